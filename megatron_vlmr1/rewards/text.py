"""Text rewards: answer format, multiple choice, yes/no, exact / fuzzy / math answers, repetition and length shaping.

Every reward here is per sample (``fn(text, **sample) -> float``) and registered into the batch registry. Answers
are read from the last ``<answer>...</answer>`` block when present, else from the whole completion (see
``parsing.answer_or_text``); the strict tag structure is scored separately by ``format``.
"""
from __future__ import annotations

import json
import math
import re
import threading
from typing import Any

from megatron_vlmr1.rewards import detection
from megatron_vlmr1.rewards.parsing import (
    MAX_BOXES,
    MAX_TEXT_CHARS,
    answer_or_text,
    boxes_from_json,
    extract_answer,
    normalize_text,
    parse_json_value,
)
from megatron_vlmr1.rewards.registry import RewardFieldError, register_sample_reward

MATH_MAX_CHARS = 1000
MATH_TIMEOUT_S = 1
REPETITION_NGRAM = 6
REPETITION_MAX_WORDS = 50_000
COSINE_CORRECT_THRESHOLD = 0.7


def has_strict_format(text: str) -> bool:
    """``<think>…</think><answer>…</answer>`` and nothing else.

    Whitespace rules: whitespace around the whole completion and between ``</think>`` and ``<answer>`` is allowed;
    each of the four tags must occur exactly once, in order; tag contents are free (may be empty). Stricter than
    VLM-R1's lazy regex, which accepts a second ``<think>…<answer>…`` pair hidden inside the first answer. Linear
    time (``str.count`` / ``str.find``).
    """
    body = text.strip()
    if not (body.startswith("<think>") and body.endswith("</answer>")):
        return False
    if any(body.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    think_end = body.find("</think>")
    answer_start = body.find("<answer>")
    return think_end < answer_start and body[think_end + len("</think>"):answer_start].strip() == ""


@register_sample_reward("format")
def format_reward(text: str, /, **_: Any) -> float:
    """1.0 when the completion has the strict think/answer format (``has_strict_format``), else 0.0."""
    return 1.0 if has_strict_format(text) else 0.0


@register_sample_reward("rec_format")
def rec_format_reward(text: str, /, **_: Any) -> float:
    """1.0 when the format is strict and the answer holds a JSON box.

    A box is ``{"bbox_2d": [...]}``, a bare ``[x1, y1, x2, y2]``, or a list of either (VLM-R1's ``format_reward_rec``
    accepts only integer boxes inside braces; we accept what ``iou`` can score).
    """
    if not has_strict_format(text):
        return 0.0
    value = parse_json_value(extract_answer(text) or "")
    boxes = boxes_from_json(value) if value is not None else None
    return 1.0 if boxes else 0.0


# A capital letter standing alone (start / space / bracket before it) and ending the text or followed by punctuation:
# "B", "(C)", "A.", "answer: D" — but not the "I" of "I think". Fixed-width look-arounds only: linear time.
_CHOICE_RE = re.compile(r"(?:^|(?<=[\s(\[]))([A-Z])(?=$|[.,:;)\]!?])")


def extract_choice(text: str) -> str | None:
    """The chosen option letter of an answer, or ``None``; with several candidates the last one wins."""
    flat = " ".join(text[:MAX_TEXT_CHARS].split())
    candidates = _CHOICE_RE.findall(flat)
    return candidates[-1] if candidates else None


@register_sample_reward("mcq")
def mcq_reward(text: str, /, solution: Any = None, **_: Any) -> float:
    """1.0 when the answer's option letter equals the solution's (letters A-Z, see ``extract_choice``)."""
    truth = answer_or_text(str(solution))
    correct = extract_choice(truth) or truth.strip().upper()
    chosen = extract_choice(answer_or_text(text))
    return 1.0 if chosen is not None and chosen == correct else 0.0


_YES_NO_RE = re.compile(r"\b(yes|no)\b")


def _yes_no(text: str) -> str | None:
    match = _YES_NO_RE.search(answer_or_text(text)[:MAX_TEXT_CHARS].lower())
    return None if match is None else match.group(1)


@register_sample_reward("yes_no")
def yes_no_reward(text: str, /, solution: Any = None, **_: Any) -> float:
    """1.0 when the first whole-word yes/no of the answer equals the solution's.

    Whole words, unlike VLM-R1's substring search (where "not" and "know" read as "no"); an answer with neither
    word scores 0.0.
    """
    chosen = _yes_no(text)
    return 1.0 if chosen is not None and chosen == _yes_no(str(solution)) else 0.0


@register_sample_reward("all_match")
def all_match_reward(text: str, /, solution: Any = None, **_: Any) -> float:
    """1.0 when the normalised answer equals the normalised solution (``parsing.normalize_text``)."""
    return 1.0 if normalize_text(text) == normalize_text(str(solution)) else 0.0


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyrö 2004): O(len(b) · len(a) / wordsize)."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for ch in b:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def similarity(a: str, b: str) -> float:
    """Indel similarity ``2·LCS / (len(a) + len(b))`` (python-Levenshtein's ``ratio``, which VLM-R1 uses).

    Two empty strings are identical: 1.0.
    """
    if not a and not b:
        return 1.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


@register_sample_reward("fuzzy")
def fuzzy_reward(text: str, /, solution: Any = None, **_: Any) -> float:
    """Similarity of the normalised answer and solution (each cut to ``MAX_TEXT_CHARS``), in [0, 1]."""
    return similarity(normalize_text(text), normalize_text(str(solution)))


def _math_timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere the input caps bound the time.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@register_sample_reward("math")
def math_reward(text: str, /, solution: Any = None, **_: Any) -> float:
    """1.0 when math-verify finds the answer equivalent to the solution.

    Bounded time: both sides are cut to ``MATH_MAX_CHARS`` and parsing / verification each get ``MATH_TIMEOUT_S``
    (main thread only); an empty gold parse scores 0.0.
    """
    from math_verify import parse, verify

    timeout = _math_timeout()
    gold = parse(answer_or_text(str(solution))[:MATH_MAX_CHARS], parsing_timeout=timeout)
    if not gold:
        return 0.0
    answer = parse(answer_or_text(text)[:MATH_MAX_CHARS], parsing_timeout=timeout)
    if not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=timeout) else 0.0


def _as_number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def default_accuracy(text: str, /, solution: Any = None, **_: Any) -> float:
    """VLM-R1's default accuracy: math-verify; else numbers compared exactly, option letters, or fuzzy text."""
    if math_reward(text, solution) == 1.0:
        return 1.0
    truth = normalize_text(str(solution))
    answer = normalize_text(text)
    if re.search(r"\d", truth):
        expected, got = _as_number(truth), _as_number(answer)
        if expected is not None and got is not None:
            return 1.0 if expected == got else 0.0
        return similarity(answer, truth)
    if extract_choice(answer_or_text(str(solution))) is not None:
        return mcq_reward(text, solution)
    return similarity(answer, truth)


ACCURACY_METHODS = {
    "default": default_accuracy,
    "mcq": mcq_reward,
    "yes_no": yes_no_reward,
    "math": math_reward,
    "all_match": all_match_reward,
    "fuzzy": fuzzy_reward,
    "iou": detection.iou_reward,
    "map": detection.ap_reward,
    "ap": detection.ap_reward,
    "od_ap": detection.ap_reward,
    "ap50": detection.ap50_reward,
    "od_ap50": detection.ap50_reward,
    "map_len": detection.map_len_reward,
    "odLength": detection.map_len_reward,
    "weighted_sum": detection.weighted_sum_reward,
}


def accuracy_methods() -> list[str]:
    """The names ``accu_reward_method`` may take (the data loader checks every line against these)."""
    return sorted(ACCURACY_METHODS)


@register_sample_reward("accuracy")
def accuracy_reward(text: str, /, accu_reward_method: str | None = None, **sample: Any) -> float:
    """The accuracy reward chosen per sample by ``accu_reward_method`` (VLM-R1's column; missing → ``default``).

    Methods: see ``ACCURACY_METHODS`` — VLM-R1's names (``od_ap`` / ``od_ap50`` / ``odLength``) and ours, the
    reward names (``ap`` / ``ap50`` / ``map_len``), which the README and ``make_synthetic_data.py`` write.
    """
    method = accu_reward_method or "default"
    if method not in ACCURACY_METHODS:
        raise RewardFieldError(f"accu_reward_method {method!r} is unknown; known: {accuracy_methods()}")
    return ACCURACY_METHODS[method](text, **sample)


def _detection_units(text: str) -> list[tuple[Any, Any]] | None:
    """(box, label) pairs when the answer is an OVD list of ``{"bbox_2d", "label"}`` objects, else ``None``."""
    value = parse_json_value(answer_or_text(text))
    if not isinstance(value, list) or not value or len(value) > MAX_BOXES:
        return None
    if not all(isinstance(item, dict) and "bbox_2d" in item and "label" in item for item in value):
        return None
    return [(json.dumps(item["bbox_2d"]), json.dumps(item["label"])) for item in value]


def _repetition_units(text: str) -> tuple[list[Any], int]:
    """(units, n): an OVD answer repeats whole objects (1-grams of (box, label)); anything else word 6-grams.

    As in VLM-R1's ``repetition_reward``: only a list of ``{bbox_2d, label}`` objects is scored by duplicated
    objects; everything else — prose, a REC box, a looping ``<think>`` before any answer — by repeated word
    n-grams over the whole completion, so a single-box answer cannot hide a loop in the reasoning.
    """
    objects = _detection_units(text)
    if objects is not None:
        return objects, 1
    return text.lower().split()[:REPETITION_MAX_WORDS], REPETITION_NGRAM


@register_sample_reward("repetition")
def repetition_reward(text: str, /, **_: Any) -> float:
    """``-(1 - unique n-grams / all n-grams)`` in [-1, 0]: 0 for no repetition, towards -1 for a loop.

    Text uses word 6-grams over the first ``REPETITION_MAX_WORDS`` words of the whole completion (shorter texts
    score 0); an OVD answer (a list of ``{bbox_2d, label}`` objects) uses its objects as 1-grams, so a duplicated
    object is a repetition (``_repetition_units``).
    """
    units, n = _repetition_units(text)
    if len(units) < n:
        return 0.0
    ngrams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return len(set(ngrams)) / len(ngrams) - 1.0


def cosine_schedule(length: float, max_len: float, value_at_zero: float, value_at_max: float) -> float:
    """Half-cosine from ``value_at_zero`` (length 0) to ``value_at_max`` (length >= max_len)."""
    progress = min(max(length, 0.0), max_len) / max_len
    return value_at_max + (value_at_zero - value_at_max) * (1.0 + math.cos(math.pi * progress)) / 2.0


@register_sample_reward("cosine_length")
def cosine_length_reward(
    text: str, /, completion_length: Any = None, cosine_max_len: Any = 1024, **sample: Any
) -> float:
    """Length shaping of Yeo et al. 2025 (arXiv 2502.03373): short correct answers earn most, short wrong ones least.

    Correct (``accuracy`` >= 0.7): 1.0 at length 0 falling to 0.5 at ``cosine_max_len``. Wrong: -0.5 at length 0
    rising to 0.0 at ``cosine_max_len``, so a wrong answer is penalised less for reasoning longer. The accuracy is
    the real one of this completion (the ``accuracy`` reward, dispatched by ``accu_reward_method``); VLM-R1's
    version overwrites it with 1.0, rewarding every answer as correct. Length is ``completion_length`` (tokens,
    supplied by the trainer) or, when absent, the whitespace word count.
    """
    valid = isinstance(cosine_max_len, (int, float)) and not isinstance(cosine_max_len, bool)
    max_len = float(cosine_max_len) if valid else math.nan
    if not math.isfinite(max_len) or max_len <= 0:
        raise RewardFieldError(f"cosine_max_len must be a positive number, got {cosine_max_len!r}")
    if completion_length is None:
        length = float(len(text.split()))
    elif isinstance(completion_length, (int, float)) and not isinstance(completion_length, bool):
        length = float(completion_length)
    else:
        raise RewardFieldError(f"completion_length must be a number of tokens, got {completion_length!r}")
    correct = accuracy_reward(text, **sample) >= COSINE_CORRECT_THRESHOLD
    if correct:
        return cosine_schedule(length, max_len, value_at_zero=1.0, value_at_max=0.5)
    return cosine_schedule(length, max_len, value_at_zero=-0.5, value_at_max=0.0)
