"""The PyTorch side of the GPU comparison: nanoGPT's training step on the same GPU, timed as bench/gpu_check.py
times jaxgpt's, one JSON out.

    python bench/gpu_peer.py OUT_JSON [--model=124m|350m] [--batch=32] [--accum=2] [--steps=20] [--compile=auto]
        [--smoke]

The step is nanoGPT's train.py: its model (tests/nanogpt_reference.py: nanoGPT's modules and init,
F.scaled_dot_product_attention with is_causal, the exact-erf GELU, vocabulary padded to 50304, the head tied to
wte), torch.compile'd with the loss inside (nanoGPT's forward computes F.cross_entropy), bf16 autocast, TF32
matmuls allowed, fused AdamW over nanoGPT's two parameter groups (weight decay 0.1 on the 2-D weights, none on
biases and norms; betas 0.9/0.95), --accum micro-batches each backpropagating loss / accum, gradients clipped to norm
1.0, then zero_grad(set_to_none=True). The learning rate follows configs/124m.py's warmup (6e-4, 715 steps).

The tokens are bench/gpu_check.py's `step_tokens`: the very batch the jaxgpt side trains on, moved to the device
once. Timing: the first step (which compiles), 3 warm-up steps, then --steps steps, each ended by
torch.cuda.synchronize() and the loss read back, as the jaxgpt side blocks on its step and reads its loss; the
median is reported. Peak memory: torch.cuda.max_memory_allocated() over the process, as jaxgpt's peak_bytes_in_use.

--compile=auto compiles on a GPU only (inductor's C++ compile of the step takes minutes on a small CPU). --smoke:
bench/gpu_check.py's tiny model on any device, to prove the script. bench/gpu_run.py runs this in fresh processes,
alternating with jaxgpt's side, and computes MFU for both with jaxgpt/metrics.py's FLOPs per token.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from gpu_check import SMOKE_MODEL, step_tokens, write_json  # noqa: E402  (numpy only at import)

SHAPES = {"124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # gpt2, gpt2-medium
          "350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024)}
ROWS = 50304  # nanoGPT's vocabulary, 50257 padded to a multiple of 64 (as jaxgpt pads it)
LR, WARMUP = 6e-4, 715  # configs/124m.py's


def nanogpt_module():
    """tests/nanogpt_reference.py, loaded by path (a module named `tests` may be installed elsewhere)."""
    spec = importlib.util.spec_from_file_location("nanogpt_reference", os.path.join(REPO, "tests",
                                                                                    "nanogpt_reference.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def build(shape: dict, device):
    """nanoGPT's model with the loss in its forward, and configure_optimizers' fused AdamW."""
    import torch
    import torch.nn.functional as F
    ref = nanogpt_module()
    torch.manual_seed(0)
    gpt = ref.GPT(ref.GPTConfig(vocab_size=ROWS, dropout=0.0, bias=True, **shape)).to(device)

    class WithLoss(torch.nn.Module):  # nanoGPT's GPT.forward(idx, targets)
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, idx, targets):
            logits = self.gpt(idx)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
    params = [p for p in gpt.parameters() if p.requires_grad]  # the tied head counted once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, fused=True)
    except RuntimeError:  # a CPU build without the fused kernel
        opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    return WithLoss(), gpt, opt, sum(p.numel() for p in params)


def run(args) -> dict:
    import torch
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # nanoGPT's train.py
    torch.backends.cudnn.allow_tf32 = True
    shape = SMOKE_MODEL if args.smoke else SHAPES[args.model]
    compiled = args.compile == "on" or (args.compile == "auto" and cuda)
    model, gpt, opt, n_params = build(shape, device)
    step_fn = torch.compile(model) if compiled else model
    A, B, T = args.accum, args.batch, shape["block_size"]
    tokens = torch.from_numpy(step_tokens(A, B, T)[0].astype(np.int64))  # (A, B, T + 1)
    # one contiguous tensor per micro-batch, as nanoGPT's get_batch makes them (views would differ in offset only,
    # which compiled graphs may guard on)
    inputs = [tokens[m, :, :-1].contiguous().to(device) for m in range(A)]
    targets = [tokens[m, :, 1:].contiguous().to(device) for m in range(A)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def one_step(i: int) -> float:
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (i + 1) / WARMUP)
        total = torch.zeros((), device=device)
        for micro in range(A):
            with autocast:
                loss = step_fn(inputs[micro], targets[micro]) / A
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(total)

    times, losses = [], []
    for i in range(4 + args.steps):  # the first step (compiles), 3 warm-up steps, the timed steps
        start = time.perf_counter()
        losses.append(one_step(i))
        times.append(time.perf_counter() - start)
    first_s, times = times[0], times[4:]
    step_s = float(np.median(times))
    return {
        "side": "torch", "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "compiled": compiled, "autocast": "bfloat16", "fused_adamw": bool(opt.defaults.get("fused")),
        "model": {**shape, "params": n_params, "vocab_rows": ROWS}, "batch_size": B, "grad_accum_steps": A,
        "tokens_per_step": A * B * T, "first_step_s": first_s, "timed_steps": len(times),
        "step_ms_median": 1e3 * step_s, "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
        "tokens_per_s": A * B * T / step_s, "peak_bytes_in_use": torch.cuda.max_memory_allocated() if cuda else None,
        "losses": losses, "passed": bool(np.all(np.isfinite(losses))),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the JSON to write")
    p.add_argument("--model", choices=sorted(SHAPES), default="124m")
    p.add_argument("--batch", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps, after the first and 3 warm-up steps")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile the step")
    p.add_argument("--smoke", action="store_true", help="bench/gpu_check.py's tiny model, any device")
    args = p.parse_args()
    result = run(args)
    write_json(args.out, result)
    print(f"torch: {result['model']['params'] / 1e6:.1f}M params, {args.batch} x {result['model']['block_size']} x "
          f"{args.accum}: {result['step_ms_median']:.1f} ms/step, {result['tokens_per_s']:,.0f} tok/s, first step "
          f"{result['first_step_s']:.1f} s, compiled {result['compiled']}; {args.out}")


if __name__ == "__main__":
    main()
