"""``box_space: auto`` resolves to the family's grounding convention; an explicit value wins."""
from __future__ import annotations

import pytest
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from megatron_vlmr1.vlm.base import VLMFamily
from megatron_vlmr1.vlm.box_space import describe_box_space, resolve_box_space


@pytest.mark.parametrize("config, expected", [(Qwen2_5_VLConfig(), "resized"), (Qwen2VLConfig(), "norm1000")])
def test_auto_is_the_family_default(config, expected):
    assert resolve_box_space("auto", config) == expected
    for explicit in ("abs", "resized", "norm1000"):
        assert resolve_box_space(explicit, config) == explicit


def test_families_answer_in_norm1000_unless_they_say_otherwise():
    # InternVL (and any family that does not override it) grounds in 0-1000 coordinates.
    assert VLMFamily.default_box_space(None, "internvl") == "norm1000"  # type: ignore[arg-type]


def test_the_log_line_says_where_the_value_came_from():
    assert describe_box_space("auto", "resized", "qwen2_5_vl") == (
        "box_space: resized (auto: the default of model_type 'qwen2_5_vl')")
    assert describe_box_space("abs", "abs", "qwen2_5_vl") == "box_space: abs (set in the config)"
