"""Train-step throughput on this CPU, jaxgpt vs PyTorch, f32 and bf16, one table.

    python -m bench.throughput [--shapes=char,124m] [--batch_124m=1] [--steps=5] [--rounds=2] [--torch_compile]

Shapes: `char` is nanoGPT's shakespeare_char model (6L/6H/384, T=256, B=12, 65-token vocabulary; jaxgpt pads it
to 128 rows); `124m` is GPT-2 124M at T=1024 with a small batch (vocabulary 50257, padded to 50304 on both sides
as nanoGPT does). One step is forward, backward, global-norm clipping and an AdamW update. jaxgpt runs its own
jitted `jaxgpt.step` train step (config.model.dtype float32 or bfloat16: bf16 matmuls accumulating in f32 over f32
master weights); PyTorch (bench/peers.py) runs HF GPT2LMHeadModel with torch.optim.AdamW, eagerly in f32 and under
torch.autocast(bfloat16) (and torch.compile'd with --torch_compile). Every figure is the median of --steps timed
steps after untimed warm-up steps. Each implementation runs in a fresh process (sharing one with the other framework
slows jaxgpt's 124M step), alternating in ABBA order over --rounds, and the medians are compared: a shared machine's
speed drifts within half an hour (bench/README.md). "of ceiling" divides the achieved FLOP/s (nanoGPT's 6N +
12LTC per token) by XLA's own big-matmul rate on this machine at that precision, measured here first.
"""
from __future__ import annotations

import json
import statistics
import subprocess

import numpy as np
from absl import app, flags

from bench import harness, peers

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["char", "124m"], "Which shapes to run: char, 124m.")
flags.DEFINE_integer("batch_124m", 1, "Sequences per step for the 124M shape.")
flags.DEFINE_integer("steps", 5, "Timed steps per measurement (after warm-up).")
flags.DEFINE_bool("torch_compile", False, "Also time torch.compile'd PyTorch (slow to compile on 2 cores).")
flags.DEFINE_integer("rounds", 2, "Runs of each implementation per shape and dtype, in ABBA order.")
flags.DEFINE_string("run", None, "Internal: 'implementation,shape,dtype' to time in this process; prints JSON.")

SHAPES = {  # name -> model shape, batch, tokenizer vocabulary, rows of the PyTorch embedding
    "char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=12, vocab=65, torch_rows=65),
    "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=None, vocab=50257, torch_rows=50304),
}
DTYPES = ("float32", "bfloat16")


def matmul_ceiling(dtype: str, n: int = 2048) -> float:
    """FLOP/s of one big (n, n) @ (n, n) XLA matmul, bf16 inputs accumulating in f32 for bfloat16."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / harness.median_seconds(lambda: f(a, b).block_until_ready(), steps=5)


def jaxgpt_step(shape: dict, batch: int, dtype: str, flops_per_token: dict):
    import jax

    from jaxgpt import metrics
    from jaxgpt import step as train_step
    config = harness.config("base", model__n_layer=shape["n_layer"], model__n_head=shape["n_head"],
                            model__n_embd=shape["n_embd"], model__block_size=shape["block_size"], model__dtype=dtype,
                            batch_size=batch, optim__b2=0.99)
    steps, model_config, mesh = harness.train_steps(config, shape["vocab"])
    state = train_step.fresh_state(steps, model_config, config.seed)
    tokens = np.random.default_rng(0).integers(0, shape["vocab"], (1, 1, batch, shape["block_size"] + 1))
    batch_arrays = harness.global_batch(mesh, tokens.astype(np.int32))
    T, C = shape["block_size"], shape["n_embd"]
    flops_per_token[dtype] = metrics.flops_per_token(steps.n_params, T * C, shape["n_layer"], T, C)

    def step():
        nonlocal state
        state, step_metrics = steps.train_steps(state, batch_arrays)
        jax.block_until_ready(step_metrics)
    return step


def run_one(impl: str, name: str, dtype: str) -> dict:
    """Seconds per step of one implementation in this process, and the model's FLOPs per token."""
    shape = SHAPES[name]
    batch = shape["batch"] or FLAGS.batch_124m
    flops_per_token = {}
    if impl == "jaxgpt":
        step = jaxgpt_step(shape, batch, dtype, flops_per_token)
    else:
        step = peers.throughput_step(shape, batch, dtype, compiled=impl == "torch_compile")
    return {"seconds": harness.median_seconds(step, FLAGS.steps), "flops_per_token": flops_per_token.get(dtype)}


def main(argv):
    del argv
    if FLAGS.run:
        print(json.dumps(run_one(*FLAGS.run.split(","))))
        return
    import torch
    ceilings = {d: matmul_ceiling(d) for d in DTYPES}
    print(f"{harness.describe(harness.environment('jax', 'torch'))} ({torch.get_num_threads()} threads); each run "
          f"a fresh process, {FLAGS.rounds} per implementation in ABBA order, medians")
    print("XLA 2048^3 matmul ceiling: " + ", ".join(f"{d} {c / 1e9:.0f} GFLOP/s" for d, c in ceilings.items()))
    print(f"\n{'shape':18s} {'dtype':9s} {'implementation':22s} {'ms/step':>9s} {'tokens/s':>9s} "
          f"{'GFLOP/s':>8s} {'of ceiling':>10s} {'jaxgpt vs this':>14s}")
    impls = ["jaxgpt", "torch"] + (["torch_compile"] if FLAGS.torch_compile else [])
    passed = [f"--steps={FLAGS.steps}", f"--batch_124m={FLAGS.batch_124m}"]
    for name in FLAGS.shapes:
        shape = SHAPES[name]
        batch = shape["batch"] or FLAGS.batch_124m
        label, tokens = f"{name} B={batch} T={shape['block_size']}", batch * shape["block_size"]
        for dtype in DTYPES:
            runs = {impl: [] for impl in impls}
            for impl in harness.abba(impls, FLAGS.rounds):
                try:
                    args = (f"--run={impl},{name},{dtype}", *passed)
                    runs[impl].append(harness.run_json("bench.throughput", *args))
                except subprocess.CalledProcessError as e:
                    if impl != "torch_compile":
                        raise
                    print(f"torch.compile failed: {e.stderr.strip().splitlines()[-1][:200]}")  # keep the other rows
            flops_per_token = runs["jaxgpt"][0]["flops_per_token"]
            names = {"jaxgpt": "jaxgpt", "torch": "PyTorch " + ("eager f32" if dtype == "float32" else "autocast bf16")}
            names["torch_compile"] = names["torch"] + " +compile"
            base = statistics.median(r["seconds"] for r in runs["jaxgpt"])
            for impl in impls:
                if not runs[impl]:
                    continue
                seconds = statistics.median(r["seconds"] for r in runs[impl])
                flops = flops_per_token * tokens / seconds
                print(f"{label:18s} {dtype:9s} {names[impl]:22s} {1e3 * seconds:9.1f} {tokens / seconds:9.0f} "
                      f"{flops / 1e9:8.1f} {flops / ceilings[dtype]:10.1%} {seconds / base:13.2f}x", flush=True)


if __name__ == "__main__":
    app.run(main)
