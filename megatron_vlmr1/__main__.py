"""Command line: ``python -m megatron_vlmr1 {train,sft,eval} --config FILE [key.sub=value ...]``."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("megatron_vlmr1.trainer.grpo", "GRPO training (R1-style RL with verifiable rewards)"),
    "sft": ("megatron_vlmr1.trainer.sft", "supervised fine-tuning on the same data"),
    "eval": ("megatron_vlmr1.eval.run", "REC accuracy / OVD mAP on a split, or on a predictions file"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m megatron_vlmr1")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    args, rest = parser.parse_known_args(argv[:1])
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
