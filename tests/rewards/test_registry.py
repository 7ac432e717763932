"""The reward registry: lookup, registration rules, custom rewards, batch fields, weighted combination."""
import math

import pytest

from megatron_vlmr1.rewards import (
    RewardFieldError,
    combine_rewards,
    get_reward,
    list_rewards,
    register_reward,
    register_sample_reward,
)
from megatron_vlmr1.rewards import registry

BUILT_INS = {
    "format", "rec_format", "iou", "ap", "ap50", "map_len", "weighted_sum", "repetition", "cosine_length",
    "mcq", "yes_no", "all_match", "math", "fuzzy", "accuracy",
}


def constant_half(completions, **fields):
    return [0.5] * len(completions)


def returns_nan(completions, **fields):
    return [math.nan] * len(completions)


def returns_too_few(completions, **fields):
    return [1.0]


def test_builtins_are_registered():
    assert BUILT_INS <= set(list_rewards())


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*'format'.*'iou'"):
        get_reward("nope")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("format")(constant_half)


def test_register_new_batch_and_sample_rewards(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", registry._REGISTRY.copy())
    register_reward("test_constant")(constant_half)
    assert get_reward("test_constant")(["a", "b"]) == [0.5, 0.5]

    @register_sample_reward("test_length")
    def length(text, scale=1.0, **_):
        return len(text) * scale

    assert length("abc") == 3  # the decorator returns the per-sample function unchanged
    assert get_reward("test_length")(["ab", "abcd"], scale=[1.0, 0.5]) == [2.0, 2.0]


def test_custom_reward_by_module_path():
    fn = get_reward("tests.rewards.test_registry:constant_half")
    assert fn(["x", "y", "z"]) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tests.rewards.no_such_module:fn", "cannot import"),
        ("tests.rewards.test_registry:no_such_fn", "no callable 'no_such_fn'"),
        ("tests.rewards.test_registry:", "package.module:function"),
    ],
)
def test_bad_custom_reward_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        get_reward(spec)


def test_custom_reward_outputs_are_checked():
    with pytest.raises(ValueError, match="non-finite"):
        get_reward("tests.rewards.test_registry:returns_nan")(["a"])
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        get_reward("tests.rewards.test_registry:returns_too_few")(["a", "b"])


def test_fields_must_align_with_completions_and_scalars_broadcast():
    with pytest.raises(ValueError, match="'solution' has 1 entries for 2"):
        get_reward("all_match")(["a", "b"], solution=["a"])
    assert get_reward("all_match")(["a", "b"], solution="a") == [1.0, 0.0]


def test_chat_style_completions_are_accepted():
    chat = [[{"role": "assistant", "content": "<think>t</think><answer>x</answer>"}]]
    assert get_reward("format")(chat) == [1.0]


def test_sample_field_errors_raise_instead_of_scoring_zero():
    with pytest.raises(RewardFieldError, match="image_size"):
        get_reward("iou")(["[0, 0, 10, 10]"], solution=["[0, 0, 10, 10]"], box_space="resized")
    with pytest.raises(RewardFieldError, match="accu_reward_method 'llm'"):
        get_reward("accuracy")(["a"], solution=["a"], accu_reward_method=["llm"])


def test_combine_rewards_honours_weights():
    completions = [
        "<think>t</think><answer>[0, 0, 10, 10]</answer>",  # format 1, iou 1
        "<answer>[0, 0, 10, 5]</answer>",  # format 0, iou 0.5
    ]
    combined = combine_rewards([("format", 0.5), ("iou", 2.0)])
    result = combined(completions, solution=["[0, 0, 10, 10]"] * 2)
    assert result.per_reward == {"format": [1.0, 0.0], "iou": [1.0, 0.5]}
    assert result.total == [0.5 * 1.0 + 2.0 * 1.0, 0.5 * 0.0 + 2.0 * 0.5]


def test_combine_rewards_validates_specs():
    with pytest.raises(ValueError, match="at least one"):
        combine_rewards([])
    with pytest.raises(ValueError, match="listed twice"):
        combine_rewards([("format", 1.0), ("format", 2.0)])
    with pytest.raises(ValueError, match="finite number"):
        combine_rewards([("format", math.inf)])
    with pytest.raises(ValueError, match="unknown reward"):
        combine_rewards([("formatt", 1.0)])


def test_a_data_column_named_text_does_not_collide_with_the_completion():
    # Built-ins take the completion positionally, so any column name (even "text") is just another field.
    assert get_reward("all_match")(["<answer>a</answer>"], solution=["a"], text=["ignored"]) == [1.0]
    assert get_reward("iou")(["[0, 0, 2, 2]"], solution=["[0, 0, 2, 2]"], text=["ignored"]) == [1.0]
