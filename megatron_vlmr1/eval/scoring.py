"""Split-level scores: REC accuracy at an IoU threshold, OVD COCO mAP / AP50 and greedy precision / recall.

Uses the same parsing and IoU convention as the rewards (``megatron_vlmr1.rewards``), so a model evaluated here is
scored the way it was trained. A sample without a prediction counts as a miss (IoU 0 / no detections) and is
reported in ``num_missing``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from megatron_vlmr1.data import target_image
from megatron_vlmr1.eval.io import Prediction, SplitLine, load_coco_json, sample_solution
from megatron_vlmr1.rewards.boxes import box_iou, greedy_match, iou_matrix, to_original_space
from megatron_vlmr1.rewards.coco import coco_bbox_ap, coco_from_dataset, xyxy_to_xywh
from megatron_vlmr1.rewards.parsing import LabeledBox, first_box, parse_boxes, reference_boxes

OVD_MATCH_IOU = 0.5


def _image_size(sample: SplitLine, prediction: Prediction, image_root: str | None) -> Any:
    """Original (width, height): from the prediction, the data line, or the image file's header, in that order."""
    if prediction.image_size is not None:
        return prediction.image_size
    if sample.record.get("image_size") is not None:
        return sample.record["image_size"]
    image = sample.record.get("image")
    if isinstance(image, list):
        image = image[target_image(sample.record, len(image))] if image else None
    if image_root is None or not isinstance(image, str):
        raise ValueError(
            f"{prediction.where}: box_space needs the original image size: give 'image_size' in the prediction "
            f"or the data line ({sample.where}), or set the split's 'image_root'"
        )
    path = Path(image_root) / image
    if not path.is_file():
        raise ValueError(f"{sample.where}: image {path} not found (needed for its size)")
    with Image.open(path) as handle:
        return list(handle.size)


def _coco_or_sample_size(coco_image: dict[str, Any], sample: SplitLine, prediction: Prediction,
                         image_root: str | None) -> Any:
    """Original (width, height) of an OVD sample: the prediction's, else the COCO image entry's, else as for REC."""
    if prediction.image_size is None and "width" in coco_image and "height" in coco_image:
        return [coco_image["width"], coco_image["height"]]
    return _image_size(sample, prediction, image_root)


def score_rec_split(
    samples: list[SplitLine],
    predictions: dict[Any, Prediction],
    iou_threshold: float,
    box_space: str,
    image_root: str | None = None,
) -> dict[str, Any]:
    """REC metrics of one split: ``accuracy`` = fraction with IoU > ``iou_threshold``, ``mean_iou``, per-sample records.

    ``predictions`` maps sample id → prediction. The best IoU over a sample's reference boxes counts.
    """
    records = []
    for sample in samples:
        refs = reference_boxes(sample_solution(sample))
        if not refs:
            raise ValueError(f"{sample.where}: the solution holds no valid box")
        prediction = predictions.get(sample.id)
        box = None
        if prediction is not None:
            box = first_box(prediction.completion)
            if box is not None and box_space != "abs":
                size = _image_size(sample, prediction, image_root)
                box = to_original_space(box, box_space, size, prediction.resized_size)
        iou = 0.0 if box is None else max(box_iou(box, ref) for ref in refs)
        records.append({
            "id": sample.id,
            "iou": iou,
            "correct": iou > iou_threshold,
            "pred_box": None if box is None else list(box),
            "missing": prediction is None,
        })
    count = len(records)
    return {
        "num_samples": count,
        "num_missing": sum(r["missing"] for r in records),
        "num_no_box": sum(r["pred_box"] is None and not r["missing"] for r in records),
        "accuracy": sum(r["correct"] for r in records) / count if count else 0.0,
        "mean_iou": sum(r["iou"] for r in records) / count if count else 0.0,
        "records": records,
    }


def _label(label: str | None) -> str:
    return (label or "").strip().lower()


def score_ovd_split(
    samples: list[SplitLine],
    predictions: dict[Any, Prediction],
    coco_gt_path: str | Path,
    box_space: str = "abs",
    image_root: str | None = None,
) -> dict[str, Any]:
    """OVD metrics of one split against its COCO ground truth.

    Predicted boxes are first rescaled from ``box_space`` to original-image pixels (as the OVD rewards do); the
    original size comes from the prediction, the COCO image entry, the data line or the image file, in that order.

    ``map`` / ``ap50``: pycocotools ``COCOeval`` (bbox) over the split's images; every predicted box gets score
    1.0 (completions carry no confidences), and a label that is not a COCO category name (compared after
    ``strip().lower()``) is dropped. ``precision`` / ``recall``: greedy one-to-one matching at IoU 0.5 within each
    label, per image; every valid predicted box counts in the precision denominator, unknown labels included.
    A sample's image is its ``coco_image_id`` field, else its ``id``.
    """
    dataset = load_coco_json(coco_gt_path)
    coco_gt = coco_from_dataset(dataset)
    category_ids = {_label(c.get("name")): c["id"] for c in dataset["categories"]}
    gt_by_image: dict[Any, list[tuple[Any, tuple[float, float, float, float]]]] = {}
    for ann in dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        gt_by_image.setdefault(ann["image_id"], []).append((ann["category_id"], (x, y, x + w, y + h)))

    detections: list[dict[str, Any]] = []
    records = []
    image_ids = []
    for sample in samples:
        image_id = sample.record.get("coco_image_id", sample.id)
        if image_id not in coco_gt.imgs:
            raise ValueError(f"{sample.where}: image id {image_id!r} is not in {coco_gt_path}")
        image_ids.append(image_id)
        prediction = predictions.get(sample.id)
        boxes = parse_boxes(prediction.completion) if prediction is not None else []
        if boxes and box_space != "abs":
            assert prediction is not None
            size = _coco_or_sample_size(coco_gt.imgs[image_id], sample, prediction, image_root)
            boxes = [LabeledBox(to_original_space(b.box, box_space, size, prediction.resized_size), b.label)
                     for b in boxes]
        gts = gt_by_image.get(image_id, [])
        known = [(category_ids[_label(b.label)], b.box) for b in boxes or [] if _label(b.label) in category_ids]
        detections += [
            {"image_id": image_id, "category_id": cid, "bbox": xyxy_to_xywh(box), "score": 1.0} for cid, box in known
        ]
        true_positives = 0
        for cid in sorted({c for c, _ in gts}):
            preds_c = [box for c, box in known if c == cid]
            gts_c = [box for c, box in gts if c == cid]
            true_positives += len(greedy_match(iou_matrix(preds_c, gts_c), OVD_MATCH_IOU))
        records.append({
            "id": sample.id,
            "image_id": image_id,
            "missing": prediction is None,
            "parsed": boxes is not None,
            "num_pred": len(boxes or []),
            "num_gt": len(gts),
            "true_positives": true_positives,
        })
    mean_ap, ap50 = coco_bbox_ap(coco_gt, detections, list(dict.fromkeys(image_ids))) if image_ids else (0.0, 0.0)
    num_pred = sum(r["num_pred"] for r in records)
    num_gt = sum(r["num_gt"] for r in records)
    true_positives = sum(r["true_positives"] for r in records)
    return {
        "num_samples": len(records),
        "num_missing": sum(r["missing"] for r in records),
        "num_unparseable": sum(not r["parsed"] for r in records),
        "map": mean_ap,
        "ap50": ap50,
        "num_pred_boxes": num_pred,
        "num_gt_boxes": num_gt,
        "precision": true_positives / num_pred if num_pred else 0.0,
        "recall": true_positives / num_gt if num_gt else 0.0,
        "records": records,
    }
