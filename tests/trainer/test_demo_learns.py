"""The demo recipe (examples/configs/demo_*.yaml) on its data, shortened: SFT warm-up then 20 GRPO steps."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_vlmr1.config import load_config
from tests.trainer.conftest import run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.slow
def test_demo_recipe_raises_the_reward_without_losing_iou(tiny_qwen2_5_vl, tmp_path):
    from megatron_vlmr1.data.synthetic import make_rec_dataset
    from megatron_vlmr1.trainer.grpo import GRPORunConfig, GRPOTrainer
    from megatron_vlmr1.trainer.sft import SFTRunConfig, SFTTrainer

    make_rec_dataset(tmp_path / "data", 512, seed=0, difficulty="locate")  # make demo's data
    data = f"data.files=[{tmp_path / 'data' / 'train.jsonl'}]"
    quiet = ["train.tensorboard=false", "train.progress_bar=false"]
    sft = load_config(SFTRunConfig, EXAMPLES / "demo_sft.yaml",
                      [f"model.path={tiny_qwen2_5_vl}", data, f"train.output_dir={tmp_path / 'sft'}", *quiet])
    run(SFTTrainer, sft)
    grpo = load_config(GRPORunConfig, EXAMPLES / "demo_grpo.yaml",
                       [f"model.path={tmp_path / 'sft' / 'hf'}", data, f"train.output_dir={tmp_path / 'grpo'}",
                        "train.steps=20", "checkpoint.save_interval=0", "checkpoint.export_hf=false", *quiet])
    records = run(GRPOTrainer, grpo)
    mean = lambda key, rows: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    curve = [(round(r["reward/mean"], 3), round(r["reward/iou"], 3)) for r in records]
    assert mean("reward/mean", records[-5:]) > mean("reward/mean", records[:5]) + 0.1, curve
    # The format is not bought with the box: IoU does not fall (its doubling takes the demo's 100 steps, see README;
    # over these 20 steps it goes 0.25 -> 0.30, too little to assert more without a flaky test).
    assert mean("reward/iou", records[-5:]) >= mean("reward/iou", records[:5]), curve
    assert records[-1]["reward/rec_format"] > 0.5
