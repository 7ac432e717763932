"""``python -m megatron_vlmr1 eval --config FILE [--predictions FILE] [--output FILE] [key=value ...]``.

Scores completions on REC / OVD splits and writes a byte-reproducible JSON report plus a short table. Completions
come from a predictions file; without one, the command line runs the configured model (``eval.generate``), writes
its completions as ``predictions.jsonl`` beside the report and scores that file. Library callers may instead pass
a ``generate(records) -> completions`` callable to ``evaluate``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, Sequence

from megatron_vlmr1.config import apply_overrides, from_dict, read_yaml
from megatron_vlmr1.eval.config import EvalConfig
from megatron_vlmr1.eval.io import Prediction, SplitLine, load_predictions, load_split, write_report
from megatron_vlmr1.eval.scoring import score_ovd_split, score_rec_split

Generate = Callable[[list[dict[str, Any]]], list[str]]


def load_eval_config(path: str | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """``EvalConfig`` from a YAML file (its top-level ``eval:`` section when there is one) plus dotted overrides."""
    data = read_yaml(path) if path else {}
    if isinstance(data.get("eval"), dict):
        data = data["eval"]
    return from_dict(EvalConfig, apply_overrides(data, overrides))


def generate_predictions(
    split: str, samples: list[SplitLine], generate: Generate, batch_size: int
) -> dict[Any, Prediction]:
    """Completions for every sample from ``generate`` (called on batches of data records), keyed by sample id."""
    predictions = {}
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        completions = generate([s.record for s in batch])
        if len(completions) != len(batch) or not all(isinstance(c, str) for c in completions):
            raise ValueError(f"generate returned {len(completions)} completions for {len(batch)} samples "
                             "(expected one string per sample)")
        for sample, completion in zip(batch, completions):
            predictions[sample.id] = Prediction(split, sample.id, completion, where=f"generate({sample.where})")
    return predictions


def eval_box_space(cfg: EvalConfig) -> tuple[str, str]:
    """(resolved box space, a log line): ``auto`` asks ``model.path``'s family, as training does; no model → ``abs``."""
    from megatron_vlmr1.vlm.box_space import AUTO, describe_box_space, resolve_box_space

    if cfg.box_space != AUTO or cfg.model.path is None:
        resolved = "abs" if cfg.box_space == AUTO else cfg.box_space
        return resolved, describe_box_space(cfg.box_space, resolved, None)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(cfg.model.path)
    resolved = resolve_box_space(AUTO, hf_config)
    return resolved, describe_box_space(AUTO, resolved, hf_config.model_type)


def evaluate(cfg: EvalConfig, generate: Generate | None = None) -> dict[str, Any]:
    """The evaluation report (a JSON-ready dict) of every configured split."""
    box_space, _ = eval_box_space(cfg)
    split_samples = {split.name: load_split(split.data) for split in cfg.splits}
    if cfg.predictions is not None:
        by_key = load_predictions(cfg.predictions, [s.name for s in cfg.splits])
        predictions = {name: {} for name in split_samples}
        for (split, sample_id), prediction in by_key.items():
            predictions[split][sample_id] = prediction
        for name, samples in split_samples.items():
            known = {s.id for s in samples}
            for sample_id, prediction in predictions[name].items():
                if sample_id not in known:
                    raise ValueError(f"{prediction.where}: id {sample_id!r} is not in split {name!r}")
    elif generate is not None:
        predictions = {
            name: generate_predictions(name, samples, generate, cfg.batch_size)
            for name, samples in split_samples.items()
        }
    else:
        raise ValueError("eval needs 'predictions' (a jsonl of id/completion) or a generate callable for the model")

    splits = {}
    for split in cfg.splits:
        samples, preds = split_samples[split.name], predictions[split.name]
        if cfg.task == "rec":
            splits[split.name] = score_rec_split(samples, preds, cfg.iou_threshold, box_space, split.image_root)
        else:
            assert split.coco_gt is not None
            splits[split.name] = score_ovd_split(samples, preds, split.coco_gt, box_space, split.image_root)
    report: dict[str, Any] = {
        "task": cfg.task,
        "predictions": cfg.predictions,
        "settings": {"iou_threshold": cfg.iou_threshold, "box_space": box_space},
        "splits": splits,
    }
    if cfg.task == "rec":
        total = sum(s["num_samples"] for s in splits.values())
        correct = sum(sum(r["correct"] for r in s["records"]) for s in splits.values())
        report["overall"] = {"num_samples": total, "accuracy": correct / total if total else 0.0}
    return report


def format_table(report: dict[str, Any]) -> str:
    """A short fixed-width summary of a report, one row per split."""
    if report["task"] == "rec":
        threshold = report["settings"]["iou_threshold"]
        header = ["split", "n", "missing", f"acc@{threshold:g}", "mean_iou"]
        keys = ["num_samples", "num_missing", "accuracy", "mean_iou"]
    else:
        header = ["split", "n", "missing", "mAP", "AP50", "P@0.5", "R@0.5"]
        keys = ["num_samples", "num_missing", "map", "ap50", "precision", "recall"]
    rows = [header]
    for name, split in report["splits"].items():
        cells = [f"{split[k]:.4f}" if isinstance(split[k], float) else str(split[k]) for k in keys]
        rows.append([name, *cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None, generate: Generate | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_vlmr1 eval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML with the eval settings (or a run YAML with an 'eval:' section)")
    parser.add_argument("--predictions", help="jsonl of {id, completion[, split, image_size, resized_size]}; "
                        "without it the config's 'model' generates them")
    parser.add_argument("--output", help="where to write the JSON report (default: the config's 'output')")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. iou_threshold=0.7")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides)
    if args.predictions:
        overrides.append(f"predictions={args.predictions}")
    if args.output:
        overrides.append(f"output={args.output}")
    try:
        cfg = load_eval_config(args.config, overrides)
        if cfg.predictions is None and generate is None:
            from megatron_vlmr1.eval.generate import generate_predictions_file

            cfg = dataclasses.replace(cfg, predictions=str(generate_predictions_file(cfg)))
            print(f"predictions: {cfg.predictions}")
        print(eval_box_space(cfg)[1])
        report = evaluate(cfg, generate)
        write_report(report, cfg.output)
    except ValueError as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"report: {cfg.output}")
    return 0
