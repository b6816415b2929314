"""Per-device bytes of params + optimizer state for the 124M train step, full finetuning vs LoRA r=8 (attention
and MLP adapters): the compiled step's memory analysis on one CPU device, nothing allocated.
Run: python bench/lora_memory.py"""
import importlib

import jax
import jax.numpy as jnp

from jaxgpt import loader, sharding, step


def state_bytes(rank: int) -> tuple[int, int]:
    config = importlib.import_module("configs.124m").get_config()
    config.batch_size, config.grad_accum_steps, config.model.block_size = 1, 1, 256
    config.lora.rank, config.lora.targets = rank, "attn,mlp"
    mesh = sharding.make_mesh(config.mesh)
    steps = step.make_steps(config, loader.model_config(config, vocab_size=50257), mesh)
    batch = {k: jax.ShapeDtypeStruct((1, 1, 1, 256), jnp.int32) for k in ("inputs", "targets")}
    analysis = steps.train_steps.lower(steps.abstract_state, batch).compile().memory_analysis()
    opt = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(steps.abstract_state.opt_state))
    return analysis.argument_size_in_bytes - 2 * 256 * 4, opt


def main():
    for name, rank in (("full", 0), ("LoRA r=8", 8)):
        total, opt = state_bytes(rank)
        print(f"{name:10s} params + optimizer state {total / 2**20:8.1f} MiB (optimizer state {opt / 2**20:7.1f} MiB)",
              flush=True)


if __name__ == "__main__":
    main()
