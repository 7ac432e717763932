"""VLM-R1's REC recipe format: a YAML list of ``.json`` files of ``{image, problem, solution, ...}`` records.

VLM-R1's ``grpo_rec.py`` reads ``data_config/rec.yaml``::

    datasets:
      - json_path: /data/rec_jsons_processed/refcoco_train.json
      - json_path: /data/rec_jsons_processed/refcocog_train.json
        sampling_strategy: first:1000        # all | first:N | end:N | random:N; N may be a percentage, "10%"

and joins each record's ``image`` with its ``--image_root``. A record (the ``rec_jsons_processed`` layout) is
``{"image": "train2014/COCO_....jpg", "problem": "the man on the left", "solution": [x1, y1, x2, y2],
"normal_caption": ...}``. Here the YAML (or one such ``.json``) is an entry of ``data.files``; its paired
``data.image_folders`` entry plays ``--image_root`` (an entry's own ``image_folder`` key wins; with neither, images
are relative to the ``.json`` file's folder). Each record becomes a jsonl-form record (``<image>`` + problem as
the human turn, the solution as JSON as the gpt turn, ``task: rec``; other keys stay extra reward fields) and goes
through the same validation as a jsonl line; problems are reported as ``file.json[INDEX]``.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from megatron_vlmr1.data.schema import IMAGE_TOKEN, Row, check_records, image_list

SAMPLING_KINDS = ("all", "first", "end", "random")


@dataclass(frozen=True)
class RecSource:
    """One ``datasets`` entry of a VLM-R1 data YAML."""

    json_path: str
    image_folder: str | None = None
    sampling_strategy: str = "all"
    where: str = ""  # "rec.yaml: datasets[2]", for errors


def _sampling(strategy: Any, where: str) -> tuple[str, str | None]:
    """(kind, count text) of ``all`` / ``first:N`` / ``end:N`` / ``random:N`` (N an integer or ``P%``)."""
    if not isinstance(strategy, str):
        raise ValueError(f"{where}: 'sampling_strategy' must be a string like 'first:1000', got {strategy!r}")
    kind, _, count = strategy.partition(":")
    if kind not in SAMPLING_KINDS or (kind == "all") != (count == ""):
        raise ValueError(f"{where}: sampling_strategy {strategy!r}; expected 'all' or one of "
                         f"{list(SAMPLING_KINDS[1:])} with ':N' or ':P%'")
    number = count[:-1] if count.endswith("%") else count
    if count and not (number.isdigit() and int(number) > 0):
        raise ValueError(f"{where}: sampling_strategy {strategy!r}: N must be a positive integer or percentage")
    return kind, count or None


def read_data_yaml(path: str | Path) -> list[RecSource]:
    """The ``datasets`` list of a VLM-R1 data YAML; relative ``json_path`` / ``image_folder`` are from the YAML's
    folder. Every entry is checked (a string ``json_path``, a known ``sampling_strategy``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: malformed YAML ({err})") from None
    datasets = content.get("datasets") if isinstance(content, dict) else None
    if not isinstance(datasets, list) or not datasets:
        raise ValueError(f"{path}: expected 'datasets: [{{json_path: ...}}, ...]' (VLM-R1's data YAML)")
    sources = []
    for i, entry in enumerate(datasets):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str) or not entry["json_path"]:
            raise ValueError(f"{where}: expected a mapping with a 'json_path' string, got {entry!r}")
        unknown = sorted(set(entry) - {"json_path", "image_folder", "sampling_strategy"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: json_path, image_folder, sampling_strategy")
        strategy = entry.get("sampling_strategy", "all")
        _sampling(strategy, where)
        folder = entry.get("image_folder")
        if folder is not None and (not isinstance(folder, str) or not folder):
            raise ValueError(f"{where}: 'image_folder' must be a directory path, got {folder!r}")
        sources.append(RecSource(str(path.parent / entry["json_path"]),
                                 None if folder is None else str(path.parent / folder), strategy, where))
    return sources


def sample_rows(rows: list[Row], strategy: str, seed: int, where: str) -> list[Row]:
    """VLM-R1's ``sampling_strategy`` on one file's rows (``random`` is seeded, so runs are reproducible)."""
    kind, count = _sampling(strategy, where)
    if count is None:
        return rows
    number = math.ceil(int(count[:-1]) * len(rows) / 100) if count.endswith("%") else int(count)
    if kind == "first":
        return rows[:number]
    if kind == "end":
        return rows[-number:]
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:number]


def _solution_text(solution: Any) -> str:
    return solution if isinstance(solution, str) else json.dumps(solution)


def as_conversation(record: dict[str, Any]) -> dict[str, Any]:
    """A REC record in the jsonl form the rest of the loader reads (``task: rec`` unless the record says)."""
    rest = {k: v for k, v in record.items() if k not in ("problem", "solution")}
    images = len(image_list(record)) if isinstance(record.get("image"), (str, list)) else 0
    rest.setdefault("task", "rec")
    rest["conversations"] = [
        {"from": "human", "value": IMAGE_TOKEN * images + record["problem"]},
        {"from": "gpt", "value": _solution_text(record["solution"])},
    ]
    return rest


def _json_entries(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        yield f"{path}", None, f"malformed JSON ({err.msg} at line {err.lineno} column {err.colno})"
        return
    if not isinstance(records, list):
        yield f"{path}", None, f"expected a JSON array of records, got {type(records).__name__}"
        return
    for index, record in enumerate(records):
        where = f"{path}[{index}]"
        if not isinstance(record, dict):
            yield where, None, f"expected a JSON object, got {type(record).__name__}"
            continue
        missing = [key for key in ("problem", "solution") if key not in record]
        if missing:
            yield where, None, f"missing key(s) {missing} (a REC record is {{image, problem, solution, ...}})"
        elif not isinstance(record["problem"], str) or IMAGE_TOKEN in record["problem"]:
            yield where, None, f"'problem' must be a string without '{IMAGE_TOKEN}', got {record['problem']!r}"
        elif isinstance(record["solution"], bool) or not isinstance(record["solution"], (str, list, int, float)):
            yield where, None, f"'solution' must be a box list or a string, got {record['solution']!r}"
        else:
            yield where, as_conversation(record), None


def read_rec_json(path: str | Path, image_folder: str | Path, *, min_image_side: int = 28, max_errors: int = 20,
                  verify_images: bool = True) -> list[Row]:
    """Parse and check one VLM-R1 REC ``.json`` array; one ``ValueError`` lists its problems as ``file[INDEX]``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    return check_records(path, Path(image_folder), _json_entries(path), min_image_side=min_image_side,
                         max_errors=max_errors, verify_images=verify_images)
