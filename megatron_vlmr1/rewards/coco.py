"""Thin, silent wrappers over pycocotools for in-memory COCO ``bbox`` evaluation.

pycocotools prints progress on every call (``creating index...``, the summary table); a reward runs thousands of
times per step, so all of its output is captured here. Used by the OVD rewards (one image per sample) and by the
split-level OVD evaluation.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def xyxy_to_xywh(box: tuple[float, float, float, float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def coco_from_dataset(dataset: dict[str, Any]) -> COCO:
    """A ``COCO`` index over an in-memory dataset dict (``images``, ``annotations``, ``categories``)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_bbox_ap(
    coco_gt: COCO, detections: list[dict[str, Any]], image_ids: list[int] | None = None
) -> tuple[float, float]:
    """(AP@[.5:.95], AP50) of COCO ``bbox`` evaluation, as ``COCOeval.summarize`` reports them in ``stats[0:2]``.

    ``detections`` are COCO result dicts (``image_id``, ``category_id``, ``bbox`` as xywh, ``score``). Only the
    area range "all" and ``maxDets=100`` are evaluated (the two numbers use nothing else), which skips two thirds
    of pycocotools' work and its summary printout; the parity test against plain ``COCOeval`` guards this.
    "Undefined" (pycocotools' -1, e.g. no detections or no ground truth) is returned as 0.0.
    """
    if not detections:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = image_ids
        evaluator.params.areaRng = [[0, 1e10]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.params.maxDets = [100]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, 0]  # [iou_thresholds, recall_points, categories]
    at_50 = precision[evaluator.params.iouThrs == 0.5]
    return _mean_defined(precision), _mean_defined(at_50)


def _mean_defined(precision: np.ndarray) -> float:
    defined = precision[precision > -1]
    return float(np.mean(defined)) if defined.size else 0.0
