"""Per-request seeds (the trainer's per-prompt seeds): a request samples the same whatever requests share the call."""
from __future__ import annotations

import pytest

from megatron_vlmr1.rollout.base import SamplingConfig
from megatron_vlmr1.rollout.hf import HFRolloutEngine
from tests.rollout.test_hf_engine import _requests

SAMPLED = SamplingConfig(n=3, temperature=1.0, max_new_tokens=4)


def _ids(results) -> list:
    return [[c.completion_ids for c in r.completions] for r in results]


def test_transformers_engine_samples_a_seeded_request_independently_of_its_batch(tiny_qwen2_5_vl):
    engine = HFRolloutEngine.from_pretrained(tiny_qwen2_5_vl, max_batch_size=4)  # 3 rows per request: 1 per forward
    requests = _requests()[:2]
    together = engine.generate(requests, SAMPLED, seeds=[5, 6])
    alone = [engine.generate([request], SAMPLED, seeds=[seed])[0] for request, seed in zip(requests, [5, 6])]
    assert _ids(together) == _ids(alone)
    engine.max_batch_size = 64  # both requests in one forward: still the same samples
    assert _ids(engine.generate(requests, SAMPLED, seeds=[5, 6])) == _ids(together)
    # the seed matters, and the G samples of one request differ
    assert _ids(engine.generate(requests[:1], SAMPLED, seeds=[8])) != _ids(together[:1])
    assert len({tuple(ids) for ids in _ids(together)[1]}) > 1
    with pytest.raises(ValueError, match="2 seeds for 3 requests"):
        engine.generate(_requests(), SAMPLED, seeds=[1, 2])
