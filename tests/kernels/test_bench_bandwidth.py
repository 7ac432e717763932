"""``tools/bench_kernels.py --bandwidth-goal``: the fused kernels' GB/s against a peak, and the exit status that
``tools/gpu_smoke.sh`` turns into PASS/FAIL (on CPU here, with the peak given; on a GPU it is read from the device)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench(goal: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/bench_kernels.py", "--device", "cpu", "--dtype", "fp32", "--vocab",
                           "4096", "--tokens", "64", "--repeat", "1", "--peak-gbps", "1000",
                           "--bandwidth-goal", str(goal)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_bandwidth_report_names_both_passes_and_fails_below_the_goal():
    ok = _bench(0.0)
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = re.findall(r"kernel bandwidth: (.+), fp32, 64 x 4096: ([\d.e+-]+) GB/s = (\d+)% of the device's 1000 GB/s "
                       r"\(--peak-gbps\)", ok.stdout)
    assert [name for name, _, _ in lines] == ["forward (log-prob only)", "forward+backward, in place"], ok.stdout
    assert all(float(gbps) > 0 for _, gbps, _ in lines)
    assert "goal >= 0% of peak: met" in ok.stdout
    below = _bench(0.99)  # a CPU at 99% of a 1000 GB/s device is impossible
    assert below.returncode == 1 and "goal >= 99% of peak: NOT met" in below.stdout
