"""Runs the vLLM engine in its own process for tests/rollout/test_vllm_engine.py and writes what it saw as JSON.

vLLM pins CPU threads and keeps global state, so it runs here rather than inside the pytest process:
    python -m tests.rollout.vllm_driver MODEL_DIR NEW_WEIGHTS_DIR OUT_JSON
"""
from __future__ import annotations

import dataclasses
import json
import sys


def _dump(results) -> list[dict]:
    return [{"prompt_ids": r.prompt_ids, "completions": [dataclasses.asdict(c) for c in r.completions]}
            for r in results]


def vision_weight_names(model_dir) -> set[str]:
    """Checkpoint names of the vision side (whatever the family calls them): the specs that map into ``visual.``."""
    from transformers import AutoConfig

    from megatron_vlmr1.vlm.families import get_family

    config = AutoConfig.from_pretrained(model_dir)
    return {name for spec in get_family(config).weight_specs(config) if spec.mcore_name.startswith("visual.")
            for name in spec.hf_names}


def main(model_dir: str, new_weights_dir: str, out_path: str) -> None:
    import torch
    from safetensors.torch import load_file

    from megatron_vlmr1.rollout.base import RolloutRequest, SamplingConfig
    from megatron_vlmr1.rollout.vllm import VLLMRolloutEngine
    from tests.rollout.test_hf_engine import _requests

    torch.set_num_threads(1)
    engine = VLLMRolloutEngine(model_dir, max_model_len=512, max_num_seqs=8, max_images_per_prompt=2)
    greedy = SamplingConfig(n=2, temperature=0, max_new_tokens=8)
    sampled = SamplingConfig(n=3, temperature=1.0, top_p=0.95, max_new_tokens=10, seed=4)
    out: dict = {"greedy_before": _dump(engine.generate(_requests(), greedy))}
    errors = []
    for request in (RolloutRequest.from_prompt("red " * 600, []),
                    RolloutRequest.from_prompt("<image><image><image>", [_requests()[0].images[0]] * 3)):
        try:
            engine.generate([request], greedy)
        except ValueError as err:
            errors.append(str(err))
    out["errors"] = errors
    engine.update_weights(iter(load_file(f"{new_weights_dir}/model.safetensors").items()))
    out["greedy_after"] = _dump(engine.generate(_requests(), greedy))
    out["sampled"] = _dump(engine.generate(_requests(), sampled))
    out["sampled_again"] = _dump(engine.generate(_requests(), sampled))
    free = out["greedy_after"][1]["completions"][0]["text"]
    stop = free[len(free) // 2:len(free) // 2 + 3]
    out["stop_string"] = stop
    out["stopped"] = _dump(engine.generate(_requests()[1:2], SamplingConfig(temperature=0, max_new_tokens=8,
                                                                             stop=[stop])))
    # A partial sync (vision tower only, back to the old weights) leaves every other weight as it was.
    vision = vision_weight_names(model_dir)
    old_vision = {k: v for k, v in load_file(f"{model_dir}/model.safetensors").items() if k in vision}
    engine.update_weights(iter(old_vision.items()))
    out["greedy_partial"] = _dump(engine.generate(_requests(), greedy))
    with open(out_path, "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main(*sys.argv[1:4])
