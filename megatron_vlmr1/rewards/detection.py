"""Grounding rewards: ``iou`` (REC) and ``ap`` / ``ap50`` / ``map_len`` / ``weighted_sum`` (open-vocabulary detection).

REC answers hold one box (``{"bbox_2d": [...]}`` or a bare ``[x1, y1, x2, y2]``; the first box is used). OVD answers
hold a JSON list ``[{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}, ...]`` (optionally in a ```json fence), or
``None`` / ``[]`` for "no objects". Ground truth (``solution``) uses the same shapes, as text or already parsed.

OVD rules (VLM-R1's semantics, made explicit):

- labels are compared after ``strip().lower()``; a predicted label that is not among the ground-truth labels is
  dropped before COCO evaluation (it cannot be scored against a category that does not exist);
- no ground-truth boxes: 1.0 only for an answer block that explicitly says "nothing" (``None`` / ``[]``, see
  ``says_no_objects``); an empty completion, or one without ``<answer>``, scores 0.0 (else the policy learns that
  saying nothing is free on every "None" sample); ground truth present but no predicted boxes → 0.0; an unparseable
  answer → 0.0;
- ``map_len`` multiplies AP@[.5:.95] by ``min(1, L_gt / L_pred)`` where ``L_pred`` counts every valid predicted box,
  including dropped labels, so padding the answer with junk labels is still penalised;
- COCO evaluation keeps at most 100 detections per category (pycocotools' ``maxDets``); all scores are 1.0, so
  ties keep the answer's order;
- predicted boxes are rescaled from ``box_space`` to the original image first, as for ``iou`` (InternVL and
  Qwen2-VL answer in 0-1000 coordinates, the ground truth is in pixels).
"""
from __future__ import annotations

from typing import Any

from megatron_vlmr1.rewards.boxes import box_iou, greedy_match, iou_matrix, to_original_space
from megatron_vlmr1.rewards.coco import coco_bbox_ap, coco_from_dataset, xyxy_to_xywh
from megatron_vlmr1.rewards.parsing import (LabeledBox, boxes_from_json, first_box, parse_boxes, reference_boxes,
                                            says_no_objects)
from megatron_vlmr1.rewards.registry import register_sample_reward

WEIGHTED_SUM_IOU = 0.5
WEIGHTED_SUM_POSITION = 0.7


@register_sample_reward("iou")
def iou_reward(
    text: str,
    /,
    solution: Any = None,
    box_space: str = "abs",
    image_size: Any = None,
    resized_size: Any = None,
    image_sizes: Any = None,
    target_image: Any = None,
    **_: Any,
) -> float:
    """Continuous IoU of the answer's first box with the best-matching reference box (max over references).

    The prediction is rescaled from ``box_space`` (``abs`` / ``resized`` / ``norm1000``, see ``boxes.py``) to the
    original image, where the references live. The original size is ``image_size`` (w, h), or, as the data loader
    provides it, ``image_sizes[target_image]`` (``target_image`` defaults to 0). No box, or no reference → 0.0.
    """
    pred = first_box(text)
    refs = reference_boxes(solution)
    if pred is None or not refs:
        return 0.0
    pred = to_original_space(pred, box_space, _original_size(image_size, image_sizes, target_image), resized_size)
    return max(box_iou(pred, ref) for ref in refs)


def _original_size(image_size: Any, image_sizes: Any, target_image: Any) -> Any:
    """``image_size`` (w, h), else the data loader's ``image_sizes[target_image]`` (``target_image`` defaults to 0)."""
    if image_size is None and isinstance(image_sizes, (list, tuple)) and image_sizes:
        index = target_image if isinstance(target_image, int) and 0 <= target_image < len(image_sizes) else 0
        return image_sizes[index]
    return image_size


def _predicted_boxes(text: str, box_space: str, image_size: Any, image_sizes: Any, target_image: Any,
                     resized_size: Any) -> list[LabeledBox]:
    """The answer's labelled boxes rescaled from ``box_space`` to the original image (as ``iou`` does)."""
    preds = parse_boxes(text) or []
    if box_space == "abs" or not preds:
        return preds
    size = _original_size(image_size, image_sizes, target_image)
    return [LabeledBox(to_original_space(p.box, box_space, size, resized_size), p.label) for p in preds]


def _label(box: LabeledBox) -> str:
    return (box.label or "").strip().lower()


def ovd_ground_truth(solution: Any) -> list[LabeledBox]:
    """Ground-truth labelled boxes from a solution (text or parsed JSON); anything unparseable means no boxes."""
    if isinstance(solution, str):
        parsed = parse_boxes(solution)
    else:
        parsed = boxes_from_json(solution) if solution is not None else []
    return parsed or []


def single_image_ap(preds: list[LabeledBox], gts: list[LabeledBox]) -> tuple[float, float]:
    """(AP@[.5:.95], AP50) of ``preds`` against ``gts`` on one image with pycocotools; both lists non-empty."""
    assert preds and gts
    category_ids: dict[str, int] = {}
    for box in gts:
        category_ids.setdefault(_label(box), len(category_ids) + 1)
    annotations = [
        {
            "id": i + 1,
            "image_id": 1,
            "category_id": category_ids[_label(box)],
            "bbox": xyxy_to_xywh(box.box),
            "area": (box.box[2] - box.box[0]) * (box.box[3] - box.box[1]),
            "iscrowd": 0,
        }
        for i, box in enumerate(gts)
    ]
    dataset = {
        "images": [{"id": 1, "width": 1, "height": 1}],
        "annotations": annotations,
        "categories": [{"id": cid, "name": name} for name, cid in category_ids.items()],
    }
    detections = [
        {"image_id": 1, "category_id": category_ids[_label(box)], "bbox": xyxy_to_xywh(box.box), "score": 1.0}
        for box in preds
        if _label(box) in category_ids
    ]
    return coco_bbox_ap(coco_from_dataset(dataset), detections)


def _ovd_score(text: str, solution: Any, use_ap50: bool, length_penalty: bool, box_space: str, image_size: Any,
               resized_size: Any, image_sizes: Any, target_image: Any) -> float:
    gts = ovd_ground_truth(solution)
    if not gts:
        return 1.0 if says_no_objects(text) else 0.0
    preds = _predicted_boxes(text, box_space, image_size, image_sizes, target_image, resized_size)
    if not preds:
        return 0.0
    ap, ap50 = single_image_ap(preds, gts)
    score = ap50 if use_ap50 else ap
    if length_penalty:
        score *= min(1.0, len(gts) / len(preds))
    return score


@register_sample_reward("ap")
def ap_reward(text: str, /, solution: Any = None, box_space: str = "abs", image_size: Any = None,
              resized_size: Any = None, image_sizes: Any = None, target_image: Any = None, **_: Any) -> float:
    """COCO AP@[.5:.95] of the answer's labelled boxes against the solution's (one image)."""
    return _ovd_score(text, solution, use_ap50=False, length_penalty=False, box_space=box_space, image_size=image_size,
                      resized_size=resized_size, image_sizes=image_sizes, target_image=target_image)


@register_sample_reward("ap50")
def ap50_reward(text: str, /, solution: Any = None, box_space: str = "abs", image_size: Any = None,
                resized_size: Any = None, image_sizes: Any = None, target_image: Any = None, **_: Any) -> float:
    """COCO AP at IoU 0.5 of the answer's labelled boxes against the solution's (one image)."""
    return _ovd_score(text, solution, use_ap50=True, length_penalty=False, box_space=box_space, image_size=image_size,
                      resized_size=resized_size, image_sizes=image_sizes, target_image=target_image)


@register_sample_reward("map_len")
def map_len_reward(text: str, /, solution: Any = None, box_space: str = "abs", image_size: Any = None,
                   resized_size: Any = None, image_sizes: Any = None, target_image: Any = None, **_: Any) -> float:
    """AP@[.5:.95] times the redundancy penalty ``min(1, L_gt / L_pred)`` (VLM-R1's ``odLength``)."""
    return _ovd_score(text, solution, use_ap50=False, length_penalty=True, box_space=box_space, image_size=image_size,
                      resized_size=resized_size, image_sizes=image_sizes, target_image=target_image)


@register_sample_reward("weighted_sum")
def weighted_sum_reward(text: str, /, solution: Any = None, box_space: str = "abs", image_size: Any = None,
                        resized_size: Any = None, image_sizes: Any = None, target_image: Any = None,
                        **_: Any) -> float:
    """``0.7 * position + 0.3 * completeness`` with greedy matching at IoU 0.5 (VLM-R1's ``detection_score``).

    position = sum of matched IoUs / L_gt, where a match with the wrong label contributes 0 (but still consumes
    both boxes); completeness = 1 - (missed GT fraction + unmatched prediction fraction) / 2. Matching ignores
    labels, as in VLM-R1's ``detection_score``.
    """
    gts = ovd_ground_truth(solution)
    if not gts:
        return 1.0 if says_no_objects(text) else 0.0
    preds = _predicted_boxes(text, box_space, image_size, image_sizes, target_image, resized_size)
    if not preds:
        return 0.0
    matches = greedy_match(iou_matrix([p.box for p in preds], [g.box for g in gts]), WEIGHTED_SUM_IOU)
    position = sum(iou for p, g, iou in matches if _label(preds[p]) == _label(gts[g])) / len(gts)
    miss_rate = (len(gts) - len(matches)) / len(gts)
    false_alarm_rate = (len(preds) - len(matches)) / len(preds)
    completeness = 1.0 - (miss_rate + false_alarm_rate) / 2.0
    return WEIGHTED_SUM_POSITION * position + (1.0 - WEIGHTED_SUM_POSITION) * completeness
