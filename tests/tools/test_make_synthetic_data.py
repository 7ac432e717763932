"""Synthetic shape data: determinism, boxes checked against pixels, true and unambiguous phrases, disjoint OOD split."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_vlmr1.data import DataConfig, load_samples
from megatron_vlmr1.data.synthetic import COLORS, HELD_OUT, RELATIONS, make_dataset, relation_holds

REPO = Path(__file__).resolve().parents[2]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


PHRASE = re.compile(r"^the (\w+ \w+)(?: (" + "|".join(RELATIONS) + r") the (\w+ \w+))?$")


def _is_shape_pixel(pixels: np.ndarray) -> np.ndarray:
    """[H, W] mask of pixels equal to some palette colour (the background is grey, so never one)."""
    return np.any([np.all(pixels == c, axis=-1) for c in COLORS.values()], axis=0)


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rec")
    make_dataset("rec", out, n=40, seed=3, n_test=15)
    return out


@pytest.fixture(scope="module")
def ovd_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ovd")
    make_dataset("ovd", out, n=30, seed=3, n_test=15, images_per_sample=2)
    return out


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    for task in ("rec", "ovd"):
        a, b, c = tmp_path / f"{task}a", tmp_path / f"{task}b", tmp_path / f"{task}c"
        make_dataset(task, a, n=6, seed=1, images_per_sample=2)
        make_dataset(task, b, n=6, seed=1, images_per_sample=2)
        make_dataset(task, c, n=6, seed=2, images_per_sample=2)
        assert _tree_bytes(a) == _tree_bytes(b)
        assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
        assert (a / "images/train" / f"{task}_train_000000_0.png").read_bytes() != \
            (c / "images/train" / f"{task}_train_000000_0.png").read_bytes()


def test_rec_box_is_the_tight_box_of_the_target_pixels(rec_dir):
    for split in ("train", "test", "test_ood"):
        for record in _records(rec_dir / f"{split}.jsonl"):
            x1, y1, x2, y2 = json.loads(record["conversations"][1]["value"])
            pixels = np.asarray(Image.open(rec_dir / record["image"]).convert("RGB"))
            color = COLORS[record["expression"].split()[1]]
            inside = pixels[y1:y2, x1:x2]
            target = np.all(inside == color, axis=-1)
            # Only the target and background inside the box: no piece of another object.
            assert not (_is_shape_pixel(inside) & ~target).any(), record["id"]
            # Tight: each edge row and column of the box holds target pixels.
            assert target[0].any() and target[-1].any() and target[:, 0].any() and target[:, -1].any(), record["id"]
            # Nothing of the target outside: the 1-pixel ring around the box has no shape pixel at all.
            ring = np.zeros(pixels.shape[:2], dtype=bool)
            ring[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = True
            ring[y1:y2, x1:x2] = False
            assert not _is_shape_pixel(pixels[ring]).any(), record["id"]


def test_rec_phrases_are_true_and_unambiguous(rec_dir):
    relational = 0
    for record in _records(rec_dir / "train.jsonl"):
        objects = record["objects"][record["target_image"]]
        box = json.loads(record["conversations"][1]["value"])
        label, relation, anchor = PHRASE.match(record["expression"]).groups()
        # Every object the phrase could mean: same label and, when relational, in that relation to the anchor.
        if relation is None:
            matches = [o for o in objects if o["label"] == label]
        else:
            relational += 1
            anchors = [o for o in objects if o["label"] == anchor]
            assert len(anchors) == 1, record["id"]
            matches = [o for o in objects
                       if o["label"] == label and relation_holds(o["bbox_2d"], relation, anchors[0]["bbox_2d"])]
        assert [o["bbox_2d"] for o in matches] == [box], record["id"]
    assert relational >= 5  # the relational path is exercised, not only plain "the red circle"


def test_relation_holds_hand_values():
    assert relation_holds((0, 0, 10, 10), "left of", (10, 0, 20, 10))
    assert not relation_holds((0, 0, 11, 10), "left of", (10, 0, 20, 10))  # one column of overlap
    assert relation_holds((0, 20, 10, 30), "below", (0, 0, 10, 20))
    assert not relation_holds((0, 20, 10, 30), "above", (0, 0, 10, 20))


def test_ood_split_is_disjoint_from_training_combinations(rec_dir, ovd_dir):
    for out in (rec_dir, ovd_dir):
        train_labels = {o["label"] for r in _records(out / "train.jsonl") for img in r["objects"] for o in img}
        test_labels = {o["label"] for r in _records(out / "test.jsonl") for img in r["objects"] for o in img}
        held = {" ".join(cs) for cs in HELD_OUT}
        assert train_labels and not train_labels & held
        assert not test_labels & held
        for record in _records(out / "test_ood.jsonl"):
            asked = [PHRASE.match(record["expression"]).group(1)] if "expression" in record else record["labels"]
            assert set(asked) <= held, record["id"]
            assert not set(asked) & train_labels


def test_ovd_answer_lists_every_instance_of_queried_labels(ovd_dir):
    nones = 0
    for record in _records(ovd_dir / "train.jsonl"):
        assert record["conversations"][0]["value"].startswith("<image><image>In the ")
        answer = re.fullmatch(r"<answer>(.*)</answer>", record["conversations"][1]["value"], re.S).group(1)
        objects = record["objects"][record["target_image"]]
        expected = sorted((o["label"], o["bbox_2d"]) for o in objects if o["label"] in record["labels"])
        if answer == "None":
            nones += 1
            assert expected == []
            continue
        body = re.fullmatch(r"```json\n(.*)\n```", answer, re.S).group(1)
        got = sorted((d["label"], d["bbox_2d"]) for d in json.loads(body))
        assert got == expected, record["id"]
    assert 0 < nones < 30  # both answer forms occur with this seed


def test_ovd_coco_ground_truth_matches_answers(ovd_dir):
    from pycocotools.coco import COCO

    coco = COCO(str(ovd_dir / "test.jsonl").replace("test.jsonl", "test_coco.json"))
    for record in _records(ovd_dir / "test.jsonl"):
        image = coco.imgs[record["coco_image_id"]]
        assert image["file_name"] == record["image"][record["target_image"]]
        width, height = Image.open(ovd_dir / image["file_name"]).size
        assert (image["width"], image["height"]) == (width, height)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[record["coco_image_id"]]))
        got = sorted((coco.cats[a["category_id"]]["name"],
                      [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
                     for a in anns)
        objects = record["objects"][record["target_image"]]
        assert got == sorted((o["label"], o["bbox_2d"]) for o in objects if o["label"] in record["labels"])


def test_easy_mode_has_few_large_shapes_at_few_positions(tmp_path):
    make_dataset("rec", tmp_path, n=30, seed=0, difficulty="easy")
    boxes = set()
    for record in _records(tmp_path / "train.jsonl"):
        assert Image.open(tmp_path / record["image"]).size == (112, 112)
        assert 1 <= len(record["objects"][0]) <= 2
        boxes.add(tuple(json.loads(record["conversations"][1]["value"])))
        assert json.loads(record["conversations"][1]["value"])[2] - json.loads(record["conversations"][1]["value"])[0] >= 40
    # Four quadrants, and each shape type has its own tight box inside a quadrant: at most 4 x 3 boxes.
    assert len(boxes) <= 12


def test_locate_mode_codes_position_in_colour_and_draws_one_shape_per_quadrant(tmp_path):
    make_dataset("rec", tmp_path, n=30, seed=0, n_test=4, difficulty="locate")
    boxes = set()
    for record in _records(tmp_path / "train.jsonl"):
        pixels = np.asarray(Image.open(tmp_path / record["image"]).convert("RGB")).astype(int)
        assert pixels.shape == (112, 112, 3) and len(record["objects"][0]) == 1
        box = json.loads(record["conversations"][1]["value"])
        x1, y1, x2, y2 = box
        assert x1 in (0, 56) and y1 in (0, 56) and (x2 - x1, y2 - y1) == (56, 56)
        boxes.add(tuple(box))
        # Red is 20 at x = 0 and 200 at x = 111, green likewise in y, everywhere (under the shape too).
        assert (pixels[:, 0, 0] == 20).all() and (pixels[:, 111, 0] == 200).all()
        assert (pixels[0, :, 1] == 20).all() and (pixels[111, :, 1] == 200).all()
        blue = pixels[:, :, 2] == 255
        assert not blue[:y1].any() and not blue[y2:].any() and not blue[:, :x1].any() and not blue[:, x2:].any()
        assert blue[y1:y2, x1:x2].mean() > 0.4 and (pixels[:, :, 2][~blue] == 0).all()
    assert len(boxes) == 4  # the four quadrants
    ood = {record["expression"] for record in _records(tmp_path / "test_ood.jsonl")}
    assert ood == {"the blue square"}


def test_generated_files_pass_the_loader(rec_dir, ovd_dir):
    samples = load_samples(DataConfig(files=[str(rec_dir / "train.jsonl"), str(ovd_dir / "test_ood.jsonl")],
                                      image_folders=[str(rec_dir), str(ovd_dir)]))
    assert len(samples) == 40 + 15
    assert samples[0].task == "rec" and samples[0].accu_reward_method == "iou"
    assert samples[-1].task == "ovd" and len(samples[-1].image_paths) == 2


def test_cli_writes_the_splits(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, str(REPO / "tools/make_synthetic_data.py"), "--task", "ovd", "--out",
                             str(out), "--n", "3", "--n-test", "2", "--seed", "5"],
                            capture_output=True, text=True, check=True)
    assert "test_ood" in result.stdout
    assert len(_records(out / "train.jsonl")) == 3 and len(_records(out / "test_ood.jsonl")) == 2
    assert json.loads((out / "train_coco.json").read_text())["images"][0]["id"] == 0
    bad = subprocess.run([sys.executable, str(REPO / "tools/make_synthetic_data.py"), "--task", "rec", "--out",
                          str(out), "--n", "2", "--images-per-sample", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "images_per_sample" in bad.stderr
