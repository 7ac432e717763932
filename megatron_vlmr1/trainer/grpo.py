"""GRPO: ``python -m megatron_vlmr1 train --config FILE [key.sub=value ...]``.

One step: prompts → weight sync into the rollout engine → G completions per prompt → rewards → group advantages →
old / reference log-probs → ``algo.mu`` optimizer updates through megatron's pipeline schedule. Each data-parallel
replica trains on its own prompts, but the job's ``world / rollout.tp`` rollout replicas split the step's prompts
between them (each generated exactly once, ``rollout.placement``) and send the results to the ranks that train on them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from megatron_vlmr1.algo import AlgoConfig, get_advantage_estimator, get_policy_loss, informative_groups
from megatron_vlmr1.data import DataConfig, Sample, target_image
from megatron_vlmr1.parallel import any_rank
from megatron_vlmr1.rewards import CombinedRewards
from megatron_vlmr1.rollout.base import RolloutResult
from megatron_vlmr1.rollout.config import RolloutConfig
from megatron_vlmr1.trainer.config import (CheckpointConfig, LoopConfig, ModelConfig, OptimConfig, ParallelConfig,
                                           RewardSpec)
from megatron_vlmr1.trainer.loss import GRPOLoss
from megatron_vlmr1.trainer.policy import MicroBatch
from megatron_vlmr1.trainer.session import TrainingSession, run_cli


@dataclasses.dataclass
class GRPORunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    algo: AlgoConfig = dataclasses.field(default_factory=AlgoConfig)
    rewards: list[RewardSpec] = dataclasses.field(default_factory=lambda: [RewardSpec("format", 1.0)])
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    # The coordinate space the policy's boxes are in: "abs" (original-image pixels), "resized" (pixels of the image
    # the processor fed the model: Qwen2.5-VL's grounding convention) or "norm1000" (Qwen2-VL, InternVL). Box rewards
    # rescale. "auto": the model family's own convention (vlm/box_space.py), resolved and saved when training starts.
    box_space: Literal["auto", "abs", "resized", "norm1000"] = "auto"

    def __post_init__(self):
        if not self.model.path:
            raise ValueError("model.path is required: an HF checkpoint directory (see tools/make_tiny_model.py)")
        if not self.rewards:
            raise ValueError("rewards: list at least one reward, e.g. [{name: format, weight: 1.0}]")
        if self.rollout.sampling.n not in (1, self.algo.group_size):
            raise ValueError(f"rollout.sampling.n={self.rollout.sampling.n} disagrees with algo.group_size="
                             f"{self.algo.group_size}; set only algo.group_size")


@dataclasses.dataclass
class RolloutBatch:
    """This rank's prompts of one step with their rollouts: what ``collect`` hands to the update.

    ``results[i]`` holds the G completions of ``samples[i]`` and the encoded prompt they continue (ids, pixel
    values, image geometry: the trainer scores it as is, without encoding again). ``rewards`` [prompts * G] are the
    weighted totals, prompt-major; ``per_reward`` holds every reward of every completion scored this step,
    including groups dynamic sampling dropped (for logging).
    """

    samples: list[Sample]
    results: list[RolloutResult]
    rewards: list[float]
    per_reward: dict[str, list[float]]


class GRPOTrainer(TrainingSession):
    """Actor, reference and rollout engine are separate objects; this class only orders the phases."""

    def __init__(self, cfg: GRPORunConfig):
        self.shared_prefix = cfg.algo.shared_prefix
        super().__init__(cfg, cfg.train.prompts_per_step)
        from megatron_vlmr1.rewards import combine_rewards
        from megatron_vlmr1.trainer.policy import AdapterFreeReference, ScoringModel

        self.resolve_box_space()
        self.algo = cfg.algo
        self.reward_fn = combine_rewards([(r.name, r.weight) for r in cfg.rewards])
        self.reward_names = [r.name for r in cfg.rewards]
        if self.algo.beta <= 0:
            self.reference = None
        elif cfg.model.train_mode == "lora":
            self.reference = AdapterFreeReference(self.actor)
        else:
            self.reference = ScoringModel(self.family, self.hf_config, cfg.model.path, self.env, cfg.model,
                                          shared_prefix=self.shared_prefix)
        self.engine, self.router = self.build_rollout(cfg)
        self.policy_loss = get_policy_loss(self.algo.loss)
        self.advantage_fn = get_advantage_estimator(self.algo.advantage)

    def build_rollout(self, cfg: GRPORunConfig):
        """The engine (vLLM: ``rollout.tp`` consecutive ranks per engine) and the router that splits each round's
        prompts over the ``world / rollout.tp`` rollout replicas."""
        from megatron_vlmr1.rollout.config import build_engine
        from megatron_vlmr1.rollout.exchange import RolloutRouter
        from megatron_vlmr1.rollout.placement import RankCoord, validate_rollout_tp

        env = self.env
        rollout_tp = cfg.rollout.rollout_tp(env.tp)
        validate_rollout_tp(rollout_tp, env.world_size, env.tp)
        engine = build_engine(cfg.rollout, cfg.model.path, self.actor.dtype, device=env.device, family=self.family,
                              tp=rollout_tp, world_size=env.world_size)
        router = RolloutRouter(RankCoord(env.dp_rank, env.pp_rank, env.tp_rank), rollout_tp, env.dp_group, env.dp,
                               env.device)
        return engine, router

    def resolve_box_space(self) -> None:
        """Replace ``box_space: auto`` by the family's space; log it and store it in the saved config."""
        from megatron_vlmr1.config import save_config
        from megatron_vlmr1.vlm.box_space import describe_box_space, resolve_box_space

        configured = self.cfg.box_space
        self.cfg.box_space = resolve_box_space(configured, self.hf_config)
        if self.env.is_logging_rank:
            print(describe_box_space(configured, self.cfg.box_space, self.hf_config.model_type), flush=True)
            save_config(self.cfg, self.output_dir / "config.yaml")

    # -- phases ------------------------------------------------------------------------------------------------
    def sync_weights(self, traffic: Any = None) -> int:
        """Stream the actor's full HF tensors into the engine (bucketed by the engine); returns the bytes synced.

        ``traffic`` (a ``vlm.export.SyncTraffic``) counts the bytes this rank received over the process groups."""
        from megatron_vlmr1.vlm.export import export_hf_weights

        return self.engine.update_weights(export_hf_weights(self.actor.chunks, self.family, traffic=traffic))

    def rollout(self, samples: list[Sample], step: int, round_index: int,
                prompt_indices: list[int]) -> list[RolloutResult]:
        """Generate G completions for ``samples``, the round's global prompts ``prompt_indices``: each prompt's seed
        is fixed by (run seed, step, round, global index), whichever replica generates it."""
        from megatron_vlmr1.rollout.base import RolloutRequest
        from megatron_vlmr1.rollout.placement import prompt_seed

        sampling = dataclasses.replace(self.cfg.rollout.sampling, n=self.algo.group_size)
        seeds = [prompt_seed(self.cfg.train.seed, step, round_index, index) for index in prompt_indices]
        requests = [RolloutRequest(s.messages, list(s.image_paths)) for s in samples]
        return self.engine.generate(requests, sampling, seeds=seeds)

    def score(self, samples: list[Sample], results: list[RolloutResult]) -> CombinedRewards:
        """Every reward of every completion (prompt-major) and their weighted totals."""
        from megatron_vlmr1.data import collate_reward_fields

        group = self.algo.group_size
        texts = [c.text for r in results for c in r.completions]
        fields = collate_reward_fields([s for s in samples for _ in range(group)])
        fields["box_space"] = [self.cfg.box_space] * len(texts)
        fields["resized_size"] = [resized_size(s, r) for s, r in zip(samples, results) for _ in range(group)]
        return self.reward_fn(texts, **fields)

    def collect(self, step: int, metrics: dict) -> RolloutBatch:
        """Roll out this replica's prompts (split over the job's rollout replicas, each generated once); with dynamic
        sampling, keep only groups whose rewards differ. Rounds are collective: one runs while any replica needs
        more groups, and a replica that has enough contributes no prompts to it."""
        group = self.algo.group_size
        kept_samples, kept_results, kept_total, per_reward = [], [], [], {}
        rounds = self.algo.dynamic_sampling_max_rounds if self.algo.dynamic_sampling else 1
        metrics["rollout_prompts_generated"] = 0.0
        for round_index in range(rounds):
            need_more = len(kept_samples) < self.prompts_per_rank
            if round_index and not any_rank(need_more):
                break
            samples = next(self.data) if need_more else []
            with self.timer("rollout", metrics):
                results = self.router.run_round(
                    samples, lambda chunk, indices: self.rollout(chunk, step, round_index, indices))
            metrics["rollout_prompts_generated"] += self.router.last_plan.total
            if not samples:
                continue
            with self.timer("reward", metrics):
                rewards = self.score(samples, results)
            for name, values in rewards.per_reward.items():
                per_reward.setdefault(name, []).extend(values)
            total = torch.tensor(rewards.total, dtype=torch.float32)
            keep = (informative_groups(total, group).tolist() if self.algo.dynamic_sampling
                    else list(range(len(samples))))
            for g in keep:
                kept_samples.append(samples[g])
                kept_results.append(results[g])
                kept_total.extend(rewards.total[g * group:(g + 1) * group])
        kept = self.prompts_per_rank
        return RolloutBatch(kept_samples[:kept], kept_results[:kept], kept_total[:kept * group], per_reward)

    def step(self, step: int) -> dict:
        """One GRPO step. ``self.preemption.check()`` between the phases abandons the step (``Preempted``) while
        no update of it has been applied yet; the session then saves the previous step's state."""
        from megatron_vlmr1.vlm.export import SyncTraffic

        metrics: dict[str, float] = {}
        traffic = SyncTraffic()
        with self.timer("sync", metrics):
            metrics["sync_gib"] = self.sync_weights(traffic) / 2**30
        # the busiest rank's bytes received over the trainer's process groups while exporting (TP gather, PP send)
        metrics["sync_bytes_moved_gib"] = self.all_reduce_max(traffic.received_bytes) / 2**30
        self.preemption.check()
        batch = self.collect(step, metrics)
        self.preemption.check()
        freed = self.engine.sleep()  # vLLM on CUDA with rollout.vllm_sleep: the trainer gets its memory until the sync
        if self.cfg.rollout.engine == "vllm" and self.cfg.rollout.vllm_sleep:
            metrics["rollout_sleep_freed_gib"] = freed / 2**30
        self.log_rollout_metrics(metrics, batch.per_reward, batch.results)
        if any_rank(not batch.samples):  # collective: a replica without data must not leave the others waiting in DDP
            metrics["skipped_no_signal"] = 1.0
            return metrics
        advantages = self.advantage_fn(torch.tensor(batch.rewards, dtype=torch.float32), self.algo)
        with self.timer("micro_batches", metrics):
            micro_batches = self.build_micro_batches(batch, advantages)
        with self.timer("old_logprob", metrics):
            self.attach("old_logprobs", micro_batches, self.actor.logprobs(micro_batches) if self.algo.mu > 1 else None)
        self.preemption.check()
        with self.timer("ref_logprob", metrics):
            self.attach("ref_logprobs", micro_batches,
                        self.reference.logprobs(micro_batches) if self.reference is not None else None)
        self.preemption.check()  # the last point before an update: from here on the step finishes
        loss = GRPOLoss(self.policy_loss, self.algo, micro_batches, self.env.dp, self.data_parallel_sum)
        with self.timer("update", metrics):
            for _ in range(self.algo.mu):
                outputs, update = self.actor.train_step(micro_batches, loss)
        metrics.update(update)
        metrics.update(self.reduce_token_metrics(outputs))
        return metrics

    def close(self) -> None:
        self.engine.close()  # before the process groups go: vLLM's shutdown destroys its own groups
        super().close()

    # -- helpers -----------------------------------------------------------------------------------------------
    def build_micro_batches(self, batch: RolloutBatch, advantages: torch.Tensor) -> list[MicroBatch]:
        """The engine's encoded prompts (not encoded again) + completions, with each completion's advantage [rows]
        and the engine's per-token log-probs: one row per completion, or with ``algo.shared_prefix`` one packed row
        per group (``micro_batch_size`` completions' worth of groups per micro-batch, at least one)."""
        from megatron_vlmr1.trainer.batching import make_micro_batches, make_shared_prefix_micro_batches

        rollout_logprobs = [c.logprobs for result in batch.results for c in result.completions]
        if self.algo.shared_prefix:
            groups_per_micro_batch = max(1, self.cfg.train.micro_batch_size // self.algo.group_size)
            return make_shared_prefix_micro_batches(
                self.family, self.processor, self.hf_config, [r.prompt for r in batch.results],
                [[c.completion_ids for c in r.completions] for r in batch.results], groups_per_micro_batch,
                row_scalars={"advantages": advantages}, row_token_values={"rollout_logprobs": rollout_logprobs},
                pad_per_micro_batch=self.env.pp == 1)
        prompts = [result.prompt for result in batch.results for _ in result.completions]
        completions = [c.completion_ids for result in batch.results for c in result.completions]
        return make_micro_batches(self.family, self.processor, self.hf_config, prompts, completions,
                                  self.cfg.train.micro_batch_size, row_scalars={"advantages": advantages},
                                  row_token_values={"rollout_logprobs": rollout_logprobs},
                                  pad_per_micro_batch=self.env.pp == 1)

    def all_reduce_max(self, value: float) -> float:
        """The largest ``value`` over all ranks."""
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.env.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    @staticmethod
    def attach(name: str, micro_batches: list[MicroBatch], values: list[torch.Tensor] | None) -> None:
        if values is None:
            return
        for batch, value in zip(micro_batches, values):
            batch.fields[name] = value * batch.loss_mask

    def log_rollout_metrics(self, metrics: dict, per_reward: dict[str, list[float]],
                            results: list[RolloutResult]) -> None:
        """Reward and length statistics over every completion of every data-parallel replica."""
        lengths = [len(c.completion_ids) for r in results for c in r.completions]
        weights = {r.name: r.weight for r in self.cfg.rewards}
        count = len(per_reward[self.reward_names[0]])
        totals = [sum(weights[n] * per_reward[n][i] for n in self.reward_names) for i in range(count)]
        # one contribution per replica: only its (tp 0, pp 0) rank counts
        owner = float(self.env.tp_rank == 0 and self.env.pp_rank == 0)
        local = [sum(per_reward[n]) for n in self.reward_names]
        local += [sum(totals), sum(t * t for t in totals), count, sum(lengths), len(lengths)]
        *reward_sums, total, total_sq, n, length_sum, n_lengths = self.all_reduce([owner * v for v in local])
        n = max(n, 1.0)
        for name, value in zip(self.reward_names, reward_sums):
            metrics[f"reward/{name}"] = value / n
        mean = total / n
        metrics["reward/mean"] = mean
        metrics["reward/std"] = max(total_sq / n - mean * mean, 0.0) ** 0.5
        metrics["completion_len/mean"] = length_sum / max(n_lengths, 1.0)
        metrics["rollout_tokens"] = length_sum


def resized_size(sample: Sample, result: RolloutResult) -> list[int] | None:
    """(width, height) of the image the question refers to, as the processor resized it (None: text-only)."""
    if not result.images:
        return None
    height, width = result.images[target_image(sample.extra, len(result.images))].resized
    return [width, height]


def main(argv: list[str]) -> int:
    return run_cli("python -m megatron_vlmr1 train", GRPORunConfig, GRPOTrainer, argv)
