"""VLM-R1's REC recipe format (data YAML → .json arrays of {image, problem, solution}) loads unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from megatron_vlmr1.data import DataConfig, collate_reward_fields, load_samples
from megatron_vlmr1.data.rec_json import read_data_yaml
from megatron_vlmr1.rewards import get_reward


def rec(image: str, problem: str, box: list[int], **extra) -> dict:
    return {"image": image, "problem": problem, "solution": box, **extra}


@pytest.fixture
def recipe(tmp_path) -> Path:
    """VLM-R1's layout: images under an image root (with a sub-folder in the path), annotations elsewhere."""
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    for name, size in [("a.jpg", (64, 48)), ("b.jpg", (56, 56))]:
        Image.new("RGB", size, (200, 10, 10)).save(root / "train2014" / name)
    ann = tmp_path / "rec_jsons_processed"
    ann.mkdir()
    (ann / "refcoco_train.json").write_text(json.dumps([
        rec("train2014/a.jpg", "the man on the left", [1, 2, 30, 40], normal_caption="a man"),
        rec("train2014/b.jpg", "the red cup", [5, 5, 20, 20]),
        rec("train2014/a.jpg", "the dog", [10, 10, 50, 40]),
    ]))
    (ann / "refcocog_train.json").write_text(json.dumps([rec("train2014/b.jpg", "the plate", [0, 0, 56, 56])] * 4))
    (tmp_path / "rec.yaml").write_text(
        "datasets:\n"
        "    - json_path: rec_jsons_processed/refcoco_train.json\n"
        "    - json_path: rec_jsons_processed/refcocog_train.json\n"
        "      sampling_strategy: first:50%\n")
    return tmp_path


def test_data_yaml_with_image_root_loads_as_vlm_r1_does(recipe):
    samples = load_samples(DataConfig(files=[str(recipe / "rec.yaml")], image_folders=[str(recipe / "coco")],
                                      task="rec", shuffle=False))
    assert [s.problem for s in samples] == ["the man on the left", "the red cup", "the dog", "the plate", "the plate"]
    first = samples[0]
    assert first.source == f"{recipe / 'rec_jsons_processed' / 'refcoco_train.json'}[0]"
    assert first.image_paths == [str(recipe / "coco" / "train2014" / "a.jpg")] and first.image_sizes == [(64, 48)]
    assert first.solution == "<answer> [1, 2, 30, 40] </answer>"
    assert first.task == "rec" and first.accu_reward_method == "iou"  # grpo_rec.py scores REC by IoU
    assert first.extra == {"normal_caption": "a man"}
    text = first.messages[0]["content"][-1]["text"]
    assert text.startswith("the man on the left First output the thinking process") and "JSON format" in text
    assert [c["type"] for c in first.messages[0]["content"]] == ["image", "text"]
    # The rewards read the loaded solution: the exact box scores 1.0.
    fields = collate_reward_fields(samples[:1])
    assert get_reward("accuracy")(["<answer>[1, 2, 30, 40]</answer>"], **fields) == [1.0]


def test_a_single_json_file_and_per_entry_image_folders(recipe):
    ann = recipe / "rec_jsons_processed"
    direct = load_samples(DataConfig(files=[str(ann / "refcoco_train.json")], image_folders=[str(recipe / "coco")],
                                     reward_methods=["default"], shuffle=False))
    assert len(direct) == 3 and direct[0].accu_reward_method == "default"  # an explicit method still wins
    (recipe / "own.yaml").write_text(
        "datasets:\n"
        "  - {json_path: rec_jsons_processed/refcoco_train.json, image_folder: coco, sampling_strategy: 'end:1'}\n"
        "  - {json_path: rec_jsons_processed/refcocog_train.json, image_folder: coco, sampling_strategy: 'random:2'}\n")
    samples = load_samples(DataConfig(files=[str(recipe / "own.yaml")], shuffle=False))
    assert [s.problem for s in samples] == ["the dog", "the plate", "the plate"]


@pytest.mark.parametrize("records, message", [
    ([rec("train2014/a.jpg", "ok", [1, 2, 3, 4]), {"image": "train2014/a.jpg", "solution": [1, 2, 3, 4]}],
     "[1]: missing key(s) ['problem']"),
    ([rec("train2014/a.jpg", "ok", [1, 2, 3, 4]), rec("train2014/missing.jpg", "x", [1, 2, 3, 4])],
     "[1]: image not found"),
    ([rec("train2014/a.jpg", "ok", [1, 2, 3, 4]), rec("train2014/a.jpg", "<image>x", [1, 2, 3, 4])],
     "[1]: 'problem' must be a string without '<image>'"),
    ([rec("train2014/a.jpg", "ok", [1, 2, 3, 4]), rec("train2014/a.jpg", "x", None)],
     "[1]: 'solution' must be a box list or a string"),
    ([rec("train2014/a.jpg", "ok", [1, 2, 3, 4]), [1, 2]], "[1]: expected a JSON object, got list"),
    ([rec("train2014/a.jpg", "ok", [1, 2, 3, 4], accu_reward_method="IoU")], "[0]: unknown accu_reward_method 'IoU'"),
])
def test_bad_records_name_the_file_and_record_index(recipe, records, message):
    path = recipe / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError) as info:
        load_samples(DataConfig(files=[str(path)], image_folders=[str(recipe / "coco")]))
    assert f"{path}{message}" in str(info.value)


def test_a_file_that_is_not_a_json_array_is_an_error(recipe):
    path = recipe / "bad.json"
    path.write_text('{"image": "a.jpg"}')
    with pytest.raises(ValueError, match="expected a JSON array of records, got dict"):
        load_samples(DataConfig(files=[str(path)]))
    path.write_text('[{"image": ')
    with pytest.raises(ValueError, match=r"bad\.json: malformed JSON"):
        load_samples(DataConfig(files=[str(path)]))


@pytest.mark.parametrize("content, message", [
    ("datasets: []\n", "expected 'datasets: "),
    ("other: 1\n", "expected 'datasets: "),
    ("datasets:\n  - {path: x.json}\n", r"datasets\[0\]: expected a mapping with a 'json_path'"),
    ("datasets:\n  - {json_path: x.json, sampling: all}\n", r"datasets\[0\]: unknown key\(s\) \['sampling'\]"),
    ("datasets:\n  - {json_path: x.json, sampling_strategy: 'first:0'}\n", "N must be a positive integer"),
    ("datasets:\n  - {json_path: x.json, sampling_strategy: 'middle:5'}\n", "sampling_strategy 'middle:5'"),
    ("datasets:\n  - {json_path: x.json, sampling_strategy: 'all:5'}\n", "sampling_strategy 'all:5'"),
    ("datasets: [\n", "malformed YAML"),
])
def test_data_yaml_errors_name_the_entry(tmp_path, content, message):
    path = tmp_path / "rec.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_data_yaml(path)
