"""Evaluation scoring: REC accuracy at an IoU threshold and OVD COCO mAP, from predictions or a generate callable."""
from megatron_vlmr1.eval.config import EvalConfig, SplitConfig

__all__ = ["EvalConfig", "SplitConfig"]
