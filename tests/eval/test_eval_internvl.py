"""``python -m megatron_vlmr1 eval`` on the tiny InternVL: REC and OVD splits through the transformers engine (twice:
byte-identical), ``box_space: auto`` resolved to InternVL's ``norm1000``, and the vLLM engine writing the same
predictions file (greedy)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from megatron_vlmr1.data.synthetic import make_dataset
from megatron_vlmr1.eval.generate import PREDICTIONS_FILE
from megatron_vlmr1.eval.run import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict[str, dict]:
    """One split per task: 3 REC and 2 OVD test samples (the OVD one with its COCO ground truth)."""
    rec_root, ovd_root = tmp_path_factory.mktemp("rec"), tmp_path_factory.mktemp("ovd")
    rec = make_dataset("rec", rec_root, n=1, n_test=3, seed=21)
    ovd = make_dataset("ovd", ovd_root, n=1, n_test=2, seed=22)
    return {"rec": {"name": "test", "data": str(rec["test"])},
            "ovd": {"name": "test", "data": str(ovd["test"]), "coco_gt": str(ovd_root / "test_coco.json")}}


def write_config(path: Path, task: str, split: dict, model: Path, out: Path) -> str:
    path.write_text(yaml.safe_dump({"eval": {
        "task": task, "splits": [split], "output": str(out / "report.json"), "batch_size": 2,
        "model": {"path": str(model), "engine": "hf", "max_new_tokens": 8, "max_model_len": 1024}}}))
    return str(path)


@pytest.mark.parametrize("task", ["rec", "ovd"])
def test_internvl_eval_resolves_norm1000_and_is_reproducible(tiny_internvl, splits, tmp_path, capsys, task):
    out = tmp_path / "out"
    config = write_config(tmp_path / "eval.yaml", task, splits[task], tiny_internvl, out)
    assert main(["--config", config]) == 0
    printed = capsys.readouterr().out
    assert "norm1000" in printed
    first = {name: (out / name).read_bytes() for name in ("report.json", PREDICTIONS_FILE)}
    assert main(["--config", config]) == 0
    assert first == {name: (out / name).read_bytes() for name in ("report.json", PREDICTIONS_FILE)}

    report = json.loads(first["report.json"])
    assert report["settings"]["box_space"] == "norm1000"
    samples = [json.loads(line) for line in Path(splits[task]["data"]).read_text().splitlines()]
    rows = [json.loads(line) for line in first[PREDICTIONS_FILE].decode().splitlines()]
    assert [r["id"] for r in rows] == [s["id"] for s in samples]
    assert all(isinstance(r["completion"], str) and r["completion"] for r in rows)
    # the original size of the asked-about image travels with each prediction (norm1000 needs it to rescale)
    root = Path(splits[task]["data"]).parent
    sizes = []
    for sample in samples:
        images = sample["image"] if isinstance(sample["image"], list) else [sample["image"]]
        with Image.open(root / images[sample.get("target_image", 0)]) as image:
            sizes.append(list(image.size))
    assert [r["image_size"] for r in rows] == sizes
    assert report["splits"]["test"]["num_samples"] == len(rows) and report["splits"]["test"]["num_missing"] == 0


@pytest.mark.slow
def test_internvl_vllm_eval_predictions_equal_the_transformers_engines(tiny_internvl, splits, tmp_path):
    """REC and OVD in one config each; greedy decoding is engine-independent, byte for byte."""
    for task in ("rec", "ovd"):
        config = write_config(tmp_path / f"{task}.yaml", task, splits[task], tiny_internvl, tmp_path / task)
        assert main(["--config", config, f"output={tmp_path / task / 'hf' / 'report.json'}"]) == 0
        result = subprocess.run([sys.executable, "-m", "megatron_vlmr1", "eval", "--config", config,
                                 "model.engine=vllm", f"output={tmp_path / task / 'vllm' / 'report.json'}"],
                                cwd=REPO, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-5000:]
        hf_rows = (tmp_path / task / "hf" / PREDICTIONS_FILE).read_bytes()
        assert (tmp_path / task / "vllm" / PREDICTIONS_FILE).read_bytes() == hf_rows, task
        reports = [json.loads((tmp_path / task / engine / "report.json").read_text()) for engine in ("hf", "vllm")]
        assert reports[0]["splits"] == reports[1]["splits"]
        assert reports[1]["settings"]["box_space"] == "norm1000"
