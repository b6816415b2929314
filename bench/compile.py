"""First-step compile time of GPT-2 124M's train step, with and without scan over layers, on this machine.

    python bench/compile.py [--batch_size=1]

Uses configs/124m.py (bf16 compute, grad_accum_steps 8) with a small batch (compile time barely depends on it)
and times jaxgpt.train's jitted step: tracing + lowering to StableHLO, then XLA compilation, from abstract
inputs (nothing is allocated or run). Each variant runs in a fresh subprocess so no cache is shared.
"""
from __future__ import annotations

import json
import time

import fresh
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 1, "Sequences per micro-batch.")
flags.DEFINE_bool("scan_layers", None, "Internal: time one variant in this process and print JSON.")


def compile_seconds(scan_layers: bool, batch_size: int) -> dict:
    import importlib

    import jax
    import jax.numpy as jnp

    from jaxgpt import loader, sharding, step
    config = importlib.import_module("configs.124m").get_config()
    config.model.scan_layers, config.batch_size = scan_layers, batch_size
    model_config = loader.model_config(config, 50257)
    mesh = sharding.make_mesh(config.mesh)
    steps = step.make_steps(config, model_config, mesh)
    shape = (1, config.grad_accum_steps, batch_size, model_config.block_size)  # one step per call
    batch_spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh, ndim=4, batch_axis=2))
    start = time.perf_counter()
    lowered = steps.train_steps.lower(steps.abstract_state, {"inputs": batch_spec, "targets": batch_spec})
    traced = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"trace_lower_s": traced - start, "compile_s": done - traced}


def main(argv):
    del argv
    if FLAGS.scan_layers is not None:
        print(json.dumps(compile_seconds(FLAGS.scan_layers, FLAGS.batch_size)))
        return
    print(f"GPT-2 124M train step (configs/124m.py, batch {FLAGS.batch_size} x 8 micro-batches), fresh process each")
    print(f"{'scan_layers':12s} {'trace+lower s':>14s} {'XLA compile s':>14s} {'total s':>8s}")
    for scan in (False, True):
        r = fresh.run_json(__file__, f"--scan_layers={scan}", f"--batch_size={FLAGS.batch_size}")
        print(f"{scan!s:12s} {r['trace_lower_s']:14.1f} {r['compile_s']:14.1f} {sum(r.values()):8.1f}")


if __name__ == "__main__":
    app.run(main)
