"""Supervised fine-tuning on the same data: ``python -m megatron_vlmr1 sft --config FILE [key.sub=value ...]``.

The target of a sample is its answer in the R1 format (``<think>…</think><answer>…</answer>``) followed by the
model family's end-of-turn token, so an SFT-warmed policy already satisfies the format reward and stops on its own.
The loss is the token-mean negative log-likelihood of the target tokens over the whole step's batch.
"""
from __future__ import annotations

import dataclasses
import json

from megatron_vlmr1.data import DataConfig, Sample
from megatron_vlmr1.trainer.config import CheckpointConfig, LoopConfig, ModelConfig, OptimConfig, ParallelConfig
from megatron_vlmr1.trainer.loss import NLLLoss
from megatron_vlmr1.trainer.policy import MicroBatch
from megatron_vlmr1.trainer.session import TrainingSession, run_cli


@dataclasses.dataclass
class SFTRunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=1e-5))
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    think: str = "Let me find it in the image."  # the reasoning text put in <think> when the data has none

    def __post_init__(self):
        if not self.model.path:
            raise ValueError("model.path is required: an HF checkpoint directory (see tools/make_tiny_model.py)")


def _answer_json(answer: str) -> str:
    """A bare box list becomes ``{"bbox_2d": [...]}`` (what rec_format and iou expect); anything else is kept."""
    try:
        value = json.loads(answer)
    except ValueError:
        return answer
    if isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        return json.dumps({"bbox_2d": value})
    return answer


def sft_target(solution: str, think: str) -> str:
    """``<answer> X </answer>`` (the loader's solution form) → ``<think>…</think><answer>X'</answer>``."""
    if "<think>" in solution:
        return solution
    answer = solution.replace("<answer>", "").replace("</answer>", "").strip()
    return f"<think>{think}</think><answer>{_answer_json(answer)}</answer>"


class SFTTrainer(TrainingSession):
    def __init__(self, cfg: SFTRunConfig):
        super().__init__(cfg, cfg.train.prompts_per_step)

    def step(self, step: int) -> dict:
        return self.update(self.micro_batches(next(self.data)))

    def micro_batches(self, samples: list[Sample]) -> list[MicroBatch]:
        """Prompt + R1-format target of each sample, in ``train.micro_batch_size`` rows per micro-batch."""
        from megatron_vlmr1.trainer.batching import make_micro_batches

        tokenizer = self.processor.tokenizer
        prompts = [self.family.encode_prompt(self.processor, s.messages, list(s.image_paths)) for s in samples]
        end = self.family.end_of_turn
        targets = [tokenizer(sft_target(s.solution, self.cfg.think) + end, add_special_tokens=False)["input_ids"]
                   for s in samples]
        return make_micro_batches(self.family, self.processor, self.hf_config, prompts, targets,
                                  self.cfg.train.micro_batch_size)

    def update(self, micro_batches: list[MicroBatch]) -> dict:
        """One optimizer update over the micro-batches; its metrics are read from the device once."""
        loss = NLLLoss(micro_batches, self.env.dp, self.data_parallel_sum)
        metrics: dict[str, float] = {}
        with self.timer("update", metrics):
            outputs, update = self.actor.train_step(micro_batches, loss)
        metrics.update(update)
        metrics.update(self.reduce_token_metrics(outputs))
        return metrics


def main(argv: list[str]) -> int:
    return run_cli("python -m megatron_vlmr1 sft", SFTRunConfig, SFTTrainer, argv)
