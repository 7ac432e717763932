"""Bounded, non-raising parsing of model completions: the answer block, boxes, and normalised answer text.

Completions are untrusted (a policy being trained will find every crash), so parsing here never uses ``eval``,
never runs a regex that can backtrack catastrophically, and caps the work per completion:

- ``MAX_PARSE_CHARS``: only this many leading characters of an answer are parsed for JSON / boxes.
- ``MAX_BOXES``: a box list longer than this is treated as unparseable (a detection answer with thousands of
  boxes is a degenerate output, and scoring it would cost seconds of COCO evaluation).
- ``MAX_COORD``: a coordinate must be a finite JSON number with ``|v| <= MAX_COORD``; anything else (NaN, inf,
  1e308, a 5000-digit integer, a string, a bool) makes that box invalid.
- ``MAX_TEXT_CHARS``: normalised answer text (for exact / fuzzy / choice matching) is cut to this length.

Conventions shared by every box reward: a box is ``(x1, y1, x2, y2)`` with ``x2 >= x1`` and ``y2 >= y1``
(a box with swapped corners is invalid, not silently repaired).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_PARSE_CHARS = 200_000
MAX_BOXES = 1000
MAX_COORD = 1e7
MAX_TEXT_CHARS = 10_000
_MAX_JSON_ATTEMPTS = 8

Box = tuple[float, float, float, float]

# Four numbers in square brackets; no nested quantifiers, so matching is linear in the scanned text.
_NUM = r"(-?[0-9]{1,12}(?:\.[0-9]{1,12})?)"
_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class LabeledBox:
    """One detection: a valid box and its (optional) category label."""

    box: Box
    label: str | None = None


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or a chat-style ``[{"role": ..., "content": str}]`` (VLM-R1's form)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else ""
    return ""


def extract_answer(text: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` block, or ``None`` when there is none.

    The last block is used because models that restate the question often quote an earlier, wrong answer.
    Linear time: two ``rfind`` calls.
    """
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>"):end]


def answer_or_text(text: str) -> str:
    """The answer block when present, else the whole text (lenient scoring; strictness is the format reward's job)."""
    answer = extract_answer(text)
    return text if answer is None else answer


def normalize_text(text: str) -> str:
    """Answer text for exact / fuzzy matching: whitespace runs collapsed, trailing '.' dropped, lower case."""
    text = answer_or_text(text)[:MAX_TEXT_CHARS]
    return " ".join(text.split()).rstrip(".").strip().lower()


def _strip_code_fence(text: str) -> str:
    """Content of the first Markdown code fence (```json ... ```), or the text unchanged when there is none."""
    start = text.find("```")
    if start < 0:
        return text
    body_start = start + 3
    newline = text.find("\n", body_start)
    if text.startswith("json", body_start):
        body_start += 4
    elif newline >= 0 and text[body_start:newline].strip().isalpha():
        body_start = newline + 1
    end = text.find("```", body_start)
    return text[body_start:] if end < 0 else text[body_start:end]


def parse_json_value(text: str) -> Any | None:
    """The first JSON array/object in ``text`` (code fence stripped), or ``None``; never raises.

    Tries ``raw_decode`` at up to ``_MAX_JSON_ATTEMPTS`` opening brackets so that prose around the JSON is allowed.
    Deep nesting raises ``RecursionError`` inside ``json``; that is caught like any other parse failure.
    """
    text = _strip_code_fence(text[:MAX_PARSE_CHARS])
    position = 0
    for _ in range(_MAX_JSON_ATTEMPTS):
        starts = [i for i in (text.find("[", position), text.find("{", position)) if i >= 0]
        if not starts:
            return None
        position = min(starts)
        try:
            return _DECODER.raw_decode(text, position)[0]
        except (ValueError, RecursionError):
            position += 1
    return None


def _coord(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    if not math.isfinite(number) or abs(number) > MAX_COORD:
        return None
    return number


def as_box(value: Any) -> Box | None:
    """A valid box from a 4-element list of numbers, or ``None``."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    coords = [_coord(v) for v in value]
    if any(c is None for c in coords):
        return None
    x1, y1, x2, y2 = coords
    if x2 < x1 or y2 < y1:
        return None
    return (x1, y1, x2, y2)


def _item_box(item: Any) -> LabeledBox | None:
    if isinstance(item, dict):
        box = as_box(item.get("bbox_2d"))
        label = item.get("label")
        return None if box is None else LabeledBox(box, label if isinstance(label, str) else None)
    box = as_box(item)
    return None if box is None else LabeledBox(box)


def boxes_from_json(value: Any) -> list[LabeledBox] | None:
    """Boxes in a parsed JSON value, in order; ``None`` when the value holds no box structure at all.

    Accepted shapes: ``{"bbox_2d": [..4..], "label": ...}``, a bare ``[x1, y1, x2, y2]``, or a list of either.
    Invalid items inside a list are dropped. An empty list means "no objects" and returns ``[]``.
    """
    single = _item_box(value)
    if single is not None:
        return [single]
    if isinstance(value, dict):
        return None
    if not isinstance(value, list) or len(value) > MAX_BOXES:
        return None
    boxes = [box for box in (_item_box(item) for item in value) if box is not None]
    if value and not boxes:
        return None
    return boxes


def parse_boxes(text: str) -> list[LabeledBox] | None:
    """All boxes of an answer (JSON only). ``"None"`` / ``[]`` → ``[]`` (no objects); unparseable → ``None``."""
    answer = answer_or_text(text).strip()
    if answer.lower() in ("none", ""):
        return []
    value = parse_json_value(answer)
    return None if value is None else boxes_from_json(value)


def says_no_objects(text: str) -> bool:
    """True when the completion's ``<answer>`` block explicitly says there is nothing: ``None`` / ``null`` / ``[]``.

    Only an explicit answer counts: no answer block, an empty one, or prose is not "no objects" (an OVD reward
    that scored those 1.0 on a "None" sample would pay the policy for saying nothing).
    """
    answer = extract_answer(text)
    if answer is None:
        return False
    body = _strip_code_fence(answer[:MAX_PARSE_CHARS]).strip()
    if body.lower() in ("none", "null"):
        return True
    if not body.startswith("["):
        return False
    try:
        return json.loads(body) == []
    except (ValueError, RecursionError):
        return False


def first_box(text: str) -> Box | None:
    """The first box of an answer: from its JSON when that parses, else the first ``[a, b, c, d]`` in the text."""
    answer = answer_or_text(text)[:MAX_PARSE_CHARS]
    value = parse_json_value(answer)
    boxes = boxes_from_json(value) if value is not None else None
    if boxes:
        return boxes[0].box
    match = _BOX_RE.search(answer)
    return None if match is None else as_box([float(g) for g in match.groups()])


def reference_boxes(solution: Any) -> list[Box]:
    """Ground-truth boxes of a sample: a 4-list, a list of 4-lists / ``bbox_2d`` dicts, or text holding that JSON."""
    if isinstance(solution, str):
        parsed = parse_boxes(solution)
        if parsed is None:
            box = first_box(solution)
            return [] if box is None else [box]
        return [b.box for b in parsed]
    parsed = boxes_from_json(solution)
    return [] if parsed is None else [b.box for b in parsed]
