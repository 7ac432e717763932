"""Convert checkpoints between Hugging Face format and megatron distributed checkpoints (dist_checkpointing).

    python tools/convert_checkpoint.py hf-to-mcore --hf HF_DIR --out MCORE_DIR [--tp N --pp N]
    python tools/convert_checkpoint.py mcore-to-hf --mcore MCORE_DIR --out HF_DIR [--hf-template DIR] [--tp N --pp N]

The megatron checkpoint loads at any TP/PP (``megatron_vlmr1.vlm.export.load_mcore_checkpoint``). The tool starts
its own TP x PP gloo ranks on the CPU, or uses the ranks of ``torchrun`` when launched under it. Conversion streams:
each rank holds its own shard of the model plus one HF tensor (hf-to-mcore) or one gathered layer (mcore-to-hf);
mcore-to-hf writes safetensors files of at most ``--max-shard-mb``. Each rank's peak RSS is printed at the end.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_vlmr1.parallel import ParallelEnv, destroy_parallel, free_port  # noqa: E402
from megatron_vlmr1.vlm.hf_checkpoint import copy_side_files  # noqa: E402

HF_FILES_SUBDIR = "hf_files"  # tokenizer / processor / config copied next to the megatron checkpoint


# --- validation in the launching process (cheap, before any rank starts) -----------------------------------------

def validate_hf_dir(hf_dir: str) -> None:
    """Raise ValueError for an unsupported architecture, missing shards or tensors, or mismatched shapes."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from megatron_vlmr1.vlm.families import get_family
    from megatron_vlmr1.vlm.export import SafetensorsReader

    family = get_family(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    reader = SafetensorsReader(hf_dir, family.checkpoint_name)
    with torch.device("meta"):
        expected = AutoModelForImageTextToText.from_config(config).state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in expected.items():
        name = family.checkpoint_name(name)
        if tied and name == family.checkpoint_name("lm_head.weight"):
            continue
        if name not in reader:
            raise ValueError(f"{hf_dir}: checkpoint has no tensor {name!r}")
        handle = reader._files[reader.weight_map[name]]
        shape = tuple(handle.get_slice(reader._raw_names[name]).get_shape())
        if shape != tuple(tensor.shape):
            raise ValueError(f"{hf_dir}: {name} has shape {shape}, config.json implies {tuple(tensor.shape)}")


def validate_mcore_dir(mcore_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_vlmr1.vlm.families import get_family
    from megatron_vlmr1.vlm.export import hf_config_from_metadata, read_model_metadata

    if not os.path.isdir(mcore_dir) or not dist_checkpointing.check_is_distributed_checkpoint(mcore_dir):
        raise ValueError(f"{mcore_dir} is not a megatron distributed checkpoint")
    metadata = read_model_metadata(mcore_dir)
    get_family(hf_config_from_metadata(metadata))
    return metadata


# --- per-rank work ---------------------------------------------------------------------------------------------

def _init(tp: int, pp: int) -> ParallelEnv:
    from megatron_vlmr1.parallel import ParallelConfig, initialize_parallel

    return initialize_parallel(ParallelConfig(tp=tp, pp=pp), torch.device("cpu"))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def hf_to_mcore(args: argparse.Namespace) -> float:
    from transformers import AutoConfig

    from megatron_vlmr1.vlm.families import get_family
    from megatron_vlmr1.vlm.export import load_hf_weights, save_mcore_checkpoint

    env = _init(args.tp, args.pp)
    hf_config = AutoConfig.from_pretrained(args.hf)
    family = get_family(hf_config)
    dtype = getattr(hf_config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = family.build_model(hf_config, env, params_dtype=dtype, perform_initialization=False)
    load_hf_weights(model, family, args.hf)
    save_mcore_checkpoint(model, args.out)
    if dist.get_rank() == 0:
        copy_side_files(args.hf, os.path.join(args.out, HF_FILES_SUBDIR))
    destroy_parallel()
    return _peak_rss_mb()


def mcore_to_hf(args: argparse.Namespace) -> float:
    from megatron_vlmr1.vlm.export import build_model_for_checkpoint, export_hf_weights, load_mcore_checkpoint
    from megatron_vlmr1.vlm.hf_checkpoint import write_hf_weights

    env = _init(args.tp, args.pp)
    model, family = build_model_for_checkpoint(args.mcore, env, perform_initialization=False)
    load_mcore_checkpoint(model, args.mcore)
    write_hf_weights(export_hf_weights(model, family), args.out, write=dist.get_rank() == 0,
                     max_shard_bytes=args.max_shard_mb * 2**20)
    if dist.get_rank() == 0:
        _write_hf_side_files(args, model.hf_config)
    dist.barrier()
    destroy_parallel()
    return _peak_rss_mb()


def _write_hf_side_files(args: argparse.Namespace, hf_config: Any) -> None:
    template = args.hf_template or os.path.join(args.mcore, HF_FILES_SUBDIR)
    if os.path.isdir(template):
        copy_side_files(template, args.out)
    hf_config.save_pretrained(args.out)


# --- launching ---------------------------------------------------------------------------------------------------

def _rank_main(rank: int, world_size: int, port: int, command: str, args: argparse.Namespace,
               out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        peak = COMMANDS[command](args)
        with open(os.path.join(out_dir, f"rss{rank}"), "w") as fh:
            fh.write(str(peak))
    finally:
        dist.destroy_process_group()


def launch(command: str, args: argparse.Namespace) -> list[float]:
    """Run ``command`` on TP x PP ranks: under torchrun in place, otherwise in spawned gloo processes."""
    world_size = args.tp * args.pp
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise ValueError(f"torchrun world size {os.environ['WORLD_SIZE']} != --tp x --pp = {world_size}")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return [COMMANDS[command](args)]
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(world_size, free_port(), command, args, out_dir), nprocs=world_size,
                           join=True, start_method="spawn")
        return [float(open(os.path.join(out_dir, f"rss{r}")).read()) for r in range(world_size)]


COMMANDS = {"hf-to-mcore": hf_to_mcore, "mcore-to-hf": mcore_to_hf}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors -> megatron distributed checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, help="output megatron checkpoint directory")
    to_hf = sub.add_parser("mcore-to-hf", help="megatron distributed checkpoint -> HF safetensors")
    to_hf.add_argument("--mcore", required=True, help="megatron checkpoint directory (from hf-to-mcore or training)")
    to_hf.add_argument("--out", required=True, help="output HF model directory")
    to_hf.add_argument("--hf-template", default=None,
                       help="copy tokenizer/processor files from here (default: those saved with the checkpoint)")
    to_hf.add_argument("--max-shard-mb", type=int, default=4096, help="largest safetensors file to write")
    for p in (to_mcore, to_hf):
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to convert with")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks to convert with")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.tp < 1 or args.pp < 1:
            raise ValueError("--tp and --pp must be >= 1")
        if args.command == "hf-to-mcore":
            validate_hf_dir(args.hf)
        else:
            validate_mcore_dir(args.mcore)
    except ValueError as err:
        sys.exit(f"convert_checkpoint.py {args.command}: error: {err}")
    peaks = launch(args.command, args)
    print(f"{args.command}: wrote {args.out}; peak RSS per rank (MB): {', '.join(f'{p:.0f}' for p in peaks)}")


if __name__ == "__main__":
    main()
