import json

from megatron_vlmr1.trainer.metrics import MetricsLogger, plot_reward_curve, read_metrics


def test_jsonl_resume_truncates_and_plot(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 6):
        logger.log(step, {"reward/mean": step / 10, "reward/iou": step / 20, "kl": float("nan")})
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["kl"] is None and records[2]["reward/mean"] == 0.3

    resumed = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    resumed.log(4, {"reward/mean": 0.9})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    png = plot_reward_curve(tmp_path / "metrics.jsonl", tmp_path / "reward_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((tmp_path / "tensorboard").iterdir())


def test_log_interval_thins_tensorboard_not_the_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, tensorboard=True, log_interval=2)
    for step in range(1, 6):
        logger.log(step, {"reward/mean": step / 10})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [2, 4]
    assert [logger.due(s) for s in range(1, 5)] == [False, True, False, True]


def test_sft_runs_get_a_loss_curve(tmp_path):
    from megatron_vlmr1.trainer.metrics import plot_run

    logger = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 4):
        logger.log(step, {"loss": 3.0 / step})
    png = plot_run(tmp_path / "metrics.jsonl", tmp_path)
    assert png.name == "loss_curve.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "reward_curve.png").exists()
