"""The report of ``examples/sft_vs_rl.sh``: tables and curves read from its eval reports, and only from them.

Layout it reads (written by the script)::

    OUT/evals/rec/start/report.json            the shared start, step 0 of both REC arms
    OUT/evals/rec/{sft,grpo}/step_NNNN/report.json
    OUT/evals/ovd/start/report.json            step 0 of both OVD arms
    OUT/evals/ovd/{ap,map_len}/step_NNNN/report.json

It writes ``OUT/report.md`` (REC: accuracy@0.5 and mean IoU per checkpoint on ``test`` and ``test_ood``; OVD: mAP,
AP50 and mean predicted boxes per image on ``test``), ``OUT/rec_curves.png`` / ``OUT/ovd_curves.png``, and
``OUT/report.json`` — every number together with the eval report it was read from, so a reader (or a test) can
check each one against its source.

Usage: ``python tools/sft_vs_rl_report.py OUT``
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

REC_ARMS = ("sft", "grpo")
OVD_ARMS = ("ap", "map_len")
REC_SPLITS = ("test", "test_ood")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the eval report ({err})") from None


def arm_reports(evals: Path, task: str, arm: str) -> list[tuple[int, Path]]:
    """(step, report path) of one arm, the shared start as step 0, in step order."""
    start = evals / task / "start" / "report.json"
    found = [(0, start)] if start.is_file() else []
    arm_dir = evals / task / arm
    if arm_dir.is_dir():
        for child in arm_dir.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / "report.json").is_file():
                found.append((int(match.group(1)), child / "report.json"))
    if not found:
        raise ValueError(f"no eval reports for {task}/{arm} under {evals}")
    return sorted(found)


def rec_rows(out: Path) -> list[dict[str, Any]]:
    """One row per (arm, step): accuracy and mean IoU per split, with the report they come from."""
    rows = []
    for arm in REC_ARMS:
        for step, path in arm_reports(out / "evals", "rec", arm):
            report = _load(path)
            if report.get("task") != "rec":
                raise ValueError(f"{path}: expected a REC eval report, got task {report.get('task')!r}")
            row: dict[str, Any] = {"arm": arm, "step": step, "source": str(path.relative_to(out)),
                                   "iou_threshold": report["settings"]["iou_threshold"]}
            for split in REC_SPLITS:
                if split not in report["splits"]:
                    raise ValueError(f"{path}: split {split!r} missing (has {sorted(report['splits'])})")
                row[f"{split}/accuracy"] = report["splits"][split]["accuracy"]
                row[f"{split}/mean_iou"] = report["splits"][split]["mean_iou"]
            rows.append(row)
    return rows


def ovd_rows(out: Path) -> list[dict[str, Any]]:
    """One row per (reward, step): mAP, AP50 and predicted boxes per image on ``test``."""
    rows = []
    for arm in OVD_ARMS:
        for step, path in arm_reports(out / "evals", "ovd", arm):
            report = _load(path)
            if report.get("task") != "ovd" or "test" not in report.get("splits", {}):
                raise ValueError(f"{path}: expected an OVD eval report with a 'test' split")
            split = report["splits"]["test"]
            rows.append({"arm": arm, "step": step, "source": str(path.relative_to(out)), "map": split["map"],
                         "ap50": split["ap50"],
                         "boxes_per_image": split["num_pred_boxes"] / max(split["num_samples"], 1)})
    return rows


def markdown(rec: list[dict[str, Any]], ovd: list[dict[str, Any]]) -> str:
    threshold = rec[0]["iou_threshold"] if rec else 0.5
    lines = [
        "# SFT vs RL, in miniature (examples/sft_vs_rl.sh)", "",
        "Every number below is read from the `python -m megatron_vlmr1 eval` report named in its row (greedy "
        "decoding; step 0 is the shared start checkpoint).", "",
        f"## REC: accuracy@{threshold:g} and mean IoU", "",
        "| arm | step | test acc | test mIoU | test_ood acc | test_ood mIoU | eval report |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rec:
        lines.append(f"| {r['arm']} | {r['step']} | {r['test/accuracy']:.4f} | {r['test/mean_iou']:.4f} | "
                     f"{r['test_ood/accuracy']:.4f} | {r['test_ood/mean_iou']:.4f} | `{r['source']}` |")
    lines += ["", "## OVD: GRPO with `ap` vs `map_len`", "",
              "| reward | step | mAP | AP50 | boxes / image | eval report |", "|---|---:|---:|---:|---:|---|"]
    for r in ovd:
        lines.append(f"| {r['arm']} | {r['step']} | {r['map']:.4f} | {r['ap50']:.4f} | {r['boxes_per_image']:.4f} | "
                     f"`{r['source']}` |")
    lines += ["", "![REC curves](rec_curves.png)", "", "![OVD curves](ovd_curves.png)", ""]
    return "\n".join(lines)


def plot(rec: list[dict[str, Any]], ovd: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in zip(axes, ("accuracy", "mean_iou"), ("accuracy@0.5", "mean IoU")):
        for arm in REC_ARMS:
            for split, style in zip(REC_SPLITS, ("-", "--")):
                points = [(r["step"], r[f"{split}/{metric}"]) for r in rec if r["arm"] == arm]
                ax.plot(*zip(*points), style, marker="o", label=f"{arm} / {split}")
        ax.set_xlabel("training step")
        ax.set_title(f"REC {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rec_curves.png", dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in zip(axes, ("map", "boxes_per_image"), ("mAP", "predicted boxes per image")):
        for arm in OVD_ARMS:
            points = [(r["step"], r[metric]) for r in ovd if r["arm"] == arm]
            ax.plot(*zip(*points), marker="o", label=f"GRPO {arm}")
        ax.set_xlabel("training step")
        ax.set_title(f"OVD {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ovd_curves.png", dpi=100)
    plt.close(fig)


def write_report(out: str | Path) -> Path:
    """Write report.md, report.json and the two PNGs under ``out``; returns the markdown path."""
    out = Path(out)
    rec, ovd = rec_rows(out), ovd_rows(out)
    (out / "report.json").write_text(json.dumps({"rec": rec, "ovd": ovd}, indent=2) + "\n")
    plot(rec, ovd, out)
    path = out / "report.md"
    path.write_text(markdown(rec, ovd))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the sft_vs_rl output folder (holding evals/)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.out)
    except ValueError as err:
        parser.error(str(err))
    print(path.read_text())


if __name__ == "__main__":
    main()
