"""jaxgpt's GPT against Hugging Face's GPT2LMHeadModel (the reference), plus properties of the model itself."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_bridge
from jaxgpt.model import GPT, GPTConfig, build, cross_entropy, num_params
from torch_bridge import HF, convert


def tokens(vocab: int, B: int, T: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T))


def ours(model: GPT, idx: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(idx))[0])


def theirs(hf, idx: np.ndarray, labels: bool = False):
    with torch.no_grad():
        out = hf(torch.as_tensor(idx), labels=torch.as_tensor(idx) if labels else None)
    return (out.logits.numpy(), out.loss.item()) if labels else out.logits.numpy()


def lm_loss(logits, idx) -> float:
    return float(cross_entropy(jnp.asarray(logits[:, :-1]), jnp.asarray(idx[:, 1:])))


@pytest.fixture(scope="module")
def hf_124m(make_hf_gpt2):
    return make_hf_gpt2(full_size=True)


def check_parity(hf, B: int, T: int, label: str, **overrides):
    model, vocab = torch_bridge.from_hf(hf, **overrides), hf.config.vocab_size
    idx = tokens(vocab, B, T)
    logits, hf_logits, hf_loss = ours(model, idx), *theirs(hf, idx, labels=True)
    diff = np.abs(logits[..., :vocab] - hf_logits).max()
    loss_diff = abs(lm_loss(logits, idx) - hf_loss)
    print(f"\n[{label}] max |logits - HF logits| = {diff:.3g}, |loss - HF loss| = {loss_diff:.3g}")
    assert diff <= 1e-4
    assert loss_diff <= 1e-5
    assert np.all(np.isneginf(logits[..., vocab:]))  # padded rows


@pytest.mark.gpu
@pytest.mark.parametrize("scan_layers", [False, True])
def test_small_model_matches_hf(make_hf_gpt2, scan_layers):
    check_parity(make_hf_gpt2(), B=2, T=32, label=f"small, scan_layers={scan_layers}", scan_layers=scan_layers)


@pytest.mark.gpu
def test_124m_matches_hf(hf_124m):
    check_parity(hf_124m, B=1, T=64, label="124M")


def test_124m_parameter_count_matches_hf(hf_124m):
    hf_count = sum(p.numel() for p in hf_124m.parameters())  # the tied head is counted once
    config = GPTConfig.from_preset("gpt2", vocab_size=50257)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    assert num_params(abstract) == hf_count == 124_439_808
    assert num_params(torch_bridge.from_hf(hf_124m, vocab_size=50257)) == hf_count


def test_1b_swiglu_parameter_count_matches_hf_llama():
    """configs/1b_swiglu.py against LlamaForCausalLM of the same shape (built on the meta device: no memory)."""
    import importlib

    import transformers

    from jaxgpt import loader, model
    config = importlib.import_module("configs.1b_swiglu").get_config()
    ours = loader.model_config(config, 50257)
    hf_config = transformers.LlamaConfig(
        vocab_size=ours.vocab_size, hidden_size=ours.n_embd, intermediate_size=ours.mlp_dim,
        num_hidden_layers=ours.n_layer, num_attention_heads=ours.n_head, num_key_value_heads=ours.n_kv_head,
        max_position_embeddings=ours.block_size, tie_word_embeddings=ours.tie_embeddings)
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in transformers.LlamaForCausalLM(hf_config).parameters())
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model.abstract(ours), nnx.Param)))
    print(f"\n1b_swiglu: {count:,} parameters (HF Llama: {hf_count:,})")
    assert count == hf_count and 1.0e9 < count < 1.1e9


def test_future_tokens_do_not_change_earlier_logits():
    model = build(GPTConfig(vocab_size=128, n_layer=2, n_head=4, n_embd=64, block_size=32))
    idx = tokens(100, 2, 32)
    changed = idx.copy()
    changed[:, 20:] = tokens(100, 2, 12, seed=1)
    a, b = ours(model, idx), ours(model, changed)
    np.testing.assert_array_equal(a[:, :20], b[:, :20])
    assert np.abs(a[:, 20:] - b[:, 20:]).max() > 1e-3  # the test can see a change where there is one


def test_padded_vocab_logits_are_neg_inf_and_loss_unchanged(make_hf_gpt2):
    hf = make_hf_gpt2(vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
    padded, exact = torch_bridge.from_hf(hf), torch_bridge.from_hf(hf, vocab_size=50257)
    assert (padded.config.vocab_size, exact.config.vocab_size) == (50304, 50257)
    idx = tokens(50257, 2, 32)
    logits_padded, logits_exact = ours(padded, idx), ours(exact, idx)
    assert np.all(np.isneginf(logits_padded[..., 50257:]))
    assert np.all(np.isfinite(logits_padded[..., :50257]))
    np.testing.assert_allclose(logits_padded[..., :50257], logits_exact, atol=1e-6, rtol=0)
    assert abs(lm_loss(logits_padded, idx) - lm_loss(logits_exact, idx)) <= 1e-6


def test_bf16_compute_close_to_fp32(make_hf_gpt2):
    hf = make_hf_gpt2()
    fp32 = torch_bridge.from_hf(hf)
    bf16 = torch_bridge.from_hf(hf, dtype="bfloat16")
    assert bf16.wte.embedding[...].dtype == jnp.float32  # params stay float32; only compute is bfloat16
    idx = tokens(100, 2, 32)
    a, b = ours(fp32, idx)[..., :100], ours(bf16, idx)[..., :100]
    diff, scale = np.abs(a - b).max(), np.abs(a).max()
    print(f"\n[bf16] max |bf16 logits - fp32 logits| = {diff:.3g} (max |fp32 logit| = {scale:.3g})")
    # Measured on CPU: 2.9e-3 with max |logit| 0.53 (2.6e-3 to 3.5e-3, 0.5-0.8% of the logit scale, over HF init
    # seeds 0-4): bfloat16 keeps 8 significant bits (relative step 2^-8 = 0.4%); matmuls accumulate in float32.
    # Tolerance: 1e-2 absolute, about 3x the measured figure.
    assert diff <= 1e-2
    assert diff > 0  # bfloat16 really was used


def test_config_comes_from_hf_and_overrides_change_compute_only(make_hf_gpt2):
    hf = make_hf_gpt2(n_positions=96, layer_norm_epsilon=1e-6)
    config = torch_bridge.from_hf(hf, dtype="bfloat16", scan_layers=True).config
    assert dataclasses.asdict(config) == dataclasses.asdict(GPTConfig(
        vocab_size=128, valid_vocab_size=100, block_size=96, n_layer=2, n_head=4, n_embd=64, layer_norm_epsilon=1e-6,
        dtype="bfloat16", scan_layers=True))


def our_grads(model: GPT, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """Gradients of the LM loss, under HF's parameter names."""
    loss = lambda m: cross_entropy(m(jnp.asarray(idx))[0][:, :-1], jnp.asarray(idx[:, 1:]))  # noqa: E731
    return convert.state_dict(nnx.merge(nnx.graphdef(model), nnx.grad(loss)(model)), HF)


def hf_grads(hf, idx: np.ndarray, autocast: bool = False) -> dict[str, torch.Tensor]:
    hf.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = hf(torch.as_tensor(idx), labels=torch.as_tensor(idx)).loss
    loss.backward()
    return {name: p.grad.clone() for name, p in hf.named_parameters()}


def relative_errors(grads: dict, reference: dict) -> np.ndarray:
    """max |grad - reference| / max |reference| for each parameter."""
    return np.array([((grads[k] - ref).abs().max() / ref.abs().max()).item() for k, ref in reference.items()])


@pytest.mark.gpu
def test_long_sequence_logits_and_gradients_match_hf(make_hf_gpt2):
    """T=300 runs attention in three query blocks (128, 128, 44): logits, loss and every parameter's gradient must
    match HF's eager attention and autograd."""
    hf = make_hf_gpt2(n_positions=320)
    check_parity(hf, B=2, T=300, label="T=300, three attention blocks")
    idx = tokens(hf.config.vocab_size, 2, 300, seed=3)
    worst = relative_errors(our_grads(torch_bridge.from_hf(hf), idx), hf_grads(hf, idx)).max()
    print(f"\n[T=300] worst max |grad - HF grad| / max |HF grad| = {worst:.3g}")
    assert worst <= 1e-4


@pytest.mark.gpu
def test_bf16_gradients_as_accurate_as_torch_autocast(make_hf_gpt2):
    """bfloat16 gradients (half-precision matmuls in the backward pass too) against float32 HF autograd: no worse
    than HF's own gradients under torch.autocast(bfloat16) against the same reference."""
    hf = make_hf_gpt2(n_positions=320)
    idx = tokens(hf.config.vocab_size, 2, 300, seed=3)
    reference = hf_grads(hf, idx)
    ours = relative_errors(our_grads(torch_bridge.from_hf(hf, dtype="bfloat16"), idx), reference)
    theirs = relative_errors(hf_grads(hf, idx, autocast=True), reference)
    print(f"\n[bf16 grads] relative error vs f32 HF, mean / worst over parameters: jaxgpt {ours.mean():.3g} / "
          f"{ours.max():.3g}, torch autocast {theirs.mean():.3g} / {theirs.max():.3g}")
    assert 0 < ours.mean() <= 1.25 * theirs.mean()
    assert ours.max() <= 2 * theirs.max()


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat):
    """Activation checkpointing (with scan over layers, as the large configs use it) recomputes the forward pass,
    through the hand-written attention and matmul backward passes, to the same float32 gradients."""
    idx = tokens(100, 2, 300)
    grads = {policy: our_grads(build(GPTConfig(vocab_size=128, valid_vocab_size=100, n_layer=2, n_head=4, n_embd=64,
                                               block_size=320, scan_layers=True, remat=policy)), idx)
             for policy in ("none", remat)}
    for name, g in grads["none"].items():
        np.testing.assert_allclose(g.numpy(), grads[remat][name].numpy(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the speedrun's blocks against NumPy

SPEEDRUN = dict(qk_norm=True, mlp="relu2", logit_softcap=3.0, value_embeds=1, positions="rope", tie_embeddings=False,
                zero_init_proj=True)
PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def numpy_speedrun_logits(p: dict, c: GPTConfig, idx: np.ndarray) -> np.ndarray:
    """modded-nanogpt's blocks transcribed in float64 on a per-layer jaxgpt parameter tree: per layer, q and k
    RMS-normalised over the head dim (F.rms_norm, eps float32's), v = lambdas[0] v + lambdas[1] ve with this
    layer's table (or none: 0), rotary positions (rotate-half), causal softmax attention (with n_kv_head, HF Llama's
    separate q/k/v projections, each key/value head repeated for its H / K query heads), relu(x)^2 in the MLP;
    LayerNorm (GPT-2's), the untied head, 30 * tanh(logits / 30) with c's cap; padded vocabulary -inf."""
    def norm(x, w):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + c.layer_norm_epsilon)
        return x * w["scale"] + w["bias"]

    def rms(x):
        return x / np.sqrt(np.square(x).mean(-1, keepdims=True) + np.finfo(np.float32).eps)

    def rope(x):  # (B, T, H, D)
        D, T = x.shape[-1], x.shape[1]
        angles = np.arange(T)[:, None] * (1.0 / c.rope_theta ** (np.arange(0, D, 2) / D))  # (T, D/2)
        cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    B, T = idx.shape
    H, D = c.n_head, c.head_dim
    x = p["wte"]["embedding"][idx]
    for i in range(c.n_layer):
        layer, slot = p["h"][i], c.value_slots[i]
        h, attn = norm(x, layer["ln_1"]), layer["attn"]
        if c.n_kv_head:  # separate projections, K key/value heads
            q, k, v = (np.einsum("btc,chd->bthd", h, attn[n]["kernel"]) + attn[n]["bias"] for n in PROJECTIONS)
        else:
            qkv = np.einsum("btc,cshd->btshd", h, attn["c_attn"]["kernel"]) + attn["c_attn"]["bias"]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = rms(q), rms(k)
        ve = p["value_embeds"][slot]["embedding"][idx].reshape(v.shape) if slot < c.value_embeds else 0.0
        lambdas = attn["value_mix"]["lambdas"]
        v = lambdas[0] * v + lambdas[1] * ve
        q, k = rope(q), rope(k)
        k, v = (np.repeat(t, H // t.shape[2], axis=2) for t in (k, v))  # kv head j serves query heads j*H/K...
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D) + np.where(np.tril(np.ones((T, T))), 0, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        y = np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)
        x = x + np.einsum("bthd,hdc->btc", y, layer["attn"]["c_proj"]["kernel"]) + layer["attn"]["c_proj"]["bias"]
        h = norm(x, layer["ln_2"]) @ layer["mlp"]["c_fc"]["kernel"] + layer["mlp"]["c_fc"]["bias"]
        x = x + np.square(np.maximum(h, 0)) @ layer["mlp"]["c_proj"]["kernel"] + layer["mlp"]["c_proj"]["bias"]
    logits = norm(x, p["ln_f"]) @ p["lm_head"].T
    logits = c.logit_softcap * np.tanh(logits / c.logit_softcap)
    return np.where(np.arange(c.vocab_size) < c.n_valid_vocab, logits, -np.inf)


def randomized(config: GPTConfig, seed: int = 1) -> GPT:
    """A model of config with every parameter N(0, 0.3) (zero-initialised projections and head, unit lambdas and
    norm scales would hide mistakes)."""
    model = build(config)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return model


@pytest.mark.parametrize("layers, value_embeds, n_kv_head", [(4, 1, 0), (4, 2, 0), (4, 1, 1)])
def test_speedrun_blocks_match_a_numpy_transcription(layers, value_embeds, n_kv_head):
    """QK-norm, value embeddings (a table in the first and last layers, a zero slot between when there is one),
    ReLU^2, rotary positions, soft-capped logits of an untied head, with GPT-2's fused c_attn or grouped-query
    projections (value tables as wide as the K key/value heads): jaxgpt against NumPy in float64, and the
    scan_layers model (the same weights stacked) against both."""
    config = GPTConfig(vocab_size=128, valid_vocab_size=100, n_layer=layers, n_head=4, n_embd=64, block_size=32,
                       n_kv_head=n_kv_head, **{**SPEEDRUN, "value_embeds": value_embeds})
    assert config.value_slots == ((0, 1, 1, 0) if value_embeds == 1 else (0, 1, 0, 1))
    model = randomized(config)
    idx = tokens(100, 2, 32)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.state(model, nnx.Param).to_pure_dict())
    expected, got = numpy_speedrun_logits(params, config, idx), ours(model, idx)
    diff = np.abs(got[..., :100] - expected[..., :100]).max()
    print(f"\n[speedrun blocks, {layers} layers, value_embeds={value_embeds}, n_kv_head={n_kv_head}] "
          f"max |jaxgpt - NumPy| {diff:.3g}, logits within +-{np.abs(expected[..., :100]).max():.3g} "
          f"of the cap {config.logit_softcap}")
    assert diff <= 1e-4 and np.all(np.isneginf(got[..., 100:]))
    assert np.abs(expected[..., :100]).max() > 0.8 * config.logit_softcap  # the cap bends the largest logits
    scanned = build(dataclasses.replace(config, scan_layers=True))
    stacked = nnx.state(scanned, nnx.Param)
    per_layer = nnx.state(model, nnx.Param).to_pure_dict()
    per_layer["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(per_layer["h"][i] for i in range(layers)))
    stacked.replace_by_pure_dict(per_layer)
    nnx.update(scanned, stacked)
    np.testing.assert_allclose(ours(scanned, idx)[..., :100], got[..., :100], atol=1e-5, rtol=0)


def test_speedrun_init_and_config_errors():
    """zero_init_proj starts both c_proj kernels and the untied head at 0 (the logits at 0: a uniform first
    prediction) and leaves every other parameter as GPT-2's init draws it; bad values are one clear error."""
    config = GPTConfig(vocab_size=128, n_layer=2, n_head=4, n_embd=64, block_size=32, tie_embeddings=False)
    zero = nnx.state(build(dataclasses.replace(config, zero_init_proj=True)), nnx.Param).to_pure_dict()
    plain = nnx.state(build(config), nnx.Param).to_pure_dict()
    from flax.traverse_util import flatten_dict
    zero, plain = flatten_dict(zero), flatten_dict(plain)
    zeroed = {k for k, v in zero.items() if not np.array_equal(v, plain[k])}
    assert zeroed == {(*k, "kernel") for k in [("h", i, m, "c_proj") for i in range(2) for m in ("attn", "mlp")]} | {
        ("lm_head",)}
    assert all(not np.asarray(zero[k]).any() for k in zeroed)
    with pytest.raises(ValueError, match=r"value_embeds=2 between 0 and n_layer / 2 = 1"):
        GPTConfig(n_layer=3, value_embeds=2)
    with pytest.raises(ValueError, match=r"logit_softcap=-1.0 must be >= 0"):
        GPTConfig(logit_softcap=-1.0)
    with pytest.raises(ValueError, match=r"mlp='relu3': expected one of \['gelu', 'swiglu', 'relu2'\]"):
        GPTConfig(mlp="relu3")


def test_speedrun_blocks_keep_the_model_causal():
    """Value embeddings are looked up per token, QK-norm and ReLU^2 act per position: still causal."""
    model = randomized(GPTConfig(vocab_size=128, n_layer=2, n_head=4, n_embd=64, block_size=32, **SPEEDRUN))
    idx = tokens(100, 2, 32)
    changed = idx.copy()
    changed[:, 20:] = tokens(100, 2, 12, seed=1)
    a, b = ours(model, idx), ours(model, changed)
    np.testing.assert_array_equal(a[:, :20], b[:, :20])
    assert np.abs(a[:, 20:] - b[:, 20:]).max() > 1e-3


LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_head=1, bias=False, tie_embeddings=False)


@pytest.mark.parametrize("blocks, expected", [
    ({}, ["wte.embedding", "wpe.embedding", "h.{i}.ln_1.scale", "h.{i}.ln_1.bias", "h.{i}.attn.c_attn.kernel",
          "h.{i}.attn.c_attn.bias", "h.{i}.attn.c_proj.kernel", "h.{i}.attn.c_proj.bias", "h.{i}.ln_2.scale",
          "h.{i}.ln_2.bias", "h.{i}.mlp.c_fc.kernel", "h.{i}.mlp.c_fc.bias", "h.{i}.mlp.c_proj.kernel",
          "h.{i}.mlp.c_proj.bias", "ln_f.scale", "ln_f.bias"]),
    (LLAMA, ["wte.embedding", "h.{i}.ln_1.scale", "h.{i}.attn.q_proj.kernel", "h.{i}.attn.k_proj.kernel",
             "h.{i}.attn.v_proj.kernel", "h.{i}.attn.c_proj.kernel", "h.{i}.ln_2.scale", "h.{i}.mlp.c_gate.kernel",
             "h.{i}.mlp.c_fc.kernel", "h.{i}.mlp.c_proj.kernel", "ln_f.scale", "lm_head"]),
    ({**SPEEDRUN, "norm": "rmsnorm", "bias": False},
     ["wte.embedding", "h.{i}.ln_1.scale", "h.{i}.attn.c_attn.kernel", "h.{i}.attn.c_proj.kernel",
      "h.{i}.attn.value_mix.lambdas", "h.{i}.ln_2.scale", "h.{i}.mlp.c_fc.kernel", "h.{i}.mlp.c_proj.kernel",
      "ln_f.scale", "lm_head", "value_embeds.0.embedding"]),
], ids=["gpt2", "llama", "speedrun"])
def test_parameter_paths_are_the_documented_names(blocks, expected):
    """The parameter tree names what the module docstring and torch_bridge's tables promise (HF GPT2LMHeadModel's
    names, Llama's projections, the speedrun's value_mix and value_embeds): saved checkpoints depend on them. Under
    scan_layers the same names hold one stacked 'h' entry."""
    config = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16, **blocks)
    for scan_layers in (False, True):
        state = nnx.state(build(dataclasses.replace(config, scan_layers=scan_layers)), nnx.Param)
        paths = sorted(".".join(map(str, path)) for path, _ in state.flat_state())
        layers = [""] if scan_layers else ["0.", "1."]
        want = sorted({name.replace("h.{i}.", f"h.{i}") for name in expected for i in layers})
        assert paths == want, scan_layers


@pytest.mark.parametrize("blocks", [{}, LLAMA, SPEEDRUN], ids=["gpt2", "llama", "speedrun"])
def test_two_models_of_one_config_have_equal_graphdefs(blocks):
    """jitted programs are cached by graphdef (jaxgpt/engine.py, step.py): every part a switch picks must be a value
    that compares equal across builds, not an object equal only to itself (a bound method)."""
    config = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16, **blocks)
    assert nnx.graphdef(build(config, seed=0)) == nnx.graphdef(build(config, seed=1))
