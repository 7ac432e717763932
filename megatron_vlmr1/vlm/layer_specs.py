"""A GPT layer spec whose norms are modules of their own, for LoRA on Transformer Engine.

megatron's Transformer Engine spec fuses each pre-norm into the next linear (``TELayerNormColumnParallelLinear`` for
``linear_qkv`` and ``linear_fc1``), so the linear's own input — the normalised hidden state, which LoRA's ``A`` must
see — never exists outside TE. The local spec keeps them apart but brings megatron's unfused attention, which stores
[b * heads, s, s] scores per layer. ``split_norm_layer_spec`` is the local spec's layout (input norm, attention,
pre-MLP norm, MLP; the same parameter names and checkpoint keys) built from any megatron backend provider: with
``TESpecProvider`` that is ``TENorm`` + ``TEColumnParallelLinear`` / ``TERowParallelLinear`` + ``TEDotProductAttention``,
so LoRA can hook every linear while attention stays fused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron.core.models.backends import BackendSpecProvider
    from megatron.core.transformer.spec_utils import ModuleSpec

# Where the separate norms' weights sit in a fused (TE) layer: the same map megatron's local spec uses, so
# distributed checkpoints load across the local, fused-TE and split-TE layers.
FUSED_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                   "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def split_norm_layer_spec(provider: BackendSpecProvider) -> ModuleSpec:
    """A dense GPT layer (RMSNorm, no QK norm) with separate norm and linear modules from ``provider``."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    norm = provider.layer_norm(rms_norm=True, for_qk=False)
    attention = ModuleSpec(
        module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(linear_qkv=provider.column_parallel_linear(),
                                           core_attention=provider.core_attention(),
                                           linear_proj=provider.row_parallel_linear(),
                                           q_layernorm=IdentityOp, k_layernorm=IdentityOp))
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=provider.column_parallel_linear(),
                                                          linear_fc2=provider.row_parallel_linear()))
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=norm, mlp=mlp, mlp_bda=get_bias_dropout_add,
        sharded_state_dict_keys_map=dict(FUSED_NORM_KEYS)))


def te_split_norm_layer_spec() -> ModuleSpec:
    """``split_norm_layer_spec`` with Transformer Engine's modules (resolved here: TE is a GPU-only extra)."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise ImportError("the 'te_split' backend needs Transformer Engine (transformer-engine[pytorch]); "
                          "use the 'local' backend without it") from err
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return split_norm_layer_spec(TESpecProvider())
