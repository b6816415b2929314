"""The fast (jaxgpt/ops/xla_cpu.py) and gpu (jaxgpt/ops/gpu.py) kernel sets against the plain-jnp reference set,
op by op and through the whole model, forward and gradients, float32 and bfloat16; and the attention field reaching
every path. (The sets' chunked losses: tests/test_loss.py.)"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import checkpoint, loader
from jaxgpt.model import GPTConfig, build, cross_entropy
from jaxgpt.ops import Ops, resolve_attention

B, T, H, D, C, V = 2, 300, 4, 16, 64, 128  # T=300: three query blocks of the blocked attention (128, 128, 44)


def rand(shape, seed, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


OPS = {  # name -> (op(ops, *inputs), float32 inputs)
    "dense": (lambda o, x, w, b: o.dense(x, w, b), lambda: (rand((B, T, C), 1), rand((C, 3 * C), 2, 0.1),
                                                            rand((3 * C,), 3, 0.1))),
    "gelu": (lambda o, x: o.gelu(x.astype(o.dtype)), lambda: (rand((B, T, 4 * C), 4, 2.0),)),
    "gelu_exact": (lambda o, x: dataclasses.replace(o, activation="gelu").gelu(x.astype(o.dtype)),
                   lambda: (rand((B, T, 4 * C), 4, 2.0),)),
    "relu2": (lambda o, x: o.relu2(x.astype(o.dtype)), lambda: (rand((B, T, 4 * C), 4, 2.0),)),
    "attention": (lambda o, qkv: o.causal_attention(qkv.astype(o.dtype)), lambda: (rand((B, T, 3, H, D), 5),)),
    "tied_logits": (lambda o, x, e: o.tied_logits(x.astype(o.dtype), e), lambda: (rand((B, T, C), 6),
                                                                                 rand((V, C), 7, 0.1))),
}


def forward_and_grads(name, kernels, dtype):
    op, inputs = OPS[name]
    ops, args = Ops(kernels, "blocked", dtype), inputs()
    y = op(ops, *args).astype(jnp.float32)
    cotangent = rand(y.shape, 9)
    grads = jax.grad(lambda *a: jnp.sum(op(ops, *a).astype(jnp.float32) * cotangent), range(len(args)))(*args)
    return np.asarray(y), [np.asarray(g) for g in grads]


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def worst(result, reference) -> tuple[float, float]:
    """(forward, worst gradient) relative error of result against reference."""
    return relative(result[0], reference[0]), max(relative(g, r) for g, r in zip(result[1], reference[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["fast", "gpu"])
@pytest.mark.parametrize("name", OPS)
def test_kernels_equal_reference_in_float32(name, kernels):
    # Measured: forward identical, gradients about 1e-6 apart (summation order of the 2-D and blocked forms); the
    # gpu set's ops are the reference's in float32 (its blocked attention is the fast set's).
    fwd, grad = worst(forward_and_grads(name, kernels, "float32"), forward_and_grads(name, "reference", "float32"))
    print(f"\n[{name} float32] {kernels} vs reference: forward {fwd:.3g}, gradients {grad:.3g}")
    assert fwd <= 1e-6 and grad <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["fast", "gpu"])
@pytest.mark.parametrize("name", OPS)
def test_kernels_equal_reference_in_bfloat16(name, kernels):
    """The sets round to bfloat16 (relative step 2^-8 = 3.9e-3) at different points: the fast and gpu GELUs
    evaluate in float32, the fast backward passes round cotangents to bfloat16 as PyTorch's autocast does, the gpu
    dense layer rounds its product to bfloat16 before adding the bias in float32 (two roundings). Tolerances: a set
    within 2e-2 of the reference set (measured worst 1.7e-2: the reference GELU's gradient, rounded at every op of
    the formula), and within 8e-3 of the float32 reference (measured worst: fast 5.7e-3, gpu 5.7e-3, the gpu
    dense layer's output)."""
    ours, ref = forward_and_grads(name, kernels, "bfloat16"), forward_and_grads(name, "reference", "bfloat16")
    exact = forward_and_grads(name, "reference", "float32")
    between, accuracy = worst(ours, ref), worst(ours, exact)
    print(f"\n[{name} bfloat16] {kernels} vs reference {between[0]:.3g} / {between[1]:.3g}, {kernels} vs float32 "
          f"{accuracy[0]:.3g} / {accuracy[1]:.3g} (forward / gradients)")
    assert max(between) <= 2e-2 and max(accuracy) <= ACCURACY.get(name, 8e-3)
    assert accuracy[0] > 0  # bfloat16 really was used


# relu(x)^2 squares its bfloat16-rounded input, doubling that rounding (up to 2^-8 = 3.9e-3 relative), and rounds
# its output once more: up to 3 x 3.9e-3 (measured 8.9e-3 forward, 5.0e-3 gradients, both sets alike)
ACCURACY = {"relu2": 1.2e-2}


def model_loss_and_grads(config, idx):
    model = build(config)
    loss = lambda m: cross_entropy(m(jnp.asarray(idx))[0][:, :-1], jnp.asarray(idx[:, 1:]))  # noqa: E731
    value, grads = nnx.value_and_grad(loss)(model)
    return float(value), jax.tree.leaves(grads)


MODEL = GPTConfig(vocab_size=V, valid_vocab_size=100, n_layer=2, n_head=H, n_embd=C, block_size=320, init_std=0.1)
SPEEDRUN_BLOCKS = dict(qk_norm=True, mlp="relu2", logit_softcap=2.0, value_embeds=1, positions="rope",
                       tie_embeddings=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels, attention, blocks", [
    ("fast", "blocked", {}), ("fast", "xla", {}), ("gpu", "blocked", {}), ("fast", "blocked", SPEEDRUN_BLOCKS),
    ("gpu", "blocked", SPEEDRUN_BLOCKS)])
def test_model_on_kernels_equals_reference_in_float32(kernels, attention, blocks):
    base = dataclasses.replace(MODEL, attention=attention, **blocks)
    idx = np.random.default_rng(0).integers(0, 100, (B, T))
    ours = model_loss_and_grads(dataclasses.replace(base, kernels=kernels), idx)
    ref = model_loss_and_grads(dataclasses.replace(base, kernels="reference"), idx)
    grad = max(relative(np.asarray(a), np.asarray(b)) for a, b in zip(ours[1], ref[1]))
    print(f"\n[model, {kernels}, attention={attention}, {blocks or 'GPT-2'}] |loss - reference| "
          f"{abs(ours[0] - ref[0]):.3g}, gradients {grad:.3g}")
    assert abs(ours[0] - ref[0]) <= 1e-6 and grad <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["fast", "gpu"])
def test_model_in_bfloat16_is_as_close_to_float32_as_the_reference_set(kernels):
    """The whole model in bfloat16 against the float32 reference: a set may round elsewhere than the reference set,
    not more. Measured (loss, worst gradient relative to its largest entry): reference 1.3e-4 / 1.06e-2, fast
    8.2e-5 / 1.00e-2, gpu 3.7e-5 / 9.8e-3. Bound: the reference set's own distance, with a quarter of margin."""
    idx = np.random.default_rng(0).integers(0, 100, (B, T))
    exact = model_loss_and_grads(dataclasses.replace(MODEL, kernels="reference"), idx)

    def distance(kernels):
        loss, grads = model_loss_and_grads(dataclasses.replace(MODEL, kernels=kernels, dtype="bfloat16"), idx)
        return abs(loss - exact[0]), max(relative(np.asarray(a), np.asarray(b)) for a, b in zip(grads, exact[1]))
    ours, ref = distance(kernels), distance("reference")
    print(f"\n[model bfloat16] vs float32: {kernels} loss {ours[0]:.2g}, gradients {ours[1]:.3g}; reference set "
          f"loss {ref[0]:.2g}, gradients {ref[1]:.3g}")
    assert ours[0] <= 1.25 * ref[0] and ours[1] <= 1.25 * ref[1]
    assert ours[1] > 1e-4  # bfloat16 really was used


@pytest.mark.gpu
def test_the_backends_attention_equals_xlas_in_bfloat16():
    """attention=auto's choice for bfloat16 (cuDNN's flash attention on a GPU, the blocked kernel elsewhere) against
    XLA's, forward and gradients, at the 124M head shape. bfloat16 keeps 8 bits: they may differ by a few ulps where
    they round at other points, |a - b| <= 2e-2 (1 + |b|) (bench/gpu/check.py's criterion); a wrong mask, scale or
    layout is off by O(1)."""
    implementation = resolve_attention("auto", "bfloat16")
    assert implementation == ("cudnn" if jax.default_backend() == "gpu" else "blocked")
    qkv = rand((2, 256, 3, 12, 64), 11).astype(jnp.bfloat16)
    cotangent = rand((2, 256, 12, 64), 12)
    results = {}
    for name in (implementation, "xla"):
        ops = Ops("fast", name, "bfloat16")
        y, vjp = jax.vjp(ops.causal_attention, qkv)
        results[name] = [np.asarray(y, np.float32), np.asarray(vjp(cotangent.astype(y.dtype))[0], np.float32)]
    for ours, xla in zip(results[implementation], results["xla"]):
        assert np.all(np.abs(ours - xla) <= 2e-2 * (1 + np.abs(xla))), np.abs(ours - xla).max()


def primitives(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


def test_attention_field_reaches_training_sampling_and_evaluation(tmp_path):
    """model.attention picks the implementation: the blocked kernel is a custom VJP, XLA's is not. The training
    config's field reaches the model; a saved model keeps it for sampling and evaluation."""
    from configs import tiny
    config = tiny.get_config()
    config.model.attention = "xla"
    model_config = loader.model_config(config, vocab_size=65)
    assert model_config.attention == "xla"
    idx = jnp.zeros((1, 8), jnp.int32)
    for attention, blocked in (("blocked", True), ("xla", False)):
        model = build(dataclasses.replace(model_config, attention=attention))
        assert ("custom_vjp_call" in primitives(lambda m: m(idx)[0], model)) == blocked, attention
    saved = checkpoint.load_model(checkpoint.save_model(build(model_config), str(tmp_path / "m")))
    assert saved.config.attention == "xla"
    assert loader.load(str(tmp_path / "m"), attention="blocked").config.attention == "blocked"
    assert resolve_attention("auto", "float32") == "blocked"  # on CPU


def test_unknown_attention_or_kernels_is_a_clear_error():
    with pytest.raises(ValueError, match="attention='flash'"):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="kernels='fastest'"):
        GPTConfig(kernels="fastest")
