"""Generation against Hugging Face's GPT2LMHeadModel.generate, the KV cache against a full forward, sampling sets."""
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_bridge
from jaxgpt import checkpoint, generate
from jaxgpt.model import GPTConfig, build

EOT = 50256
PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198], [15496, 11, 995]]  # 11 and 3 tokens


@pytest.fixture(scope="module")
def hf_model(make_hf_gpt2):
    # GPT-2's vocabulary (the bridge pads it to 50304 rows); a wide init makes greedy choices far from ties
    return make_hf_gpt2(vocab_size=50257, bos_token_id=EOT, eos_token_id=EOT, initializer_range=0.3)


@pytest.fixture(scope="module")
def model(hf_model):
    return torch_bridge.from_hf(hf_model)


def hf_greedy(hf_model, prompt, max_new_tokens=64):
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=EOT)
    return generate._until_eot(out[0, len(prompt):].tolist(), EOT)


@pytest.mark.gpu
def test_greedy_matches_hf_alone_and_batched(hf_model, model):
    assert model.config.vocab_size > model.config.n_valid_vocab  # padded vocab rows are in play
    expected = [hf_greedy(hf_model, p) for p in PROMPTS]
    assert all(len(e) > 8 for e in expected)
    for prompt, want in zip(PROMPTS, expected):
        assert generate.generate(model, [prompt], max_new_tokens=64, temperature=0, eot_id=EOT) == [want]
    for loop in ("python", "device"):
        got = generate.generate(model, PROMPTS, max_new_tokens=64, temperature=0, eot_id=EOT, loop=loop)
        assert got == expected, loop


def test_scan_layers_model_generates_the_same(hf_model, model):
    scanned = torch_bridge.from_hf(hf_model, scan_layers=True)
    assert scanned.config.scan_layers
    want = generate.generate(model, PROMPTS, max_new_tokens=32, temperature=0)
    for loop in ("python", "device"):
        assert generate.generate(scanned, PROMPTS, max_new_tokens=32, temperature=0, loop=loop) == want


@pytest.mark.gpu
@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_logits_equal_full_forward(hf_model, scan_layers):
    check_cached_logits(torch_bridge.from_hf(hf_model, scan_layers=scan_layers), PROMPTS)


SPEEDRUN = dict(qk_norm=True, mlp="relu2", logit_softcap=3.0, value_embeds=1, positions="rope", tie_embeddings=False)


def speedrun_model(scan_layers: bool, n_kv_head: int = 0):
    """A model in the speedrun's blocks with every parameter N(0, 0.3): lambdas and norms away from 1, greedy
    choices away from ties."""
    model = build(GPTConfig(vocab_size=128, valid_vocab_size=100, n_layer=2, n_head=4, n_embd=64, block_size=64,
                            scan_layers=scan_layers, n_kv_head=n_kv_head, **SPEEDRUN))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return model


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("n_kv_head", [0, 2])
def test_speedrun_blocks_cached_logits_equal_full_forward(scan_layers, n_kv_head):
    """QK-norm before the cache, mixed values in it, each new token's value embedding at decode; with GPT-2's
    c_attn or grouped-query projections (a cache of 2 key/value heads for 4 query heads)."""
    check_cached_logits(speedrun_model(scan_layers, n_kv_head), [[5, 17, 42, 8, 99, 3, 61, 23, 70, 12, 1], [88, 4, 31]])


def check_cached_logits(model, prompts):
    forward = nnx.jit(lambda model, ids, cache, positions: model(ids, cache=cache, positions=positions))
    rng = np.random.default_rng(0)
    extra = rng.integers(0, model.config.n_valid_vocab, size=(2, 6)).astype(np.int32)  # fed one at a time after
    ids, start = generate.left_pad(prompts, 16)
    cache = generate.init_cache(model.config, jnp.asarray(start), 32)
    positions = np.maximum(np.arange(16)[None] - start[:, None], 0)
    prefill_logits, cache = forward(model, jnp.asarray(ids), cache, jnp.asarray(positions))
    step_logits = []
    for i in range(extra.shape[1]):
        logits, cache = forward(model, jnp.asarray(extra[:, i:i + 1]), cache, jnp.asarray(16 + i - start[:, None]))
        step_logits.append(np.asarray(logits[:, 0]))
    valid = model.config.n_valid_vocab
    for row, prompt in enumerate(prompts):
        full, _ = forward(model, jnp.asarray([prompt + extra[row].tolist()]), None, None)  # no cache, no padding
        full = np.asarray(full[0, :, :valid])
        np.testing.assert_allclose(np.asarray(prefill_logits[row, start[row]:, :valid]), full[:len(prompt)],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.stack(step_logits)[:, row, :valid], full[len(prompt):], rtol=1e-5, atol=1e-5)


def test_stops_per_row_at_end_of_text(model):
    free = generate.generate(model, PROMPTS, max_new_tokens=24, temperature=0)
    stop = free[0][5]  # make row 0's sixth token the end-of-text token
    for loop in ("python", "device"):
        got = generate.generate(model, PROMPTS, max_new_tokens=24, temperature=0, eot_id=stop, loop=loop)
        assert got == [generate._until_eot(row, stop) for row in free], loop
    assert len(got[0]) <= 5 and len(got[1]) == len(generate._until_eot(free[1], stop))


def sampler_sets(logits, temperature, top_k, top_p):
    """Reference allowed sets per row, from numpy: temperature, then top-k, then the smallest top-p prefix."""
    sets = []
    for row in np.asarray(logits, np.float64) / temperature:
        order = np.argsort(-row)
        if top_k is not None:
            order = order[:top_k]
        p = np.exp(row[order] - row[order].max())
        p /= p.sum()
        n = len(order) if top_p is None else int(np.searchsorted(np.cumsum(p), top_p) + 1)
        sets.append(set(order[:n].tolist()))
    return sets


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.6), (1.5, 40, 0.9),
                                                     (1.0, None, 0.3)])
def test_top_k_top_p_only_sample_inside_their_sets(temperature, top_k, top_p):
    logits = 1.5 * jax.random.normal(jax.random.key(1), (3, 300))
    logits = logits.at[:, 250:].set(-jnp.inf)  # padded vocabulary rows
    sampler = generate.Sampler(temperature, top_k, top_p)
    keys = jax.random.split(jax.random.key(2), 3000)
    draws = np.asarray(jax.vmap(lambda k: sampler(logits, k))(keys))  # (draws, rows)
    kept = np.isfinite(np.asarray(sampler.filter(logits)))  # (rows, 300)
    for row, allowed in enumerate(sampler_sets(logits[:, :250], temperature, top_k, top_p)):
        assert set(np.flatnonzero(kept[row]).tolist()) == allowed
        seen = set(draws[:, row].tolist())
        assert seen <= allowed, (row, sorted(seen - allowed))
        assert len(seen) >= min(len(allowed), 3) and len(allowed) > 1  # the draws explore the set


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.6), (1.5, 40, 0.9),
                                                     (1.0, None, 0.3), (0.5, 20, 0.95)])
def test_filtering_equals_hf_logits_processors_and_draws_follow_the_softmax(temperature, top_k, top_p):
    """Sampler.filter against transformers' temperature, top-k and top-p warpers (in that order, as generate
    applies them) on the same logits; then 20,000 draws of one row against the filtered softmax (chi-square)."""
    from scipy import stats
    from transformers.generation import logits_process as lp

    logits = 1.5 * jax.random.normal(jax.random.key(1), (3, 300))
    warpers = [lp.TemperatureLogitsWarper(temperature)]
    warpers += [lp.TopKLogitsWarper(top_k)] if top_k is not None else []
    warpers += [lp.TopPLogitsWarper(top_p)] if top_p is not None else []
    theirs = torch.tensor(np.asarray(logits))
    for warp in warpers:
        theirs = warp(None, theirs)
    sampler = generate.Sampler(temperature, top_k, top_p)
    ours = np.asarray(sampler.filter(logits))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs.numpy()))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs.numpy()[np.isfinite(ours)], rtol=1e-6, atol=1e-6)

    n = 20_000
    draws = np.asarray(jax.vmap(lambda k: sampler(logits[:1], k))(jax.random.split(jax.random.key(3), n)))[:, 0]
    kept = np.flatnonzero(np.isfinite(ours[0]))
    probs = np.exp(ours[0, kept].astype(np.float64) - ours[0, kept].max())
    observed = np.array([(draws == t).sum() for t in kept])
    assert observed.sum() == n  # nothing outside the kept set
    statistic, p_value = stats.chisquare(observed, n * probs / probs.sum())
    print(f"\n[T={temperature}, k={top_k}, p={top_p}] {len(kept)} tokens kept, chi-square p = {p_value:.3g}")
    assert len(kept) == 1 or p_value > 1e-3


def test_one_filter_takes_each_rows_own_settings():
    """filter_logits with settings per row (the serving engine's form) filters each row as Sampler.filter does
    with that row's settings alone."""
    logits = 1.5 * jax.random.normal(jax.random.key(1), (4, 300))
    rows = [(1.0, 5, 1.0), (0.7, 0, 0.6), (1.5, 40, 0.9), (1.0, 0, 1.0)]  # top-k, top-p, both, neither
    temperature, top_k, top_p = (np.array(x, dtype) for x, dtype in zip(zip(*rows), (np.float32, np.int32,
                                                                                      np.float32)))
    mode, k_max = generate.filter_mode(temperature, top_k, top_p, logits.shape[-1])
    together = np.asarray(generate.filter_logits(logits, temperature, top_k, top_p, mode=mode, k_max=k_max))
    for i, (t, k, p) in enumerate(rows):
        alone = np.asarray(generate.Sampler(t, k or None, p if p < 1 else None).filter(logits[i:i + 1]))[0]
        np.testing.assert_array_equal(np.isfinite(together[i]), np.isfinite(alone))
        np.testing.assert_allclose(together[i], alone, rtol=1e-6)


def test_seed_reproducible_and_padded_vocab_never_sampled():
    config = GPTConfig(vocab_size=128, valid_vocab_size=100, block_size=128, n_layer=2, n_head=2, n_embd=32)
    model = build(config, seed=3)
    prompts, kwargs = [[4, 8, 15, 16, 23, 42], [99]], dict(max_new_tokens=100, temperature=3.0)  # flat sampling
    a = generate.generate(model, prompts, seed=7, **kwargs)
    assert a == generate.generate(model, prompts, seed=7, **kwargs)
    assert a == generate.generate(model, prompts, seed=7, loop="python", **kwargs)
    assert a != generate.generate(model, prompts, seed=8, **kwargs)
    tokens = np.array(a)
    assert tokens.max() < 100 and len(set(tokens.ravel().tolist())) > 60


def compilations(caplog, run) -> list[str]:
    """The jitted functions that XLA compiled while `run()` ran, from jax's own compile log."""
    caplog.clear()
    jax.config.update("jax_log_compiles", True)  # globally: a `with jax.log_compiles()` is this thread's only
    try:
        with caplog.at_level("WARNING"):
            run()
    finally:
        jax.config.update("jax_log_compiles", False)
    return [r.getMessage().split()[4] for r in caplog.records
            if r.getMessage().startswith("Finished XLA compilation of jit(")]


def test_no_recompilation_per_token_or_prompt_length(model, caplog):
    def sample(prompt, n, seed):
        return lambda: generate.generate(model, [prompt], max_new_tokens=n, temperature=0.8, top_k=50, seed=seed,
                                         loop="python")
    first = compilations(caplog, sample([1, 2, 3], 20, 0))
    assert first.count("jit(run_step)") == 1  # 19 steps, one compilation
    # prompt lengths 9 and 13 share bucket 16; 20 + 16 and 40 + 16 new tokens share a 64-slot cache
    for prompt, n in (([5] * 9, 40), ([6] * 13, 20), ([7, 8] * 5, 33)):
        later = compilations(caplog, sample(prompt, n, 1))
        assert not {"jit(run_prefill)", "jit(run_step)"} & set(later), later


def test_generation_past_block_size_continues_in_windows(model):
    block, prompt = model.config.block_size, PROMPTS[0]
    out = generate.generate(model, [prompt, PROMPTS[1]], max_new_tokens=200, temperature=0)  # no eot: all 200
    assert [len(o) for o in out] == [200, 200]
    first = block - len(prompt)  # the first window: the prompt and as many tokens as fit in a block
    assert out[0][:first] == generate.generate(model, [prompt], max_new_tokens=first, temperature=0)[0]
    context = (prompt + out[0][:first])[-(block // 2):]  # the next one re-reads the last half block
    second = block - len(context)
    assert out[0][first:first + second] == generate.generate(model, [context], max_new_tokens=second,
                                                             temperature=0)[0]


def test_rejects_bad_requests(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate.generate(model, [[50300]], max_new_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        generate.generate(model, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        generate.generate(model, [[1]], max_new_tokens=4, top_p=1.5)


def test_sample_cli_interactive(tmp_path, model):
    model_dir = checkpoint.save_model(model, str(tmp_path / "model"))
    cmd = [sys.executable, "-m", "jaxgpt.sample", f"--ckpt={model_dir}", "--interactive", "--max_new_tokens=12",
           "--temperature=0", "--num_samples=2"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    done = subprocess.run(cmd, input="The quick brown fox\nHello\nexit\nnever read\n", capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    from jaxgpt.tokenizer import get_tokenizer
    tok = get_tokenizer("gpt2")
    for prompt in ("The quick brown fox", "Hello"):
        continuation = tok.decode(generate.generate(model, [tok.encode(prompt)], max_new_tokens=12, temperature=0,
                                                    eot_id=EOT)[0])
        assert done.stdout.count(prompt + continuation + "\n") == 2  # greedy: both samples are the same
    assert "never read" not in done.stdout and done.stdout.count("prompt> ") == 3


def test_sample_helpers(tmp_path, hf_model, model):
    from jaxgpt import sample
    from jaxgpt.tokenizer import get_tokenizer
    (tmp_path / "prompt.txt").write_text("Once upon a time\n", encoding="utf-8")
    assert sample.read_prompt(f"FILE:{tmp_path / 'prompt.txt'}") == "Once upon a time\n"
    assert sample.read_prompt("plain text") == "plain text"
    tok = get_tokenizer("gpt2")
    assert sample.encode_prompt(tok, "") == [EOT]
    ids = tok.encode("naïve 🦙 鼹鼠 done")
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some characters span several tokens
    out = io.StringIO()
    stream = sample.TextStream(tok, out)
    for t in ids:
        stream(0, t)
        assert "\ufffd" not in out.getvalue()
    assert out.getvalue() == "naïve 🦙 鼹鼠 done"
    hf_dir = torch_bridge.save_hf(model, str(tmp_path / "hf"))
    from_hf_dir = sample.load_model(None, hf_dir)
    assert generate.generate(from_hf_dir, PROMPTS, max_new_tokens=8, temperature=0) == generate.generate(
        model, PROMPTS, max_new_tokens=8, temperature=0)
