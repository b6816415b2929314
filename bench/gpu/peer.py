"""The PyTorch side of the GPU comparison: nanoGPT's training step on the same GPU, timed as bench/gpu/check.py
times jaxgpt's, one JSON out.

    python -m bench.gpu.peer OUT_JSON [--model=124m|350m] [--batch=32] [--accum=2] [--steps=20] [--compile=auto]
        [--smoke]

The step (bench/peers.py's nanogpt_step) is nanoGPT's train.py: its model (tests/nanogpt_reference.py: nanoGPT's
modules and init, F.scaled_dot_product_attention with is_causal, the exact-erf GELU, vocabulary padded to 50304, the
head tied to wte), torch.compile'd with the loss inside (nanoGPT's forward computes F.cross_entropy), bf16 autocast,
TF32 matmuls allowed, fused AdamW over nanoGPT's two parameter groups (weight decay 0.1 on the 2-D weights, none on
biases and norms; betas 0.9/0.95), --accum micro-batches each backpropagating loss / accum, gradients clipped to norm
1.0, then zero_grad(set_to_none=True). The learning rate follows configs/124m.py's warmup (6e-4, 715 steps).

The tokens are bench/gpu/check.py's `step_tokens`: the very batch the jaxgpt side trains on, moved to the device
once. Timing (bench/harness.py's step_timing): the first step (which compiles), 3 warm-up steps, then --steps steps,
each ended by torch.cuda.synchronize() and the loss read back, as the jaxgpt side blocks on its step and reads its
loss; the median is reported. Peak memory: torch.cuda.max_memory_allocated() over the process, as jaxgpt's
peak_bytes_in_use.

--compile=auto compiles on a GPU only (inductor's C++ compile of the step is slow on a small CPU). --smoke:
bench/gpu/check.py's tiny model on any device, to prove the script. bench/gpu/run.py runs this in fresh processes,
alternating with jaxgpt's side, and computes MFU for both with jaxgpt/metrics.py's FLOPs per token.
"""
from __future__ import annotations

import argparse

from bench import harness, peers
from bench.gpu.check import SMOKE_MODEL, step_tokens

SHAPES = {"124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # gpt2, gpt2-medium
          "350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the JSON to write")
    p.add_argument("--model", choices=sorted(SHAPES), default="124m")
    p.add_argument("--batch", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps, after the first and 3 warm-up steps")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile the step")
    p.add_argument("--smoke", action="store_true", help="bench/gpu/check.py's tiny model, any device")
    args = p.parse_args()
    import torch
    shape = SMOKE_MODEL if args.smoke else SHAPES[args.model]
    compiled = args.compile == "on" or (args.compile == "auto" and torch.cuda.is_available())
    tokens = step_tokens(args.accum, args.batch, shape["block_size"])[0]  # (A, B, T + 1)
    result = peers.nanogpt_step(shape, tokens, args.steps, compiled)
    harness.write_json(args.out, result)
    print(f"torch: {result['model']['params'] / 1e6:.1f}M params, {args.batch} x {result['model']['block_size']} x "
          f"{args.accum}: {result['step_ms_median']:.1f} ms/step, {result['tokens_per_s']:,.0f} tok/s, first step "
          f"{result['first_step_s']:.1f} s, compiled {result['compiled']}; {args.out}")


if __name__ == "__main__":
    main()
