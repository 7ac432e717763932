"""Evaluation on hand-made split / prediction files: REC accuracy, OVD mAP, reports, errors, the generate seam."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from megatron_vlmr1.eval.config import EvalConfig, EvalModelConfig, SplitConfig
from megatron_vlmr1.eval.io import write_report
from megatron_vlmr1.eval.run import evaluate, format_table, load_eval_config, main

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def rec_sample(sample_id, box, **extra):
    return {"id": sample_id, "image": f"{sample_id}.png",
            "conversations": [{"from": "human", "value": "<image>where?"}, {"from": "gpt", "value": json.dumps(box)}],
            **extra}


def answer(box):
    return f"<think>t</think><answer>{json.dumps({'bbox_2d': box})}</answer>"


@pytest.fixture
def rec_files(tmp_path):
    """Two REC splits; hand-computed IoUs of the predictions are in the comments."""
    a = write_jsonl(tmp_path / "a.jsonl", [
        rec_sample("a0", [0, 0, 10, 10]),
        rec_sample("a1", [0, 0, 10, 10]),
        rec_sample("a2", [0, 0, 10, 10]),
        rec_sample("a3", [0, 0, 10, 10]),
        rec_sample("a4", [0, 0, 10, 10]),
    ])
    b = write_jsonl(tmp_path / "b.jsonl", [rec_sample(0, [5, 5, 25, 25]), rec_sample(1, [0, 0, 4, 4])])
    preds = write_jsonl(tmp_path / "pred.jsonl", [
        {"split": "a", "id": "a0", "completion": answer([0, 0, 10, 10])},  # IoU 1
        {"split": "a", "id": "a1", "completion": answer([5, 5, 15, 15])},  # IoU 25/175
        {"split": "a", "id": "a2", "completion": answer([0, 0, 10, 5])},  # IoU exactly 0.5: not > 0.5
        {"split": "a", "id": "a3", "completion": "<answer>I cannot find it</answer>"},  # no box
        # a4: no prediction at all
        {"split": "b", "id": 0, "completion": "<answer>[5, 5, 25, 20]</answer>"},  # IoU 0.75
        {"split": "b", "id": 1, "completion": "[0, 0, 4, 4]"},  # IoU 1 (no tags: lenient)
    ])
    return tmp_path, a, b, preds


def rec_config(tmp_path, a, b, preds, **kwargs):
    return EvalConfig(
        task="rec", splits=[SplitConfig("a", a), SplitConfig("b", b)], predictions=preds,
        output=str(tmp_path / "report.json"), **kwargs,
    )


def test_rec_scores_of_a_hand_made_predictions_file(rec_files):
    tmp_path, a, b, preds = rec_files
    report = evaluate(rec_config(tmp_path, a, b, preds))
    split_a, split_b = report["splits"]["a"], report["splits"]["b"]
    assert [r["iou"] for r in split_a["records"]] == pytest.approx([1.0, 25 / 175, 0.5, 0.0, 0.0])
    assert [r["correct"] for r in split_a["records"]] == [True, False, False, False, False]
    assert split_a["accuracy"] == pytest.approx(1 / 5)
    assert split_a["mean_iou"] == pytest.approx((1 + 25 / 175 + 0.5) / 5)
    assert (split_a["num_missing"], split_a["num_no_box"]) == (1, 1)
    assert split_b["accuracy"] == 1.0 and split_b["mean_iou"] == pytest.approx((0.75 + 1.0) / 2)
    assert report["overall"] == {"num_samples": 7, "accuracy": pytest.approx(3 / 7)}
    assert split_a["records"][0] == {
        "id": "a0", "iou": 1.0, "correct": True, "pred_box": [0, 0, 10, 10], "missing": False,
    }


def test_rec_threshold_is_configurable(rec_files):
    tmp_path, a, b, preds = rec_files
    report = evaluate(rec_config(tmp_path, a, b, preds, iou_threshold=0.1))
    assert report["splits"]["a"]["accuracy"] == pytest.approx(3 / 5)
    report = evaluate(rec_config(tmp_path, a, b, preds, iou_threshold=0.8))
    assert report["splits"]["b"]["accuracy"] == pytest.approx(1 / 2)


def test_rec_box_spaces_read_the_image_size_from_prediction_data_or_image(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "s2.png")
    data = write_jsonl(tmp_path / "d.jsonl", [
        rec_sample("s0", [20, 20, 40, 40]),
        rec_sample("s1", [20, 20, 40, 40], image_size=[200, 100]),
        rec_sample("s2", [20, 20, 40, 40]),
    ])
    norm = "<answer>[100, 200, 200, 400]</answer>"  # 0-1000 coordinates of the reference box in a 200x100 image
    preds = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "s0", "completion": norm, "image_size": [200, 100]},
        {"id": "s1", "completion": norm},
        {"id": "s2", "completion": norm},
    ])
    cfg = EvalConfig(splits=[SplitConfig("t", data, image_root=str(tmp_path))], predictions=preds,
                     box_space="norm1000", output=str(tmp_path / "r.json"))
    assert [r["iou"] for r in evaluate(cfg)["splits"]["t"]["records"]] == [1.0, 1.0, 1.0]
    resized = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "s0", "completion": "<answer>[10, 10, 20, 20]</answer>", "image_size": [200, 100],
         "resized_size": [100, 50]},
    ])
    one = write_jsonl(tmp_path / "d1.jsonl", [rec_sample("s0", [20, 20, 40, 40])])
    cfg = EvalConfig(splits=[SplitConfig("t", one)],
                     predictions=resized, box_space="resized", output=str(tmp_path / "r.json"))
    assert evaluate(cfg)["splits"]["t"]["records"][0]["iou"] == 1.0
    no_size = EvalConfig(splits=[SplitConfig("t", data)], predictions=preds, box_space="norm1000",
                         output=str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match=r"p\.jsonl:3: box_space needs the original image size"):
        evaluate(no_size)


def test_box_space_auto_follows_the_models_family_as_training_does(tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    one = write_jsonl(tmp_path / "d1.jsonl", [rec_sample("s0", [20, 20, 40, 40], image_size=[200, 100])])
    preds = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "s0", "completion": "<answer>[10, 10, 20, 20]</answer>", "resized_size": [100, 50]}])
    split = [SplitConfig("t", one)]
    # No model to ask: the predictions are read as original-image pixels.
    report = evaluate(EvalConfig(splits=split, predictions=preds, output=str(tmp_path / "r.json")))
    assert report["settings"]["box_space"] == "abs" and report["splits"]["t"]["records"][0]["iou"] == 0.0
    Qwen2_5_VLConfig().save_pretrained(tmp_path / "qwen25")
    Qwen2VLConfig().save_pretrained(tmp_path / "qwen2")
    for model, space, iou in [("qwen25", "resized", 1.0), ("qwen2", "norm1000", 0.0)]:
        cfg = EvalConfig(splits=split, predictions=preds, output=str(tmp_path / "r.json"),
                         model=EvalModelConfig(path=str(tmp_path / model)))
        report = evaluate(cfg)
        assert report["settings"]["box_space"] == space
        assert report["splits"]["t"]["records"][0]["iou"] == pytest.approx(iou, abs=0.05)
    explicit = EvalConfig(splits=split, predictions=preds, output=str(tmp_path / "r.json"), box_space="abs",
                          model=EvalModelConfig(path=str(tmp_path / "qwen25")))
    assert evaluate(explicit)["settings"]["box_space"] == "abs"


# ---------------------------------------------------------------- OVD


def ovd_answer(items):
    return "<think>t</think><answer>```json\n" + json.dumps(items) + "\n```</answer>"


@pytest.fixture
def ovd_files(tmp_path):
    coco = {
        "images": [{"id": 1, "width": 64, "height": 64, "file_name": "1.png"},
                   {"id": 2, "width": 64, "height": 64, "file_name": "2.png"}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [20, 20, 10, 10], "area": 100, "iscrowd": 0},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    data = write_jsonl(tmp_path / "ovd.jsonl", [
        {"id": "x", "coco_image_id": 1, "conversations": []},
        {"id": "y", "coco_image_id": 2, "conversations": []},
    ])
    preds = write_jsonl(tmp_path / "ovd_pred.jsonl", [
        {"id": "x", "completion": ovd_answer([{"bbox_2d": [0, 0, 10, 10], "label": "cat"},
                                              {"bbox_2d": [30, 30, 40, 40], "label": "bird"}])},
        {"id": "y", "completion": ovd_answer([{"bbox_2d": [0, 0, 10, 10], "label": "Dog"},
                                              {"bbox_2d": [20, 20, 30, 26.4], "label": "cat"}])},  # IoU 0.64
    ])
    cfg = EvalConfig(task="ovd", splits=[SplitConfig("val", data, coco_gt=str(tmp_path / "coco.json"))],
                     predictions=preds, output=str(tmp_path / "report.json"))
    return cfg


def test_ovd_scores_of_a_hand_made_predictions_file(ovd_files):
    split = evaluate(ovd_files)["splits"]["val"]
    # dog: AP 1 at every threshold. cat: two GT; at IoU thresholds .50/.55/.60 both detections match (AP 1); at the
    # seven thresholds .65-.95 image 1's detection is a TP then image 2's an FP: precision 1 up to recall 0.5 →
    # 51 of COCO's 101 recall points → AP 51/101.
    cat = (3 * 1.0 + 7 * 51 / 101) / 10
    assert split["map"] == pytest.approx((1.0 + cat) / 2)
    assert split["ap50"] == pytest.approx(1.0)
    # Greedy at IoU 0.5: 3 true positives; 4 predicted boxes (the unknown "bird" counts); 3 ground-truth boxes.
    assert split["precision"] == pytest.approx(3 / 4)
    assert split["recall"] == pytest.approx(1.0)
    assert (split["num_pred_boxes"], split["num_gt_boxes"]) == (4, 3)
    assert [r["true_positives"] for r in split["records"]] == [1, 2]


def test_ovd_missing_and_unparseable_predictions(ovd_files, tmp_path):
    ovd_files.predictions = write_jsonl(tmp_path / "p2.jsonl", [{"id": "x", "completion": "<answer>junk</answer>"}])
    split = evaluate(ovd_files)["splits"]["val"]
    assert (split["map"], split["ap50"], split["precision"], split["recall"]) == (0.0, 0.0, 0.0, 0.0)
    assert (split["num_missing"], split["num_unparseable"]) == (1, 1)


def test_ovd_boxes_are_rescaled_from_the_models_box_space(ovd_files, tmp_path):
    """norm1000 answers (InternVL's space, from ``box_space: auto`` and the model's config) score like the pixel
    answers of the hand-made file; the 64x64 size comes from the COCO image entry, or the prediction when given."""
    from transformers import InternVLConfig

    pixels = evaluate(ovd_files)["splits"]["val"]
    to_norm = 1000 / 64
    norm_lines = []
    for line in Path(ovd_files.predictions).read_text().splitlines():
        row = json.loads(line)
        items = json.loads(row["completion"].split("```json\n")[1].split("\n```")[0])
        items = [{**item, "bbox_2d": [v * to_norm for v in item["bbox_2d"]]} for item in items]
        norm_lines.append({**row, "completion": ovd_answer(items)})
    norm_lines[1]["image_size"] = [64, 64]
    InternVLConfig().save_pretrained(tmp_path / "internvl")
    ovd_files.predictions = write_jsonl(tmp_path / "norm.jsonl", norm_lines)
    ovd_files.model = EvalModelConfig(path=str(tmp_path / "internvl"))
    report = evaluate(ovd_files)
    assert report["settings"]["box_space"] == "norm1000"
    split = report["splits"]["val"]
    for key in ("map", "ap50", "precision", "recall"):
        assert split[key] == pytest.approx(pixels[key]), key
    assert evaluate(dataclasses.replace(ovd_files, box_space="abs"))["splits"]["val"]["recall"] < pixels["recall"]


# ---------------------------------------------------------------- report, CLI, errors


def test_report_is_byte_identical_across_runs(rec_files, ovd_files):
    tmp_path, a, b, preds = rec_files
    config = tmp_path / "eval.yaml"
    config.write_text(f"eval:\n  task: rec\n  splits:\n    - {{name: a, data: {a}}}\n    - {{name: b, data: {b}}}\n")
    outputs = []
    for run in range(2):
        out = tmp_path / f"report{run}.json"
        assert main(["--config", str(config), "--predictions", preds, "--output", str(out)]) == 0
        outputs.append(out.read_bytes())
    # A fresh interpreter with another hash seed must write the same bytes too.
    out = tmp_path / "report_subprocess.json"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-m", "megatron_vlmr1", "eval", "--config", str(config), "--predictions", preds,
                    "--output", str(out)], check=True, cwd=REPO, env=env, capture_output=True)
    outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    report = json.loads(outputs[0])
    assert report["splits"]["a"]["mean_iou"] == round((1 + 25 / 175 + 0.5) / 5, 6)

    ovd_out = []
    for run in range(2):
        ovd_files.output = str(tmp_path / f"ovd{run}.json")
        write_report(evaluate(ovd_files), ovd_files.output)
        ovd_out.append(Path(ovd_files.output).read_bytes())
    assert ovd_out[0] == ovd_out[1]


def test_cli_prints_a_table(rec_files, capsys):
    tmp_path, a, b, preds = rec_files
    config = tmp_path / "eval.yaml"
    config.write_text(f"task: rec\nsplits:\n  - {{name: a, data: {a}}}\n  - {{name: b, data: {b}}}\n")
    assert main(["--config", str(config), "--predictions", preds, "--output", str(tmp_path / "r.json"),
                 "iou_threshold=0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "box_space: abs (auto, no model to ask: original-image pixels)"
    assert lines[1].split() == ["split", "n", "missing", "acc@0.1", "mean_iou"]
    assert lines[2].split() == ["a", "5", "1", "0.6000", "0.3286"]
    assert lines[3].split() == ["b", "2", "0", "1.0000", "0.8750"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"pred\.jsonl:2: malformed JSON"),
        ("[1, 2]", r"pred\.jsonl:2: expected a JSON object"),
        ('{"completion": "x"}', r"pred\.jsonl:2: missing 'id'"),
        ('{"id": "a1", "completion": 5}', r"pred\.jsonl:2: 'completion' must be a string"),
        ('{"id": "a0", "completion": "x"}', r"pred\.jsonl:2: duplicate prediction .* \(first at .*pred\.jsonl:1\)"),
        ('{"id": "zz", "completion": "x"}', r"pred\.jsonl:2: id 'zz' is not in split 'a'"),
        ('{"id": "a1", "split": "c", "completion": "x"}', r"pred\.jsonl:2: unknown split 'c'"),
        ('{"id": "a1", "completion": "x", "image_size": [0, 5]}', r"pred\.jsonl:2: 'image_size' must be"),
    ],
)
def test_bad_prediction_lines_name_file_and_line(tmp_path, capsys, bad_line, message):
    data = write_jsonl(tmp_path / "a.jsonl", [rec_sample("a0", [0, 0, 1, 1]), rec_sample("a1", [0, 0, 1, 1])])
    preds = write_jsonl(tmp_path / "pred.jsonl", ['{"id": "a0", "completion": "x"}', "", bad_line][::2])
    cfg = EvalConfig(splits=[SplitConfig("a", data)], predictions=preds, output=str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match=message):
        evaluate(cfg)
    config = tmp_path / "eval.yaml"
    config.write_text(f"splits:\n  - {{name: a, data: {data}}}\noutput: {tmp_path / 'r.json'}\n")
    assert main(["--config", str(config), "--predictions", preds]) == 2
    assert "pred.jsonl:2" in capsys.readouterr().err


def test_split_without_split_field_is_ambiguous_with_several_splits(rec_files):
    tmp_path, a, b, _ = rec_files
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "a0", "completion": "x"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:1: 'split' is required"):
        evaluate(rec_config(tmp_path, a, b, preds))


def test_bad_data_lines_name_file_and_line(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [])
    cases = {
        "dup.jsonl": ([rec_sample("s", [0, 0, 1, 1])] * 2, r"dup\.jsonl:2: duplicate id 's'"),
        "nobox.jsonl": ([rec_sample("s", "somewhere")], r"nobox\.jsonl:1: the solution holds no valid box"),
        "noid.jsonl": ([{"conversations": []}], r"noid\.jsonl:1: missing 'id'"),
    }
    for name, (rows, message) in cases.items():
        cfg = EvalConfig(splits=[SplitConfig("t", write_jsonl(tmp_path / name, rows))], predictions=preds,
                         output=str(tmp_path / "r.json"))
        with pytest.raises(ValueError, match=message):
            evaluate(cfg)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"splits": []}, "at least one"),
        ({"splits": [{"name": "a", "data": "a.jsonl"}], "iou_threshold": 1.5}, "iou_threshold"),
        ({"splits": [{"name": "a", "data": "a.jsonl"}], "task": "ovd"}, "coco_gt"),
        ({"splits": [{"name": "a", "data": "x"}, {"name": "a", "data": "y"}]}, r"\['a'\] appear more than once"),
        ({"splits": [{"name": "a", "data": "x"}], "box_space": "percent"}, "box_space"),
        ({"splits": [{"name": "a", "data": "x"}], "batch_size": 0}, "batch_size"),
        ({"splits": [{"name": "a", "data": "x", "coco": "y"}]}, r"unknown config key\(s\) \['coco'\]"),
        ({"splits": [{"name": "", "data": "x"}]}, "non-empty"),
    ],
)
def test_eval_config_validation(tmp_path, data, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=message):
        load_eval_config(str(path))


def test_generate_seam_batches_data_records(rec_files):
    tmp_path, a, b, _ = rec_files
    calls = []

    def generate(records):
        calls.append([r["id"] for r in records])
        return [f"<answer>{r['conversations'][1]['value']}</answer>" for r in records]

    cfg = rec_config(tmp_path, a, b, None, batch_size=2)
    report = evaluate(cfg, generate=generate)
    assert report["overall"]["accuracy"] == 1.0
    assert calls == [["a0", "a1"], ["a2", "a3"], ["a4"], [0, 1]]
    with pytest.raises(ValueError, match="generate returned 1 completions for 2 samples"):
        evaluate(cfg, generate=lambda records: ["x"])
    with pytest.raises(ValueError, match="needs 'predictions'"):
        evaluate(cfg)
    assert "acc@0.5" in format_table(report)
