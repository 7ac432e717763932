"""Crash-safe checkpoint directories.

Layout under ``OUTPUT_DIR/checkpoints``::

    step_00000010/          a complete checkpoint (megatron dist checkpoint + trainer_state.json)
    step_00000020.tmp/      a save in progress: never read, removed by the next save
    latest                  text file naming the newest complete checkpoint, replaced atomically

A save writes into ``*.tmp``, and only after every rank has finished is the directory renamed and ``latest``
swapped with ``os.replace``. A run killed mid-save therefore leaves the previous checkpoint as ``latest``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

STATE_FILE = "trainer_state.json"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class CheckpointManager:
    """Saves and finds checkpoints; ``barrier`` synchronises ranks (a no-op for one process)."""

    def __init__(self, root: str | Path, rank: int = 0, keep_last: int = 2,
                 barrier: Callable[[], None] = lambda: None):
        if keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")
        self.root = Path(root)
        self.rank = rank
        self.keep_last = keep_last
        self.barrier = barrier

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:08d}"

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none yet."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / STATE_FILE).exists():
            raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint (no {STATE_FILE})")
        return path

    def save(self, step: int, write_shards: Callable[[Path], None], trainer_state: dict) -> Path:
        """Every rank calls this; ``write_shards(dir)`` writes this rank's part (e.g. dist_checkpointing.save)."""
        final = self.root / self.step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
            tmp.mkdir()
        self.barrier()
        write_shards(tmp)
        self.barrier()
        if self.rank == 0:
            _atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step, **trainer_state}, indent=1, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            _atomic_write_text(self.root / LATEST, final.name)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_state(path: str | Path) -> dict:
        return json.loads((Path(path) / STATE_FILE).read_text())
