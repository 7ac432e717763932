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


@pytest.mark.parametrize("difficulty", ["easy", "normal"])
def test_synthetic_images_are_not_resized_so_auto_scores_the_demo_as_abs(tiny_qwen2_5_vl, tmp_path, difficulty):
    # box_space: auto is "resized" for Qwen2.5-VL; the synthetic images (sides multiples of 28, <= 224) reach the
    # tiny model at their own size, so resized pixels are original pixels and the demo's boxes score unchanged.
    from transformers import AutoProcessor

    from megatron_vlmr1.data import DataConfig, load_samples
    from megatron_vlmr1.data.synthetic import make_rec_dataset
    from megatron_vlmr1.vlm.qwen_vl.processor import encode_prompt

    make_rec_dataset(tmp_path, 6, seed=0, difficulty=difficulty)
    processor = AutoProcessor.from_pretrained(tiny_qwen2_5_vl)
    for sample in load_samples(DataConfig(files=[str(tmp_path / "train.jsonl")])):
        geometry = encode_prompt(processor, sample.messages, sample.image_paths).images
        assert [g.resized for g in geometry] == [g.original for g in geometry]
