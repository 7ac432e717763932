"""Print a run's reward table: mean of each reward over the first and the last steps, and the change.

    python tools/summarize_run.py runs/demo/metrics.jsonl [--window 10]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def summarize(records: list[dict], window: int) -> list[tuple[str, float, float]]:
    keys = sorted({k for r in records for k in r if k.startswith("reward/") and k != "reward/std"})
    rows = []
    for key in keys:
        values = [r[key] for r in records if r.get(key) is not None]
        if values:
            head, tail = values[:window], values[-window:]
            rows.append((key, sum(head) / len(head), sum(tail) / len(tail)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()]
    print(f"{len(records)} steps; mean of the first / last {args.window} steps")
    print(f"{'metric':<20}{'first':>10}{'last':>10}{'change':>10}")
    for key, first, last in summarize(records, args.window):
        print(f"{key:<20}{first:>10.3f}{last:>10.3f}{last - first:>+10.3f}")
    print(f"plot: {args.metrics.parent / 'reward_curve.png'}")


if __name__ == "__main__":
    main()
