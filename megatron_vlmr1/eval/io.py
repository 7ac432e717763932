"""Reading evaluation inputs (split jsonl, predictions jsonl, COCO ground truth) and writing the report.

The split reader is the one adapter between evaluation and the data format: it reads VLM-R1 jsonl directly
(``id``, ``image``, ``conversations``, optional ``solution`` / ``image_size`` / ``coco_image_id``), so scoring does
not depend on the training data pipeline. Every input error names the file and line.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_vlmr1.data import jsonl_lines


@dataclass(frozen=True)
class SplitLine:
    """One line of a split file, as scoring reads it (the training prompt built from a line is ``data.Sample``)."""

    id: str | int
    record: dict[str, Any]
    where: str  # "file:line", for error messages


@dataclass(frozen=True)
class Prediction:
    """One line of a predictions file (or one generated completion)."""

    split: str
    id: str | int
    completion: str
    image_size: Any = None
    resized_size: Any = None
    where: str = ""


def read_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``[("file:line", object), ...]`` for every non-blank line; a missing file or a bad line raises ``ValueError``
    (the first problem; the lines are read by ``data.jsonl_lines``, as training data is)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    rows = []
    for where, value, problem in jsonl_lines(path):
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
        rows.append((where, value))
    return rows


def _check_id(value: Any, where: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: 'id' must be a string or an integer, got {value!r}")
    return value


def load_split(path: str | Path) -> list[SplitLine]:
    """Samples of a split file in file order; ids must be present and unique."""
    samples = []
    seen: dict[str | int, str] = {}
    for where, record in read_jsonl(path):
        if "id" not in record:
            raise ValueError(f"{where}: missing 'id'")
        sample_id = _check_id(record["id"], where)
        if sample_id in seen:
            raise ValueError(f"{where}: duplicate id {sample_id!r} (first at {seen[sample_id]})")
        seen[sample_id] = where
        samples.append(SplitLine(sample_id, record, where))
    return samples


def sample_solution(sample: SplitLine) -> Any:
    """The reference answer: ``solution`` when present, else the last ``gpt`` turn of ``conversations``."""
    record = sample.record
    if "solution" in record:
        return record["solution"]
    turns = record.get("conversations")
    if isinstance(turns, list):
        for turn in reversed(turns):
            if isinstance(turn, dict) and turn.get("from") == "gpt":
                return turn.get("value")
    raise ValueError(f"{sample.where}: no 'solution' and no gpt turn in 'conversations'")


def _check_size(value: Any, key: str, where: str) -> Any:
    if value is None:
        return None
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 1 for v in value)
    )
    if not ok:
        raise ValueError(f"{where}: '{key}' must be [width, height] in pixels (numbers >= 1), got {value!r}")
    return value


def load_predictions(path: str | Path, split_names: list[str]) -> dict[tuple[str, str | int], Prediction]:
    """Predictions keyed by ``(split, id)``.

    A line without ``split`` belongs to the only split when there is one; with several splits it must say which.
    """
    predictions: dict[tuple[str, str | int], Prediction] = {}
    for where, row in read_jsonl(path):
        if "id" not in row:
            raise ValueError(f"{where}: missing 'id'")
        sample_id = _check_id(row["id"], where)
        completion = row.get("completion")
        if not isinstance(completion, str):
            raise ValueError(f"{where}: 'completion' must be a string, got {completion!r}")
        split = row.get("split")
        if split is None:
            if len(split_names) != 1:
                raise ValueError(f"{where}: 'split' is required when evaluating several splits {split_names}")
            split = split_names[0]
        if split not in split_names:
            raise ValueError(f"{where}: unknown split {split!r}; configured splits: {split_names}")
        key = (split, sample_id)
        if key in predictions:
            raise ValueError(f"{where}: duplicate prediction for split {split!r} id {sample_id!r} "
                             f"(first at {predictions[key].where})")
        predictions[key] = Prediction(
            split, sample_id, completion,
            _check_size(row.get("image_size"), "image_size", where),
            _check_size(row.get("resized_size"), "resized_size", where),
            where,
        )
    return predictions


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """A COCO detection ground-truth dict (``images``, ``annotations``, ``categories``), checked for those keys."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: COCO ground-truth file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
        raise ValueError(f"{path}: COCO ground truth needs lists 'images', 'annotations' and 'categories'")
    return data


def round_floats(value: Any, digits: int = 6) -> Any:
    """Round every float in a JSON-like tree, so reports are stable across platforms' last-bit differences."""
    if isinstance(value, float):
        rounded = round(value, digits)
        return 0.0 if rounded == 0 else rounded
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


def report_json(report: dict[str, Any]) -> str:
    """Canonical report text: rounded floats, sorted keys, ASCII, two-space indent, trailing newline."""
    return json.dumps(round_floats(report), sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n"


def write_report(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_json(report), encoding="utf-8")
