"""Train-step throughput on this CPU, jaxgpt vs PyTorch, f32 and bf16, in one run.

    python bench/throughput.py [--shapes=char,124m] [--batch_124m=1] [--steps=5] [--torch_compile]

Shapes: `char` is nanoGPT's shakespeare_char model (6L/6H/384, T=256, B=12, 65-token vocabulary; jaxgpt pads it
to 128 rows); `124m` is GPT-2 124M at T=1024 with a small batch (vocabulary 50257, padded to 50304 on both sides
as nanoGPT does). One step is forward, backward, global-norm clipping and an AdamW update. jaxgpt runs its own
jitted `jaxgpt.train` step (config.model.dtype float32 or bfloat16: bf16 matmuls accumulating in f32 over f32
master weights); PyTorch runs HF GPT2LMHeadModel with torch.optim.AdamW, eagerly in f32 and under
torch.autocast(bfloat16) (and torch.compile'd with --torch_compile). Every figure is the median of --steps timed
steps after untimed warm-up steps, the implementations' steps timed in turn (jaxgpt, PyTorch, jaxgpt, ...) so
that a drift in the machine's speed weighs on both. "of ceiling" divides the achieved FLOP/s (nanoGPT's 6N +
12LTC per token) by XLA's own big-matmul rate on this machine at that precision, measured here first.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["char", "124m"], "Which shapes to run: char, 124m.")
flags.DEFINE_integer("batch_124m", 1, "Sequences per step for the 124M shape.")
flags.DEFINE_integer("steps", 5, "Timed steps per measurement (after warm-up).")
flags.DEFINE_bool("torch_compile", False, "Also time torch.compile'd PyTorch (slow to compile on 2 cores).")

SHAPES = {  # name -> model shape, batch, tokenizer vocabulary, rows of the PyTorch embedding
    "char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=12, vocab=65, torch_rows=65),
    "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=None, vocab=50257, torch_rows=50304),
}
DTYPES = ("float32", "bfloat16")


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())


def timed(fn, steps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `steps` calls after `warmup` untimed ones."""
    return interleaved([fn], steps, warmup)[0]


def interleaved(fns: list, steps: int, warmup: int = 2) -> list[float]:
    """Median seconds per call of each fn, timing them in turn (a, b, a, b, ...) after `warmup` untimed rounds, so
    a drift in this shared machine's speed weighs on every fn alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def matmul_ceiling(dtype: str, n: int = 2048) -> float:
    """FLOP/s of one big (n, n) @ (n, n) XLA matmul, bf16 inputs accumulating in f32 for bfloat16."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * n ** 3 / timed(lambda: f(a, b).block_until_ready(), steps=5)


def train_config(shape: dict, batch: int, dtype: str):
    from configs import base
    c = base.get_config()
    c.model.n_layer, c.model.n_head, c.model.n_embd = shape["n_layer"], shape["n_head"], shape["n_embd"]
    c.model.block_size, c.model.dtype = shape["block_size"], dtype
    c.batch_size = batch
    c.optim.b2 = 0.99
    return c


def jaxgpt_step(shape: dict, batch: int, dtype: str, flops_per_token: dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt import metrics, model, sharding, train
    config = train_config(shape, batch, dtype)
    model_config = train.model_config(config, shape["vocab"])
    mesh = sharding.make_mesh(config.mesh)
    steps = train.make_steps(config, model_config, mesh)
    params = jax.jit(lambda: nnx.state(model.build(model_config, config.seed), nnx.Param),
                     out_shardings=steps.state_sharding.params)()
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=steps.tx.init(params),
                             rng=jax.random.PRNGKey(1))
    tokens = np.random.default_rng(0).integers(0, shape["vocab"], (1, 1, batch, shape["block_size"] + 1))
    batch_arrays = sharding.host_batch_to_global(
        {"inputs": tokens[..., :-1].astype(np.int32), "targets": tokens[..., 1:].astype(np.int32)}, mesh, batch_axis=2)
    T, C = shape["block_size"], shape["n_embd"]
    flops_per_token[dtype] = metrics.flops_per_token(steps.n_params, T * C, shape["n_layer"], T, C)

    def step():
        nonlocal state
        state, step_metrics = steps.train_steps(state, batch_arrays)
        jax.block_until_ready(step_metrics)
    return step


def torch_step(shape: dict, batch: int, dtype: str, compiled: bool):
    import torch
    import transformers
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=shape["torch_rows"], n_positions=shape["block_size"], n_embd=shape["n_embd"],
        n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        activation_function="gelu_new", bos_token_id=None, eos_token_id=None))
    net = torch.compile(hf) if compiled else hf
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, shape["vocab"], (batch, shape["block_size"] + 1)))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = net(inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
    return step


def main(argv):
    del argv
    import jax
    import torch
    ceilings = {d: matmul_ceiling(d) for d in DTYPES}
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print("XLA 2048^3 matmul ceiling: " + ", ".join(f"{d} {c / 1e9:.0f} GFLOP/s" for d, c in ceilings.items()))
    print(f"\n{'shape':18s} {'dtype':9s} {'implementation':22s} {'ms/step':>9s} {'tokens/s':>9s} "
          f"{'GFLOP/s':>8s} {'of ceiling':>10s} {'jaxgpt vs this':>14s}")
    for name in FLAGS.shapes:
        shape = SHAPES[name]
        batch = shape["batch"] or FLAGS.batch_124m
        label = f"{name} B={batch} T={shape['block_size']}"
        tokens = batch * shape["block_size"]
        for dtype in DTYPES:
            flops_per_token = {}
            torch_name = "PyTorch " + ("eager f32" if dtype == "float32" else "autocast bf16")
            steps = [("jaxgpt", jaxgpt_step(shape, batch, dtype, flops_per_token)),
                     (torch_name, torch_step(shape, batch, dtype, compiled=False))]
            if FLAGS.torch_compile:
                try:
                    steps.append((torch_name + " +compile", torch_step(shape, batch, dtype, compiled=True)))
                except Exception as e:  # noqa: BLE001 -- report a broken torch.compile, keep the other rows
                    print(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
            rows = list(zip([name for name, _ in steps], interleaved([fn for _, fn in steps], FLAGS.steps)))
            for impl, seconds in rows:
                flops = flops_per_token[dtype] * tokens / seconds
                print(f"{label:18s} {dtype:9s} {impl:22s} {1e3 * seconds:9.1f} {tokens / seconds:9.0f} "
                      f"{flops / 1e9:8.1f} {flops / ceilings[dtype]:10.1%} {seconds / rows[0][1]:13.2f}x", flush=True)


if __name__ == "__main__":
    app.run(main)
