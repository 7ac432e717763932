"""Box geometry shared by the rewards and the evaluation: IoU, greedy matching, coordinate spaces.

Pixel convention: boxes are continuous ``(x1, y1, x2, y2)`` with area ``(x2 - x1) * (y2 - y1)`` (no ``+1``), which
is the convention of pycocotools' bbox IoU, so the REC reward, the OVD rewards and COCO evaluation agree. (VLM-R1's
REC ``iou`` mixes a ``+1`` intersection with a ``+0`` union; we do not reproduce that.)

Coordinate spaces a model may answer in (``box_space``):

- ``"abs"``: absolute pixels of the original image (what the ground truth uses).
- ``"resized"``: pixels of the image the processor fed the model (Qwen2-VL resizes to multiples of 28); rescaled
  to the original with ``image_size = (orig_w, orig_h)`` and ``resized_size = (resized_w, resized_h)``.
- ``"norm1000"``: 0..1000 normalised coordinates (Qwen2-VL / InternVL grounding convention), scaled by
  ``orig_w / 1000`` and ``orig_h / 1000``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from megatron_vlmr1.rewards.parsing import Box, _coord
from megatron_vlmr1.rewards.registry import RewardFieldError

BOX_SPACES = ("abs", "resized", "norm1000")


def box_iou(a: Box, b: Box) -> float:
    """IoU of two valid boxes in [0, 1]; 0 when the union is empty (two degenerate boxes)."""
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(inter_w, 0.0) * max(inter_h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0.0:
        return 0.0
    return min(max(inter / union, 0.0), 1.0)


def iou_matrix(preds: Sequence[Box], gts: Sequence[Box]) -> np.ndarray:
    """Pairwise IoU, ``[len(preds), len(gts)]`` float64, same convention as ``box_iou``."""
    if not preds or not gts:
        return np.zeros((len(preds), len(gts)))
    p = np.asarray(preds, dtype=np.float64)[:, None, :]
    g = np.asarray(gts, dtype=np.float64)[None, :, :]
    inter = np.clip(np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]), 0, None) * np.clip(
        np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]), 0, None
    )
    area_p = (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])
    area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
    union = area_p + area_g - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return np.clip(iou, 0.0, 1.0)


def greedy_match(iou: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching: repeatedly take the highest-IoU unmatched (pred, gt) pair with IoU >= threshold.

    ``iou`` is ``[num_pred, num_gt]``. Ties go to the lower pred index, then the lower gt index (VLM-R1's scan
    order). Returns ``(pred_idx, gt_idx, iou)`` in matching order. Sorting all pairs once is equivalent to
    repeated arg-max and costs O(P·G log(P·G)) instead of O(min(P,G)·P·G).
    """
    if iou.size == 0:
        return []
    flat = iou.ravel()
    order = np.argsort(-flat, kind="stable")
    used_pred: set[int] = set()
    used_gt: set[int] = set()
    matches = []
    num_gt = iou.shape[1]
    for index in order:
        value = float(flat[index])
        if value < threshold:
            break
        pred, gt = divmod(int(index), num_gt)
        if pred in used_pred or gt in used_gt:
            continue
        used_pred.add(pred)
        used_gt.add(gt)
        matches.append((pred, gt, value))
        if len(used_pred) == iou.shape[0] or len(used_gt) == num_gt:
            break
    return matches


def _size(value: Any, name: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RewardFieldError(f"{name} must be (width, height), got {value!r}")
    w, h = (_coord(v) for v in value)
    if w is None or h is None or w < 1 or h < 1:
        raise RewardFieldError(f"{name} must be two numbers >= 1 (pixels), got {value!r}")
    return w, h


def to_original_space(box: Box, box_space: str, image_size: Any = None, resized_size: Any = None) -> Box:
    """Rescale a predicted box from ``box_space`` to absolute pixels of the original image.

    Raises ``RewardFieldError`` (a ``ValueError``) for an unknown space or a missing / malformed ``image_size`` /
    ``resized_size``.
    """
    if box_space == "abs":
        return box
    if box_space not in BOX_SPACES:
        raise RewardFieldError(f"box_space must be one of {list(BOX_SPACES)}, got {box_space!r}")
    orig_w, orig_h = _size(image_size, "image_size")
    if box_space == "resized":
        from_w, from_h = _size(resized_size, "resized_size")
    else:
        from_w, from_h = 1000.0, 1000.0
    sx, sy = orig_w / from_w, orig_h / from_h
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    assert all(math.isfinite(c) for c in scaled)
    return scaled
