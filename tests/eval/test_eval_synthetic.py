"""Evaluation on the synthetic REC / OVD splits the data package writes: perfect answers score 1, empty answers 0."""
import json

import pytest

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
