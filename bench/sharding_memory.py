"""Per-device bytes of params + optimizer state for GPT-2 124M and 1.5B and the 1.1B SwiGLU model on 8 devices:
data parallel vs FSDP, and the time to compile each step.

Figures come from the compiled train step's memory analysis (argument bytes of the state, per device), on 8
CPU devices forced by XLA_FLAGS; nothing is allocated. Run: python bench/sharding_memory.py
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import importlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxgpt import loader, sharding, step  # noqa: E402

MESHES = {"data parallel (data=8)": (8, 1, 1), "FSDP (fsdp=8)": (1, 8, 1)}


def state_bytes_per_device(config_file: str, mesh_shape) -> tuple[int, int, float]:
    config = importlib.import_module(f"configs.{config_file}").get_config()
    config.batch_size, config.grad_accum_steps = 8, 1
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
    mesh = sharding.make_mesh(config.mesh)
    model_config = loader.model_config(config, vocab_size=50257)
    steps = step.make_steps(config, model_config, mesh)
    batch = {k: jax.ShapeDtypeStruct((1, 1, 8, model_config.block_size), jnp.int32) for k in ("inputs", "targets")}
    start = time.perf_counter()
    compiled = steps.train_steps.lower(steps.abstract_state, batch).compile()
    seconds = time.perf_counter() - start
    batch_bytes = 2 * 8 * model_config.block_size * 4 // mesh.size
    analysis = compiled.memory_analysis()
    return analysis.argument_size_in_bytes - batch_bytes, analysis.temp_size_in_bytes, seconds


MODELS = {"124M": "124m", "1.5B": "1558m", "1.1B-swiglu": "1b_swiglu"}


def main(names=tuple(MODELS)):
    """python bench/sharding_memory.py [124M 1.5B 1.1B-swiglu]"""
    print(f"{'model':12s} {'mesh':24s} {'params+opt state / device':>26s} {'temporaries / device':>22s} "
          f"{'compile':>9s}")
    for name in names:
        for mesh_name, shape in MESHES.items():
            state, temp, seconds = state_bytes_per_device(MODELS[name], shape)
            print(f"{name:12s} {mesh_name:24s} {state / 2**30:22.2f} GiB {temp / 2**30:18.2f} GiB {seconds:8.1f}s",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or tuple(MODELS))
