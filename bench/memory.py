"""Per-device memory of a compiled train step, from XLA's memory analysis of the step compiled from abstract inputs
(as Trainer.compile_ahead compiles it; nothing is allocated or run). Three questions, one per mode:

    python -m bench.memory [--batch_sizes=8,16,32,64] [--loss_chunks=0,4096] [--remat=none]
    python -m bench.memory --mode=lora
    python -m bench.memory --mode=sharding [--models=124M,1.5B,1.1B-swiglu]

chunks (the default): GPT-2 124M (configs/124m.py: bf16 compute, float32 master weights and AdamW state) on one
    device, one optimizer step of one micro-batch of B x 1024 tokens, with the loss over all logits at once
    (loss_chunk=0) and in chunks. peak = arguments + outputs - aliased (the donated state) + temporaries: XLA's
    buffer assignment for this machine's backend (on a CPU, a proxy for a GPU's).
lora: params + optimizer state of the 124M step (batch 1 x 256), full finetuning vs LoRA r=8 on attention and MLP.
sharding: params + optimizer state and temporaries per device of GPT-2 124M and 1.5B and the 1.1B SwiGLU model on 8
    CPU devices (jax_num_cpu_devices), data parallel vs FSDP, batch 8, and the time to compile each step.
"""
from __future__ import annotations

import json

from absl import app, flags

from bench import harness

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "chunks", ["chunks", "lora", "sharding"], "Which question (see the docstring).")
flags.DEFINE_list("batch_sizes", ["8", "16", "32", "64"], "chunks: micro-batch sizes (sequences per device).")
flags.DEFINE_list("loss_chunks", ["0", "4096"], "chunks: model.loss_chunk values; 0 is all logits at once.")
flags.DEFINE_string("remat", "none", "chunks: model.remat: none | full | dots.")
flags.DEFINE_list("models", ["124M", "1.5B", "1.1B-swiglu"], "sharding: the models.")

GIB, MIB = 2**30, 2**20
VOCAB = 50257
MODELS = {"124M": "124m", "1.5B": "1558m", "1.1B-swiglu": "1b_swiglu"}
MESHES = {"data parallel (data=8)": (8, 1, 1), "FSDP (fsdp=8)": (1, 8, 1)}


def analysis(config, batch: int, devices=None):
    """(memory analysis, per-device bytes of the batch, compile seconds) of one step of one micro-batch."""
    steps, mc, mesh = harness.train_steps(config, VOCAB, devices)
    compiled, trace_s, compile_s = harness.compile_step(steps, mesh, (1, 1, batch, mc.block_size))
    return compiled.memory_analysis(), 2 * batch * mc.block_size * 4 // mesh.size, trace_s + compile_s, steps


def chunks():
    import jax
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, remat={FLAGS.remat}", flush=True)
    print(f"{'B x 1024':>9s} {'loss_chunk':>10s} {'args GiB':>9s} {'out GiB':>8s} {'aliased':>8s} {'temp GiB':>9s} "
          f"{'peak GiB':>9s} {'compile s':>9s}", flush=True)
    for b in map(int, FLAGS.batch_sizes):
        for chunk in map(int, FLAGS.loss_chunks):
            c = harness.config("124m", batch_size=b, grad_accum_steps=1, model__loss_chunk=chunk,
                               model__remat=FLAGS.remat, mesh__data=1, mesh__fsdp=1, mesh__tensor=1)
            m, _, seconds, _ = analysis(c, b, jax.devices()[:1])
            peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            r = dict(batch_size=b, loss_chunk=chunk, arguments=m.argument_size_in_bytes / GIB,
                     outputs=m.output_size_in_bytes / GIB, aliased=m.alias_size_in_bytes / GIB,
                     temporaries=m.temp_size_in_bytes / GIB, peak=peak / GIB, compile_s=round(seconds, 1))
            print(f"{b:9d} {chunk:10d} {r['arguments']:9.2f} {r['outputs']:8.2f} {r['aliased']:8.2f} "
                  f"{r['temporaries']:9.2f} {r['peak']:9.2f} {r['compile_s']:9.1f}", flush=True)
            print(json.dumps(r), flush=True)


def lora():
    import jax
    for name, rank in (("full", 0), ("LoRA r=8", 8)):
        c = harness.config("124m", batch_size=1, grad_accum_steps=1, model__block_size=256, lora__rank=rank,
                           lora__targets="attn,mlp")
        m, batch_bytes, _, steps = analysis(c, 1)
        opt = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(steps.abstract_state.opt_state))
        print(f"{name:10s} params + optimizer state {(m.argument_size_in_bytes - batch_bytes) / MIB:8.1f} MiB "
              f"(optimizer state {opt / MIB:7.1f} MiB)", flush=True)


def sharding():
    print(f"{'model':12s} {'mesh':24s} {'params+opt state / device':>26s} {'temporaries / device':>22s} "
          f"{'compile':>9s}")
    for name in FLAGS.models:
        for mesh_name, (data, fsdp, tensor) in MESHES.items():
            c = harness.config(MODELS[name], batch_size=8, grad_accum_steps=1, mesh__data=data, mesh__fsdp=fsdp,
                               mesh__tensor=tensor)
            m, batch_bytes, seconds, _ = analysis(c, 8)
            print(f"{name:12s} {mesh_name:24s} {(m.argument_size_in_bytes - batch_bytes) / GIB:22.2f} GiB "
                  f"{m.temp_size_in_bytes / GIB:18.2f} GiB {seconds:8.1f}s", flush=True)


def main(argv):
    del argv
    if FLAGS.mode == "sharding":
        import jax
        jax.config.update("jax_num_cpu_devices", 8)  # before any device is asked for
    {"chunks": chunks, "lora": lora, "sharding": sharding}[FLAGS.mode]()


if __name__ == "__main__":
    app.run(main)
