"""Per-device memory of GPT-2 124M's compiled train step by micro-batch, with the loss over all logits at once
(loss_chunk=0) and in chunks (the default model.loss_chunk).

    python bench/memory.py [--batch_sizes=8,16,32,64] [--loss_chunks=0,4096] [--remat=none]

Uses configs/124m.py (bf16 compute, float32 master weights and AdamW state) on one device and compiles
jaxgpt.step's jitted train step for one optimizer step of one micro-batch of B x 1024 tokens, from abstract
inputs, as Trainer.compile_ahead does; nothing is allocated or run. The figures are XLA's buffer assignment for
this machine's backend (on a CPU, a proxy for a GPU's). peak = arguments + outputs - aliased (the donated state)
+ temporaries.
"""
from __future__ import annotations

import importlib
import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxgpt import loader, sharding, step

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["8", "16", "32", "64"], "Micro-batch sizes (sequences per device).")
flags.DEFINE_list("loss_chunks", ["0", "4096"], "model.loss_chunk values: 0 is the whole batch's logits at once.")
flags.DEFINE_string("remat", "none", "model.remat: none | full | dots.")

GIB = 2**30


def step_memory(batch_size: int, loss_chunk: int) -> dict:
    config = importlib.import_module("configs.124m").get_config()
    config.batch_size, config.grad_accum_steps, config.model.loss_chunk = batch_size, 1, loss_chunk
    config.model.remat = FLAGS.remat
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    model_config = loader.model_config(config, 50257)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    steps = step.make_steps(config, model_config, mesh)
    spec = sharding.batch_sharding(mesh, ndim=4, batch_axis=2)
    batch = {k: jax.ShapeDtypeStruct((1, 1, batch_size, model_config.block_size), jnp.int32, sharding=spec)
             for k in ("inputs", "targets")}
    start = time.perf_counter()
    m = steps.train_steps.lower(steps.abstract_state, batch).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return dict(batch_size=batch_size, loss_chunk=loss_chunk, arguments=m.argument_size_in_bytes / GIB,
                outputs=m.output_size_in_bytes / GIB, aliased=m.alias_size_in_bytes / GIB,
                temporaries=m.temp_size_in_bytes / GIB, peak=peak / GIB,
                compile_s=round(time.perf_counter() - start, 1))


def main(_):
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, remat={FLAGS.remat}", flush=True)
    print(f"{'B x 1024':>9s} {'loss_chunk':>10s} {'args GiB':>9s} {'out GiB':>8s} {'aliased':>8s} {'temp GiB':>9s} "
          f"{'peak GiB':>9s} {'compile s':>9s}", flush=True)
    for batch_size in map(int, FLAGS.batch_sizes):
        for loss_chunk in map(int, FLAGS.loss_chunks):
            r = step_memory(batch_size, loss_chunk)
            print(f"{batch_size:9d} {loss_chunk:10d} {r['arguments']:9.2f} {r['outputs']:8.2f} {r['aliased']:8.2f} "
                  f"{r['temporaries']:9.2f} {r['peak']:9.2f} {r['compile_s']:9.1f}", flush=True)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    app.run(main)
