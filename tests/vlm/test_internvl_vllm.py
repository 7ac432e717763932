"""The tiny InternVL in vLLM (its InternS1 implementation): vLLM expands the image prompts exactly as the family's
``encode_prompt`` does, and its greedy tokens equal transformers' before and after an in-place weight reload."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def prompts(model_dir: str | Path) -> list[tuple[list[int], list]]:
    """(template ids with one ``<IMG_CONTEXT>`` per image, images): a tiled wide image; a tall one + a square one."""
    from PIL import Image
    from transformers import AutoProcessor

    from megatron_vlmr1.data import build_messages
    from megatron_vlmr1.vlm.families import get_family

    family = get_family(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(0)
    wide, tall, square = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
                          for h, w in ((112, 224), (336, 112), (112, 112))]
    cases = [("<image>Where is the red circle?", [wide]), ("<image><image>Count the squares.", [tall, square])]
    return [(processor.tokenizer(family.render_prompt(processor, build_messages(text, len(images))),
                                 add_special_tokens=False)["input_ids"], images) for text, images in cases]


def _hf_greedy(model_dir: Path, encoded) -> list[list[int]]:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    completions = []
    for prompt in encoded:
        ids = torch.tensor([prompt.input_ids])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=prompt.pixel_values,
                                 max_new_tokens=8, do_sample=False)
        completions.append(out[0, ids.shape[1]:].tolist())
    return completions


def test_vllm_matches_the_family_and_transformers_before_and_after_a_reload(tmp_path):
    from megatron_vlmr1.data import build_messages
    from megatron_vlmr1.vlm.families import get_family
    from tools.make_tiny_model import make_tiny_model

    old = make_tiny_model("internvl", tmp_path / "old", seed=0)
    new = make_tiny_model("internvl", tmp_path / "new", seed=5)
    out = tmp_path / "vllm.json"
    result = subprocess.run([sys.executable, "-m", "tests.vlm.internvl_vllm_driver", str(old), str(new), str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    seen = json.loads(out.read_text())
    family = get_family(old)
    processor = family.load_processor(old)
    cases = [("<image>Where is the red circle?", 1), ("<image><image>Count the squares.", 2)]
    encoded = [family.encode_prompt(processor, build_messages(text, n), images)
               for (text, n), (_, images) in zip(cases, prompts(old))]
    assert seen["before"]["prompt_ids"] == [p.input_ids for p in encoded]
    assert seen["before"]["completions"] == _hf_greedy(old, encoded)
    after = _hf_greedy(new, encoded)
    assert seen["after"]["completions"] == after
    assert after != seen["before"]["completions"]  # the reload mattered
