"""The split-norm layer spec LoRA uses with Transformer Engine (``vlm.layer_specs``), tested on CPU.

Transformer Engine is not installed here, so the TE layer never runs in these tests: the spec's structure is built
from megatron's local modules (a model from it must be megatron's local layer, and LoRA must hook every linear with
the normalised input), and the TE variant is checked for which TE wrappers fill which slot.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron_vlmr1.vlm.layer_specs import split_norm_layer_spec, te_split_norm_layer_spec
from tests.distributed import run_distributed
from tests.vlm import qwen_vl_helpers as helpers


def test_split_spec_from_local_modules_is_megatrons_local_layer():
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    assert split_norm_layer_spec(LocalSpecProvider()) == get_gpt_layer_local_spec(normalization="RMSNorm")


def test_te_split_spec_puts_te_norms_apart_from_plain_te_linears(monkeypatch):
    with pytest.raises(ImportError, match=r"'te_split' backend needs Transformer Engine"):
        te_split_norm_layer_spec()
    # Names only: with a stand-in ``transformer_engine`` module, megatron's TE wrapper names resolve (as stubs)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    from megatron.core.extensions import transformer_engine as te

    layer = te_split_norm_layer_spec().submodules
    attention, mlp = layer.self_attention.submodules, layer.mlp.submodules
    assert layer.input_layernorm is te.TENorm and layer.pre_mlp_layernorm is te.TENorm
    assert attention.linear_qkv is te.TEColumnParallelLinear and mlp.linear_fc1 is te.TEColumnParallelLinear
    assert attention.linear_proj is te.TERowParallelLinear and mlp.linear_fc2 is te.TERowParallelLinear
    assert attention.core_attention is te.TEDotProductAttention
    assert te.TELayerNormColumnParallelLinear not in (attention.linear_qkv, mlp.linear_fc1)


def test_lora_on_gpu_picks_the_split_backend(tiny_qwen2_5_vl, monkeypatch):
    from megatron_vlmr1.vlm.families import get_family
    from megatron_vlmr1.vlm.gpt_vlm import layer_spec

    family = get_family(tiny_qwen2_5_vl)
    assert family.default_backend(torch.device("cpu"), separate_norm=True) == "local"
    with pytest.raises(ImportError, match="Transformer Engine"):
        layer_spec("te_split")
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    assert family.default_backend(torch.device("cuda"), separate_norm=True) == "te_split"
    assert family.default_backend(torch.device("cuda")) == "te"


def _split_model_with_lora(rank, world_size, hf_dir, batch):
    from megatron.core.models.backends import LocalSpecProvider

    from megatron_vlmr1.vlm.lora import apply_lora, disabled_adapters, lora_adapters
    from megatron_vlmr1.vlm.qwen_vl import family as qwen_family

    helpers.setup(1, 1)
    stock, _ = helpers.build_loaded(hf_dir)
    stock.eval()
    stock_logits = helpers.run_pipeline(stock, batch, forward_only=True)[0]
    # the family builds its layers from the split spec (local modules standing in for TE's)
    qwen_family.layer_spec = lambda backend: split_norm_layer_spec(LocalSpecProvider())
    model, _ = helpers.build_loaded(hf_dir)
    model.eval()
    same = torch.equal(helpers.run_pipeline(model, batch, forward_only=True)[0], stock_logits)
    adapted = apply_lora(model, rank=4, alpha=8.0)
    seen = {}
    layer = model.language_model.decoder.layers[0]
    layer.input_layernorm.register_forward_hook(lambda m, a, out: seen.__setitem__("input_norm", out))
    layer.pre_mlp_layernorm.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp_norm", out))
    for name, adapter in lora_adapters(model).items():
        adapter.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
        with torch.no_grad():
            adapter.B.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(seen) + 1))
    lora_logits = helpers.run_pipeline(model, batch, forward_only=True)[0]
    prefix = "language_model.decoder.layers.0."
    sees_norm = {"qkv": torch.equal(seen[prefix + "self_attention.linear_qkv"], seen["input_norm"]),
                 "fc1": torch.equal(seen[prefix + "mlp.linear_fc1"], seen["mlp_norm"])}
    with disabled_adapters(model):
        base_logits = helpers.run_pipeline(model, batch, forward_only=True)[0]
    return {"same_as_local": same, "adapted": adapted, "qkv_sees_norm": sees_norm["qkv"],
            "fc1_sees_norm": sees_norm["fc1"], "lora_changes": not torch.equal(lora_logits, stock_logits),
            "disabled_is_base": torch.equal(base_logits, stock_logits)}


def test_lora_wraps_every_linear_of_a_split_norm_model_with_its_normalised_input(tiny_qwen2_5_vl):
    reference = helpers.hf_reference(tiny_qwen2_5_vl, "right")
    batch = {k: v for k, v in reference.items() if k != "logits"}
    out = run_distributed(_split_model_with_lora, 1, str(tiny_qwen2_5_vl), batch)[0]
    assert out["same_as_local"]
    layers = {name.split(".decoder.layers.")[1].split(".")[0] for name in out["adapted"]}
    assert len(out["adapted"]) == 4 * len(layers)
    assert {name.rsplit(".", 1)[-1] for name in out["adapted"]} == {"linear_qkv", "linear_proj", "linear_fc1",
                                                                     "linear_fc2"}
    assert out["qkv_sees_norm"] and out["fc1_sees_norm"]
    assert out["lora_changes"] and out["disabled_is_base"]
