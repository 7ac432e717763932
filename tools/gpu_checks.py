"""The Python checks of ``tools/gpu_smoke.sh``, one per subcommand, each runnable on any device so that the CPU
suite keeps them working (``tests/tools/test_gpu_checks.py``) although only a GPU machine runs them for real.

    python tools/gpu_checks.py kernels [--device cuda] [--vocab 151936]
    python tools/gpu_checks.py model MODEL_DIR [--device cuda] [--backend local|te]
    python tools/gpu_checks.py vllm MODEL_DIR

Each prints one summary line and exits 1 (AssertionError) when its numbers are off.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def check_kernels(device: str, vocab: int = 151936) -> str:
    """Fused log-prob + entropy (forward and backward) and group advantages vs the plain-torch references, in
    float32 and bfloat16, with ignored (-100) target rows; on ``device`` the csrc kernel must be the one running."""
    from megatron_vlmr1.kernels import backend, fused_logprob, group_advantage
    from megatron_vlmr1.kernels.reference import group_advantage_reference, logprob_reference

    running = backend(device)
    assert running == f"csrc-{torch.device(device).type}", f"kernels on {device} run {running!r}, not the csrc kernel"
    gen = torch.Generator().manual_seed(0)
    worst = {}
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        logits = (torch.randn(2, 257, vocab, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_()
        targets = torch.randint(0, vocab, (2, 257), generator=gen).to(device)
        targets[:, :17] = -100  # ignored rows (prompt tokens)
        logp, ent = fused_logprob(logits, targets, return_entropy=True)
        ref_logits = logits.detach().float().requires_grad_()
        ref_logp, ref_ent = logprob_reference(ref_logits, targets)
        weights = torch.randn(ref_logp.shape, generator=gen).to(device)
        (logp.float() * weights + ent.float() * weights).sum().backward()
        (ref_logp * weights + ref_ent * weights).sum().backward()
        errors = {"logprob": (logp.float() - ref_logp).abs().max().item(),
                  "entropy": (ent.float() - ref_ent).abs().max().item(),
                  "grad": (logits.grad.float() - ref_logits.grad).abs().max().item()}
        assert all(e < tol * 10 for e in errors.values()), (dtype, errors)
        worst[str(dtype).removeprefix("torch.")] = max(errors.values())
    rewards = torch.rand(64 * 8, generator=gen).to(device)
    adv_err = (group_advantage(rewards, 8) - group_advantage_reference(rewards, 8)).abs().max().item()
    assert adv_err < 1e-5, adv_err
    return (f"kernels ({running}, vocab {vocab}) max abs error: "
            + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + f", advantage {adv_err:.1e}")


def _reference_batch(model_dir: str) -> dict:
    """transformers' processor batch of two rows (one and two images, left-padded) and transformers' own mrope
    positions for it, so a failure points at our model, not at our prompt building."""
    from PIL import Image
    from transformers import AutoProcessor

    gen = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
              for h, w in ((112, 112), (112, 168), (56, 84))]
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the circle?"}]}],
                [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Count."}]}]]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    return processor(text=texts, images=[[images[0]], images[1:]], return_tensors="pt", padding=True,
                     padding_side="left")


def check_model(model_dir: str, device: str, backend: str) -> str:
    """Our megatron Qwen-VL (``backend`` layer spec) vs transformers on ``device``, float32, same weights: logits of
    an image + text batch, and the trainer's log-prob path is not involved (raw model output)."""
    from transformers import AutoModelForImageTextToText

    from megatron_vlmr1.parallel import ParallelConfig, init_parallel, teardown_parallel
    from megatron_vlmr1.vlm.export import build_model_from_hf

    if torch.device(device).type == "cuda":  # full float32 on both sides
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    enc = {k: v.to(device) if torch.is_tensor(v) else v for k, v in _reference_batch(model_dir).items()}
    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    positions, _ = hf.model.get_rope_index(enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
                                           image_grid_thw=enc["image_grid_thw"], attention_mask=enc["attention_mask"])
    with torch.no_grad():
        theirs = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=positions,
                    pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits.float()
    del hf
    env = init_parallel(ParallelConfig(device=device), seed=0)
    try:
        model, _ = build_model_from_hf(model_dir, env, params_dtype=torch.float32, backend=backend)
        model = model.to(device).eval()
        with torch.no_grad():
            ours = model(enc["input_ids"], positions, enc["attention_mask"], enc["pixel_values"],
                         enc["image_grid_thw"])[..., :theirs.shape[-1]].float()
    finally:
        teardown_parallel(env)
    real = enc["attention_mask"].bool()  # left padding: the padded positions' logits are not compared
    error = (ours - theirs)[real].abs().max().item()
    assert error < 2e-3, f"megatron ({backend}) vs transformers logits differ by {error:.2e}"
    return f"megatron ({backend} spec) vs transformers logits on {device}: max abs diff {error:.2e}"


def check_vllm(model_dir: str) -> str:
    """vLLM on the GPU: greedy rollout, sleep frees memory, a weight sync that changes the output and one that
    restores it."""
    from safetensors.torch import load_file

    from megatron_vlmr1.rollout.base import RolloutRequest, SamplingConfig
    from megatron_vlmr1.rollout.vllm import VLLMRolloutEngine

    engine = VLLMRolloutEngine(model_dir, max_model_len=512, dtype="bfloat16", gpu_memory_utilization=0.3, sleep=True)
    try:
        request = [RolloutRequest.from_prompt("Describe the picture in one sentence.")]
        greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=16, seed=0)
        first = engine.generate(request, greedy)[0].completions[0].completion_ids
        freed = engine.sleep()
        assert freed > 0, "vLLM sleep freed no device memory"
        weights = {}
        for shard in Path(model_dir).glob("*.safetensors"):
            weights.update(load_file(str(shard)))
        zeroed = ((n, torch.zeros_like(t) if "lm_head" in n or "embed" in n else t) for n, t in weights.items())
        synced = engine.update_weights(zeroed)
        changed = engine.generate(request, greedy)[0].completions[0].completion_ids
        assert changed != first, "weight sync did not change the greedy output"
        engine.update_weights(weights.items())
        again = engine.generate(request, greedy)[0].completions[0].completion_ids
        assert again == first, (first, again)
    finally:
        engine.close()
    return f"vLLM: sleep freed {freed / 2**20:.0f} MiB, synced {synced / 2**20:.1f} MiB, output restored"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    kernels = sub.add_parser("kernels")
    kernels.add_argument("--device", default="cuda")
    kernels.add_argument("--vocab", type=int, default=151936)
    model = sub.add_parser("model")
    model.add_argument("model_dir")
    model.add_argument("--device", default="cuda")
    model.add_argument("--backend", choices=("local", "te"), default="local")
    vllm = sub.add_parser("vllm")
    vllm.add_argument("model_dir")
    args = parser.parse_args(argv)
    if args.check == "kernels":
        print(check_kernels(args.device, args.vocab))
    elif args.check == "model":
        print(check_model(args.model_dir, args.device, args.backend))
    else:
        print(check_vllm(args.model_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
