"""The chunked loss (GPT.loss, model.loss_chunk) against today's cross_entropy of the full logits: values and
gradients of every parameter, in float32 and bfloat16, with both kernel sets; its compiled gradient holds far less
memory; and on meshes it computes what one device does."""
import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.model import GPTConfig, abstract, build, cross_entropy

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = GPTConfig(vocab_size=128, valid_vocab_size=100, block_size=32, n_layer=1, n_head=2, n_embd=32)
B, T = 3, 32


def batch(config: GPTConfig, seed: int = 0):
    """Inputs and targets (B, T); about a third of the targets are ignored, a whole row of them included."""
    idx = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, config.n_valid_vocab)
    targets = jnp.where(jax.random.bernoulli(jax.random.key(seed + 1), 0.3, (B, T)), -1, idx[:, 1:])
    return idx[:, :-1], targets.at[1].set(-1)


def unchunked(model, idx, targets, rng=None):
    return cross_entropy(model(idx, rng=rng)[0], targets)  # the loss as it was: every logit at once


def chunked(model, idx, targets, rng=None):
    return model.loss(idx, targets, rng=rng)


def values_and_grads(losses: dict, idx, targets, rng=None) -> dict:
    """{name: (loss_fn, config)} -> {name: (loss, {parameter: gradient})}, every loss of the same parameters (drawn
    for the first config; the configs differ in compute fields only) and all in one compile."""
    params = nnx.state(build(next(iter(losses.values()))[1]), nnx.Param)
    graphdefs = {name: nnx.split(abstract(config), nnx.Param)[0] for name, (_, config) in losses.items()}

    def one(params, fn, graphdef):
        return fn(nnx.merge(graphdef, params), idx, targets, rng)

    def all_of_them(params):
        return {name: jax.value_and_grad(functools.partial(one, fn=fn, graphdef=graphdefs[name]))(params)
                for name, (fn, _) in losses.items()}
    return {name: (float(value), {jax.tree_util.keystr(k): np.asarray(g, np.float32)
                                  for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]})
            for name, (value, grads) in jax.jit(all_of_them)(params).items()}


def max_diffs(a, b) -> tuple[float, float]:
    """(|loss difference|, the largest |gradient difference| over all parameters)."""
    assert a[1].keys() == b[1].keys()
    return abs(a[0] - b[0]), max(float(np.abs(a[1][k] - b[1][k]).max()) for k in a[1])


CHUNKS = {  # loss_chunk -> the chunks it makes of B=3 rows of T=32 positions
    24: "8 positions: 4 chunks, none padded",
    16: "5 positions: 7 chunks, the last padded by 3",
    4096: "all 32 positions: one chunk",
}
VARIANTS = {  # name -> (config overrides: compute fields only, the loss_chunks tried, dropout on)
    "fast": (dict(kernels="fast"), (24, 16, 4096), False),
    "reference": (dict(kernels="reference"), (16,), False),
    "bfloat16": (dict(dtype="bfloat16"), (16,), False),
    "fast, scan_layers, dropout": (dict(n_layer=2, scan_layers=True, dropout=0.1), (16,), True),
    "gpu": (dict(kernels="gpu"), (24, 16, 4096), False),
    "gpu, bfloat16": (dict(kernels="gpu", dtype="bfloat16"), (16, 4096), False),
    # a cap near the logits' size (about 0.1 at init), so that it bends them: the fast set's gradient through it
    "softcap": (dict(logit_softcap=0.1), (24, 16), False),
    "softcap, reference": (dict(logit_softcap=0.1, kernels="reference"), (16,), False),
}
ONE_COMPILE = ("fast", "reference", "bfloat16", "gpu", "gpu, bfloat16")  # the variants of one model structure


@functools.cache
def results(*variants) -> dict:
    """{(variant, 'today' | 'loss_chunk=0' (fast only) | loss_chunk): (loss, grads)} for variants of one model
    structure, in one compile (compiles dominate these tests); 'today' is the loss as it was, cross_entropy of the
    full logits."""
    losses, dropout_on = {}, False
    for variant in variants:
        overrides, chunks, dropout_on = VARIANTS[variant]
        config = dataclasses.replace(SMALL, **overrides)
        losses[variant, "today"] = unchunked, dataclasses.replace(config, loss_chunk=0)
        if variant == "fast":
            losses[variant, "loss_chunk=0"] = chunked, dataclasses.replace(config, loss_chunk=0)
        losses.update({(variant, str(chunk)): (chunked, dataclasses.replace(config, loss_chunk=chunk))
                       for chunk in chunks})
    return values_and_grads(losses, *batch(SMALL), jax.random.key(7) if dropout_on else None)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fast", "reference", "gpu", "fast, scan_layers, dropout", "softcap",
                                     "softcap, reference"])
def test_chunked_loss_equals_the_full_logits_loss_in_float32(variant):
    """Ignored targets and padded vocabulary rows in every batch; chunks that divide T, that do not, and one."""
    ours = results(*ONE_COMPILE) if variant in ONE_COMPILE else results(variant)
    today = ours[variant, "today"]
    if "softcap" in variant:  # the cap changes the loss: the check compares capped with capped
        assert abs(today[0] - results(*ONE_COMPILE)["fast", "today"][0]) > 1e-3
    if variant == "fast":
        assert ours[variant, "loss_chunk=0"][0] == today[0]  # loss_chunk=0 is today's path
    for chunk in VARIANTS[variant][1]:
        what = CHUNKS[chunk]
        loss_diff, grad_diff = max_diffs(ours[variant, str(chunk)], today)
        print(f"\n[{variant}] loss_chunk={chunk} ({what}): loss {today[0]:.6f}, |loss diff| {loss_diff:.2g}, "
              f"max |grad diff| {grad_diff:.2g}", end="")
        assert loss_diff <= 1e-6 and grad_diff <= 1e-5, chunk
        # Padded vocabulary rows have no probability, so no gradient.
        assert not ours[variant, str(chunk)][1]["['wte']['embedding'].value"][SMALL.n_valid_vocab:].any()


@pytest.mark.gpu
def test_chunked_loss_in_bfloat16():
    """Against the unchunked bfloat16 path: both round the hidden states, weights and logit cotangents to bfloat16
    at the same points, so they differ by float32 summation order only (and the roundings it flips). Tolerances:
    loss within 1e-5, every gradient within 1e-4 of its largest entry (bfloat16's relative step is 3.9e-3)."""
    ours = results(*ONE_COMPILE)
    today, exact = ours["bfloat16", "today"], ours["fast", "today"]
    assert abs(today[0] - exact[0]) > 1e-5  # bfloat16 really was used
    for chunk in VARIANTS["bfloat16"][1]:
        chunked = ours["bfloat16", str(chunk)]
        relative = max(float(np.abs(chunked[1][k] - today[1][k]).max() / np.abs(today[1][k]).max())
                       for k in today[1])
        print(f"\n[bfloat16] loss_chunk={chunk}: |loss diff| {abs(chunked[0] - today[0]):.2g} (float32's is "
              f"{abs(today[0] - exact[0]):.2g} away), worst gradient diff / its largest entry {relative:.2g}", end="")
        assert abs(chunked[0] - today[0]) <= 1e-5 and relative <= 1e-4


@pytest.mark.gpu
def test_gpu_chunked_loss_in_bfloat16_is_as_close_to_float32_as_the_full_logits():
    """The gpu set rounds the logits to bfloat16 (as nanoGPT's autocast does; the full-logits path keeps them in
    float32), so it is held to float32 instead, as close as the bfloat16 full-logits loss is: the loss, and the
    gradients the loss itself computes (the head's, wte, and ln_f's, the first its hidden gradient reaches).
    Measured (jax 0.10.2 and 0.11.2 alike): that loss 3.6e-5 and those gradients 4.6e-3 (of each gradient's largest
    entry) from float32, the gpu chunks 4.3e-6 and 4.6e-3, whatever the chunking. Bounds: 1e-4 and 1e-2. (The other
    weights' gradients come from the set's dense layers: tests/test_ops.py holds those.)"""
    ours = results(*ONE_COMPILE)
    exact, full = ours["fast", "today"], ours["bfloat16", "today"]
    loss_own = [k for k in exact[1] if "'wte'" in k or "'ln_f'" in k]
    assert len(loss_own) == 3, loss_own  # wte, ln_f's scale and bias
    for what, result in [("full logits", full)] + [(f"gpu, loss_chunk={c}", ours["gpu, bfloat16", str(c)])
                                                   for c in VARIANTS["gpu, bfloat16"][1]]:
        relative = max(float(np.abs(result[1][k] - exact[1][k]).max() / np.abs(exact[1][k]).max())
                       for k in loss_own)
        print(f"\n[bfloat16 vs float32] {what}: |loss diff| {abs(result[0] - exact[0]):.2g}, worst gradient diff / "
              f"its largest entry {relative:.2g}", end="")
        assert abs(result[0] - exact[0]) <= 1e-4 and 1e-4 < relative <= 1e-2


def test_chunked_gradient_compiles_to_far_less_memory():
    """A train-step-like gradient at vocab 50304 and 32 x 128 tokens: the full float32 logits alone are 0.77 GiB,
    chunks of 512 tokens hold an eighth of that at a time."""
    config = GPTConfig(vocab_size=50304, block_size=128, n_layer=1, n_head=1, n_embd=64)
    idx = jax.ShapeDtypeStruct((32, 128), jnp.int32)

    def temp_bytes(loss_chunk):
        graphdef, params = nnx.split(abstract(dataclasses.replace(config, loss_chunk=loss_chunk)), nnx.Param)
        grad = jax.jit(jax.grad(lambda p, x, y: nnx.merge(graphdef, p).loss(x, y)))
        return grad.lower(params, idx, idx).compile().memory_analysis().temp_size_in_bytes
    full, chunks = temp_bytes(0), temp_bytes(512)
    print(f"\n[memory] temporaries: {full / 2**20:.0f} MiB unchunked, {chunks / 2**20:.0f} MiB in chunks of 512")
    assert chunks < full / 4


MESH_CHECK = r"""
import dataclasses, json, re, sys
import jax, numpy as np
from flax import nnx
from jaxgpt import sharding, step
from jaxgpt.model import GPTConfig, abstract, build
config = GPTConfig(vocab_size=128, valid_vocab_size=100, block_size=32, n_layer=1, n_head=2, n_embd=32,
                   kernels=sys.argv[1])
idx = jax.random.randint(jax.random.key(0), (8, 29), 0, 100)
targets = idx.at[:, -3:].set(-1)
params = nnx.state(build(config), nnx.Param)
def run(mesh_shape, loss_chunk):
    graphdef = nnx.split(abstract(dataclasses.replace(config, loss_chunk=loss_chunk)), nnx.Param)[0]
    grad = jax.value_and_grad(lambda p, x, y: step.loss_fn(p, graphdef, x, y, None))
    if mesh_shape is None:
        return jax.jit(grad)(params, idx, targets), ""
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
    args = (jax.device_put(params, sharding.param_shardings(params, mesh)),
            *jax.device_put((idx, targets), sharding.batch_sharding(mesh)))
    compiled = jax.jit(step.under_mesh(mesh, grad)).lower(*args).compile()
    return compiled(*args), compiled.as_text()
def collectives(computations):
    return sorted({op for c in computations for op in re.findall(
        r" (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?[(]", c)})
(one, one_grads), _ = run(None, 0)
out = {}
for shape in ([8, 1, 1], [2, 2, 2]):
    (loss, grads), hlo = run(shape, 16)
    computations = hlo.split("\n\n")  # the chunk loop's body is the only loop: outside ENTRY
    out[str(shape)] = dict(
        loss=abs(float(loss) - float(one)),
        grad=max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(one_grads))),
        collectives=collectives(computations),
        in_loop=collectives(c for c in computations if not c.lstrip().startswith("ENTRY")))
print(json.dumps(out))
"""


@pytest.mark.parametrize("kernels", ["fast", "gpu"])
def test_chunked_loss_on_meshes_equals_one_device(kernels):
    """Data parallel (data=8) and mixed (data=2, fsdp=2, tensor=2) meshes of 8 CPU devices, 2 and 4 chunks as
    each device holds 1 or 2 rows: loss and gradients as one unchunked device computes them. Data parallel gathers
    nothing (each device chunks its own rows) and communicates nothing inside the chunk loop (each device sums its
    own embedding gradient until the loop ends); tensor parallel must (the logsumexp over vocabulary shards)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", MESH_CHECK, kernels], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print("\n" + "\n".join(f"[{kernels}, mesh {k}] {v}" for k, v in out.items()))
    for mesh, r in out.items():  # tests/test_sharding.py's tolerance: a mesh sums in another order
        assert r["loss"] <= 1e-5 and r["grad"] <= 1e-5, mesh
    assert out["[8, 1, 1]"]["collectives"] == ["all-reduce"] and not out["[8, 1, 1]"]["in_loop"]
    assert out["[2, 2, 2]"]["in_loop"]  # the check sees into the loop
