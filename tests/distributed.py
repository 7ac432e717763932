"""Spawn N CPU processes over gloo for multi-rank tests.

``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in spawned processes with a gloo
process group already initialised, and returns the list of per-rank return values (anything ``torch.save`` can
write). A failure in any rank fails the calling test with that rank's traceback.
"""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _cpu_test_device():
    """Spawned ranks inherit the environment: gloo ranks run on the CPU whatever ``VLMR1_TEST_DEVICE`` says."""
    saved = os.environ.get("VLMR1_TEST_DEVICE")
    os.environ["VLMR1_TEST_DEVICE"] = "cpu"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["VLMR1_TEST_DEVICE"]
        else:
            os.environ["VLMR1_TEST_DEVICE"] = saved


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    with tempfile.TemporaryDirectory() as out_dir, _cpu_test_device():
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    raise TimeoutError(f"distributed test still running after {timeout:.0f} s (hung collective?)")
        except Exception as err:
            messages = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"rank{rank}.err")
                if os.path.exists(path):
                    messages.append(f"--- rank {rank} ---\n" + open(path).read())
            raise AssertionError("distributed test failed:\n" + "\n".join(messages or [str(err)])) from None
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
