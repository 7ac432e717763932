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


def coco_bbox_stats(coco_gt: COCO, detections: list[dict[str, Any]], image_ids: list[int] | None = None) -> np.ndarray:
    """The 12 COCO bbox summary numbers (``stats[0]`` = AP@[.5:.95], ``stats[1]`` = AP50), all output silenced.

    ``detections`` are COCO result dicts (``image_id``, ``category_id``, ``bbox`` as xywh, ``score``). With no
    detections every statistic is 0 (pycocotools cannot load an empty result list). pycocotools reports -1 for
    "undefined" (no ground truth); callers decide what that means.
    """
    if not detections:
        return np.zeros(12)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=np.float64)
