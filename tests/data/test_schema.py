"""jsonl validation: each bad case names its file and line; all problems of a file come back in one error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from megatron_vlmr1.data import load_image, read_jsonl, upscale_to_min_side


def _line(**record) -> str:
    record.setdefault("conversations", [{"from": "human", "value": "<image>Where is it?"},
                                        {"from": "gpt", "value": "[1, 2, 3, 4]"}])
    return json.dumps(record)


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (56, 56), (10, 10, 200)).save(tmp_path / "b.png")
    Image.new("RGB", (20, 10), (10, 200, 10)).save(tmp_path / "tiny.png")
    full = (tmp_path / "a.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "not_an_image.png").write_text("hello")
    return tmp_path


def _write(folder: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _problems(path: Path, folder: Path, **kwargs) -> list[str]:
    with pytest.raises(ValueError) as info:
        read_jsonl(path, folder, **kwargs)
    return str(info.value).splitlines()[1:]


def test_good_file_single_multi_and_text_only(folder):
    path = _write(folder, [
        _line(id=1, image="a.png"),
        "",  # blank lines are skipped
        _line(id="two", image=["a.png", "b.png"], conversations=[
            {"from": "human", "value": "<image><image>Which is red?"}, {"from": "gpt", "value": "first"}]),
        _line(id=3, conversations=[{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": 4}]),
    ])
    rows = read_jsonl(path, folder)
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert rows[0].image_paths == (str(folder / "a.png"),) and rows[0].image_sizes == ((64, 48),)
    assert rows[1].image_sizes == ((64, 48), (56, 56))
    assert rows[2].image_paths == () and rows[2].record["conversations"][1]["value"] == 4


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "image": "a.png", "conversations": [', "malformed JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    (_line(image="a.png", conversations=None), "'conversations' must be a list of at least two turns"),
    (json.dumps({"image": "a.png"}), "missing key 'conversations'"),
    (_line(image="a.png", conversations=[{"from": "human", "value": "<image>q"}]), "at least two turns"),
    (_line(image="a.png", conversations=[{"from": "gpt", "value": "<image>q"}, {"from": "gpt", "value": "a"}]),
     "conversations[0]['from'] must be 'human'"),
    (_line(image="a.png", conversations=[{"from": "human"}, {"from": "gpt", "value": "a"}]),
     "conversations[0] must be an object with 'from' and 'value'"),
    (_line(image="a.png", conversations=[{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]),
     "conversations[0]['value'] must be a string"),
    (_line(image="a.png", conversations=[{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": None}]),
     "conversations[1]['value'] must be a string or a number"),
    (_line(image=7), "'image' must be a path or a non-empty list of paths"),
    (_line(image=[]), "'image' must be a path or a non-empty list of paths"),
    (_line(image="a.png", id=[1]), "'id' must be a string or an integer"),
    (_line(image="a.png", accu_reward_method=3), "'accu_reward_method' must be a non-empty string"),
    (_line(image="a.png", task="segmentation"), "unknown task 'segmentation'"),
    (_line(image="a.png", accu_reward_method="mapp"), "unknown accu_reward_method 'mapp'; known: ["),
    (_line(image="missing.png"), "image not found"),
    (_line(image="truncated.png"), "cannot read image"),
    (_line(image="not_an_image.png"), "cannot read image"),
    (_line(image=["a.png", "b.png"]), "1 '<image>' placeholder(s) in the question but 2 image(s)"),
    (_line(image="a.png", conversations=[{"from": "human", "value": "<image><image>q"},
                                         {"from": "gpt", "value": "a"}]), "2 '<image>' placeholder(s)"),
    (_line(conversations=[{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]),
     "1 '<image>' placeholder(s) in the question but 0 image(s)"),
])
def test_each_bad_line_is_reported_with_file_and_line(folder, line, message):
    path = _write(folder, [_line(image="a.png"), line])
    problems = _problems(path, folder)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:2: "), problems
    assert message in problems[0], problems


@pytest.mark.parametrize("method", ["map_len", "odLength", "iou", "default", "od_ap50", "weighted_sum"])
def test_known_accu_reward_methods_pass_validation(folder, method):
    rows = read_jsonl(_write(folder, [_line(image="a.png", accu_reward_method=method)]), folder)
    assert rows[0].record["accu_reward_method"] == method


def test_all_problems_of_a_file_in_one_error_up_to_the_cap(folder):
    bad = [_line(image="missing.png"), "{oops", _line(image="a.png"), json.dumps({"image": "a.png"})]
    path = _write(folder, bad)
    problems = _problems(path, folder)
    assert [p.split(": ")[0] for p in problems] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    many = _write(folder, ["{oops"] * 30, "many.jsonl")
    with pytest.raises(ValueError) as info:
        read_jsonl(many, folder, max_errors=5)
    lines = str(info.value).splitlines()
    assert lines[0] == f"6 problem(s) in {many}:"
    assert lines[-1] == f"{many}: stopped after 5 problems"


def test_small_image_warns_naming_the_file_and_is_upscaled_on_load(folder):
    path = _write(folder, [_line(image="tiny.png")])
    with pytest.warns(UserWarning, match=r"data\.jsonl:1: image .*tiny\.png is 20x10, below the minimum side 28"):
        rows = read_jsonl(path, folder, min_image_side=28)
    assert rows[0].image_sizes == ((20, 10),)  # boxes stay in the original image's pixels
    image = load_image(rows[0].image_paths[0], min_side=28)
    assert image.size == (56, 28) and image.mode == "RGB"  # shorter side to 28, aspect kept, like VLM-R1


def test_upscale_leaves_large_images_alone():
    image = Image.new("RGB", (30, 90))
    assert upscale_to_min_side(image, 28) is image
    assert upscale_to_min_side(Image.new("RGB", (9, 90)), 28).size == (28, 280)


def test_existence_only_mode_skips_decoding(folder):
    path = _write(folder, [_line(image="truncated.png")])
    assert len(read_jsonl(path, folder, verify_images=False)) == 1
    assert "cannot read image" in _problems(path, folder)[0]


def test_missing_file_is_an_error(folder):
    with pytest.raises(ValueError, match="data file not found"):
        read_jsonl(folder / "nope.jsonl", folder)
