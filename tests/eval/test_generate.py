"""Model evaluation: training prompts → rollout engine → predictions.jsonl → the scoring path.

A stub engine (answers chosen per image) checks the wiring exactly: which prompts the model sees, which sizes the
predictions carry, and that perfect answers score 1 through the generated file. The tiny Qwen2.5-VL then runs the
whole command end to end, twice, and its predictions are re-scored with ``--predictions``.
"""
import json
from pathlib import Path

import pytest
import yaml

from megatron_vlmr1.data import DataConfig, load_samples
from megatron_vlmr1.data.synthetic import make_dataset
from megatron_vlmr1.data.templates import TEMPLATES
from megatron_vlmr1.eval.config import EvalConfig, EvalModelConfig, SplitConfig
from megatron_vlmr1.eval.generate import PREDICTIONS_FILE, generate_predictions_file
from megatron_vlmr1.eval.run import evaluate, load_eval_config, main
from megatron_vlmr1.rollout.base import Completion, RolloutEngine, RolloutResult
from megatron_vlmr1.vlm.inputs import EncodedPrompt, ImageGeometry


class StubEngine(RolloutEngine):
    """Answers each request with ``answers[first image path]`` and reports each image resized by ``scale``."""

    max_model_len = 4096

    def __init__(self, answers, scale=1.0):
        self.answers, self.scale = answers, scale
        self.requests, self.samplings = [], []

    def generate(self, requests, sampling):
        from PIL import Image

        self.requests.extend(requests)
        self.samplings.append(sampling)
        results = []
        for request in requests:
            geometry = []
            for path in request.images:
                with Image.open(path) as image:
                    width, height = image.size
                geometry.append(ImageGeometry((height, width), (round(height * self.scale), round(width * self.scale))))
            text = self.answers[request.images[0]]
            completion = Completion([0], text, [0.0], "stop")
            results.append(RolloutResult(EncodedPrompt([], None, None, geometry), [completion]))
        return results

    def update_weights(self, weights):
        raise AssertionError("evaluation never updates weights")


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def scaled_answer(record, root, scale):
    """The reference answer with every box multiplied by ``scale``, keyed by the record's image path."""
    value = record["conversations"][1]["value"]
    if record["task"] == "rec":
        box = [round(v * scale) for v in json.loads(value)]
        return str(Path(root) / record["image"]), f"<think>t</think><answer>{json.dumps(box)}</answer>"
    return str(Path(root) / record["image"]), f"<think>t</think>{value}"


@pytest.fixture(scope="module")
def rec_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    return root, make_dataset("rec", root, n=1, n_test=3, seed=11)


@pytest.fixture(scope="module")
def ovd_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ovd")
    return root, make_dataset("ovd", root, n=1, n_test=2, seed=12)


def rec_config(rec_data, out, **model):
    root, paths = rec_data
    return EvalConfig(task="rec", output=str(out / "report.json"), batch_size=2,
                      splits=[SplitConfig("test", str(paths["test"])), SplitConfig("ood", str(paths["test_ood"]))],
                      model=EvalModelConfig(**model))


def test_prompts_are_the_training_data_loaders(rec_data, tmp_path):
    root, paths = rec_data
    answers = dict(scaled_answer(r, root, 1.0) for p in ("test", "test_ood") for r in records(paths[p]))
    engine = StubEngine(answers)
    cfg = rec_config(rec_data, tmp_path, system_prompt="Be brief.", max_new_tokens=7)
    generate_predictions_file(cfg, engine)

    expected = [s for p in ("test", "test_ood")
                for s in load_samples(DataConfig(files=[str(paths[p])], task="rec", system_prompt="Be brief."))]
    assert [r.messages for r in engine.requests] == [s.messages for s in expected]
    assert [r.images for r in engine.requests] == [list(s.image_paths) for s in expected]
    assert TEMPLATES["rec"].replace("{Question}", expected[0].problem) in json.dumps(engine.requests[0].messages)
    # three prompts per split at batch_size 2: calls of 2, 1, 2, 1 prompts, greedy, one completion, 7 tokens
    assert len(engine.samplings) == 4
    assert {(s.greedy, s.n, s.max_new_tokens, s.seed) for s in engine.samplings} == {(True, 1, 7, 0)}


def test_template_comes_from_model_task_or_template_unless_the_line_has_its_own(tmp_path):
    from PIL import Image

    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    line = {"id": 7, "image": "a.png", "conversations": [{"from": "human", "value": "<image>Where is it?"},
                                                          {"from": "gpt", "value": "[0, 0, 10, 10]"}]}
    (tmp_path / "s.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "id": 8, "task": "default"}) + "\n")
    split = SplitConfig("s", str(tmp_path / "s.jsonl"))
    texts = {}
    for name, model in [("eval task", {}), ("model task", {"task": "ic"}), ("template", {"template": "Q: {Question}"})]:
        engine = StubEngine({str(tmp_path / "a.png"): "x"})
        cfg = EvalConfig(task="rec", splits=[split], output=str(tmp_path / name / "r.json"),
                         model=EvalModelConfig(**model))
        generate_predictions_file(cfg, engine)
        texts[name] = [r.messages[0]["content"][1]["text"] for r in engine.requests]
    assert texts["eval task"] == [TEMPLATES["rec"].replace("{Question}", "Where is it?"),
                                  TEMPLATES["default"].replace("{Question}", "Where is it?")]
    assert texts["model task"][0] == TEMPLATES["ic"].replace("{Question}", "Where is it?")
    assert texts["template"][0] == "Q: Where is it?"
    # a line's own task wins over the configured template name, as in training
    assert texts["model task"][1] == texts["eval task"][1]
    # integer ids stay integers in the predictions file, so scoring keys them as the split does
    assert [row["id"] for row in records(tmp_path / "template" / PREDICTIONS_FILE)] == [7, 8]


def test_predictions_carry_sizes_so_resized_boxes_score_in_original_pixels(rec_data, tmp_path):
    root, paths = rec_data
    scale = 0.5
    answers = dict(scaled_answer(r, root, scale) for p in ("test", "test_ood") for r in records(paths[p]))
    cfg = rec_config(rec_data, tmp_path)
    path = generate_predictions_file(cfg, StubEngine(answers, scale))
    assert path == tmp_path / PREDICTIONS_FILE

    rows = records(path)
    split_records = records(paths["test"]) + records(paths["test_ood"])
    assert [(r["split"], r["id"]) for r in rows] == [("test", r["id"]) for r in records(paths["test"])] + [
        ("ood", r["id"]) for r in records(paths["test_ood"])]
    from PIL import Image

    for row, record in zip(rows, split_records):
        with Image.open(Path(root) / record["image"]) as image:
            assert row["image_size"] == list(image.size)
            assert row["resized_size"] == [round(image.size[0] * scale), round(image.size[1] * scale)]

    resized = evaluate(EvalConfig(task="rec", splits=cfg.splits, predictions=str(path), box_space="resized",
                                  output=str(tmp_path / "r.json")))
    absolute = evaluate(EvalConfig(task="rec", splits=cfg.splits, predictions=str(path), box_space="abs",
                                   output=str(tmp_path / "r.json")))
    # boxes rounded at half scale land within a pixel of the reference: IoU well above 0.5 once rescaled
    assert resized["overall"]["accuracy"] == 1.0
    assert absolute["overall"]["accuracy"] < 1.0


def test_perfect_ovd_answers_score_one_through_the_generated_file(ovd_data, tmp_path):
    root, paths = ovd_data
    answers = dict(scaled_answer(r, root, 1.0) for r in records(paths["test"]))
    cfg = EvalConfig(task="ovd", output=str(tmp_path / "report.json"),
                     splits=[SplitConfig("test", str(paths["test"]), coco_gt=str(root / "test_coco.json"))])
    path = generate_predictions_file(cfg, StubEngine(answers))
    split = evaluate(EvalConfig(task="ovd", splits=cfg.splits, predictions=str(path), output=cfg.output))
    assert (split["splits"]["test"]["map"], split["splits"]["test"]["recall"]) == pytest.approx((1.0, 1.0))
    assert split["splits"]["test"]["num_missing"] == 0


def write_config(path, data):
    path.write_text(yaml.safe_dump({"eval": data}))
    return str(path)


@pytest.mark.parametrize("task", ["rec", "ovd"])
def test_tiny_model_eval_end_to_end_is_reproducible_and_rescorable(tiny_qwen2_5_vl, rec_data, ovd_data, tmp_path,
                                                                   capsys, task):
    root, paths = rec_data if task == "rec" else ovd_data
    split = {"name": "test", "data": str(paths["test"])}
    if task == "ovd":
        split["coco_gt"] = str(root / "test_coco.json")
    out = tmp_path / "out"
    config = write_config(tmp_path / "eval.yaml", {
        "task": task, "splits": [split], "output": str(out / "report.json"), "batch_size": 2,
        "model": {"path": str(tiny_qwen2_5_vl), "engine": "hf", "max_new_tokens": 6}})

    assert main(["--config", config]) == 0
    first = {name: (out / name).read_bytes() for name in ("report.json", PREDICTIONS_FILE)}
    assert main(["--config", config]) == 0
    second = {name: (out / name).read_bytes() for name in ("report.json", PREDICTIONS_FILE)}
    assert first == second

    rows = records(out / PREDICTIONS_FILE)
    assert [r["id"] for r in rows] == [r["id"] for r in records(paths["test"])]
    assert all(isinstance(r["completion"], str) and r["completion"] for r in rows)
    assert all(r["image_size"] == r["resized_size"] for r in rows)  # synthetic sides are multiples of 28
    report = json.loads(first["report.json"])
    assert report["predictions"] == str(out / PREDICTIONS_FILE)
    assert report["splits"]["test"]["num_samples"] == len(rows) and report["splits"]["test"]["num_missing"] == 0

    rescored = tmp_path / "rescored.json"
    assert main(["--config", config, "--predictions", str(out / PREDICTIONS_FILE), "--output", str(rescored)]) == 0
    assert rescored.read_bytes() == first["report.json"]
    assert "predictions: " in capsys.readouterr().out


@pytest.mark.parametrize("model, message", [
    ({}, "give '--predictions FILE' or 'model.path'"),
    ({"path": "/nonexistent/ckpt"}, "not an HF checkpoint directory"),
    ({"path": "x", "engine": "sglang"}, "config key 'model.engine': 'sglang' is not one of \\['hf', 'vllm'\\]"),
    ({"path": "x", "dtype": "int8"}, "config key 'model.dtype'"),
    ({"path": "x", "device": "tpu"}, "config key 'model.device'"),
    ({"path": "x", "max_new_tokens": 0}, "'model.max_new_tokens' must be >= 1"),
    ({"path": "x", "task": "caption"}, "'model.task': unknown task 'caption'"),
    ({"path": "x", "template": "no slot"}, "'model.template' must contain"),
])
def test_bad_model_config_is_a_clear_error(rec_data, tmp_path, capsys, model, message):
    root, paths = rec_data
    config = write_config(tmp_path / "eval.yaml", {"task": "rec", "output": str(tmp_path / "r.json"),
                                                   "splits": [{"name": "test", "data": str(paths["test"])}],
                                                   "model": model})
    assert main(["--config", config]) == 2
    assert capsys.readouterr().err.startswith("eval error: ")
    with pytest.raises(ValueError, match=message):
        cfg = load_eval_config(config)
        generate_predictions_file(cfg)
    assert not (tmp_path / PREDICTIONS_FILE).exists()


def test_device_auto_follows_cuda_and_explicit_cuda_needs_it(tiny_qwen2_5_vl, rec_data, tmp_path, monkeypatch):
    import torch

    from megatron_vlmr1.parallel import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [resolve_device(name).type for name in ("auto", "cuda", "cpu")] == ["cuda", "cuda", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="parallel.device is 'cuda' but CUDA is not available"):
        resolve_device("cuda")
    cfg = rec_config(rec_data, tmp_path, path=str(tiny_qwen2_5_vl), device="cuda")
    with pytest.raises(ValueError, match="'model.device' is 'cuda' but CUDA is not available"):
        generate_predictions_file(cfg)


@pytest.mark.slow
def test_vllm_engine_predictions_equal_the_transformers_engines(tiny_qwen2_5_vl, rec_data, tmp_path):
    """Greedy decoding is engine-independent: the vLLM run writes the same predictions file, byte for byte."""
    import subprocess
    import sys

    root, paths = rec_data
    config = write_config(tmp_path / "eval.yaml", {
        "task": "rec", "splits": [{"name": "test", "data": str(paths["test"])}], "batch_size": 2,
        "model": {"path": str(tiny_qwen2_5_vl), "max_new_tokens": 6, "max_model_len": 1024}})
    assert main(["--config", config, "model.engine=hf", f"output={tmp_path / 'hf' / 'report.json'}"]) == 0
    result = subprocess.run([sys.executable, "-m", "megatron_vlmr1", "eval", "--config", config, "model.engine=vllm",
                             f"output={tmp_path / 'vllm' / 'report.json'}"],
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "vllm" / PREDICTIONS_FILE).read_bytes() == (tmp_path / "hf" / PREDICTIONS_FILE).read_bytes()
