"""Evaluation config: which splits, which task, where predictions come from, where the report goes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_vlmr1.rewards.boxes import BOX_SPACES


@dataclass
class SplitConfig:
    """One evaluation split: a VLM-R1 jsonl file, plus the COCO ground truth for OVD.

    ``image_root`` is only needed when boxes must be rescaled (``box_space`` other than ``abs``) and neither the
    prediction nor the data line carries ``image_size``: the original size is then read from the image header.
    """

    name: str
    data: str
    coco_gt: str | None = None
    image_root: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"eval split: 'name' must be a non-empty string, got {self.name!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"eval split {self.name!r}: 'data' must be a jsonl path")


@dataclass
class EvalConfig:
    """``task``: ``rec`` (accuracy at IoU > ``iou_threshold``) or ``ovd`` (COCO mAP / AP50, greedy P/R at IoU 0.5).

    ``predictions``: jsonl with ``id``, ``completion`` and optional ``split`` / ``image_size`` / ``resized_size``;
    without it, completions come from a ``generate`` callable (model inference, wired by the caller).
    ``box_space``: coordinate space of predicted REC boxes (see ``megatron_vlmr1.rewards.boxes``).
    """

    task: Literal["rec", "ovd"] = "rec"
    splits: list[SplitConfig] = field(default_factory=list)
    predictions: str | None = None
    output: str = "eval_report.json"
    iou_threshold: float = 0.5
    box_space: Literal["abs", "resized", "norm1000"] = "abs"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.task not in ("rec", "ovd"):
            raise ValueError(f"eval: 'task' must be 'rec' or 'ovd', got {self.task!r}")
        if not self.splits:
            raise ValueError("eval: 'splits' must list at least one {name, data} split")
        if any(not isinstance(s, SplitConfig) for s in self.splits):
            raise ValueError("eval: every entry of 'splits' must be a SplitConfig ({name, data, coco_gt, image_root})")
        names = [s.name for s in self.splits]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"eval: split name(s) {duplicates} appear more than once in 'splits'")
        if self.task == "ovd":
            missing = [s.name for s in self.splits if not s.coco_gt]
            if missing:
                raise ValueError(f"eval: task 'ovd' needs 'coco_gt' (COCO ground-truth json) for split(s) {missing}")
        if not 0.0 <= self.iou_threshold < 1.0:
            raise ValueError(f"eval: 'iou_threshold' must be in [0, 1), got {self.iou_threshold}")
        if self.box_space not in BOX_SPACES:
            raise ValueError(f"eval: 'box_space' must be one of {list(BOX_SPACES)}, got {self.box_space!r}")
        if self.batch_size < 1:
            raise ValueError(f"eval: 'batch_size' must be >= 1, got {self.batch_size}")
        if not self.output:
            raise ValueError("eval: 'output' must be a file path for the JSON report")
