"""Box parsing, IoU, coordinate spaces, the REC ``iou`` reward and the OVD rewards, against hand-computed values."""
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from megatron_vlmr1.rewards import get_reward
from megatron_vlmr1.rewards.boxes import box_iou, greedy_match, iou_matrix, to_original_space
from megatron_vlmr1.rewards.parsing import LabeledBox, first_box, parse_boxes, reference_boxes


def score(name, completion, **fields):
    return get_reward(name)([completion], **{k: [v] for k, v in fields.items()})[0]


def ovd_answer(items):
    return "<think>t</think><answer>```json\n" + json.dumps(items) + "\n```</answer>"


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175),
        ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching edges share no area
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),
        ((0, 0, 10, 10), (0, 0, 10, 6.4), 0.64),
        ((1, 1, 1, 1), (1, 1, 1, 1), 0.0),  # empty union
    ],
)
def test_box_iou_hand_values(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert iou_matrix([a], [b])[0, 0] == pytest.approx(expected)


def test_greedy_match_takes_best_pairs_first_and_respects_threshold():
    iou = np.array([[0.6, 0.9], [0.7, 0.2], [0.4, 0.45]])
    assert greedy_match(iou, 0.5) == [(0, 1, 0.9), (1, 0, 0.7)]
    assert greedy_match(np.array([[0.5, 0.5], [0.5, 0.5]]), 0.5) == [(0, 0, 0.5), (1, 1, 0.5)]  # ties: scan order
    assert greedy_match(np.array([[0.49]]), 0.5) == []


def test_coordinate_spaces():
    assert to_original_space((10, 10, 20, 20), "abs") == (10, 10, 20, 20)
    assert to_original_space((10, 10, 20, 20), "resized", (200, 100), (100, 50)) == (20, 20, 40, 40)
    assert to_original_space((100, 200, 200, 400), "norm1000", (200, 100)) == (20, 20, 40, 40)
    for bad in [None, (0, 10), (10,), ("a", 1), (1e-300, 10)]:
        with pytest.raises(ValueError, match="image_size"):
            to_original_space((0, 0, 1, 1), "norm1000", bad)
    with pytest.raises(ValueError, match="box_space"):
        to_original_space((0, 0, 1, 1), "percent", (10, 10))


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<answer>{"bbox_2d": [1, 2, 3, 4], "label": "x"}</answer>', (1, 2, 3, 4)),
        ("<answer>[1.5, 2, 3.25, 4]</answer>", (1.5, 2, 3.25, 4)),
        ('<answer>[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}]</answer>', (1, 2, 3, 4)),
        ("<answer>[[5, 6, 7, 8], [1, 2, 3, 4]]</answer>", (5, 6, 7, 8)),
        ('<answer>```json\n{"bbox_2d": [1, 2, 3, 4]}\n```</answer>', (1, 2, 3, 4)),
        ("<answer>the box is [1, 2, 3, 4] I think</answer>", (1, 2, 3, 4)),
        ("<answer>[9, 9, 9, 9]</answer> then <answer>[1, 2, 3, 4]</answer>", (1, 2, 3, 4)),  # last answer block
        ("no tags [1, 2, 3, 4]", (1, 2, 3, 4)),
        ("<answer>[3, 2, 1, 4]</answer>", None),  # x2 < x1: invalid, not repaired
        ('<answer>{"bbox_2d": [NaN, 2, 3, 4]}</answer>', None),
        ('<answer>{"bbox_2d": [1, 2, 3, 1e400]}</answer>', None),
        ('<answer>{"bbox_2d": ["1", 2, 3, 4]}</answer>', None),
        ('<answer>{"bbox_2d": [true, 2, 3, 4]}</answer>', None),
        ("<answer>[1, 2, 3]</answer>", None),
        ("<answer></answer>", None),
    ],
)
def test_first_box(text, expected):
    assert first_box(text) == expected


def test_parse_boxes_for_detection_answers():
    assert parse_boxes("<answer>None</answer>") == []
    assert parse_boxes("<answer> [] </answer>") == []
    assert parse_boxes("<answer>I see nothing useful</answer>") is None
    assert parse_boxes('<answer>[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, {"bbox_2d": [1, 1]}]</answer>') == [
        LabeledBox((1, 2, 3, 4), "cat")
    ]
    assert reference_boxes([[0, 0, 1, 1], [2, 2, 3, 3]]) == [(0, 0, 1, 1), (2, 2, 3, 3)]
    assert reference_boxes("[0, 0, 1, 1]") == [(0, 0, 1, 1)]


# ---------------------------------------------------------------- iou (REC)


def test_iou_reward_hand_values():
    gt = "[0, 0, 10, 10]"
    assert score("iou", '<think>t</think><answer>{"bbox_2d": [0, 0, 10, 10]}</answer>', solution=gt) == 1.0
    assert score("iou", "<answer>[5, 5, 15, 15]</answer>", solution=gt) == pytest.approx(1 / 7)
    assert score("iou", "<answer>[5.0, 5.0, 15.0, 15.0]</answer>", solution=[0, 0, 10, 10]) == pytest.approx(1 / 7)
    assert score("iou", "<answer>no box</answer>", solution=gt) == 0.0
    assert score("iou", "<answer>[0, 0, 10, 10]</answer>", solution="not a box") == 0.0


def test_iou_reward_takes_max_over_references():
    refs = [[100, 100, 110, 110], [0, 0, 10, 20]]
    assert score("iou", "<answer>[0, 0, 10, 10]</answer>", solution=refs) == pytest.approx(0.5)


def test_iou_reward_rescales_prediction_spaces():
    gt = [20, 20, 40, 40]
    resized = score(
        "iou", "<answer>[10, 10, 20, 20]</answer>", solution=gt, box_space="resized",
        image_size=[200, 100], resized_size=[100, 50],
    )
    assert resized == 1.0
    norm = score(
        "iou", "<answer>[100, 200, 200, 400]</answer>", solution=gt, box_space="norm1000", image_size=[200, 100]
    )
    assert norm == 1.0
    assert score("iou", "<answer>[10, 10, 20, 20]</answer>", solution=gt) == 0.0  # same text read as absolute
    # The data loader's form: one size per image, the asked-about image chosen by target_image.
    from_loader = score(
        "iou", "<answer>[100, 200, 200, 400]</answer>", solution="<answer> [20, 20, 40, 40] </answer>",
        box_space="norm1000", image_sizes=[[50, 50], [200, 100]], target_image=1,
    )
    assert from_loader == 1.0


# ---------------------------------------------------------------- OVD

CAT = {"bbox_2d": [0, 0, 10, 10], "label": "cat"}
DOG = {"bbox_2d": [20, 20, 31, 31], "label": "dog"}


def test_ovd_empty_cases():
    none = "<think>t</think><answer>None</answer>"
    for name in ("ap", "ap50", "map_len", "weighted_sum"):
        assert score(name, none, solution="<answer>None</answer>") == 1.0, name
        assert score(name, none, solution=ovd_answer([CAT])) == 0.0, name
        assert score(name, ovd_answer([CAT]), solution="<answer>None</answer>") == 0.0, name
        assert score(name, "<answer>garbage</answer>", solution="<answer>None</answer>") == 0.0, name


@pytest.mark.parametrize("name", ["ap", "ap50", "map_len", "weighted_sum"])
def test_ovd_none_ground_truth_needs_an_explicit_empty_answer(name):
    for truth in ("<answer>None</answer>", "<answer> [] </answer>", [], None):
        for explicit in ("<answer>[]</answer>", "<think>t</think><answer> null </answer>",
                         "<answer>```json\n[]\n```</answer>", "<answer>none</answer>"):
            assert score(name, explicit, solution=truth) == 1.0, (name, truth, explicit)
        # Saying nothing is not saying "nothing": no completion, no answer block, an empty or prose answer.
        for silent in ("", "   ", "<think>no idea</think>", "[]", "None", "<answer></answer>",
                       "<answer>nothing here</answer>", "<answer>[[]]</answer>", "<answer>" + "[" * 5000 + "</answer>"):
            assert score(name, silent, solution=truth) == 0.0, (name, truth, silent)


def test_ap_hand_values():
    assert score("ap", ovd_answer([CAT]), solution=ovd_answer([CAT])) == pytest.approx(1.0)
    # IoU 0.64 matches at thresholds 0.50, 0.55, 0.60 out of ten → AP@[.5:.95] = 0.3, AP50 = 1.
    shifted = [{"bbox_2d": [0, 0, 10, 6.4], "label": "cat"}]
    assert score("ap", ovd_answer(shifted), solution=ovd_answer([CAT])) == pytest.approx(0.3)
    assert score("ap50", ovd_answer(shifted), solution=ovd_answer([CAT])) == pytest.approx(1.0)
    # Right box, wrong label: "dog" is not a ground-truth label, so it is dropped and nothing is detected.
    wrong_label = [{"bbox_2d": [0, 0, 10, 10], "label": "dog"}]
    assert score("ap", ovd_answer(wrong_label), solution=ovd_answer([CAT])) == 0.0
    # Labels compare case- and space-insensitively.
    spaced = [{"bbox_2d": [0, 0, 10, 10], "label": " Cat"}]
    assert score("ap", ovd_answer(spaced), solution=ovd_answer([CAT])) == pytest.approx(1.0)


def test_map_len_redundancy_penalty():
    gt = ovd_answer([CAT])
    # A duplicate is a false positive after the only true positive: AP stays 1, L_gt / L_pred = 1/2.
    assert score("ap", ovd_answer([CAT, CAT]), solution=gt) == pytest.approx(1.0)
    assert score("map_len", ovd_answer([CAT, CAT]), solution=gt) == pytest.approx(0.5)
    # A dropped (unknown) label still counts in L_pred.
    assert score("map_len", ovd_answer([CAT, DOG]), solution=gt) == pytest.approx(0.5)
    # Fewer predictions than ground truth: no length penalty (min(1, 2/1)); AP = recall-limited 0.5.
    assert score("map_len", ovd_answer([CAT]), solution=ovd_answer([CAT, {**CAT, "bbox_2d": [50, 50, 60, 60]}])) == (
        pytest.approx(score("ap", ovd_answer([CAT]), solution=ovd_answer([CAT, {**CAT, "bbox_2d": [50, 50, 60, 60]}])))
    )


def test_weighted_sum_hand_values():
    dog_pred = {"bbox_2d": [20, 20, 30, 30], "label": "dog"}  # IoU 100/121 with DOG
    gt = ovd_answer([CAT, DOG])
    assert score("weighted_sum", ovd_answer([CAT, dog_pred]), solution=gt) == pytest.approx(
        0.7 * (1 + 100 / 121) / 2 + 0.3
    )
    # One of two found: position 1/2, miss rate 1/2, no false alarm → completeness 0.75.
    assert score("weighted_sum", ovd_answer([CAT]), solution=gt) == pytest.approx(0.7 * 0.5 + 0.3 * 0.75)
    # Right box with the wrong label is matched but earns no position score.
    wrong = {"bbox_2d": [0, 0, 10, 10], "label": "dog"}
    assert score("weighted_sum", ovd_answer([wrong]), solution=ovd_answer([CAT])) == pytest.approx(0.3)
    # A far-off box matches nothing: miss 1, false alarm 1 → 0.
    far = {"bbox_2d": [100, 100, 110, 110], "label": "cat"}
    assert score("weighted_sum", ovd_answer([far]), solution=ovd_answer([CAT])) == 0.0


def _direct_pycocotools_ap(tmp_path, preds, gts):
    """Straight pycocotools on files, the way a user would run it, for the parity test."""
    names = sorted({g["label"] for g in gts})
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    gt_json = {
        "images": [{"id": 7, "width": 640, "height": 480, "file_name": "x.jpg"}],
        "categories": [{"id": i, "name": n} for n, i in cat_id.items()],
        "annotations": [
            {"id": k + 1, "image_id": 7, "category_id": cat_id[g["label"]], "bbox": xywh(g["bbox_2d"]),
             "area": xywh(g["bbox_2d"])[2] * xywh(g["bbox_2d"])[3], "iscrowd": 0}
            for k, g in enumerate(gts)
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    dets = [{"image_id": 7, "category_id": cat_id[p["label"]], "bbox": xywh(p["bbox_2d"]), "score": 1.0}
            for p in preds if p["label"] in cat_id]
    coco = COCO(str(tmp_path / "gt.json"))
    if not dets:
        return 0.0, 0.0
    evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return max(evaluator.stats[0], 0.0), max(evaluator.stats[1], 0.0)


@pytest.mark.parametrize("name", ["ap", "ap50", "map_len", "weighted_sum"])
def test_ovd_rewards_rescale_prediction_spaces(name):
    """Boxes answered in 0-1000 (InternVL, Qwen2-VL) or resized pixels are rescaled to the original image first."""
    gt = ovd_answer([{"bbox_2d": [20, 20, 40, 40], "label": "cat"}, {"bbox_2d": [100, 50, 150, 90], "label": "dog"}])
    norm = ovd_answer([{"bbox_2d": [100, 200, 200, 400], "label": "cat"},
                       {"bbox_2d": [500, 500, 750, 900], "label": "dog"}])  # x * 200 / 1000, y * 100 / 1000
    resized = ovd_answer([{"bbox_2d": [10, 10, 20, 20], "label": "cat"}, {"bbox_2d": [50, 25, 75, 45], "label": "dog"}])
    assert score(name, norm, solution=gt, box_space="norm1000", image_size=[200, 100]) == pytest.approx(1.0)
    assert score(name, resized, solution=gt, box_space="resized", image_size=[200, 100],
                 resized_size=[100, 50]) == pytest.approx(1.0)
    assert score(name, norm, solution=gt, box_space="norm1000", image_sizes=[[50, 50], [200, 100]],
                 target_image=1) == pytest.approx(1.0)
    assert score(name, norm, solution=gt) < 0.5  # the same text read as pixels misses
    with pytest.raises(ValueError, match="image_size"):
        score(name, norm, solution=gt, box_space="norm1000")


@pytest.mark.parametrize("seed", range(6))
def test_ap_equals_direct_pycocotools(tmp_path, seed):
    rng = np.random.default_rng(seed)
    labels = ["cat", "dog", "car"]

    def random_items(n):
        items = []
        for _ in range(n):
            x, y = rng.uniform(0, 300, size=2)
            w, h = rng.uniform(5, 120, size=2)
            items.append({"bbox_2d": [round(x, 1), round(y, 1), round(x + w, 1), round(y + h, 1)],
                          "label": str(rng.choice(labels))})
        return items

    gts = random_items(int(rng.integers(1, 8)))
    # Predictions: jittered copies of some ground truth plus random extras, so AP is strictly between 0 and 1.
    preds = [
        {"bbox_2d": [c + float(rng.normal(0, 4)) for c in g["bbox_2d"][:2]] + g["bbox_2d"][2:], "label": g["label"]}
        for g in gts if rng.random() < 0.8
    ]
    preds += random_items(int(rng.integers(0, 5)))
    preds = [p for p in preds if p["bbox_2d"][2] > p["bbox_2d"][0] and p["bbox_2d"][3] > p["bbox_2d"][1]]
    if not preds:
        preds = random_items(1)
    expected_ap, expected_ap50 = _direct_pycocotools_ap(tmp_path, preds, gts)
    assert score("ap", ovd_answer(preds), solution=ovd_answer(gts)) == pytest.approx(expected_ap, abs=1e-12)
    assert score("ap50", ovd_answer(preds), solution=ovd_answer(gts)) == pytest.approx(expected_ap50, abs=1e-12)
    assert score("map_len", ovd_answer(preds), solution=ovd_answer(gts)) == pytest.approx(
        expected_ap * min(1.0, len(gts) / len(preds)), abs=1e-12
    )
