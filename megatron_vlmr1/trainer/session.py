"""What every training run shares: process groups, model family, data, the actor, metrics, checkpoints, preemption.

A subclass (GRPO, SFT) implements ``step(step) -> metrics``; ``fit`` runs the loop, saves on schedule and on
preemption (SIGTERM/SIGUSR1: see ``preemption``), and exports HF weights at the end.
"""
from __future__ import annotations

import abc
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_vlmr1.config import save_config
from megatron_vlmr1.trainer.checkpoint import CheckpointManager
from megatron_vlmr1.trainer.loss import ordered_sum
from megatron_vlmr1.parallel import all_reduce_sum, any_rank, init_parallel, teardown_parallel
from megatron_vlmr1.trainer.metrics import MetricsLogger, plot_run
from megatron_vlmr1.trainer.preemption import Preempted, PreemptionGuard


# Reshardable across data-parallel sizes: a run can resume on a different number of GPUs. (megatron-core
# 0.16.1's 'fully_reshardable' format cannot load torch Adam's per-parameter 'step'.)
OPTIMIZER_CKPT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


class TrainingSession(abc.ABC):
    shared_prefix = False  # the training forward reads shared-prefix packed rows (their core attention is built)

    def __init__(self, cfg: Any, prompts_per_step: int):
        from transformers import AutoConfig

        from megatron_vlmr1.data import BatchIterator, load_samples
        from megatron_vlmr1.trainer.policy import ActorModel
        from megatron_vlmr1.vlm.families import get_family

        self.cfg = cfg
        self.env = init_parallel(cfg.parallel, cfg.train.seed)
        self.output_dir = Path(cfg.train.output_dir)
        if prompts_per_step % self.env.dp:
            raise ValueError(f"train.prompts_per_step={prompts_per_step} is not divisible by the data-parallel size "
                             f"{self.env.dp}")
        self.prompts_per_rank = prompts_per_step // self.env.dp
        self.hf_config = AutoConfig.from_pretrained(cfg.model.path)
        self.family = get_family(self.hf_config)
        self.processor = self.family.load_processor(cfg.model.path)
        samples = load_samples(cfg.data)
        self.data = BatchIterator(samples, self.prompts_per_rank, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                                  rank=self.env.dp_rank, world_size=self.env.dp)
        self.actor = ActorModel(self.family, self.hf_config, cfg.model.path, self.env, cfg.model, cfg.optim,
                                total_steps=cfg.train.steps, distributed_optimizer=cfg.parallel.distributed_optimizer,
                                recompute=cfg.parallel.recompute, shared_prefix=self.shared_prefix)
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", rank=self.env.rank,
                                             keep_last=cfg.checkpoint.keep_last, barrier=dist.barrier)
        self.start_step = self.maybe_resume()
        self.metrics = MetricsLogger(self.output_dir, enabled=self.env.is_logging_rank,
                                     tensorboard=cfg.train.tensorboard, resume_step=self.start_step,
                                     log_interval=cfg.train.log_interval)
        if self.env.is_logging_rank:
            save_config(cfg, self.output_dir / "config.yaml")
        # A subclass's step() calls self.preemption.check() between its phases (before any update of the step).
        self.preemption = PreemptionGuard()

    # -- small utilities ---------------------------------------------------------------------------------------

    @contextmanager
    def timer(self, phase: str, metrics: dict):
        start = time.perf_counter()
        yield
        metrics[f"time/{phase}"] = metrics.get(f"time/{phase}", 0.0) + time.perf_counter() - start

    def all_reduce(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values)

    def data_parallel_sum(self, value: float) -> float:
        """Sum over the data-parallel replicas (e.g. a loss normaliser counted over the whole step's batch)."""
        return all_reduce_sum([value], group=self.env.dp_group)[0]

    def reduce_token_metrics(self, outputs: list[dict[str, torch.Tensor]]) -> dict:
        """Token-weighted means of the loss callback's metrics over micro-batches and replicas.

        Each micro-batch reports ``metric * tokens`` and ``tokens`` as 0-dim float64 device tensors; only last-stage
        ranks report. Tensor-parallel ranks report identical values, which cancel in the ratio. The sums are formed
        on the device in micro-batch order (``ordered_sum``: the numbers Python's float sum gave) and read with one
        ``tolist()`` per step: a single host sync, however many micro-batches.
        """
        keys = sorted({k for out in outputs for k in out if k not in ("tokens", "rollout_logprob_gap_max")})
        keys = self._same_keys_everywhere(keys)
        device = self.env.device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        rows = [torch.stack([out.get(k, zero) for k in keys] + [out["tokens"]]) for out in outputs]
        sums = ordered_sum(rows) if rows else torch.zeros(len(keys) + 1, dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        gap = "rollout_logprob_gap" in keys
        if gap:  # |logprob - rollout logprob| >= 0, so 0 stands in for a rank without micro-batches
            gap_max = torch.stack([out.get("rollout_logprob_gap_max", zero) for out in outputs] + [zero]).max()
            gap_max = gap_max.reshape(1)
            dist.all_reduce(gap_max, op=dist.ReduceOp.MAX)
            sums = torch.cat([sums, gap_max])
        read = sums.tolist()  # the step's one host read
        *values, tokens = read[:len(keys) + 1]
        result = {k: v / max(tokens, 1.0) for k, v in zip(keys, values)}
        if gap:
            result["rollout_logprob_gap_max"] = read[-1]
        return result

    def _same_keys_everywhere(self, keys: list[str]) -> list[str]:
        """Non-last pipeline stages have no metrics; take the key list from the last stage of the world."""
        box = [keys]
        dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
        return box[0]

    # -- checkpoints -------------------------------------------------------------------------------------------
    def sharded_state(self, is_loading: bool = False) -> dict:
        module = self.actor.module
        self.actor.init_optimizer_state()  # no update yet (e.g. every group skipped): megatron needs a state
        model_sd = module.sharded_state_dict(prefix="model.")
        return {"model": model_sd,
                "optimizer": self.actor.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_CKPT_FORMAT)}

    def save_checkpoint(self, step: int, data_state: dict | None = None) -> Path:
        """Save the state after ``step``; ``data_state`` is the data position to record (default: the current one)."""
        from megatron.core import dist_checkpointing

        def write(directory: Path) -> None:
            dist_checkpointing.save(self.sharded_state(), str(directory))

        state = {"data": data_state if data_state is not None else self.data.state_dict(),
                 "scheduler": self.actor.scheduler.state_dict()}
        return self.checkpoints.save(step, write, state)

    def maybe_resume(self) -> int:
        """Load OUTPUT_DIR/checkpoints/latest when resuming is on and one exists; returns the step it ended."""
        from megatron.core import dist_checkpointing

        latest = self.checkpoints.latest() if self.cfg.checkpoint.resume else None
        if latest is None:
            return 0
        loaded = dist_checkpointing.load(self.sharded_state(is_loading=True), str(latest))
        self.actor.module.load_state_dict(loaded["model"], strict=False)
        with torch.no_grad():  # the optimizer copies into its fp32 main params, which are leaves requiring grad
            self.actor.optimizer.load_state_dict(loaded["optimizer"])
        self.actor.restore_adam_step()
        state = CheckpointManager.read_state(latest)
        self.actor.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        if self.env.is_logging_rank:
            print(f"resumed from {latest} (step {state['step']})", flush=True)
        return int(state["step"])

    def export_hf(self, out_dir: Path) -> None:
        """Write the trained weights as an HF checkpoint (safetensors + the start checkpoint's config/tokenizer).

        A LoRA run writes merged weights (W + scale * B @ A) there, and its adapters in PEFT format to
        OUTPUT_DIR/adapter (loadable with ``peft.PeftModel.from_pretrained`` on the start checkpoint).
        """
        from megatron_vlmr1.vlm.export import export_hf_weights
        from megatron_vlmr1.vlm.hf_checkpoint import copy_side_files, write_hf_weights

        write = self.env.is_logging_rank
        write_hf_weights(export_hf_weights(self.actor.chunks, self.family), out_dir, write=write)
        if write:
            copy_side_files(self.cfg.model.path, out_dir)
        if self.cfg.model.train_mode == "lora":
            from megatron_vlmr1.vlm.lora import export_peft_adapter

            export_peft_adapter(self.actor.chunks, self.family, self.output_dir / "adapter", self.cfg.model.path,
                                write=self.env.is_logging_rank)
        dist.barrier()

    # -- the loop ----------------------------------------------------------------------------------------------
    def report(self, step: int, record: dict, bar) -> None:
        """The console view of every ``train.log_interval``-th step: the progress bar's figures, or one line when
        the bar is off (e.g. a Slurm log)."""
        shown = {k: f"{record[k]:.3f}" for k in ("reward/mean", "loss") if record.get(k) is not None}
        if not bar.disable:
            bar.set_postfix(shown)
        elif self.env.is_logging_rank:
            figures = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"step {step}/{self.cfg.train.steps} {figures} time/step={record['time/step']:.2f}s", flush=True)

    @abc.abstractmethod
    def step(self, step: int) -> dict:
        """One training step; returns its metrics."""

    def fit(self) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        last_saved = self.start_step
        bar = tqdm(total=cfg.train.steps, initial=self.start_step, desc=type(self).__name__, dynamic_ncols=True,
                   disable=not (cfg.train.progress_bar and self.env.is_logging_rank))
        step = self.start_step
        preempted = False
        self.preemption.install()
        for step in range(self.start_step + 1, cfg.train.steps + 1):
            start = time.perf_counter()
            data_before = self.data.state_dict()
            try:
                metrics = self.step(step)
            except Preempted:
                # signalled mid-step, before any update of it: keep the state as of step - 1, so the resumed run
                # redoes this step from the same prompts with the same seeds
                preempted = True
                saved = step - 1 > last_saved
                if saved:
                    self.save_checkpoint(step - 1, data_state=data_before)
                    last_saved = step - 1
                if self.env.is_logging_rank:
                    what = f"saved step {last_saved}" if saved else f"nothing to save after step {last_saved}"
                    print(f"{self.preemption.name}: abandoned step {step} before its update, {what}, exiting",
                          flush=True)
                break
            metrics["time/step"] = time.perf_counter() - start
            if "rollout_tokens" in metrics:
                metrics["tokens_per_s"] = metrics["rollout_tokens"] / metrics["time/step"]
            record = self.metrics.log(step, metrics)
            bar.update(1)
            if self.metrics.due(step):
                self.report(step, record, bar)
            if self.preemption.requested():
                preempted = True
                self.save_checkpoint(step)
                last_saved = step
                if self.env.is_logging_rank:
                    print(f"{self.preemption.name}: saved step {step}, exiting", flush=True)
                break
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                self.save_checkpoint(step)
                last_saved = step
        bar.close()
        if preempted:
            return
        if step > last_saved:
            self.save_checkpoint(step)
        if cfg.checkpoint.export_hf:
            self.export_hf(self.output_dir / "hf")
        if self.env.is_logging_rank and self.metrics.path.exists():
            plot_run(self.metrics.path, self.output_dir)

    def close(self) -> None:
        self.metrics.close()
        self.preemption.restore()
        teardown_parallel(self.env)


def run_cli(prog: str, config_cls: type, trainer_cls: type, argv: list[str]) -> int:
    """``--config FILE [key.sub=value ...]`` → config → trainer → fit. A user error (bad config or data) before
    training starts is one line naming the key / file:line and exit code 2, not a traceback."""
    import argparse
    import sys

    from megatron_vlmr1.config import load_config

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", help="YAML config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6 train.steps=100")
    args = parser.parse_args(argv)
    try:
        trainer = trainer_cls(load_config(config_cls, args.config, args.overrides))
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0
