"""Which megatron fusions a model on each device asks for (a pure function: no GPU needed to check the CUDA row)."""
from __future__ import annotations

import importlib.util

import torch

from megatron_vlmr1.vlm import gpt_vlm


def test_cpu_turns_every_fusion_off():
    flags = gpt_vlm.device_defaults(torch.device("cpu"), "local")
    assert flags["use_cpu_initialization"] and not any(v for k, v in flags.items() if k != "use_cpu_initialization")


def test_masked_softmax_fusion_only_where_megatrons_kernel_module_is_installed(monkeypatch):
    real_find_spec = importlib.util.find_spec
    for installed in (False, True):
        def find_spec(name, *args, installed=installed):
            if name == "scaled_masked_softmax_cuda":
                return object() if installed else None
            return real_find_spec(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        flags = gpt_vlm.device_defaults(torch.device("cuda"), "local")
        assert flags["masked_softmax_fusion"] is installed
        assert flags["bias_activation_fusion"] and not flags["use_cpu_initialization"]
        assert not flags["apply_rope_fusion"] and not flags["gradient_accumulation_fusion"]  # TE-only fusions
    assert gpt_vlm.device_defaults(torch.device("cuda"), "te")["apply_rope_fusion"]
