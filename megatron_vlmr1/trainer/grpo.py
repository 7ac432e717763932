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

from megatron_vlmr1.algo import AlgoConfig, get_advantage_estimator, get_policy_loss, informative_groups, loss_normalizer
from megatron_vlmr1.data import DataConfig
from megatron_vlmr1.rollout.config import RolloutConfig
from megatron_vlmr1.trainer.config import (CheckpointConfig, LoopConfig, ModelConfig, OptimConfig, ParallelConfig,
                                           RewardSpec)
from megatron_vlmr1.trainer.distributed import any_rank
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
    # the processor fed the model: Qwen2.5-VL's grounding convention) or "norm1000" (Qwen2-VL). Box rewards rescale.
    box_space: Literal["abs", "resized", "norm1000"] = "abs"

    def __post_init__(self):
        if not self.model.path:
            raise ValueError("model.path is required: an HF checkpoint directory (see tools/make_tiny_model.py)")
        if not self.rewards:
            raise ValueError("rewards: list at least one reward, e.g. [{name: format, weight: 1.0}]")
        if self.rollout.sampling.n not in (1, self.algo.group_size):
            raise ValueError(f"rollout.sampling.n={self.rollout.sampling.n} disagrees with algo.group_size="
                             f"{self.algo.group_size}; set only algo.group_size")


class GRPOTrainer(TrainingSession):
    """Actor, reference and rollout engine are separate objects; this class only orders the phases."""

    def __init__(self, cfg: GRPORunConfig):
        super().__init__(cfg, cfg.train.prompts_per_step)
        from megatron_vlmr1.rewards import combine_rewards
        from megatron_vlmr1.trainer.policy import AdapterFreeReference, ScoringModel

        self.algo = cfg.algo
        self.reward_fn = combine_rewards([(r.name, r.weight) for r in cfg.rewards])
        self.reward_names = [r.name for r in cfg.rewards]
        if self.algo.beta <= 0:
            self.reference = None
        elif cfg.model.train_mode == "lora":
            self.reference = AdapterFreeReference(self.actor)
        else:
            self.reference = ScoringModel(self.family, self.hf_config, cfg.model.path, self.env, cfg.model)
        self.engine, self.router = self.build_rollout(cfg)
        self.policy_loss = get_policy_loss(self.algo.loss)
        self.advantage_fn = get_advantage_estimator(self.algo.advantage)

    def build_rollout(self, cfg: GRPORunConfig):
        """The engine (vLLM: ``rollout.tp`` consecutive ranks per engine) and the router that splits each round's
        prompts over the ``world / rollout.tp`` rollout replicas."""
        from megatron.core import parallel_state

        from megatron_vlmr1.rollout.config import build_engine
        from megatron_vlmr1.rollout.exchange import RolloutRouter
        from megatron_vlmr1.rollout.placement import RankCoord, validate_rollout_tp

        env = self.env
        rollout_tp = cfg.rollout.rollout_tp(env.tp)
        validate_rollout_tp(rollout_tp, env.world_size, env.tp)
        engine = build_engine(cfg.rollout, cfg.model.path, self.actor.dtype, device=env.device, tp=rollout_tp,
                              world_size=env.world_size)
        router = RolloutRouter(RankCoord(env.dp_rank, env.pp_rank, env.tp_rank), rollout_tp,
                               parallel_state.get_data_parallel_group(), env.dp, env.device)
        return engine, router

    # -- phases ------------------------------------------------------------------------------------------------
    def sync_weights(self, traffic: Any = None) -> int:
        """Stream the actor's full HF tensors into the engine (bucketed by the engine); returns the bytes synced.

        ``traffic`` (a ``vlm.export.SyncTraffic``) counts the bytes this rank received over the process groups."""
        from megatron_vlmr1.vlm.export import export_hf_weights

        return self.engine.update_weights(export_hf_weights(self.actor.chunks, self.family, traffic=traffic))

    def rollout(self, samples: list, step: int, round_index: int, prompt_indices: list[int]):
        """Generate G completions for ``samples``, the round's global prompts ``prompt_indices``: each prompt's seed
        is fixed by (run seed, step, round, global index), whichever replica generates it."""
        from megatron_vlmr1.rollout.base import RolloutRequest
        from megatron_vlmr1.rollout.placement import prompt_seed

        sampling = dataclasses.replace(self.cfg.rollout.sampling, n=self.algo.group_size)
        seeds = [prompt_seed(self.cfg.train.seed, step, round_index, index) for index in prompt_indices]
        requests = [RolloutRequest(s.messages, list(s.image_paths)) for s in samples]
        return self.engine.generate(requests, sampling, seeds=seeds)

    def score(self, samples: list, results: list) -> tuple[list[str], Any]:
        from megatron_vlmr1.data import collate_reward_fields

        group = self.algo.group_size
        texts = [c.text for r in results for c in r.completions]
        fields = collate_reward_fields([s for s in samples for _ in range(group)])
        fields["box_space"] = [self.cfg.box_space] * len(texts)
        fields["resized_size"] = [resized_size(s, r) for s, r in zip(samples, results) for _ in range(group)]
        return texts, self.reward_fn(texts, **fields)

    def collect(self, step: int, metrics: dict) -> tuple[list, list, list[float], dict[str, list[float]]]:
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
                _, rewards = self.score(samples, results)
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
        return kept_samples[:kept], kept_results[:kept], kept_total[:kept * group], per_reward

    def step(self, step: int) -> dict:
        from megatron_vlmr1.vlm.export import SyncTraffic

        metrics: dict[str, float] = {}
        traffic = SyncTraffic()
        with self.timer("sync", metrics):
            metrics["sync_gib"] = self.sync_weights(traffic) / 2**30
        # the busiest rank's bytes received over the trainer's process groups while exporting (TP gather, PP send)
        metrics["sync_bytes_moved_gib"] = self.all_reduce_max(traffic.received_bytes) / 2**30
        samples, results, total, per_reward = self.collect(step, metrics)
        freed = self.engine.sleep()  # vLLM on CUDA with rollout.vllm_sleep: the trainer gets its memory until the sync
        if self.cfg.rollout.engine == "vllm" and self.cfg.rollout.vllm_sleep:
            metrics["rollout_sleep_freed_gib"] = freed / 2**30
        self.log_rollout_metrics(metrics, per_reward, results)
        if any_rank(not samples):  # collective: a replica without data must not leave the others waiting in DDP
            metrics["skipped_no_signal"] = 1.0
            return metrics
        advantages = self.advantage_fn(torch.tensor(total, dtype=torch.float32), self.algo)
        micro_batches = self.build_micro_batches(samples, results, advantages)
        with self.timer("old_logprob", metrics):
            self.attach("old_logprobs", micro_batches, self.actor.logprobs(micro_batches) if self.algo.mu > 1 else None)
        with self.timer("ref_logprob", metrics):
            self.attach("ref_logprobs", micro_batches,
                        self.reference.logprobs(micro_batches) if self.reference is not None else None)
        normalizer = self.global_normalizer(micro_batches)
        with self.timer("update", metrics):
            for _ in range(self.algo.mu):
                outputs, update = self.actor.train_step(micro_batches, self.token_loss(normalizer))
        metrics.update(update)
        metrics.update(self.reduce_token_metrics(outputs))
        return metrics

    def close(self) -> None:
        self.engine.close()  # before the process groups go: vLLM's shutdown destroys its own groups
        super().close()

    # -- helpers -----------------------------------------------------------------------------------------------
    def build_micro_batches(self, samples: list, results: list, advantages: torch.Tensor) -> list:
        from megatron_vlmr1.trainer.batching import make_micro_batches

        prompts, completions, rollout_logprobs = [], [], []
        for sample, result in zip(samples, results):
            encoded = self.family.encode_prompt(self.processor, sample.messages, list(sample.image_paths))
            if list(encoded.input_ids) != list(result.prompt_ids):
                raise AssertionError("rollout engine and trainer encoded a prompt differently")
            for completion in result.completions:
                prompts.append(encoded)
                completions.append(completion.completion_ids)
                rollout_logprobs.append(completion.logprobs)
        return make_micro_batches(self.family, self.processor, self.hf_config, prompts, completions,
                                  self.cfg.train.micro_batch_size, row_scalars={"advantages": advantages},
                                  row_token_values={"rollout_logprobs": rollout_logprobs})

    def all_reduce_max(self, value: float) -> float:
        """The largest ``value`` over all ranks."""
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.env.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    @staticmethod
    def attach(name: str, micro_batches: list, values: list | None) -> None:
        if values is None:
            return
        for batch, value in zip(micro_batches, values):
            batch.fields[name] = value * batch.loss_mask

    def global_normalizer(self, micro_batches: list) -> float:
        """The aggregation's count over this step's whole batch on every data-parallel replica."""
        return self.data_parallel_sum(sum(float(loss_normalizer(mb.loss_mask, self.algo)) for mb in micro_batches))

    def token_loss(self, normalizer: float):
        algo, loss_fn = self.algo, self.policy_loss

        def compute(batch, logprobs, entropy):
            mask = batch.loss_mask
            fields = batch.fields
            old = fields.get("old_logprobs", logprobs.detach())
            loss, metrics = loss_fn(logprobs, old, fields.get("ref_logprobs"), fields["advantages"], mask, algo,
                                    rollout_logprobs=fields.get("rollout_logprobs") if algo.tis_cap else None,
                                    normalizer=normalizer)
            tokens = mask.sum()
            mismatch = (logprobs.detach() - fields["rollout_logprobs"]).abs() * mask
            out = {k: float(v) * float(tokens) for k, v in metrics.items()}
            out.update(tokens=float(tokens), entropy=float((entropy.detach() * mask).sum()),
                       rollout_logprob_gap=float(mismatch.sum()), rollout_logprob_gap_max=float(mismatch.max()))
            return loss, out

        return compute

    def log_rollout_metrics(self, metrics: dict, per_reward: dict, results: list) -> None:
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


def resized_size(sample: Any, result: Any) -> list[int] | None:
    """(width, height) of the image the question refers to, as the processor resized it (None: text-only)."""
    if not result.images:
        return None
    index = sample.extra.get("target_image", 0) if isinstance(sample.extra.get("target_image", 0), int) else 0
    height, width = result.images[min(max(index, 0), len(result.images) - 1)].resized
    return [width, height]


def main(argv: list[str]) -> int:
    return run_cli("python -m megatron_vlmr1 train", GRPORunConfig, GRPOTrainer, argv)
