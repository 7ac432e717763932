"""LoRA on the megatron Qwen-VL model: B=0 is the base model, TP=2 equals TP=1 (logits and adapter gradients),
disabled adapters give the base back, the merged HF export and the PEFT export both reproduce the adapted logits in
transformers, and dist checkpoints reshard adapters from TP=2 to TP=1.

Both TP sizes run inside one 2-process launch (spawning and importing dominate the cost on 2 cores).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.vlm import qwen_vl_helpers as helpers

RANK, ALPHA = 4, 8.0


def _hf_layout_b(family, hf_config, layout) -> dict[str, torch.Tensor]:
    """Random B for every adapted weight, drawn per HF tensor and fused like the weight: [out_full, r] by mcore name.

    Drawing in the HF layout keeps repeated KV-head copies equal, so every TP size holds the same adapter."""
    generator = torch.Generator().manual_seed(7)
    out = {}
    for spec in family.weight_specs(hf_config, layout):
        if spec.mcore_name.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight",
                                     "linear_fc2.weight")):
            parts = [torch.randn(n, RANK, generator=generator) * 0.05 for n in _hf_rows(spec, hf_config)]
            out[spec.mcore_name] = spec.to_mcore(parts)
    return out


def _hf_rows(spec, hf_config) -> list[int]:
    from megatron_vlmr1.vlm.base import hf_config_text

    text = hf_config_text(hf_config)
    head_dim = text.hidden_size // text.num_attention_heads
    rows = {"q_proj": text.num_attention_heads * head_dim, "k_proj": text.num_key_value_heads * head_dim,
            "v_proj": text.num_key_value_heads * head_dim, "o_proj": text.hidden_size,
            "gate_proj": text.intermediate_size, "up_proj": text.intermediate_size, "down_proj": text.hidden_size}
    return [rows[name.split(".")[-2]] for name in spec.hf_names]


def _set_b(model, family) -> None:
    from megatron.core import parallel_state

    from megatron_vlmr1.vlm.base import tp_split
    from megatron_vlmr1.vlm.lora import lora_adapters

    tp, tp_rank = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_tensor_model_parallel_rank())
    full = _hf_layout_b(family, model.hf_config, model.layout)
    with torch.no_grad():
        for name, adapter in lora_adapters(model).items():
            b = full[f"{name}.weight"]
            if adapter.kind == "column":
                b = tp_split(f"{name}.weight", b, tp, tp_rank)
            adapter.B.copy_(b)


def _full_adapters(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full (TP-merged) A and B (or their gradients) by name; gradients of the fused qkv B in the HF q/k/v layout
    (repeated KV-head copies summed), so they compare across TP sizes."""
    from megatron_vlmr1.vlm.export import gather_full_mcore
    from megatron_vlmr1.vlm.lora import lora_adapters
    from megatron_vlmr1.vlm.qwen_vl.weights import split_qkv

    out = {}
    for name, adapter in lora_adapters(model).items():
        for key, axis in adapter.tp_axes().items():
            param = getattr(adapter, key)
            tensor = param.grad if grads else param.detach()
            full = gather_full_mcore(model, f"{name}.weight", tensor) if axis is not None else tensor
            if grads and key == "B" and name.endswith("linear_qkv"):
                full = torch.cat(split_qkv(full, model.layout, reduce="sum"))
            out[f"{name}.{key}"] = full
    return out


def _logits(model, batch, tp):
    from megatron.core import parallel_state

    model.eval()
    logits = helpers.run_pipeline(model, batch, forward_only=True)[0]
    logits = helpers.gather_vocab(logits) if tp > 1 else logits
    assert parallel_state.is_pipeline_last_stage()
    return logits[..., :model.layout.vocab_size]


def _dropout_run(hf_dir: str, family, batch: dict) -> dict:
    """Train-mode forward/backward with adapter dropout: (did dropout act, replicated adapter grads by name)."""
    from megatron_vlmr1.vlm.lora import apply_lora, lora_adapters

    model, _ = helpers.build_loaded(hf_dir)
    apply_lora(model, rank=RANK, alpha=ALPHA, dropout=0.5)
    _set_b(model, family)
    eval_logits = _logits(model, batch, 2)
    model.train()
    train_logits = helpers.run_pipeline(model, dict(batch, vocab_size=model.layout.vocab_size), forward_only=True)
    helpers.run_pipeline(model, dict(batch, vocab_size=model.layout.vocab_size), forward_only=False)
    replicated = {f"{name}.{key}": getattr(adapter, key).grad
                  for name, adapter in lora_adapters(model).items()
                  for key, axis in adapter.tp_axes().items() if axis is None}
    changed = not torch.equal(helpers.gather_vocab(train_logits[0])[..., :model.layout.vocab_size], eval_logits)
    return {"changed": changed, "replicated_grads": replicated}


def _worker(rank: int, world_size: int, hf_dir: str, batch: dict, work_dir: str) -> dict:
    from megatron.core import parallel_state

    from megatron_vlmr1.vlm.export import export_hf_weights, load_mcore_checkpoint, save_mcore_checkpoint
    from megatron_vlmr1.vlm.lora import apply_lora, disabled_adapters, lora_adapters, peft_state_dict

    out: dict = {}
    for tp in (2, 1):
        helpers.setup(tp, 1)
        model, family = helpers.build_loaded(hf_dir)
        result = {"base": _logits(model, batch, tp)}
        adapted = apply_lora(model, rank=RANK, alpha=ALPHA)
        result["adapted_names"] = adapted
        result["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        result["zero_b"] = _logits(model, batch, tp)
        result["initial_a"] = {k: v for k, v in _full_adapters(model).items() if k.endswith(".A")}
        _set_b(model, family)
        result["lora"] = _logits(model, batch, tp)
        with disabled_adapters(model):
            result["disabled"] = _logits(model, batch, tp)
        result["export"] = dict(export_hf_weights(model, family))
        result["peft"] = peft_state_dict(model, family)
        model.train()
        helpers.run_pipeline(model, dict(batch, vocab_size=model.layout.vocab_size), forward_only=False)
        result["grads"] = _full_adapters(model, grads=True)
        result["base_grads"] = [n for n, p in model.named_parameters() if p.grad is not None and "lora" not in n]
        if tp == 2:
            save_mcore_checkpoint(model, Path(work_dir) / "ckpt")
            result["dropout"] = _dropout_run(hf_dir, family, batch)
            result["saved"] = _full_adapters(model)
        else:
            fresh, _ = helpers.build_loaded(hf_dir, num_query_groups=2)  # the TP=2 layout the checkpoint has
            apply_lora(fresh, rank=RANK, alpha=ALPHA, seed=99)
            load_mcore_checkpoint(fresh, Path(work_dir) / "ckpt")
            result["loaded"] = _full_adapters(fresh)
        out[tp] = result
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def lora_results(tiny_qwen2_5_vl, tmp_path_factory):
    reference = helpers.hf_reference(tiny_qwen2_5_vl, "right")
    batch = {k: v for k, v in reference.items() if k != "logits"}
    work = tmp_path_factory.mktemp("lora")
    return reference, batch, run_distributed(_worker, 2, str(tiny_qwen2_5_vl), batch, str(work))


def _masked_diff(a, b, mask) -> float:
    return (a[mask] - b[mask]).abs().max().item()


def test_zero_b_is_the_base_model_and_only_adapters_train(lora_results):
    _, batch, results = lora_results
    for tp in (1, 2):
        result = results[0][tp]
        assert torch.equal(result["zero_b"], result["base"])
        assert len(result["adapted_names"]) == 2 * 4  # 2 layers x (qkv, proj, fc1, fc2)
        assert result["trainable"] and all(n.endswith(("lora.A", "lora.B")) for n in result["trainable"])
        assert len(result["trainable"]) == 2 * len(result["adapted_names"])
        assert result["base_grads"] == []
    mask = batch["attention_mask"].bool()
    assert _masked_diff(results[0][1]["lora"], results[0][1]["base"], mask) > 1e-2  # the adapters do something


def test_disabled_adapters_give_the_base_model(lora_results):
    _, _, results = lora_results
    for tp in (1, 2):
        assert torch.equal(results[0][tp]["disabled"], results[0][tp]["base"])


def test_tp2_equals_tp1_in_init_logits_and_adapter_grads(lora_results):
    _, batch, results = lora_results
    tp1, tp2 = results[0][1], results[0][2]
    assert tp1["initial_a"].keys() == tp2["initial_a"].keys()
    for name, a in tp1["initial_a"].items():
        assert torch.equal(a, tp2["initial_a"][name]), name
    mask = batch["attention_mask"].bool()
    assert _masked_diff(tp2["lora"], tp1["lora"], mask) <= 1e-4
    assert tp1["grads"].keys() == tp2["grads"].keys()
    for name, grad in tp1["grads"].items():
        assert grad.abs().sum() > 0, name
        rel = ((tp2["grads"][name] - grad).norm() / grad.norm()).item()
        assert rel <= 1e-5, f"{name}: relative grad diff {rel}"


def test_replicated_adapter_parts_agree_across_tp_ranks(lora_results):
    _, _, results = lora_results
    for name, grad in results[0][2]["grads"].items():
        assert torch.equal(grad, results[1][2]["grads"][name]), name


def _hf_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                     image_grid_thw=batch["image_grid_thw"]).logits


def test_merged_export_reproduces_adapted_logits_in_transformers(lora_results, tiny_qwen2_5_vl, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    _, batch, results = lora_results
    for tp in (1, 2):
        merged_dir = tmp_path / f"merged_tp{tp}"
        merged_dir.mkdir()
        save_file({k: v.contiguous() for k, v in results[0][tp]["export"].items()},
                  str(merged_dir / "model.safetensors"))
        shutil.copy(Path(tiny_qwen2_5_vl) / "config.json", merged_dir / "config.json")
        model = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
        mask = batch["attention_mask"].bool()
        assert _masked_diff(_hf_logits(model, batch), results[0][1]["lora"], mask) <= 1e-4


def test_peft_export_loads_in_peft_and_matches(lora_results, tiny_qwen2_5_vl, tmp_path):
    from peft import LoraConfig, PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    _, batch, results = lora_results
    tensors, config = results[0][2]["peft"]
    assert config == results[0][1]["peft"][1]
    for name, tensor in results[0][1]["peft"][0].items():
        assert torch.allclose(tensors[name], tensor, atol=1e-7), name
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    LoraConfig(base_model_name_or_path=str(tiny_qwen2_5_vl), **config).save_pretrained(str(tmp_path))
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_5_vl, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    targeted = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert len(targeted) == 2 * 7  # q, k, v, o, gate, up, down per layer; none in the vision tower
    assert all(".language_model." in n for n in targeted)
    mask = batch["attention_mask"].bool()
    assert _masked_diff(_hf_logits(model, batch), results[0][1]["lora"], mask) <= 1e-4


def test_checkpoint_reshards_adapters_from_tp2_to_tp1(lora_results):
    _, _, results = lora_results
    saved, loaded = results[0][2]["saved"], results[0][1]["loaded"]
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name


def test_bad_targets_are_rejected():
    from megatron_vlmr1.vlm.lora import apply_lora

    with pytest.raises(ValueError, match="unknown"):
        apply_lora(torch.nn.Linear(2, 2), rank=2, alpha=4.0, targets=["q_proj"])


def test_adapter_dropout_keeps_replicated_parts_in_sync_over_tp(lora_results):
    _, _, results = lora_results
    first, second = results[0][2]["dropout"], results[1][2]["dropout"]
    assert first["changed"] and second["changed"]
    assert first["replicated_grads"].keys() == second["replicated_grads"].keys()
    for name, grad in first["replicated_grads"].items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(grad, second["replicated_grads"][name]), name
