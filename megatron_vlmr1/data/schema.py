"""Up-front validation of VLM-R1 jsonl files: every problem reported with ``file.jsonl:LINE``, nothing silent.

A run that dies at step 3,000 on a corrupt image, or silently trains on a prompt whose ``<image>`` placeholders do not
match its images, wastes a cluster allocation; so every line and every image is checked before training starts, and
all problems of a file (up to a cap) are raised together in one ``ValueError``.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from PIL import Image

from megatron_vlmr1.data.templates import known_tasks
from megatron_vlmr1.rewards.text import accuracy_methods

IMAGE_TOKEN = "<image>"  # VLM-R1's marker for "an image goes here" in a question
ImageInput = Union[str, os.PathLike, Image.Image]


@dataclass(frozen=True)
class Row:
    """One valid jsonl line: its record and its images, resolved against the file's image folder."""

    source: str  # "path/to/file.jsonl:17"
    record: dict[str, Any]
    image_paths: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]  # (width, height) of each image as stored on disk


def image_list(record: dict) -> list[str]:
    """``image`` as a list: a string is one image, a missing key is a text-only row."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def _record_problems(record: Any) -> list[str]:
    """Structural problems of one parsed line (no file access)."""
    if not isinstance(record, dict):
        return [f"expected a JSON object, got {type(record).__name__}"]
    problems = []
    image = record.get("image")
    image_ok = "image" not in record or (isinstance(image, str) and bool(image)) or (
        isinstance(image, list) and bool(image) and all(isinstance(p, str) and p for p in image))
    if not image_ok:
        problems.append(f"'image' must be a path or a non-empty list of paths, got {image!r}")
    if "id" in record and not isinstance(record["id"], (str, int)):
        problems.append(f"'id' must be a string or an integer, got {record['id']!r}")
    for key in ("accu_reward_method", "task"):
        if key in record and not (isinstance(record[key], str) and record[key]):
            problems.append(f"'{key}' must be a non-empty string, got {record[key]!r}")
    if "task" in record and isinstance(record["task"], str) and record["task"] not in known_tasks():
        problems.append(f"unknown task {record['task']!r}; known: {known_tasks()}")
    method = record.get("accu_reward_method")
    if isinstance(method, str) and method and method not in accuracy_methods():
        problems.append(f"unknown accu_reward_method {method!r}; known: {accuracy_methods()}")
    if "conversations" not in record:
        return problems + ["missing key 'conversations'"]
    turns = record["conversations"]
    if not isinstance(turns, list) or len(turns) < 2:
        return problems + ["'conversations' must be a list of at least two turns (human, gpt)"]
    turn_problems = []
    for i, (turn, role) in enumerate(zip(turns[:2], ("human", "gpt"))):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            turn_problems.append(f"conversations[{i}] must be an object with 'from' and 'value'")
        elif turn["from"] != role:
            turn_problems.append(f"conversations[{i}]['from'] must be {role!r}, got {turn['from']!r}")
    if turn_problems:
        return problems + turn_problems
    question, answer = turns[0]["value"], turns[1]["value"]
    if not isinstance(question, str):
        problems.append(f"conversations[0]['value'] must be a string, got {type(question).__name__}")
    elif image_ok and question.count(IMAGE_TOKEN) != len(image_list(record)):
        problems.append(f"{question.count(IMAGE_TOKEN)} '{IMAGE_TOKEN}' placeholder(s) in the question but "
                        f"{len(image_list(record))} image(s)")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        problems.append(f"conversations[1]['value'] must be a string or a number, got {answer!r}")
    return problems


def _image_problem(path: Path, verify: bool) -> tuple[str | None, tuple[int, int]]:
    """(problem or None, (width, height)); ``verify`` decodes all pixels, catching truncated or corrupt files."""
    if not path.is_file():
        return f"image not found: {path}", (0, 0)
    try:
        with Image.open(path) as image:
            size = image.size
            if verify:
                image.load()
    except Exception as err:  # PIL raises many types for bad files; all of them mean "unreadable"
        return f"cannot read image {path}: {type(err).__name__}: {err}", (0, 0)
    return None, size


def jsonl_lines(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """``("file:line", value, problem)`` for every non-blank line of a jsonl file: the parsed JSON value and None,
    or None and what is wrong with the line. The one jsonl reader of training data and evaluation inputs."""
    with Path(path).open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line), None
            except json.JSONDecodeError as err:
                yield where, None, f"malformed JSON ({err.msg} at column {err.colno})"


def check_records(path: Path, folder: Path, entries: Iterable[tuple[str, Any, str | None]], *, min_image_side: int,
                  max_errors: int, verify_images: bool) -> list[Row]:
    """Validate ``(where, record, parse error)`` entries of one file; raise one ``ValueError`` listing its problems.

    The checks every reader shares (jsonl lines, VLM-R1 REC json records): record structure, then every image.
    """
    rows: list[Row] = []
    errors: list[str] = []
    for where, record, parse_error in entries:
        if len(errors) >= max_errors:
            errors.append(f"{path}: stopped after {max_errors} problems")
            break
        if parse_error is not None:
            errors.append(f"{where}: {parse_error}")
            continue
        problems = _record_problems(record)
        if problems:
            errors.extend(f"{where}: {p}" for p in problems)
            continue
        paths, sizes = [], []
        for rel in image_list(record):
            image_path = folder / rel
            problem, size = _image_problem(image_path, verify_images)
            if problem:
                errors.append(f"{where}: {problem}")
                continue
            if min(size) < min_image_side:
                warnings.warn(f"{where}: image {image_path} is {size[0]}x{size[1]}, below the minimum side "
                              f"{min_image_side}; it is upscaled on load (shorter side to {min_image_side}, "
                              "aspect kept), as VLM-R1 does", stacklevel=3)
            paths.append(str(image_path))
            sizes.append(size)
        if len(paths) == len(image_list(record)):
            rows.append(Row(where, record, tuple(paths), tuple(sizes)))
    if errors:
        raise ValueError(f"{len(errors)} problem(s) in {path}:\n" + "\n".join(errors))
    return rows


def read_jsonl(path: str | Path, image_folder: str | Path, *, min_image_side: int = 28, max_errors: int = 20,
               verify_images: bool = True) -> list[Row]:
    """Parse and check one VLM-R1 jsonl file; raise one ``ValueError`` listing its problems (at most ``max_errors``).

    Images smaller than ``min_image_side`` on a side are not errors: like VLM-R1 they are upscaled on load
    (``load_image``), and a warning names each such file. Blank lines are skipped.
    """
    path, folder = Path(path), Path(image_folder)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    return check_records(path, folder, jsonl_lines(path), min_image_side=min_image_side, max_errors=max_errors,
                         verify_images=verify_images)


def upscale_to_min_side(image: Image.Image, min_side: int) -> Image.Image:
    """Upscale so the shorter side is ``min_side`` (aspect kept); images already large enough are returned as is."""
    width, height = image.size
    if min(width, height) >= min_side:
        return image
    scale = min_side / min(width, height)
    size = (max(min_side, math.ceil(width * scale)), max(min_side, math.ceil(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def open_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a path or an image (alpha/greyscale converted, as the processor would); no resizing."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = os.fspath(image)
    if not os.path.exists(path):
        raise ValueError(f"image file not found: {path}")
    with Image.open(path) as opened:
        return opened.convert("RGB")


def load_image(image: ImageInput, min_side: int = 28) -> Image.Image:
    """The one image loader of training, rollout and evaluation: RGB, upscaled to ``min_side`` when smaller (as
    VLM-R1 does; boxes stay in the original size's pixels)."""
    return upscale_to_min_side(open_image(image), min_side)
