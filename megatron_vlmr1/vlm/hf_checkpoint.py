"""Writing HF-format checkpoints from a weight stream: bounded safetensors shards + index, and the side files.

Used by the conversion tool (``mcore-to-hf``) and by the trainer's end-of-run export, both fed by
``export.export_hf_weights``: memory holds at most one shard, never the whole model.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Iterable

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class ShardedSafetensorsWriter:
    """Writes tensors into safetensors files of bounded size, then the index (as ``save_pretrained`` does)."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int) -> None:
        self.out_dir, self.max_shard_bytes = str(out_dir), max_shard_bytes
        self.bucket: dict[str, torch.Tensor] = {}
        self.bucket_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.bucket and self.bucket_bytes + size > self.max_shard_bytes:
            self._flush()
        self.bucket[name] = tensor.contiguous().cpu()
        self.bucket_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        file = f"model-part{len(self.files) + 1:05d}.safetensors"
        save_file(self.bucket, os.path.join(self.out_dir, file), metadata={"format": "pt"})
        self.files.append((file, list(self.bucket)))
        self.bucket, self.bucket_bytes = {}, 0

    def close(self) -> None:
        if self.bucket or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(os.path.join(self.out_dir, self.files[0][0]), os.path.join(self.out_dir, "model.safetensors"))
            return
        weight_map = {}
        for i, (file, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(os.path.join(self.out_dir, file), os.path.join(self.out_dir, final))
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, fh, indent=2)


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Tokenizer, processor, chat template, config, generation config... everything but the weights."""
    os.makedirs(dst, exist_ok=True)
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if os.path.isfile(path) and entry not in WEIGHT_FILES and not entry.endswith(".safetensors"):
            shutil.copy2(path, os.path.join(dst, entry))


def write_hf_weights(weights: Iterable[tuple[str, torch.Tensor]], out_dir: str | os.PathLike, write: bool,
                     max_shard_bytes: int = 4 * 2**30) -> None:
    """Drain a (collective) weight stream; only the rank with ``write`` keeps and writes the tensors."""
    writer = None
    if write:
        os.makedirs(out_dir, exist_ok=True)
        writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    for name, tensor in weights:
        if writer is not None:
            writer.add(name, tensor)
    if writer is not None:
        writer.close()
