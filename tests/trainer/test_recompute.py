"""parallel.recompute trades compute for activation memory; it must not change a single number of training."""
from __future__ import annotations

import pytest

from megatron_vlmr1.trainer.policy import recompute_config
from tests.trainer.conftest import run, sft_config


def _sft():
    from megatron_vlmr1.trainer.sft import SFTTrainer

    return SFTTrainer


def test_recompute_modes_map_to_megatron_fields():
    assert recompute_config("none") == {}
    assert recompute_config("selective")["recompute_granularity"] == "selective"
    assert recompute_config("full") == {"recompute_granularity": "full", "recompute_method": "uniform",
                                        "recompute_num_layers": 1}
    with pytest.raises(ValueError, match="parallel.recompute"):
        recompute_config("everything")


def test_recompute_reproduces_training_without_it(tiny_qwen2_5_vl, rec_data, tmp_path):
    results = {}
    for mode in ("none", "selective", "full"):
        records = run(_sft(), sft_config(tiny_qwen2_5_vl, rec_data, tmp_path / mode, parallel={"recompute": mode},
                                         train={"steps": 2}))
        results[mode] = [(r["loss"], r["grad_norm"]) for r in records]
    assert len(results["none"]) == 2
    for mode in ("selective", "full"):
        for (loss, norm), (want_loss, want_norm) in zip(results[mode], results["none"]):
            assert loss == pytest.approx(want_loss, rel=1e-6) and norm == pytest.approx(want_norm, rel=1e-6), mode
