"""algo/ stays pure: no process groups, no megatron, no models (DESIGN: distributed code is quarantined)."""
from __future__ import annotations

import ast
from pathlib import Path

import megatron_vlmr1.algo

FORBIDDEN = ("torch.distributed", "megatron.", "megatron_vlmr1.trainer", "megatron_vlmr1.rollout", "megatron_vlmr1.vlm")


def imported_modules(source: str) -> set[str]:
    """Every module (and ``module.name`` for from-imports) a Python source imports."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def forbidden(names: set[str]) -> set[str]:
    return {name for name in names if any(f"{name}.".startswith(bad) for bad in FORBIDDEN)}


def test_the_check_sees_distributed_imports():
    assert forbidden(imported_modules("import torch.distributed as dist\nimport torch\n")) == {"torch.distributed"}
    assert forbidden(imported_modules("from megatron.core import parallel_state\n")) == {
        "megatron.core",
        "megatron.core.parallel_state",
    }


def test_algo_imports_nothing_distributed():
    files = sorted(Path(megatron_vlmr1.algo.__file__).parent.glob("*.py"))
    assert len(files) >= 7
    offenders = {f"{path.name}: {name}" for path in files for name in forbidden(imported_modules(path.read_text()))}
    assert not offenders, offenders
