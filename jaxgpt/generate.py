"""Autoregressive generation with a preallocated KV cache: prefill the left-padded prompts, then decode one token
per step, in shapes that nothing recompiles for per token or per prompt length (docs/architecture.md). Two loops
share one step: 'python' streams tokens to a callback, 'device' runs them all in a lax.while_loop in one jit."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxgpt.errors import UserValueError
from jaxgpt.model import GPT, GPTConfig

CACHE_MULTIPLE = 64  # cache lengths are rounded up to a multiple of this
MIN_PROMPT_BUCKET = 16
TOP_K_MULTIPLE = 64  # top-k filters take lax.top_k of a multiple of this many candidates: few shapes compile


def cache_attention(q, keys, values, mask):
    """q (B, T, n_head, head_dim) against cached keys and values (B, n_kv_head, S, head_dim) where mask (B, T, S)
    holds, in float32 -> (B, T, n_head, head_dim). Caches keep heads before positions, so that these einsums read
    contiguous rows (dot_product_attention over a (B, S, heads, ...) cache transposes it at every step on XLA-CPU)."""
    B, T, H, D = q.shape
    K = keys.shape[1]
    q = q.reshape(B, T, K, H // K, D).astype(jnp.float32) * D ** -0.5  # each kv head serves H // K query heads
    scores = jnp.einsum("btkgd,bksd->bkgts", q, keys.astype(jnp.float32))
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    y = jnp.einsum("bkgts,bksd->btkgd", jax.nn.softmax(scores, axis=-1), values.astype(jnp.float32))
    return y.reshape(B, T, H, D).astype(values.dtype)


@struct.dataclass
class KVCache:
    """One layer's keys and values (B, n_kv_head, max_len, head_dim), filled left to right.

    index: the next slot to write (all rows advance together). start (B,): each row's first real slot; slots
    before it hold left padding and are never attended to.
    """
    k: jax.Array
    v: jax.Array
    index: jax.Array
    start: jax.Array

    @classmethod
    def create(cls, config: GPTConfig, start: jax.Array, max_len: int) -> KVCache:
        shape = (start.shape[0], config.n_kv_head or config.n_head, max_len, config.head_dim)
        zeros = jnp.zeros(shape, config.dtype)
        return cls(zeros, zeros, jnp.zeros((), jnp.int32), start.astype(jnp.int32))

    def attend(self, q, k, v, ops):
        """Writes k and v (B, T, n_kv_head, head_dim) at `index` and attends q (B, T, n_head, head_dim) to every
        filled, unpadded slot."""
        del ops  # cache_attention is the cached form
        T, max_len = q.shape[1], self.k.shape[2]
        keys = jax.lax.dynamic_update_slice(self.k, k.swapaxes(1, 2).astype(self.k.dtype), (0, 0, self.index, 0))
        values = jax.lax.dynamic_update_slice(self.v, v.swapaxes(1, 2).astype(self.v.dtype), (0, 0, self.index, 0))
        query_slot = (self.index + jnp.arange(T))[None, :, None]  # (1, T, 1)
        key_slot = jnp.arange(max_len)[None, None, :]  # (1, 1, max_len)
        real_key = key_slot >= self.start[:, None, None]  # (B, 1, max_len)
        # A pad query attends to itself only, which keeps its softmax finite; real queries never see pad keys.
        mask = (key_slot <= query_slot) & real_key | (key_slot == query_slot)  # (B, T, max_len)
        y = cache_attention(q, keys, values, mask)
        return y, self.replace(k=keys, v=values, index=self.index + T)


def init_cache(config: GPTConfig, start: jax.Array, max_len: int):
    """The per-layer cache GPT.__call__ expects: a list for a plain model, one stacked pytree for scan_layers."""
    layer = KVCache.create(config, start, max_len)
    if config.scan_layers:
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (config.n_layer, *x.shape)), layer)  # (n_layer, ...)
    return [layer] * config.n_layer


def filter_mode(temperature, top_k, top_p, vocab_size: int) -> tuple[str, int]:
    """The cheapest form of filter_logits that serves every sampled row (settings as scalars or numpy arrays, on
    the host, so that each form compiles apart): greedy (no row samples), plain (no filter), top_k (top-k only,
    among lax.top_k's k_max candidates) or sort (top-p: a full sort)."""
    temperature, top_k, top_p = (np.atleast_1d(np.asarray(x)) for x in (temperature, top_k, top_p))
    sampled = temperature > 0
    if not sampled.any():
        return "greedy", 0
    if (top_p[sampled] < 1).any():
        return "sort", 0
    if (top_k[sampled] > 0).any():
        return "top_k", min(vocab_size, -(-int(top_k.max()) // TOP_K_MULTIPLE) * TOP_K_MULTIPLE)
    return "plain", 0


def filter_logits(logits, temperature, top_k, top_p, *, mode: str, k_max: int = 0):
    """Temperature, then top-k (0: off), then top-p (1: off), HF's order, on logits (B, V) -> float32 (B, V) where
    the tokens left out (and padded vocab rows, already -inf) are -inf. Settings are scalars or one per row (B,);
    a row of temperature 0 is left unscaled (its caller takes the argmax). mode, k_max: from filter_mode."""
    B = logits.shape[0]
    column = lambda x: jnp.broadcast_to(jnp.reshape(jnp.asarray(x), (-1, 1)), (B, 1))
    temperature, top_k, top_p = column(temperature), column(top_k), column(top_p)
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    threshold = jnp.full((B, 1), -jnp.inf)
    if mode == "top_k":
        candidates = jax.lax.top_k(scaled, k_max)[0]  # (B, k_max) descending
        kth = jnp.take_along_axis(candidates, jnp.clip(top_k - 1, 0, k_max - 1), axis=-1)
        threshold = jnp.where(top_k > 0, kth, threshold)
    elif mode == "sort":
        descending = -jnp.sort(-scaled, axis=-1)  # (B, V)
        kth = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, scaled.shape[-1] - 1), axis=-1)
        kth = jnp.where(top_k > 0, kth, threshold)
        descending = jnp.where(descending >= kth, descending, -jnp.inf)
        probs = jax.nn.softmax(descending, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: every token whose predecessors hold less.
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        cutoff = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
        threshold = jnp.maximum(kth, cutoff)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How to pick a token from logits. temperature 0 is greedy; top_k/top_p of None keep every token."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise UserValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise UserValueError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserValueError(f"top_p={self.top_p} must be in (0, 1]")

    def filter(self, logits):
        """filter_logits with this sampler's settings, on logits (B, V)."""
        top_k, top_p = self.top_k or 0, 1.0 if self.top_p is None else self.top_p
        mode, k_max = filter_mode(self.temperature, top_k, top_p, logits.shape[-1])
        return filter_logits(logits, self.temperature, top_k, top_p, mode="plain" if mode == "greedy" else mode,
                             k_max=k_max)

    def __call__(self, logits, key):
        """logits (B, V) -> tokens (B,) int32."""
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, self.filter(logits), axis=-1).astype(jnp.int32)


@struct.dataclass
class Carry:
    """Decode state besides the cache: the last token of each row, which rows hit end-of-text, step counters."""
    token: jax.Array  # (B,) int32
    done: jax.Array  # (B,) bool
    length: jax.Array  # () slots filled in the cache
    step: jax.Array  # () tokens sampled so far
    start: jax.Array  # (B,) first real slot per row
    key: jax.Array
    eot_id: jax.Array  # () -1 when generation never stops early


def _prefill(model: GPT, ids, start, key, eot_id, sampler: Sampler, max_len: int):
    """ids (B, P) left-padded prompts -> (cache, carry holding the first sampled token)."""
    P = ids.shape[1]
    positions = jnp.maximum(jnp.arange(P)[None] - start[:, None], 0)  # (B, P): 0 at each row's first real token
    logits, cache = model(ids, cache=init_cache(model.config, start, max_len), positions=positions)
    token = sampler(logits[:, -1], jax.random.fold_in(key, 0))
    carry = Carry(token, token == eot_id, jnp.int32(P), jnp.int32(1), start, key, eot_id)
    return cache, carry


def _decode(model: GPT, cache, carry: Carry, sampler: Sampler):
    """Feeds each row's last token and samples the next; rows already done keep emitting end-of-text."""
    positions = (carry.length - carry.start)[:, None]  # (B, 1)
    logits, cache = model(carry.token[:, None], cache=cache, positions=positions)
    token = sampler(logits[:, 0], jax.random.fold_in(carry.key, carry.step))
    token = jnp.where(carry.done, carry.eot_id, token)
    done = carry.done | (token == carry.eot_id)
    return cache, carry.replace(token=token, done=done, length=carry.length + 1, step=carry.step + 1)


def prefill(graphdef, params, ids, start, key, eot_id, *, sampler: Sampler, max_len: int):
    return _prefill(nnx.merge(graphdef, params), ids, start, key, eot_id, sampler, max_len)


def decode_step(graphdef, params, cache, carry: Carry, *, sampler: Sampler):
    return _decode(nnx.merge(graphdef, params), cache, carry, sampler)


def generate_on_device(graphdef, params, ids, start, key, eot_id, max_new_tokens, *, sampler: Sampler,
                       max_len: int):
    """Prefill and the whole decode loop in one program: tokens (B, max_len - P), eot_id after a row stops."""
    cache, carry = _prefill(nnx.merge(graphdef, params), ids, start, key, eot_id, sampler, max_len)
    out = jnp.full((ids.shape[0], max_len - ids.shape[1]), eot_id, jnp.int32).at[:, 0].set(carry.token)

    def running(state):
        carry = state[2]
        return (carry.step < max_new_tokens) & ~jnp.all(carry.done)

    def step(state):  # params ride in the loop state: NNX refuses modules built from an enclosing trace's values
        params, cache, carry, out = state
        cache, carry = _decode(nnx.merge(graphdef, params), cache, carry, sampler)
        return params, cache, carry, out.at[:, carry.step - 1].set(carry.token)
    return jax.lax.while_loop(running, step, (params, cache, carry, out))[3]


@functools.lru_cache(maxsize=16)
def programs(graphdef, treedef):
    """prefill, decode_step and generate_on_device jitted once per model structure, which they have bound; the
    weights go in as a list of arrays. Hashing a static graphdef, or flattening an nnx.State, at every call
    would cost milliseconds per token."""
    weights = lambda leaves: jax.tree.unflatten(treedef, leaves)

    def run_prefill(leaves, ids, start, key, eot_id, *, sampler, max_len):
        return prefill(graphdef, weights(leaves), ids, start, key, eot_id, sampler=sampler, max_len=max_len)

    def run_step(leaves, cache, carry, *, sampler):
        return decode_step(graphdef, weights(leaves), cache, carry, sampler=sampler)

    def run_all(leaves, ids, start, key, eot_id, max_new_tokens, *, sampler, max_len):
        return generate_on_device(graphdef, weights(leaves), ids, start, key, eot_id, max_new_tokens,
                                  sampler=sampler, max_len=max_len)
    return (jax.jit(run_prefill, static_argnames=("sampler", "max_len")),
            jax.jit(run_step, static_argnames=("sampler",), donate_argnames=("cache",)),
            jax.jit(run_all, static_argnames=("sampler", "max_len")))


def next_power_of_two(n: int, minimum: int = 1) -> int:
    """The least power of two >= n and >= minimum: the shapes batches and lengths are rounded up to."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def prompt_bucket(length: int) -> int:
    return next_power_of_two(length, MIN_PROMPT_BUCKET)


def cache_length(prompt_len: int, max_new_tokens: int) -> int:
    return -(-(prompt_len + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE


def left_pad(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """-> ids (B, length) with each prompt flush right (pad token 0), start (B,) its first real slot."""
    ids = np.zeros((len(prompts), length), np.int32)
    start = np.array([length - len(p) for p in prompts], np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, start[row]:] = prompt
    return ids, start


def generate(model: GPT, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eot_id: int | None = None,
             on_token: Callable[[int, int], None] | None = None, loop: str | None = None) -> list[list[int]]:
    """Continues each prompt (a list of token ids) by up to `max_new_tokens` tokens; returns the new tokens only.

    temperature 0 is greedy. A row stops after sampling `eot_id` (which is not returned). `on_token(row, token)`
    is called for every new token as soon as it is produced. loop: 'python' (a jitted step per token; the default
    with on_token) or 'device' (one lax.while_loop; the default without). The same seed gives the same tokens.

    Prompt + new tokens beyond block_size continue in windows, as nanoGPT crops its context: each later window
    re-reads the last block_size // 2 tokens of every unfinished row and adds up to block_size minus that many.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserValueError("every prompt needs at least one token (start from end-of-text for unconditional samples)")
    if max_new_tokens < 1:
        raise UserValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    block = model.config.block_size
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, eot_id=eot_id, loop=loop)
    outputs, rows = [[] for _ in prompts], list(range(len(prompts)))  # rows: the unfinished ones
    contexts = [p[-block:] if len(p) >= block else p for p in prompts]
    window = 0
    while rows:
        remaining = max_new_tokens - len(outputs[rows[0]])
        if window:
            contexts = [(prompts[r] + outputs[r])[-(block // 2):] for r in rows]
        n_new = min(remaining, block - max(len(c) for c in contexts))
        if n_new < 1:  # a prompt of a whole block: drop its oldest half to make room
            contexts = [c[-(block // 2):] for c in contexts]
            n_new = min(remaining, block - max(len(c) for c in contexts))
        emit = None if on_token is None else (lambda i, t, rows=rows: on_token(rows[i], t))
        new = _generate_window(model, contexts, max_new_tokens=n_new, seed=seed + window, on_token=emit,
                               **sampling)
        for r, tokens in zip(rows, new):
            outputs[r].extend(tokens)
        rows = [r for r, tokens in zip(rows, new) if len(tokens) == n_new and len(outputs[r]) < max_new_tokens]
        window += 1
    return outputs


def _generate_window(model: GPT, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                     top_k: int | None, top_p: float | None, seed: int, eot_id: int | None,
                     on_token: Callable[[int, int], None] | None, loop: str | None) -> list[list[int]]:
    """generate() within one block: prompt + max_new_tokens <= block_size."""
    sampler = Sampler(temperature, top_k, top_p)
    config = model.config
    longest = max(len(p) for p in prompts)
    if bad := [t for p in prompts for t in p if not 0 <= t < config.n_valid_vocab]:
        raise UserValueError(f"prompt token {bad[0]} is outside the vocabulary [0, {config.n_valid_vocab})")
    loop = loop or ("python" if on_token else "device")
    if loop not in ("python", "device"):
        raise UserValueError(f"loop={loop!r}: expected 'python' or 'device'")

    P = min(prompt_bucket(longest), config.block_size)  # a bucket past the context (block_size 96, say) cannot run
    max_len = cache_length(P, max_new_tokens)
    ids, start = left_pad(prompts, P)
    graphdef, state = nnx.split(model)
    params, treedef = jax.tree.flatten(state)
    run_prefill, run_step, run_all = programs(graphdef, treedef)
    key, eot = jax.random.key(seed), jnp.int32(-1 if eot_id is None else eot_id)
    if loop == "device":
        tokens = np.asarray(run_all(params, ids, start, key, eot, jnp.int32(max_new_tokens),
                                    sampler=sampler, max_len=max_len))[:, :max_new_tokens]
        return [_until_eot(row, eot_id) for row in tokens.tolist()]

    outputs: list[list[int]] = [[] for _ in prompts]
    running = [True] * len(prompts)
    cache, carry = run_prefill(params, ids, start, key, eot, sampler=sampler, max_len=max_len)
    for step in range(max_new_tokens):
        token = carry.token
        if step + 1 < max_new_tokens:  # dispatch the next step before reading this one: the two overlap
            cache, carry = run_step(params, cache, carry, sampler=sampler)
        for row, t in enumerate(np.asarray(token).tolist()):
            if running[row] and t == eot_id:
                running[row] = False
            elif running[row]:
                outputs[row].append(t)
                if on_token:
                    on_token(row, t)
        if not any(running):
            break
    return outputs


def _until_eot(tokens: list[int], eot_id: int | None) -> list[int]:
    return tokens[:tokens.index(eot_id)] if eot_id in tokens else tokens
