"""The CUDA kernels' row split (csrc/row_layout.h) checked on CPU: compiled with the host compiler and run.

No GPU here, so the vector/scalar partition the CUDA kernels use (16-byte aligned vectors, scalar head and tail,
int64 offsets) is exercised by tests/kernels/row_layout_check.cpp: every column visited exactly once, for every
start alignment, element size, odd row length and thread count, and row offsets past 2^31 elements.
"""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler (g++), which builds the extension")
def test_row_layout_covers_every_column_once(tmp_path):
    binary = tmp_path / "row_layout_check"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}",
                    os.path.join(HERE, "row_layout_check.cpp"), "-o", str(binary)], check=True)
    out = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
