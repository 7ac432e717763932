"""Evaluation on the synthetic REC / OVD splits the data package writes: perfect answers score 1, empty answers 0."""
import json
import random

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from megatron_vlmr1.data.synthetic import make_dataset
from megatron_vlmr1.eval.config import EvalConfig, SplitConfig
from megatron_vlmr1.eval.run import evaluate
from megatron_vlmr1.rewards import get_reward


def reference_answers(records, task):
    answers = []
    for record in records:
        value = record["conversations"][1]["value"]
        answers.append(f"<think>t</think><answer>{value}</answer>" if task == "rec" else f"<think>t</think>{value}")
    return answers


@pytest.mark.parametrize("task", ["rec", "ovd"])
def test_synthetic_split_scores(tmp_path, task):
    paths = make_dataset(task, tmp_path, n=1, n_test=4, seed=3)
    split = SplitConfig("test", str(paths["test"]), coco_gt=str(tmp_path / "test_coco.json") if task == "ovd" else None)
    cfg = EvalConfig(task=task, splits=[split], output=str(tmp_path / "r.json"))
    records = [json.loads(line) for line in paths["test"].read_text().splitlines()]

    perfect = evaluate(cfg, generate=lambda batch: reference_answers(batch, task))["splits"]["test"]
    empty = evaluate(cfg, generate=lambda batch: ["<answer>None</answer>"] * len(batch))["splits"]["test"]
    if task == "rec":
        assert (perfect["accuracy"], perfect["mean_iou"]) == (1.0, 1.0)
        assert empty["accuracy"] == 0.0
        rewards = get_reward("iou")(reference_answers(records, task), solution=[r["conversations"][1]["value"]
                                                                              for r in records])
    else:
        assert (perfect["map"], perfect["ap50"], perfect["precision"], perfect["recall"]) == pytest.approx((1, 1, 1, 1))
        assert empty["map"] == 0.0 and empty["recall"] == 0.0
        rewards = get_reward("map_len")(reference_answers(records, task),
                                        solution=[r["conversations"][1]["value"] for r in records])
    # The training reward agrees with the evaluation on the same answers.
    assert rewards == pytest.approx([1.0] * len(records))


def test_ovd_split_map_equals_plain_cocoeval_on_jittered_answers(tmp_path):
    paths = make_dataset("ovd", tmp_path, n=1, n_test=6, seed=5)
    coco_path = str(tmp_path / "test_coco.json")
    records = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    rng = random.Random(0)
    completions, detections = [], []
    coco = COCO(coco_path)
    category = {c["name"]: c["id"] for c in coco.dataset["categories"]}
    for record in records:
        boxes = [o for o in record["objects"][record["target_image"]] if o["label"] in record["labels"]]
        answer = []
        for obj in boxes:
            if rng.random() < 0.8:
                x1, y1, x2, y2 = obj["bbox_2d"]
                jittered = [x1 + rng.uniform(-4, 4), y1 + rng.uniform(-4, 4), x2 + rng.uniform(-4, 4), y2]
                answer.append({"bbox_2d": jittered, "label": obj["label"]})
        if rng.random() < 0.5:
            answer.append({"bbox_2d": [1, 1, 30, 30], "label": record["labels"][0]})
        completions.append("<answer>" + json.dumps(answer) + "</answer>")
        detections += [{"image_id": record["coco_image_id"], "category_id": category[a["label"]],
                        "bbox": [a["bbox_2d"][0], a["bbox_2d"][1], a["bbox_2d"][2] - a["bbox_2d"][0],
                                 a["bbox_2d"][3] - a["bbox_2d"][1]], "score": 1.0} for a in answer]
    evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()

    cfg = EvalConfig(task="ovd", splits=[SplitConfig("test", str(paths["test"]), coco_gt=coco_path)],
                     output=str(tmp_path / "r.json"))
    answers = dict(zip([r["id"] for r in records], completions))
    split = evaluate(cfg, generate=lambda batch: [answers[r["id"]] for r in batch])["splits"]["test"]
    assert 0.0 < split["map"] < 1.0
    assert split["map"] == pytest.approx(evaluator.stats[0], abs=1e-12)
    assert split["ap50"] == pytest.approx(evaluator.stats[1], abs=1e-12)
