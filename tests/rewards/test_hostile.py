"""Hostile completions: no built-in reward raises, returns NaN/inf, or takes long, whatever the policy writes.

Times are measured with generous limits (seconds where the typical cost is milliseconds) so they cannot flake;
speed itself is a benchmark concern, these only catch super-linear blow-ups.
"""
import json
import math
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_vlmr1.rewards import get_reward, list_rewards
from megatron_vlmr1.rewards.parsing import MAX_BOXES

BOX_SOLUTION = "[10, 10, 50, 50]"
OVD_SOLUTION = '<answer>```json\n[{"bbox_2d": [10, 10, 50, 50], "label": "cat"}]\n```</answer>'
TIME_LIMIT_S = 3.0

# Every built-in, with the fields it reads (OVD rewards get detection ground truth, the rest a box / text).
FIELDS = {
    name: {"solution": OVD_SOLUTION if name in ("ap", "ap50", "map_len", "weighted_sum") else BOX_SOLUTION}
    for name in list_rewards()
}
FIELDS["accuracy"]["accu_reward_method"] = "odLength"
FIELDS["cosine_length"]["accu_reward_method"] = "weighted_sum"
FIELDS["cosine_length"]["solution"] = OVD_SOLUTION

FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "[", "]", "{", "}", '"bbox_2d": ', '"label": "cat"', ",", ":",
    "```json\n", "```", "NaN", "Infinity", "-Infinity", "1e400", "-0", "9" * 40, "10", "50", " ", "\n", "None",
    "\\boxed{", "\\frac{1}{", "$", "yes", "no", "A.", "(B)", "é", "\u202e", "\x00", "🙂", "\ud7ff",
]


@pytest.fixture(autouse=True, scope="module")
def warm_up_math_verify():
    """The first ``math`` call imports sympy (seconds, once); keep that out of the time checks."""
    get_reward("math")(["1"], solution=["1"])


def assert_well_formed(name, completions, values):
    assert len(values) == len(completions), name
    assert all(isinstance(v, float) and math.isfinite(v) for v in values), (name, values)


def run_all(completions):
    for name, fields in FIELDS.items():
        batch_fields = {k: [v] * len(completions) for k, v in fields.items()}
        start = time.perf_counter()
        values = get_reward(name)(completions, **batch_fields)
        elapsed = time.perf_counter() - start
        assert_well_formed(name, completions, values)
        assert elapsed < TIME_LIMIT_S * len(completions), (name, elapsed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_unicode_text(text):
    run_all([text])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_random_structured_fragments(text):
    run_all([text])


def _box_list(n, label="cat"):
    return "<think>t</think><answer>```json\n" + json.dumps(
        [{"bbox_2d": [i % 97, i % 89, i % 97 + 5, i % 89 + 5], "label": label} for i in range(n)]
    ) + "\n```</answer>"


HOSTILE = {
    "megabyte_random": "".join(random.Random(0).choice("ab []{},.<>/0123456789\n") for _ in range(1 << 20)),
    "megabyte_answer": "<think>t</think><answer>" + "x " * (1 << 19) + "</answer>",
    "deep_brackets": "<answer>" + "[" * 200_000 + "</answer>",
    "deep_objects": "<answer>" + '{"bbox_2d":' * 100_000 + "</answer>",
    "balanced_nesting": "<answer>" + "[" * 5000 + "1, 2, 3, 4" + "]" * 5000 + "</answer>",
    "digit_run": "<answer>[" + "1" * 500_000 + "</answer>",
    "spaces_in_box": "<answer>[" + " " * 500_000 + "1, 2, 3, 4]</answer>",
    "many_open_tags": "<answer>" * 100_000,
    "many_close_tags": "</answer>" * 100_000,
    "unclosed": "<think>" + "thinking " * 50_000 + "<answer>[10, 10, 50, 50]",
    "nan_inf": '<answer>[{"bbox_2d": [NaN, Infinity, -Infinity, 1e400], "label": "cat"}]</answer>',
    "huge_int": '<answer>[{"bbox_2d": [1, 2, ' + "9" * 5000 + ', 4], "label": "cat"}]</answer>',
    "huge_float": "<answer>[1e308, 1e308, 1.7e308, 1.7e308]</answer>",
    "unicode": "<think>🙂\u202e\x00</think><answer>[１０, 10, 50, 50] 猫 ÿ</answer>",
    "boxes_at_limit": _box_list(MAX_BOXES),
    "too_many_boxes": _box_list(5 * MAX_BOXES),
    "many_repeated_ngrams": "<answer>" + "yes no " * 200_000 + "</answer>",
    "math_bomb": "<answer>" + "\\frac{" * 5000 + "1" + "}" * 5000 + "</answer>",
    "power_tower": "<answer>$" + "9^{" * 300 + "9" + "}" * 300 + "$</answer>",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_explicit_hostile_inputs(case):
    run_all([HOSTILE[case]])


def test_megabyte_completion_is_scored_quickly_by_the_box_rewards():
    text = HOSTILE["megabyte_random"]
    for name in ("format", "rec_format", "iou", "ap", "repetition"):
        start = time.perf_counter()
        get_reward(name)([text], **{k: [v] for k, v in FIELDS[name].items()})
        assert time.perf_counter() - start < 1.0, name


def test_limits_give_documented_scores():
    # Too many boxes: the answer is treated as unparseable (0.0), even though every box is the right one.
    many = _box_list(MAX_BOXES + 1)
    assert get_reward("ap")([many], solution=[OVD_SOLUTION]) == [0.0]
    # NaN / inf / out-of-range coordinates make the box invalid: no box, 0.0.
    assert get_reward("iou")([HOSTILE["nan_inf"]], solution=[BOX_SOLUTION]) == [0.0]
    assert get_reward("iou")([HOSTILE["huge_float"]], solution=[BOX_SOLUTION]) == [0.0]
    # Fullwidth digits are not ASCII numbers: the box does not parse.
    assert get_reward("iou")([HOSTILE["unicode"]], solution=[BOX_SOLUTION]) == [0.0]
