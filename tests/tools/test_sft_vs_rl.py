"""examples/sft_vs_rl.sh, shortened: the report has its structure and every number comes from an eval report."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import sft_vs_rl_report  # noqa: E402


def _report(out: Path, task: str, arm: str, step: int, splits: dict) -> None:
    folder = out / "evals" / task / ("start" if step == 0 else arm) / ("" if step == 0 else f"step_{step:04d}")
    folder.mkdir(parents=True, exist_ok=True)
    report = {"task": task, "settings": {"iou_threshold": 0.5, "box_space": "resized"}, "splits": splits}
    (folder / "report.json").write_text(json.dumps(report))


def test_report_reads_the_eval_reports_it_names(tmp_path):
    rec = lambda acc, iou: {"accuracy": acc, "mean_iou": iou}  # noqa: E731
    _report(tmp_path, "rec", "", 0, {"test": rec(0.25, 0.3), "test_ood": rec(0.2, 0.25)})
    _report(tmp_path, "rec", "sft", 10, {"test": rec(0.5, 0.55), "test_ood": rec(0.25, 0.3)})
    _report(tmp_path, "rec", "grpo", 10, {"test": rec(0.75, 0.7), "test_ood": rec(0.5, 0.6)})
    ovd = lambda m, n: {"test": {"map": m, "ap50": m + 0.1, "num_pred_boxes": n, "num_samples": 4}}  # noqa: E731
    _report(tmp_path, "ovd", "", 0, ovd(0.1, 4))
    _report(tmp_path, "ovd", "ap", 10, ovd(0.2, 12))
    _report(tmp_path, "ovd", "map_len", 10, ovd(0.3, 5))
    text = sft_vs_rl_report.write_report(tmp_path).read_text()
    assert "| grpo | 10 | 0.7500 | 0.7000 | 0.5000 | 0.6000 | `evals/rec/grpo/step_0010/report.json` |" in text
    assert "| sft | 0 | 0.2500 | 0.3000 | 0.2000 | 0.2500 | `evals/rec/start/report.json` |" in text
    assert "| ap | 10 | 0.2000 | 0.3000 | 3.0000 | `evals/ovd/ap/step_0010/report.json` |" in text
    assert "| map_len | 10 | 0.3000 | 0.4000 | 1.2500 | `evals/ovd/map_len/step_0010/report.json` |" in text
    assert (tmp_path / "rec_curves.png").stat().st_size > 0 and (tmp_path / "ovd_curves.png").stat().st_size > 0
    (tmp_path / "evals" / "rec" / "sft" / "step_0010" / "report.json").write_text('{"task": "rec", "splits": {}')
    with pytest.raises(ValueError, match="cannot read the eval report"):
        sft_vs_rl_report.write_report(tmp_path)


def _check_against_sources(out: Path) -> int:
    """Every table row's numbers equal those of the eval report it names; returns the number of rows checked."""
    checked = 0
    for line in (out / "report.md").read_text().splitlines():
        match = re.match(r"^\| (\w+) \| (\d+) \| (.*) \| `([^`]+)` \|$", line)
        if not match:
            continue
        arm, step, cells, source = match.groups()
        numbers = [float(c) for c in cells.split(" | ")]
        assert source.startswith("evals/") and source.endswith("report.json"), source
        report = json.loads((out / source).read_text())
        if report["task"] == "rec":
            expected = [report["splits"][s][k] for s in ("test", "test_ood") for k in ("accuracy", "mean_iou")]
            assert arm in ("sft", "grpo")
        else:
            split = report["splits"]["test"]
            expected = [split["map"], split["ap50"], split["num_pred_boxes"] / split["num_samples"]]
            assert arm in ("ap", "map_len")
        assert numbers == pytest.approx(expected, abs=6e-5), line
        assert (source == f"evals/{report['task']}/start/report.json") == (step == "0"), line
        checked += 1
    return checked


@pytest.mark.slow
def test_shortened_experiment_writes_a_report_from_eval_reports(tiny_qwen2_5_vl, tmp_path):
    out = tmp_path / "sft_vs_rl"
    env = {**os.environ, "PY": sys.executable, "OUT": str(out), "BASE_MODEL": str(tiny_qwen2_5_vl), "STEPS": "1",
           "EVAL_EVERY": "1", "N": "8", "N_TEST": "2", "WARMUP_STEPS": "1", "WARMUP_PROMPTS": "2", "PROMPTS": "2",
           "MICRO": "4", "GROUP": "2", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "examples" / "sft_vs_rl.sh")], env=env, capture_output=True,
                          text=True, timeout=840)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Two REC arms and two OVD arms, each at step 0 (the shared start) and step 1.
    assert _check_against_sources(out) == 8
    summary = json.loads((out / "report.json").read_text())
    assert [(r["arm"], r["step"]) for r in summary["rec"]] == [("sft", 0), ("sft", 1), ("grpo", 0), ("grpo", 1)]
    assert [(r["arm"], r["step"]) for r in summary["ovd"]] == [("ap", 0), ("ap", 1), ("map_len", 0), ("map_len", 1)]
    assert (out / "rec_curves.png").stat().st_size > 0 and (out / "ovd_curves.png").stat().st_size > 0
    # The trainers' own logs exist but the report never names them.
    assert (out / "rec_grpo" / "metrics.jsonl").exists()
    assert "metrics.jsonl" not in (out / "report.md").read_text()
