"""Evaluation config: which splits and task, where predictions come from (a file or a model), where reports go."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_vlmr1.data.templates import question_template
from megatron_vlmr1.rewards.boxes import BOX_SPACES

ENGINES = ("hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


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
class EvalModelConfig:
    """The model that answers when no predictions file is given: an HF checkpoint run by a rollout engine.

    ``path``: an HF checkpoint directory, e.g. a training run's ``OUTPUT_DIR/hf`` export. Decoding is greedy
    (``temperature`` 0) by default, so an evaluation is deterministic. Prompts are worded as the training data loader
    words them: ``task`` names the question template (``rec``, ``ovd`` = ``odLength``, ``default``, ``ic``; empty:
    the evaluation's own task), ``template`` / ``system_prompt`` override it exactly as ``data.template`` /
    ``data.system_prompt`` do in training; a data line's own ``task`` key still wins, as in training.
    ``device`` places the transformers engine's model (``auto``: CUDA when available); vLLM picks its own device.
    ``kv_cache_gb`` / ``gpu_memory_utilization`` only concern vLLM.
    """

    path: str | None = None
    engine: Literal["hf", "vllm"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    max_model_len: int = 4096
    task: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    kv_cache_gb: int = 1
    gpu_memory_utilization: float = 0.5

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ValueError(f"eval: 'model.path' must be an HF checkpoint directory, got {self.path!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"eval: 'model.engine' must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"eval: 'model.dtype' must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"eval: 'model.device' must be one of {list(DEVICES)}, got {self.device!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"eval: 'model.max_new_tokens' must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"eval: 'model.temperature' must be >= 0 (0 = greedy), got {self.temperature}")
        if self.seed < 0:
            raise ValueError(f"eval: 'model.seed' must be >= 0, got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"eval: 'model.stop' must be a list of non-empty strings, got {self.stop!r}")
        if self.max_model_len < 2:
            raise ValueError(f"eval: 'model.max_model_len' must be >= 2, got {self.max_model_len}")
        if self.task is not None:
            try:
                question_template(self.task)
            except ValueError as err:
                raise ValueError(f"eval: 'model.task': {err}") from None
        if self.template is not None and "{Question}" not in self.template:
            raise ValueError(f"eval: 'model.template' must contain '{{Question}}', got {self.template!r}")
        if self.kv_cache_gb < 1:
            raise ValueError(f"eval: 'model.kv_cache_gb' must be >= 1, got {self.kv_cache_gb}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"eval: 'model.gpu_memory_utilization' must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")


@dataclass
class EvalConfig:
    """``task``: ``rec`` (accuracy at IoU > ``iou_threshold``) or ``ovd`` (COCO mAP / AP50, greedy P/R at IoU 0.5).

    ``predictions``: jsonl with ``id``, ``completion`` and optional ``split`` / ``image_size`` / ``resized_size``;
    without it, the command line runs ``model`` and writes ``predictions.jsonl`` beside ``output`` (library callers
    may pass a ``generate`` callable instead). ``batch_size``: prompts per generation call (and engine batch).
    ``box_space``: coordinate space of predicted boxes, REC and OVD (see ``megatron_vlmr1.rewards.boxes``); ``auto``
    (the default, as in training) is the convention of ``model.path``'s family, or ``abs`` when no model is given.
    """

    task: Literal["rec", "ovd"] = "rec"
    splits: list[SplitConfig] = field(default_factory=list)
    predictions: str | None = None
    output: str = "eval_report.json"
    iou_threshold: float = 0.5
    box_space: Literal["auto", "abs", "resized", "norm1000"] = "auto"
    batch_size: int = 8
    model: EvalModelConfig = field(default_factory=EvalModelConfig)

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
        if self.box_space not in ("auto", *BOX_SPACES):
            raise ValueError(f"eval: 'box_space' must be one of {['auto', *BOX_SPACES]}, got {self.box_space!r}")
        if self.batch_size < 1:
            raise ValueError(f"eval: 'batch_size' must be >= 1, got {self.batch_size}")
        if not self.output:
            raise ValueError("eval: 'output' must be a file path for the JSON report")
