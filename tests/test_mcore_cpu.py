"""megatron-core on CPU over gloo: TP=2 equals TP=1, and the 1F1B schedule at PP=2 equals PP=1."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

VOCAB, HIDDEN, HEADS, GROUPS, FFN, LAYERS, SEQ, BATCH = 64, 32, 4, 2, 64, 2, 8, 2


def _build_gpt(pre_process: bool = True, post_process: bool = True, pp_size: int = 1):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        ffn_hidden_size=FFN, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", add_bias_linear=False, add_qkv_bias=True, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        pipeline_dtype=torch.float32 if pp_size > 1 else None,
        pipeline_model_parallel_size=pp_size,
    )
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=pre_process, post_process=post_process,
                    share_embeddings_and_output_weights=False, position_embedding_type="rope")


def _inputs():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1).expand(BATCH, 1, SEQ, SEQ)
    return tokens, position_ids, mask


def _init(tp: int, pp: int) -> None:
    from megatron_vlmr1.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(tp=tp, pp=pp), torch.device("cpu"))


def _tp_worker(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state

    from megatron_vlmr1.vlm.base import tp_merge, tp_split

    tokens, position_ids, mask = _inputs()
    _init(1, 1)
    reference = _build_gpt()
    full_weights = {k: v.detach().clone() for k, v in reference.state_dict().items() if "_extra_state" not in k}
    logits_ref = reference(tokens, position_ids, mask)
    logits_ref.square().mean().backward()
    grads_ref = {n: p.grad.clone() for n, p in reference.named_parameters()}
    parallel_state.destroy_model_parallel()

    _init(2, 1)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    model = _build_gpt()
    model.load_state_dict({k: tp_split(k, v, 2, tp_rank) for k, v in full_weights.items()}, strict=False)
    logits_shard = model(tokens, position_ids, mask)
    logits = torch.cat(_all_gather(logits_shard.detach(), parallel_state.get_tensor_model_parallel_group()), dim=-1)
    # Loss on the full (gathered) logits so the gradient matches TP=1's loss exactly.
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    gather_from_tensor_model_parallel_region(logits_shard).square().mean().backward()
    grads = {n: tp_merge(n, _all_gather(p.grad, parallel_state.get_tensor_model_parallel_group()))
             for n, p in model.named_parameters()}
    parallel_state.destroy_model_parallel()
    return {"logits": (logits, logits_ref.detach()), "grads": (grads, grads_ref)}


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def test_tp2_matches_tp1():
    results = run_distributed(_tp_worker, 2)
    for result in results:
        logits, logits_ref = result["logits"]
        assert logits.shape == (BATCH, SEQ, VOCAB)
        torch.testing.assert_close(logits, logits_ref, rtol=0, atol=1e-5)
        grads, grads_ref = result["grads"]
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def _loss_func(output: torch.Tensor):
    loss = output.square().mean()
    return loss, {"loss": loss.detach()}


def _forward_step(data_iterator, model):
    tokens, position_ids, mask = next(data_iterator)
    return model(tokens, position_ids, mask), _loss_func


def _pp_worker(rank: int, world_size: int, pp: int, full_weights: dict | None) -> dict:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vlmr1.vlm.base import shift_layer_index

    _init(1, pp)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = _build_gpt(pre_process=pp_rank == 0, post_process=pp_rank == pp - 1, pp_size=pp)
    offset = pp_rank * LAYERS // pp
    if full_weights is None:
        assert pp == 1
        full_weights = {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    own = {}
    for name in model.state_dict():
        if "_extra_state" not in name:
            own[name] = full_weights[shift_layer_index(name, offset)]
    model.load_state_dict(own, strict=False)
    tokens, position_ids, mask = _inputs()
    microbatches = [(tokens[i:i + 1], position_ids[i:i + 1], mask[i:i + 1]) for i in range(BATCH)]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(microbatches), model=[model], num_microbatches=BATCH,
        seq_length=SEQ, micro_batch_size=1, forward_only=False)
    grads = {shift_layer_index(n, offset): p.grad.clone() for n, p in model.named_parameters()}
    parallel_state.destroy_model_parallel()
    return {"losses": [d["loss"] for d in losses], "grads": grads, "weights": full_weights}


def test_pp2_1f1b_matches_pp1():
    (reference,) = run_distributed(_pp_worker, 1, 1, None)
    stages = run_distributed(_pp_worker, 2, 2, reference["weights"])
    assert stages[0]["losses"] == []
    assert len(stages[1]["losses"]) == BATCH
    torch.testing.assert_close(torch.stack(stages[1]["losses"]), torch.stack(reference["losses"]), rtol=0, atol=1e-6)
    grads = {**stages[0]["grads"], **stages[1]["grads"]}
    assert grads.keys() == reference["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference["grads"][name], rtol=1e-4, atol=1e-7, msg=name)


def test_enable_is_idempotent_and_reversible():
    from megatron_vlmr1 import mcore_cpu

    original = torch.cuda.current_device
    with mcore_cpu.cpu_mode():
        mcore_cpu.enable_cpu_mode()
        assert torch.cuda.current_device() == "cpu"
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.cuda.current_device is original
    assert not mcore_cpu.is_cpu_mode_enabled()
    assert mcore_cpu.maybe_enable_cpu_mode("cuda") is False  # a CUDA run is never touched
    assert torch.cuda.current_device is original and not mcore_cpu.is_cpu_mode_enabled()


def test_parallel_config_validation():
    from megatron_vlmr1.parallel import ParallelConfig

    with pytest.raises(ValueError, match="parallel.tp must be >= 1"):
        ParallelConfig(tp=0)
    with pytest.raises(ValueError, match="world size 6 is not a multiple"):
        ParallelConfig(tp=2, pp=2).validate_world_size(6)


def _single_rank_collective_worker(rank: int, world_size: int) -> dict:
    from megatron.core.distributed import param_and_grad_buffer

    from megatron_vlmr1.mcore_cpu import _single_rank_collective, cpu_mode

    alone = [dist.new_group([r]) for r in range(world_size)][rank]
    calls = []

    def recording(output, input, **kwargs):
        calls.append(kwargs.get("group"))
        return "collective"

    local = _single_rank_collective(recording)
    source, target = torch.arange(6.0), torch.zeros(6)
    returned = local(target, source, group=alone, async_op=False)
    copied = target.clone()
    shared = torch.arange(4.0)
    local(shared, shared[:4], group=alone)  # the same memory (megatron's in-place buffers): left as it is
    delegated = [local(target, source, group=alone, async_op=True), local(target, source, group=None)]
    with cpu_mode():  # the module's own functions: local on one rank, gloo across two
        gathered = torch.zeros(2 * world_size)
        param_and_grad_buffer.dist_all_gather_func(gathered, torch.full((2,), float(rank)), group=None)
        own = torch.zeros(3)
        param_and_grad_buffer.dist_all_gather_func(own, torch.tensor([1.0, 2.0, 3.0]), group=alone)
    return {"returned": returned, "copied": copied, "shared": shared, "calls": len(calls),
            "delegated": delegated, "gathered": gathered, "own": own}


def test_single_rank_collectives_are_local_copies():
    for result in run_distributed(_single_rank_collective_worker, 2):
        assert result["returned"] is None
        torch.testing.assert_close(result["copied"], torch.arange(6.0), rtol=0, atol=0)
        torch.testing.assert_close(result["shared"], torch.arange(4.0), rtol=0, atol=0)
        assert result["calls"] == 2 and result["delegated"] == ["collective", "collective"]  # async, two ranks
        torch.testing.assert_close(result["gathered"], torch.tensor([0.0, 0.0, 1.0, 1.0]), rtol=0, atol=0)
        torch.testing.assert_close(result["own"], torch.tensor([1.0, 2.0, 3.0]), rtol=0, atol=0)
