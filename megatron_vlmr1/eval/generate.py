"""Model inference for evaluation: the training prompts, answered greedily by a rollout engine, as a predictions file.

A model is evaluated on the prompts it was trained on: each split is read by the training data loader
(``megatron_vlmr1.data.load_samples``), so the chat messages, question template, system prompt and image handling
are the ones GRPO / SFT used, and the completions come from the same rollout engines (``hf`` or ``vllm``) with
greedy decoding. The output is an ordinary predictions file: one line per sample with ``split``, ``id``,
``completion``, and, for image samples, ``image_size`` (the original image, where reference boxes live) and
``resized_size`` (what the processor fed the model, for ``box_space: resized``) of the sample's ``target_image``.
Scoring then reads that file, so a generated evaluation and a re-scored one (``--predictions``) are the same path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from megatron_vlmr1.data import DataConfig, load_samples, target_image
from megatron_vlmr1.data import Sample as PromptSample
from megatron_vlmr1.eval.config import EvalConfig, EvalModelConfig, SplitConfig
from megatron_vlmr1.eval.io import load_split
from megatron_vlmr1.parallel import resolve_device

if TYPE_CHECKING:
    from megatron_vlmr1.rollout.base import RolloutEngine, RolloutResult, SamplingConfig

PREDICTIONS_FILE = "predictions.jsonl"


def predictions_path(cfg: EvalConfig) -> Path:
    """Where a model evaluation writes its completions: ``predictions.jsonl`` in the report's folder."""
    return Path(cfg.output).parent / PREDICTIONS_FILE


def check_model_path(model: EvalModelConfig) -> str:
    """The checkpoint directory, or a ``ValueError`` saying what to give."""
    if not model.path:
        raise ValueError("eval: give '--predictions FILE' or 'model.path' (an HF checkpoint directory, e.g. a "
                         "training run's OUTPUT_DIR/hf export) so the model can generate the completions")
    if not (Path(model.path) / "config.json").is_file():
        raise ValueError(f"eval: 'model.path' {model.path!r} is not an HF checkpoint directory (no config.json)")
    return model.path


def split_prompts(split: SplitConfig, task: str, model: EvalModelConfig) -> list[tuple[Any, PromptSample]]:
    """``(eval id, prompt sample)`` for every line of a split, in file order, built by the training data loader.

    Image paths resolve against the split's ``image_root``, else the jsonl's folder (the data loader's default).
    The ids are the split file's own (an integer stays an integer), so predictions key exactly as scoring reads them.
    """
    data_cfg = DataConfig(files=[split.data], image_folders=[split.image_root] if split.image_root else [],
                          task=model.task or task, template=model.template, system_prompt=model.system_prompt,
                          shuffle=False)
    prompts = load_samples(data_cfg)
    ids = [sample.id for sample in load_split(split.data)]
    assert [str(i) for i in ids] == [p.id for p in prompts], "eval and data loader read a split differently"
    return list(zip(ids, prompts))


def sampling_config(model: EvalModelConfig) -> "SamplingConfig":
    """One completion per prompt, greedy unless ``model.temperature`` says otherwise, seeded either way."""
    from megatron_vlmr1.rollout.base import SamplingConfig

    return SamplingConfig(n=1, temperature=model.temperature, max_new_tokens=model.max_new_tokens,
                          stop=list(model.stop), seed=model.seed)


def build_eval_engine(model: EvalModelConfig, batch_size: int, max_images_per_prompt: int) -> "RolloutEngine":
    """The configured rollout engine on ``model.path``, sized for ``batch_size`` prompts per call."""
    import torch

    from megatron_vlmr1.rollout.config import RolloutConfig, build_engine

    rollout = RolloutConfig(engine=model.engine, max_model_len=model.max_model_len, max_batch_size=batch_size,
                            max_num_seqs=batch_size, max_images_per_prompt=max(max_images_per_prompt, 1), kv_cache_gb=model.kv_cache_gb,
                            gpu_memory_utilization=model.gpu_memory_utilization)
    # vLLM places itself
    device = resolve_device(model.device, key="eval: 'model.device'") if model.engine == "hf" else "cpu"
    return build_engine(rollout, check_model_path(model), getattr(torch, model.dtype), device=device)


def prediction_row(split: str, sample_id: Any, prompt: PromptSample, result: "RolloutResult") -> dict[str, Any]:
    """One predictions-file line; sizes are ``[width, height]`` of the sample's ``target_image`` (None: no image)."""
    row: dict[str, Any] = {"split": split, "id": sample_id, "completion": result.completions[0].text,
                           "image_size": None, "resized_size": None}
    if prompt.image_paths:
        index = target_image(prompt.extra, len(prompt.image_paths))
        width, height = prompt.image_sizes[index]
        resized_height, resized_width = result.images[index].resized
        row["image_size"] = [width, height]
        row["resized_size"] = [resized_width, resized_height]
    return row


def generate_split(engine: "RolloutEngine", split: str, prompts: Sequence[tuple[Any, PromptSample]],
                   sampling: "SamplingConfig", batch_size: int) -> list[dict[str, Any]]:
    """Prediction rows for a split's prompts, generated ``batch_size`` prompts at a time, in file order."""
    from megatron_vlmr1.rollout.base import RolloutRequest

    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        results = engine.generate([RolloutRequest(p.messages, list(p.image_paths)) for _, p in batch], sampling)
        rows.extend(prediction_row(split, sample_id, prompt, result) for (sample_id, prompt), result
                    in zip(batch, results))
    return rows


def write_predictions(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Canonical jsonl (sorted keys, ASCII), so the same completions always give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, sort_keys=True, ensure_ascii=True) + "\n" for row in rows),
                    encoding="utf-8")


def generate_predictions_file(cfg: EvalConfig, engine: "RolloutEngine | None" = None) -> Path:
    """Run the model on every split and write ``predictions_path(cfg)``; return that path.

    Every split is loaded and checked before the engine starts, so a bad data line fails in seconds, not after a
    model load. ``engine`` defaults to the one ``cfg.model`` describes.
    """
    if engine is None:
        check_model_path(cfg.model)
        if cfg.model.engine == "hf":
            resolve_device(cfg.model.device, key="eval: 'model.device'")
    prompts = {split.name: split_prompts(split, cfg.task, cfg.model) for split in cfg.splits}
    if engine is None:
        most_images = max((len(p.image_paths) for rows in prompts.values() for _, p in rows), default=1)
        engine = build_eval_engine(cfg.model, cfg.batch_size, most_images)
    sampling = sampling_config(cfg.model)
    rows = [row for name, split_rows in prompts.items()
            for row in generate_split(engine, name, split_rows, sampling, cfg.batch_size)]
    path = predictions_path(cfg)
    write_predictions(rows, path)
    return path
