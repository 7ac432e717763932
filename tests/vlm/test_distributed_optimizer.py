"""Qwen-VL under megatron's DDP + distributed optimizer (TP=2 x DP=2 over gloo): one Adam step is exactly the
hand-computed first Adam step on the DP-averaged gradient, and the exporter still works through the DDP wrapper."""
from __future__ import annotations

import torch

from tests.distributed import run_distributed
from tests.vlm import qwen_vl_helpers as helpers

LR, EPS = 1e-3, 1e-8


def _worker(rank: int, world_size: int, hf_dir: str, batches: list[dict]) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_vlmr1.vlm.export import export_hf_weights

    helpers.setup(2, 1)
    model, family = helpers.build_loaded(hf_dir)
    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, min_lr=LR, weight_decay=0.0, adam_eps=EPS, clip_grad=0.0,
                        use_distributed_optimizer=True, params_dtype=torch.float32),
        [ddp])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    dp_rank = parallel_state.get_data_parallel_rank()
    batch = dict(batches[dp_rank], vocab_size=model.layout.vocab_size)  # each DP replica sees its own batch
    helpers.run_pipeline(ddp, batch, forward_only=False)
    # This replica's own gradient; after finalize, each DP rank holds the average only for its optimizer shard.
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    finalize_model_grads([ddp])
    success, _, _ = optimizer.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    exported = dict(export_hf_weights([ddp], family))
    parallel_state.destroy_model_parallel()
    return {"before": before, "grads": grads, "after": after, "success": success, "exported": exported}


def test_distributed_optimizer_step_is_adam_on_averaged_grads(tiny_qwen2_5_vl):
    references = [helpers.hf_reference(tiny_qwen2_5_vl, side) for side in ("left", "right")]
    batches = [{k: v for k, v in ref.items() if k != "logits"} for ref in references]
    results = run_distributed(_worker, 4, str(tiny_qwen2_5_vl), batches)
    for result in results:
        assert result["success"]
    # Ranks 0/1 are TP ranks of DP replica 0, ranks 2/3 of replica 1 (megatron's default order tp-cp-ep-dp-pp).
    for tp_rank in range(2):
        a, b = results[tp_rank], results[tp_rank + 2]
        for name in a["after"]:
            # DP replicas saw different data, hence different gradients, yet end with the same weights.
            assert not torch.equal(a["grads"][name], b["grads"][name]), name
            assert torch.equal(a["after"][name], b["after"][name]), name
            grad = (a["grads"][name] + b["grads"][name]) / 2
            # First Adam step: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
            expected = a["before"][name] - LR * grad / (grad.abs() + EPS)
            torch.testing.assert_close(a["after"][name], expected, rtol=1e-5, atol=1e-7, msg=name)
            assert not torch.equal(a["after"][name], a["before"][name]), name
    for result in results[1:]:
        assert result["exported"].keys() == results[0]["exported"].keys()
        assert all(torch.equal(result["exported"][k], v) for k, v in results[0]["exported"].items())
