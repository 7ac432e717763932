"""Run metrics: one JSON line per step, TensorBoard scalars, and a reward-curve PNG.

Only the logging rank writes; every line is flushed so a killed run keeps every finished step.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

REWARD_CURVE = "reward_curve.png"
LOSS_CURVE = "loss_curve.png"
METRICS_FILE = "metrics.jsonl"


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends ``{"step": N, ...}`` records to ``OUTPUT_DIR/metrics.jsonl`` (every step) and mirrors every
    ``log_interval``-th step to TensorBoard (``train.log_interval``)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True, resume_step: int = 0,
                 log_interval: int = 1):
        if log_interval < 1:
            raise ValueError(f"train.log_interval must be >= 1, got {log_interval}")
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.log_interval = log_interval
        self.path = self.output_dir / METRICS_FILE
        self._writer = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records of steps after the checkpoint so the file tells one consistent history."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: Mapping[str, float]) -> dict:
        record = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        if not self.enabled:
            return record
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None and self.due(step):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
        return record

    def due(self, step: int) -> bool:
        """Whether ``step`` goes to the console and TensorBoard (the JSON lines get every step)."""
        return step % self.log_interval == 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, out_path: str | Path, keys: list[str], ylabel: str, title: str,
                emphasise: str | None = None) -> Path:
    """Plot the given metrics against step into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, linewidth=2.5 if key == emphasise else 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def reward_keys(metrics_path: str | Path) -> list[str]:
    records = read_metrics(metrics_path)
    return sorted({k for r in records for k in r if k.startswith("reward/") and k != "reward/std"})


def plot_reward_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    """``reward/mean`` and every ``reward/<name>`` against step (GRPO runs)."""
    return plot_curves(metrics_path, out_path, reward_keys(metrics_path), "reward", "GRPO rewards", "reward/mean")


def plot_run(metrics_path: str | Path, output_dir: str | Path) -> Path:
    """A run's curve: ``reward_curve.png`` when it logged rewards (GRPO), else ``loss_curve.png`` (SFT)."""
    if reward_keys(metrics_path):
        return plot_reward_curve(metrics_path, Path(output_dir) / REWARD_CURVE)
    return plot_curves(metrics_path, Path(output_dir) / LOSS_CURVE, ["loss"], "loss", "training loss")
