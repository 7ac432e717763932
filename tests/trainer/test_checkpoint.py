import pytest

from megatron_vlmr1.trainer.checkpoint import CheckpointManager


def _writer(payload):
    def write(directory):
        (directory / "shard.bin").write_text(payload)
    return write


def test_save_latest_and_prune(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None
    for step in (1, 2, 3):
        manager.save(step, _writer(f"w{step}"), {"data": {"epoch": 0, "index": step}})
    latest = manager.latest()
    assert latest.name == "step_00000003"
    assert (latest / "shard.bin").read_text() == "w3"
    assert CheckpointManager.read_state(latest) == {"step": 3, "data": {"epoch": 0, "index": 3}}
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]


def test_crash_mid_save_keeps_last_good(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(5, _writer("good"), {})

    def crash(directory):
        (directory / "shard.bin").write_text("half")
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        manager.save(6, crash, {})
    assert manager.latest().name == "step_00000005"
    assert (manager.latest() / "shard.bin").read_text() == "good"
    assert (tmp_path / "step_00000006.tmp").exists()
    manager.save(7, _writer("next"), {})
    assert not (tmp_path / "step_00000006.tmp").exists()
    assert manager.latest().name == "step_00000007"


def test_pointer_to_incomplete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "latest").write_text("step_00000001")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        CheckpointManager(tmp_path).latest()
