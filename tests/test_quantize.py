"""Decoding weights (jaxgpt/quantize.py): the int8 layer against its quantization error bound, converted models
against float32 (logits, greedy tokens), int8's batch independence, and the model variants it must cover."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import generate, quantize
from jaxgpt.errors import UserValueError
from jaxgpt.model import GPTConfig, Scale, build, merge_lora, num_params
from jaxgpt.ops import Ops

TINY = GPTConfig(vocab_size=128, valid_vocab_size=120, block_size=64, n_layer=2, n_head=4, n_embd=64)
LLAMA = dataclasses.replace(TINY, n_kv_head=2, mlp="swiglu", norm="rmsnorm", positions="rope",
                            tie_embeddings=False, bias=False)
SPEEDRUN = dataclasses.replace(TINY, qk_norm=True, mlp="relu2", logit_softcap=3.0, value_embeds=1, positions="rope",
                               tie_embeddings=False)
VARIANTS = {"gpt2": TINY, "scan_layers": dataclasses.replace(TINY, scan_layers=True), "llama": LLAMA,
            "speedrun": SPEEDRUN}


@nnx.jit
def forward(m, ids):
    """The logits, jitted: op by op, an int8 model compiles each of its ops apart (seconds per model)."""
    return m(ids)[0]


@nnx.jit
def loss(m, ids):
    return m.loss(ids, ids)


def rand(shape, seed, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("kernels", ["fast", "reference"])
@pytest.mark.parametrize("n_in", [1, 2])
def test_int8_dense_within_its_quantization_error(kernels, n_in):
    # The weights' rounding moves y_n by at most sum_k |x_k| * scale_n / 2; the fast kernel's activations (two int8
    # digits per row) are off by at most max|x| / 64516 each, which moves y_n by that times sum_k |w_kn|.
    x = rand((3, 5, 4, 16), 1) * jnp.linspace(0.1, 3.0, 16)  # rows of unequal ranges
    shape = (64, 24) if n_in == 1 else (4, 16, 24)
    x = x.reshape(3, 5, 64) if n_in == 1 else x
    w, bias = rand((64, 24), 2, 0.1).reshape(shape), rand((24,), 3, 0.1)
    q, scale = quantize.quantize(w.reshape(-1, 24), (0,)) if n_in == 1 else quantize.quantize(w, (0, 1))
    q = q.reshape(shape)
    assert q.dtype == jnp.int8 and scale.shape == (24,) and int(jnp.abs(q).max()) == 127
    y = Ops(kernels).int8_dense(x, jnp.moveaxis(q, -1, 0), scale, bias, n_in)  # stored outputs first
    exact = Ops("reference").dense(x, w, bias, n_in)
    x2 = np.asarray(x, np.float64).reshape(15, 64)
    bound = np.abs(x2).sum(1, keepdims=True) * np.asarray(scale)[None] / 2
    bound += np.abs(x2).max(1, keepdims=True) / 64516 * np.abs(np.asarray(q * scale)).reshape(64, 24).sum(0)
    error = np.abs(np.asarray(y - exact)).reshape(15, 24)
    assert (error <= bound * 1.001 + 1e-6).all()
    assert error.max() > 0.05 * bound.max()  # the bound is not vacuous: int8 does round


def test_int8_rows_digits():
    x = rand((4, 300), 4) * jnp.array([[1e-3], [1.0], [50.0], [0.0]])
    from jaxgpt.ops.xla_cpu import int8_rows
    digits, s_hi, s_lo = int8_rows(x)
    approx = s_hi * digits[:4].astype(jnp.float32) + s_lo * digits[4:].astype(jnp.float32)
    peak = jnp.abs(x).max(1, keepdims=True)
    assert digits.dtype == jnp.int8 and bool(jnp.all(jnp.abs(approx - x) <= peak / 64516 * 1.001))
    assert bool(jnp.all(approx[3] == 0))


def test_unknown_weights_are_a_user_error():
    with pytest.raises(UserValueError, match="float32.*bfloat16.*int8"):
        quantize.convert(build(TINY), "fp8")


def test_float32_is_the_model_itself():
    m = build(TINY)
    assert quantize.convert(m, "float32") is m


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_models_store_and_compute_as_specified(variant):
    config = VARIANTS[variant]
    m = build(config, seed=1)
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, config.n_valid_vocab)
    want = np.asarray(forward(m, ids))
    real = np.isfinite(want)
    for weights, tolerance in (("bfloat16", 2e-2), ("int8", 2e-2)):
        q = quantize.convert(m, weights)
        logits = np.asarray(forward(q, ids))
        assert (np.isfinite(logits) == real).all()
        error = np.abs(logits[real] - want[real]).max() / np.abs(want[real]).max()
        print(f"\n[{variant} {weights}] logits relative error {error:.2e}")
        assert error < tolerance
        if variant == "gpt2":  # the loss reads the dequantized head (GPT.head)
            np.testing.assert_allclose(float(loss(q, ids)), float(loss(m, ids)), rtol=1e-2)
    q = quantize.convert(m, "int8")
    assert num_params(q) == num_params(m)
    kernels = [v for p, v in jax.tree.leaves_with_path(jax.tree.map(lambda a: a, _pure(q))) if p[-1].key == "kernel"]
    assert kernels and all(k.dtype == jnp.int8 for k in kernels)
    head = q.wte.embedding if config.tie_embeddings else q.lm_head
    assert head.dtype == jnp.int8 and (q.wte.scale if config.tie_embeddings else q.lm_head_scale).shape == (128,)
    if config.positions == "learned":
        assert q.wpe.embedding.dtype == jnp.float32 and q.wpe.scale is None
    assert isinstance(q.h[0].attn.c_proj.scale if not config.scan_layers else q.h.attn.c_proj.scale, Scale)
    b = quantize.convert(m, "bfloat16")
    assert {a.dtype for a in jax.tree.leaves(_pure(b))} == {jnp.dtype(jnp.bfloat16)}


def _pure(m):
    from flax import nnx
    return nnx.state(m).to_pure_dict()


def test_a_lora_model_is_merged_first():
    config = dataclasses.replace(TINY, lora_rank=4, lora_targets=("attn", "mlp"))
    m = build(config, seed=2)
    state = nnx.state(m, nnx.LoRAParam)  # B = 0 at init: give the adapters something to add
    nnx.update(m, jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), state))
    ids = jax.random.randint(jax.random.key(0), (1, 16), 0, 120)
    q = quantize.convert(m, "int8")
    assert q.config.lora_rank == 0
    merged_first = quantize.convert(merge_lora(m), "int8")
    np.testing.assert_array_equal(np.asarray(forward(q, ids)), np.asarray(forward(merged_first, ids)))


def test_greedy_tokens_agree_with_float32():
    # Sharpened (init_std 0.2): the logits have clear leaders, as a trained model's. A flip changes the rest of
    # its row's continuation, so agreement counts tokens up to each row's first difference. Measured over 8 prompts
    # of 32 tokens: bfloat16 256/256, int8 163/256 (its weights round coarser: 1/254 of a channel's peak).
    config = dataclasses.replace(TINY, init_std=0.2)
    m = build(config, seed=3)
    prompts = [np.random.default_rng(i).integers(0, 120, 5 + i).tolist() for i in range(8)]
    want = generate.generate(m, prompts, max_new_tokens=32, temperature=0)
    for weights in ("bfloat16", "int8"):
        got = generate.generate(quantize.convert(m, weights), prompts, max_new_tokens=32, temperature=0)
        same = sum(next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), 32) for g, w in zip(got, want))
        print(f"\n[{weights}] greedy tokens equal to float32's before each row's first difference: {same}/256")
        assert same >= {"bfloat16": 224, "int8": 128}[weights]


def test_int8_rows_do_not_depend_on_the_batch():
    # int32 accumulation is exact and each row's activations have their own scales: an int8 layer's row is the
    # same bits alone or beside others, and so are a model's logits and greedy tokens. (The decode step's logits
    # through the KV cache are not: there XLA's batched attention differs in the last bit between batch 1 and
    # batch 4, in float32 too, and the activations' rounding to digits carries such a bit to about 1e-4.)
    x, w = rand((4, 64), 6), rand((64, 96), 7, 0.1)
    q, scale = quantize.quantize(w, (0,))
    q, ops = q.T, Ops()  # stored outputs first
    together = np.asarray(ops.int8_dense(x, q, scale))
    for row in range(4):
        np.testing.assert_array_equal(np.asarray(ops.int8_dense(x[row:row + 1], q, scale))[0], together[row])
    q = quantize.convert(build(dataclasses.replace(TINY, init_std=0.2), seed=4), "int8")
    ids = jax.random.randint(jax.random.key(5), (4, 12), 0, 120)
    batch = np.asarray(forward(q, ids))
    for row in (0, 3):
        np.testing.assert_array_equal(np.asarray(forward(q, ids[row:row + 1]))[0], batch[row])
    prompts = ids.tolist()
    together = generate.generate(q, prompts, max_new_tokens=16, temperature=0, loop="python")
    for row in (0, 3):
        assert generate.generate(q, prompts[row:row + 1], max_new_tokens=16, temperature=0, loop="python")[0] == \
            together[row]
