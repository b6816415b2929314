"""Gradient accumulation: micro-batches scanned inside one jit (jaxgpt's train_step) vs optax.MultiSteps.

Both run nanoGPT's CPU-recipe model (4L/4H/128, T=64) with 4 micro-batches of 12 per optimizer step, from the same
init and data; prints ms per optimizer step and the largest parameter difference after 5 steps.
Run: python bench/accumulation.py
"""
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import shakespeare_char_cpu
from jaxgpt import loader, sharding, step

ACCUM, STEPS = 4, 5


def timed(fn, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    config = shakespeare_char_cpu.get_config()
    config.grad_accum_steps = ACCUM
    mesh = sharding.make_mesh(config.mesh)
    model_config = loader.model_config(config, vocab_size=65)
    steps = step.make_steps(config, model_config, mesh)
    rng = np.random.default_rng(0)
    batches = [{k: jnp.asarray(rng.integers(0, 65, (1, ACCUM, 12, 64)), jnp.int32) for k in ("inputs", "targets")}
               for _ in range(STEPS)]
    params = step.fresh_state(steps, model_config, config.seed).params

    def fresh():
        return step.fresh_state(steps, model_config, config.seed, jax.tree.map(jnp.copy, params))

    state = fresh()
    for b in batches:  # warm up (compile) and the reference result
        state, _ = steps.train_steps(state, b)
    scanned = state
    holder = [fresh()]

    def scan_step():
        holder[0], m = steps.train_steps(holder[0], batches[0])
        return m["loss"]
    scan_ms = timed(scan_step, 10)

    multi = optax.MultiSteps(steps.tx, every_k_schedule=ACCUM)
    grad = jax.value_and_grad(functools.partial(step.loss_fn, graphdef=steps.graphdef, rng=None))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def micro_step(params, opt_state, inputs, targets):
        loss, g = grad(params, inputs=inputs, targets=targets)
        updates, opt_state = multi.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    p, s = jax.tree.map(jnp.copy, params), multi.init(params)
    for b in batches:
        for i in range(ACCUM):
            p, s, _ = micro_step(p, s, b["inputs"][0, i], b["targets"][0, i])
    diff = max(float(jnp.max(jnp.abs(a - c))) for a, c in zip(jax.tree.leaves(p), jax.tree.leaves(scanned.params)))
    ms_holder = [p, s]

    def multisteps_step():
        for i in range(ACCUM):
            ms_holder[0], ms_holder[1], loss = micro_step(ms_holder[0], ms_holder[1], batches[0]["inputs"][0, i],
                                                          batches[0]["targets"][0, i])
        return loss
    multi_ms = timed(multisteps_step, 10)
    print(f"{'accumulation':28s} {'ms / optimizer step':>20s}")
    print(f"{'lax.scan inside one jit':28s} {scan_ms:20.1f}")
    print(f"{'optax.MultiSteps':28s} {multi_ms:20.1f}")
    print(f"max |param difference| after {STEPS} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
