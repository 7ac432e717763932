"""The VLM-R1 loader: file/folder pairing, reward-method overrides, templates, solutions, extra fields, config."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from megatron_vlmr1.config import load_config
from megatron_vlmr1.data import (DataConfig, collate_reward_fields, epoch_order, load_image, load_samples,
                                 prompt_iterator, question_template)
from megatron_vlmr1.data.templates import format_question

THINK = ("First output the thinking process in <think> </think> tags and then output the final answer in "
         "<answer> </answer> tags.")


def _record(image=None, question="Where is it?", answer="[1, 2, 3, 4]", **extra) -> dict:
    images = [] if image is None else [image] if isinstance(image, str) else image
    record = {"conversations": [{"from": "human", "value": "<image>" * len(images) + question},
                                {"from": "gpt", "value": answer}], **extra}
    if image is not None:
        record["image"] = image
    return record


def _jsonl(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def two_sources(tmp_path) -> tuple[str, str, str, str]:
    """Two jsonl files whose images share a relative name but live in different folders (different sizes)."""
    d1, d2 = tmp_path / "imgs1", tmp_path / "imgs2"
    for folder, size in ((d1, (56, 84)), (d2, (112, 56))):
        (folder / "sub").mkdir(parents=True)
        Image.new("RGB", size, (255, 0, 0)).save(folder / "sub/x.png")
    f1 = _jsonl(tmp_path / "a.jsonl", [_record("sub/x.png", id=1), _record("sub/x.png", id=2,
                                                                          accu_reward_method="mcq")])
    f2 = _jsonl(tmp_path / "b.jsonl", [_record(["sub/x.png", "sub/x.png"], id=3, answer="<answer>first</answer>")])
    return f1, f2, str(d1), str(d2)


def test_files_pair_with_folders_and_reward_methods(two_sources):
    f1, f2, d1, d2 = two_sources
    samples = load_samples(DataConfig(files=[f1, f2], image_folders=[d1, d2], reward_methods=["iou", "map_len"]))
    assert [s.id for s in samples] == ["1", "2", "3"]
    assert samples[0].image_paths == [str(Path(d1) / "sub/x.png")] and samples[0].image_sizes == [(56, 84)]
    assert samples[2].image_paths == [str(Path(d2) / "sub/x.png")] * 2
    assert samples[2].image_sizes == [(112, 56), (112, 56)]
    # Per-file method, overridden by the line's own accu_reward_method.
    assert [s.accu_reward_method for s in samples] == ["iou", "mcq", "map_len"]
    assert [s.source for s in samples] == [f"{f1}:1", f"{f1}:2", f"{f2}:1"]


def test_colon_form_equals_list_form_and_default_method(two_sources):
    f1, f2, d1, d2 = two_sources
    cfg = DataConfig(files=[f"{f1}:{f2}"], image_folders=[f"{d1}:{d2}"])
    assert cfg.files == [f1, f2] and cfg.image_folders == [d1, d2]
    listed = load_samples(DataConfig(files=[f1, f2], image_folders=[d1, d2]))
    assert load_samples(cfg) == listed
    assert [s.accu_reward_method for s in listed] == ["default", "mcq", "default"]


def test_yaml_and_dotted_overrides(two_sources, tmp_path):
    f1, f2, d1, d2 = two_sources

    @dataclasses.dataclass
    class Root:
        data: DataConfig = dataclasses.field(default_factory=DataConfig)

    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(f"data:\n  files: [{f1}]\n  image_folders: [{d1}]\n  task: rec\n")
    cfg = load_config(Root, yaml_path).data
    assert (cfg.files, cfg.task) == ([f1], "rec")
    cfg = load_config(Root, yaml_path, [f"data.files={f1}:{f2}", f"data.image_folders={d1}:{d2}",
                                        "data.reward_methods=iou:map_len", "data.max_samples=2"]).data
    assert cfg.files == [f1, f2] and cfg.reward_methods == ["iou", "map_len"]
    assert [s.id for s in load_samples(cfg)] == ["1", "2"]  # max_samples keeps the first rows in file order
    with pytest.raises(ValueError, match="data.image_folders has 1 entries but data.files has 2"):
        load_config(Root, yaml_path, [f"data.files={f1}:{f2}"])


@pytest.mark.parametrize("kwargs, message", [
    ({"files": ["a", "b"], "reward_methods": ["iou"]}, "data.reward_methods has 1 entries"),
    ({"task": "segmentation"}, "data.task: unknown task 'segmentation'"),
    ({"files": ["a", "b"], "reward_methods": ["iou", "mAP"]}, "data.reward_methods: unknown accu_reward_method"),
    ({"template": "no placeholder"}, "data.template must contain '{Question}'"),
    ({"max_samples": 0}, "data.max_samples must be >= 1"),
    ({"min_image_side": 0}, "data.min_image_side"),
])
def test_config_validation_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        DataConfig(**kwargs)


def test_prompt_iterator_uses_the_config_seed_and_shuffle(two_sources):
    f1, f2, d1, d2 = two_sources
    cfg = DataConfig(files=[f1, f2], image_folders=[d1, d2], seed=5)
    samples = load_samples(cfg)
    rank1 = prompt_iterator(cfg, batch_size=1, rank=1, world_size=2)
    assert next(rank1) == [samples[int(epoch_order(3, 0, 5)[1])]]
    ordered = prompt_iterator(DataConfig(files=[f1, f2], image_folders=[d1, d2], shuffle=False), batch_size=3)
    assert [s.id for s in next(ordered)] == ["1", "2", "3"]


def test_no_files_is_an_error():
    with pytest.raises(ValueError, match="data.files is empty"):
        load_samples(DataConfig())


def test_problem_solution_and_messages_follow_vlmr1(two_sources):
    f1, f2, d1, d2 = two_sources
    single, _, double = load_samples(DataConfig(files=[f1, f2], image_folders=[d1, d2], task="rec"))
    assert single.problem == "Where is it?"
    assert single.solution == "<answer> [1, 2, 3, 4] </answer>"
    assert double.solution == "<answer> first </answer>"  # tags stripped, then wrapped once
    assert single.messages == [{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": f"Where is it? {THINK} Output the final answer in JSON format."}]}]
    assert [c["type"] for c in double.messages[0]["content"]] == ["image", "image", "text"]


def test_templates_match_vlmr1_wording():
    assert format_question(question_template("default"), "Q?") == f"Q? {THINK}"
    assert format_question(question_template("rec"), "Q?") == f"Q? {THINK} Output the final answer in JSON format."
    assert question_template("ovd") == question_template("odLength")
    assert format_question(question_template("ovd"), "Q?") == (
        "First thinks about the reasoning process in the mind and then provides the user with the answer. The "
        "reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>\nQ?")
    # Braces in a question are kept verbatim (the OVD question carries a JSON example).
    assert format_question("{Question}!", '[{"bbox_2d": 1}]') == '[{"bbox_2d": 1}]!'


def test_text_only_rows_numbers_line_task_custom_template_and_system_prompt(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [
        _record(question="2+2?", answer=4),
        _record(question="Find cats.", answer="None", task="ovd"),
    ])
    plain, ovd = load_samples(DataConfig(files=[path]))
    assert plain.image_paths == [] and plain.image_sizes == []
    assert plain.messages == [{"role": "user", "content": [{"type": "text", "text": f"2+2? {THINK}"}]}]
    assert plain.solution == "<answer> 4 </answer>"
    assert (plain.task, ovd.task) == ("default", "ovd")  # a line's task overrides the configured one
    assert ovd.messages[0]["content"][0]["text"].endswith("</answer>\nFind cats.")
    custom = load_samples(DataConfig(files=[path], template="Q: {Question}", system_prompt="Be brief."))
    assert custom[0].messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Q: 2+2?"}]}]


def test_extra_columns_reach_the_reward_fields(tmp_path):
    path = _jsonl(tmp_path / "e.jsonl", [
        _record(id="a", normal_caption="a red box", labels=["red box"]),
        _record(id="b"),
    ])
    a, b = load_samples(DataConfig(files=[path]))
    assert a.extra == {"normal_caption": "a red box", "labels": ["red box"]}
    fields = collate_reward_fields([a, b])
    assert fields["normal_caption"] == ["a red box", None]
    assert fields["solution"] == ["<answer> [1, 2, 3, 4] </answer>"] * 2
    assert fields["accu_reward_method"] == ["default", "default"]
    assert fields["id"] == ["a", "b"]
    assert set(fields) >= {"task", "problem", "image_path", "image_sizes", "source"}


def test_a_line_key_named_like_a_reward_field_is_replaced_with_a_warning(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [_record(solution="stale"), _record()])
    with pytest.warns(UserWarning, match=r"key\(s\) \['solution'\] in 1 line\(s\) \(first .*s\.jsonl:1\)"):
        sample = load_samples(DataConfig(files=[path]))[0]
    assert sample.solution == "<answer> [1, 2, 3, 4] </answer>" and "solution" not in sample.extra


def test_validation_errors_surface_through_the_loader(two_sources, tmp_path):
    f1, _, d1, _ = two_sources
    bad = _jsonl(tmp_path / "bad.jsonl", [_record("sub/missing.png")])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: image not found"):
        load_samples(DataConfig(files=[f1, bad], image_folders=[d1, d1]))


def test_messages_and_images_feed_the_qwen_processor(tmp_path, tiny_qwen2_5_vl):
    from transformers import AutoProcessor

    from megatron_vlmr1.data.synthetic import make_dataset

    make_dataset("rec", tmp_path, n=2, seed=0, n_test=0, images_per_sample=2)
    samples = load_samples(DataConfig(files=[str(tmp_path / "train.jsonl")], task="rec"))
    processor = AutoProcessor.from_pretrained(tiny_qwen2_5_vl)
    for sample in samples:
        text = processor.apply_chat_template(sample.messages, add_generation_prompt=True, tokenize=False)
        images = [load_image(p) for p in sample.image_paths]
        inputs = processor(text=[text], images=images, return_tensors="pt")
        # Sides are multiples of 28, so the processor keeps the original size: boxes need no rescaling.
        assert inputs["image_grid_thw"].tolist() == [[1, h // 14, w // 14] for w, h in sample.image_sizes]
        n_pad = (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum().item()
        assert n_pad == sum(w * h // 28 // 28 for w, h in sample.image_sizes)
        assert sample.problem in text
