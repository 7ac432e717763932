"""The megatron model a role runs: the trainable actor and the frozen reference share this code.

``ScoringModel`` builds this pipeline stage's model from an HF checkpoint and runs micro-batches through megatron's
pipeline schedule (``get_forward_backward_func``); ``ActorModel`` adds DDP, the (distributed) optimizer and the LR
schedule. The per-token loss is a callback, so the same object serves GRPO, SFT and plain scoring.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import torch

from megatron_vlmr1.kernels import fused_logprob
from megatron_vlmr1.trainer.config import ModelConfig, OptimConfig
from megatron_vlmr1.parallel import ParallelEnv
from megatron_vlmr1.trainer.packing import Packing
from megatron_vlmr1.vlm.base import VLMFamily

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class MicroBatch:
    """Right-padded rows, all micro-batches of a step padded to one length (the pipeline sends fixed shapes).

    ``input_ids``/``attention_mask`` [b, s]; ``position_ids`` [3, b, s]; ``loss_mask`` [b, s-1] marks the tokens
    (shifted: column j is token j+1) that count in the loss; ``fields`` holds per-token tensors aligned with it
    ([b, s-1]: advantages, old/ref/rollout log-probs, ...).

    Shared-prefix micro-batches (``packing`` set, see ``trainer/packing.py``) hold one packed row per group: the
    model attends by ``packing.layout`` (``attention_mask`` only marks real tokens), and ``loss_mask``/``fields``
    are in the per-completion layout [rows, T] the loss reads; ``packing`` maps the packed columns onto it.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    fields: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    packing: Packing | None = None

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MicroBatch(move(self.input_ids), move(self.attention_mask), move(self.position_ids),
                          move(self.loss_mask), move(self.pixel_values), move(self.image_grid_thw),
                          {k: move(v) for k, v in self.fields.items()}, move(self.packing))

    @property
    def target_mask(self) -> torch.Tensor:
        """[b, s-1]: the model-layout columns whose next token is scored."""
        return self.loss_mask if self.packing is None else self.packing.target_mask


# (micro_batch, logprobs [b, s-1], entropy [b, s-1]) -> (loss [], metrics). The loss goes to megatron's schedule
# as is: a training loss compensates the schedule's averaging itself (``trainer.loss.StepLoss``).
TokenLoss = Callable[[MicroBatch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


def shifted_targets(batch: MicroBatch, ignore_index: int = -100) -> torch.Tensor:
    """Token j+1 is predicted at column j; tokens outside the loss mask are ignored. [b, s] -> [b, s].

    The last column (nothing to predict) is ``ignore_index`` too, so the logits of all s positions go to the kernel
    as they are (no ``[:, :-1]`` slice, which would cost a copy forward and a zero-filled gradient backward).
    """
    targets = torch.full_like(batch.input_ids, ignore_index)
    targets[:, :-1] = batch.input_ids[:, 1:].masked_fill(~batch.target_mask.bool(), ignore_index)
    return targets


def token_logprobs(logits: torch.Tensor, batch: MicroBatch, tp_group: torch.distributed.ProcessGroup | None,
                   vocab_end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head's raw output [s, b, vocab_shard] (``raw_logits=True``: megatron's layout, padded columns
    included) → per-token log-probs and entropies [b, s-1] of the next tokens (0 outside the loss mask).

    Nothing of vocabulary size is copied: the kernel reads megatron's layout, skips the columns >= ``vocab_end`` and
    the rows whose target is ignored, and, since nothing reads the logits after the loss, writes their gradient in
    place. The [b, s-1] results are made contiguous (they are transposed views) so that token sums add up in the
    same order as a batch-first computation's, bit for bit. The targets' range was checked on the host before the
    step (``check_targets``), so the kernel's own check (a host sync per micro-batch on a GPU) is skipped.
    """
    logprobs, entropy = fused_logprob(logits, shifted_targets(batch), tp_group=tp_group, return_entropy=True,
                                      vocab_end=vocab_end, seq_first=True, inplace_backward=True, check_targets=False)
    return logprobs[:, :-1].contiguous(), entropy[:, :-1].contiguous()


def check_targets(micro_batches: list[MicroBatch], vocab_end: int, ignore_index: int = -100) -> None:
    """Every scored token id is in [0, ``vocab_end``): one check over the step's (host-resident) micro-batches
    instead of one host sync per micro-batch inside the kernel."""
    targets = torch.cat([shifted_targets(mb, ignore_index).flatten() for mb in micro_batches])
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_end))
    if bool(bad.any()):
        raise ValueError(f"token id {int(targets[bad][0])} is outside the model's vocabulary [0, {vocab_end}) "
                         f"(the tokenizer and the checkpoint disagree)")


def per_completion(token_loss: TokenLoss) -> TokenLoss:
    """The loss of a shared-prefix micro-batch sees its log-probs in the per-completion layout [rows, T]."""

    def loss(batch: MicroBatch, logprobs: torch.Tensor, entropy: torch.Tensor):
        if batch.packing is None:
            return token_loss(batch, logprobs, entropy)
        return token_loss(batch, batch.packing.rows(logprobs, batch.loss_mask),
                          batch.packing.rows(entropy, batch.loss_mask))

    return loss


class ScoringModel:
    """This pipeline stage's megatron model, loaded from an HF checkpoint; forward-only scoring."""

    def __init__(self, family: VLMFamily, hf_config: PretrainedConfig, hf_path: str, env: ParallelEnv,
                 model_cfg: ModelConfig, recompute: str = "none", shared_prefix: bool = False):
        from megatron_vlmr1.vlm.export import load_hf_weights

        self.env = env
        self.family = family
        self.dtype = DTYPES[model_cfg.dtype]
        # LoRA hooks need each linear's own input: Transformer Engine layers with separate norms (attention stays
        # fused); shared-prefix packed rows need the core attention that reads their layout (swapped in on either
        # backend, see vlm.prefix_attention)
        backend = family.default_backend(env.device, separate_norm=model_cfg.train_mode == "lora")
        # No random initialisation: every weight is loaded right after. (Transformer Engine layers keep their init:
        # that they carry megatron's TP attributes without it is not verified, see vlm.stages.)
        model = family.build_model(hf_config, env, params_dtype=self.dtype, backend=backend,
                                   perform_initialization=backend != "local", shared_prefix_attention=shared_prefix,
                                   **recompute_config(recompute))
        model.to(env.device)
        load_hf_weights(model, family, hf_path)
        self.chunks: list[torch.nn.Module] = [model]
        self.vocab_size = model.vocab_size  # the real vocabulary end; the LM head's columns beyond it are padding

    @property
    def module(self) -> torch.nn.Module:
        """The bare model (under any DDP wrapper)."""
        model = self.chunks[0]
        return getattr(model, "module", model)

    def run(self, micro_batches: list[MicroBatch], token_loss: TokenLoss, forward_only: bool) -> list[dict]:
        """Run the pipeline schedule; returns the per-micro-batch metric dicts (last stage only, else [])."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        tp_group = self.env.tp_group if self.env.tp > 1 else None
        seq_length = micro_batches[0].input_ids.shape[1]
        micro_batch_size = micro_batches[0].input_ids.shape[0]
        if self.env.pp > 1 and any(mb.input_ids.shape != (micro_batch_size, seq_length) for mb in micro_batches):
            raise AssertionError("micro-batches must share one [b, s] shape for the pipeline schedule")
        num_micro_batches = len(micro_batches)
        check_targets(micro_batches, self.vocab_size)
        token_loss = per_completion(token_loss)

        def loss_func(batch: MicroBatch, logits: torch.Tensor):
            logprobs, entropy = token_logprobs(logits, batch, tp_group, self.vocab_size)
            return token_loss(batch, logprobs, entropy)

        def forward_step(data_iterator, model):
            batch = next(data_iterator).to(self.env.device)
            layout = None if batch.packing is None else batch.packing.layout
            logits = model(batch.input_ids, batch.position_ids, batch.attention_mask, batch.pixel_values,
                           batch.image_grid_thw, raw_logits=True, prefix_layout=layout)
            return logits, partial(loss_func, batch)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=self.chunks,
            num_microbatches=num_micro_batches, seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )

    @torch.no_grad()
    def logprobs(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor] | None:
        """Per-token log-probs [b, s-1] of each micro-batch (fp32, 0 outside the loss mask); None off the last stage."""
        for model in self.chunks:
            model.eval()

        def keep(batch, logprobs, entropy):
            return logprobs.sum() * 0.0, {"logprobs": logprobs.detach().float().cpu()}

        outputs = self.run(micro_batches, keep, forward_only=True)
        return [out["logprobs"] for out in outputs] if self.env.is_last_stage else None


class ActorModel(ScoringModel):
    """The trainable policy: DDP-wrapped megatron model + megatron optimizer + LR schedule."""

    def __init__(self, family: VLMFamily, hf_config: PretrainedConfig, hf_path: str, env: ParallelEnv,
                 model_cfg: ModelConfig, optim_cfg: OptimConfig, total_steps: int, distributed_optimizer: bool = True,
                 recompute: str = "none", shared_prefix: bool = False):
        super().__init__(family, hf_config, hf_path, env, model_cfg, recompute=recompute, shared_prefix=shared_prefix)
        check_trainable_layout(self.module, env.tp)
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        model = self.chunks[0]
        apply_train_mode(model, model_cfg)
        config = model.config
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=distributed_optimizer)
        ddp = DistributedDataParallel(config, ddp_config, model)
        self.chunks = [ddp]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim_cfg.lr, min_lr=optim_cfg.min_lr,
                            weight_decay=optim_cfg.weight_decay, adam_beta1=optim_cfg.adam_beta1,
                            adam_beta2=optim_cfg.adam_beta2, adam_eps=optim_cfg.adam_eps,
                            clip_grad=optim_cfg.clip_grad, bf16=self.dtype == torch.bfloat16,
                            fp16=self.dtype == torch.float16, params_dtype=self.dtype,
                            use_distributed_optimizer=distributed_optimizer),
            self.chunks,
        )
        decay_style = {"constant": "constant", "linear": "linear", "cosine": "cosine"}[optim_cfg.lr_schedule]
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim_cfg.warmup_steps else optim_cfg.lr, max_lr=optim_cfg.lr,
            min_lr=optim_cfg.min_lr, lr_warmup_steps=optim_cfg.warmup_steps,
            lr_decay_steps=max(total_steps, optim_cfg.warmup_steps + 1), lr_decay_style=decay_style,
            start_wd=optim_cfg.weight_decay, end_wd=optim_cfg.weight_decay, wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant",
        )
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss if self.dtype == torch.float16 else None

    def init_optimizer_state(self) -> None:
        """Give every parameter an Adam state (step 0, zero moments) so a checkpoint can be loaded into it.

        megatron's optimizer reads the Adam ``step`` out of its state when building the sharded state dict to load
        into; before the first update that state is empty. Loading then overwrites these zeros.
        """
        inner = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for megatron_optimizer in inner:
            torch_optimizer = megatron_optimizer.optimizer
            for group in torch_optimizer.param_groups:
                for param in group["params"]:
                    state = torch_optimizer.state[param]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(param.data)
                        state["exp_avg_sq"] = torch.zeros_like(param.data)

    def restore_adam_step(self) -> None:
        """After loading: put the saved iteration count (kept per param group) back into each parameter's state.

        megatron-core 0.16.1 restores torch Adam's moments but leaves the per-parameter ``step`` at its initial
        value, which would change Adam's bias correction on the first update after a resume.
        """
        for megatron_optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            torch_optimizer = megatron_optimizer.optimizer
            for group in torch_optimizer.param_groups:
                if "step" not in group:
                    continue
                for param in group["params"]:
                    torch_optimizer.state[param]["step"] = torch.tensor(float(group["step"]))

    def train_step(self, micro_batches: list[MicroBatch], token_loss: TokenLoss) -> tuple[list[dict], dict]:
        """One optimizer update over all micro-batches (gradient accumulation through the pipeline schedule)."""
        for model in self.chunks:
            model.train()
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self.run(micro_batches, token_loss, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        return outputs, {"grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                         "lr": self.optimizer.param_groups[0]["lr"], "update_skipped": float(not update_ok)}


class AdapterFreeReference:
    """The reference policy of a LoRA run: the actor's own model with its adapters bypassed.

    The frozen base *is* the starting policy, so no second model is built or held in memory.
    """

    def __init__(self, actor: ActorModel):
        self.actor = actor

    def logprobs(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor] | None:
        """Per-token log-probs [b, s-1] of the base model (see ``ScoringModel.logprobs``)."""
        from megatron_vlmr1.vlm.lora import disabled_adapters

        with disabled_adapters(self.actor.module):
            return self.actor.logprobs(micro_batches)


def recompute_config(mode: str) -> dict[str, Any]:
    """megatron TransformerConfig fields for ``parallel.recompute`` (only training keeps activations to recompute)."""
    if mode == "none":
        return {}
    if mode == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if mode == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise ValueError(f"parallel.recompute must be none, selective or full, got {mode!r}")


def check_trainable_layout(model: torch.nn.Module, tp: int) -> None:
    """Refuse TP sizes that replicate KV heads: each copy would get only its own query heads' gradient and the
    copies would drift apart (megatron needs num_query_groups % TP == 0; repeating the heads is exact for
    inference and conversion only)."""
    layout = getattr(model, "layout", None)
    repeat = getattr(layout, "kv_repeat", 1)
    if repeat > 1:
        raise ValueError(f"parallel.tp={tp} exceeds the model's num_key_value_heads="
                         f"{layout.num_kv_heads}: training at this TP would let the replicated KV heads drift "
                         f"apart; use parallel.tp <= {layout.num_kv_heads} (add pipeline or data parallelism)")


def apply_train_mode(model: torch.nn.Module, model_cfg: ModelConfig) -> None:
    """Freeze what the training mode says must not change (before DDP sees the parameters)."""
    if model_cfg.train_mode == "freeze_vision":
        visual = getattr(model, "visual", None)
        if visual is not None:
            visual.requires_grad_(False)
    elif model_cfg.train_mode == "lora":
        from megatron_vlmr1.vlm.lora import apply_lora

        apply_lora(model, rank=model_cfg.lora_rank, alpha=model_cfg.lora_alpha, dropout=model_cfg.lora_dropout,
                   targets=model_cfg.lora_targets)
