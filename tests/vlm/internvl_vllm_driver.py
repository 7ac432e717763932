"""Runs vLLM on a tiny InternVL in its own process for tests/vlm/test_internvl_vllm.py; writes what it saw as JSON.

vLLM pins CPU threads and keeps global state, so it runs here rather than inside the pytest process:
    python -m tests.vlm.internvl_vllm_driver OLD_MODEL_DIR NEW_MODEL_DIR OUT_JSON
"""
from __future__ import annotations

import json
import os
import sys


def main(old_dir: str, new_dir: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from safetensors.torch import load_file
    from vllm import LLM, SamplingParams

    from tests.vlm.test_internvl_vllm import prompts

    torch.set_num_threads(1)
    llm = LLM(model=old_dir, dtype="float32", max_model_len=512, max_num_seqs=4,
              limit_mm_per_prompt={"image": 2, "video": 0}, mm_processor_cache_gb=0, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0, max_tokens=8)
    inputs = [{"prompt_token_ids": ids, "multi_modal_data": {"image": images}} for ids, images in prompts(old_dir)]

    def greedy() -> dict:
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return {"prompt_ids": [list(o.prompt_token_ids) for o in outputs],
                "completions": [list(o.outputs[0].token_ids) for o in outputs]}

    out = {"before": greedy()}
    # The weight sync the engines do: checkpoint-named tensors (what export_hf_weights yields) reloaded in place.
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(load_file(f"{new_dir}/model.safetensors")
                                                                          .items())})
    llm.llm_engine.reset_encoder_cache()
    llm.reset_prefix_cache()
    out["after"] = greedy()
    with open(out_path, "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main(*sys.argv[1:4])
