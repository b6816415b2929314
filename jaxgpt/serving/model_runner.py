"""The serving engine's device side: the KV caches of max_batch rows and the jitted prefill, decode step and row
copies. A call computes only its first b rows and reads only the first L cache slots, b and L rounded up to powers
of two, so its cost follows the load and only a few shapes ever compile. Each row samples with its own
temperature, top-k, top-p and key; with temperature 0 it is greedy and its tokens are jaxgpt.generate's."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxgpt import generate
from jaxgpt.errors import UserValueError
from jaxgpt.generate import next_power_of_two
from jaxgpt.model import GPT
from jaxgpt.serving.request import Sampling, Sequence
from jaxgpt.serving.scheduler import Batch, RowMoves

MIN_LENGTH = 64  # the shortest cache view a call reads
MIN_PROMPT = 16  # the shortest padded prefill


@struct.dataclass
class PrefillCache:
    """A layer's cache while right-padded prompts (B, P) run from position 0: causal attention among them, so a
    real token never sees the padding after it; keeps the keys and values for the slots."""
    k: jax.Array | None = None
    v: jax.Array | None = None

    def attend(self, q, k, v, ops):
        return ops.causal_attention_gqa(q, k, v), self.replace(k=k, v=v)


@struct.dataclass
class SlotCache:
    """A layer's keys and values for every row, (S, n_kv_head, max_len, head_dim) as generate.KVCache's. A step
    runs rows [0, rows): each writes its one new token at its own position pos (rows,) and attends to slots
    [0, pos] of the first `length` (every pos < length)."""
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    rows: int = struct.field(pytree_node=False)
    length: int = struct.field(pytree_node=False)

    def attend(self, q, k, v, ops):
        del ops  # generate.cache_attention is the cached form
        b, L = self.rows, self.length
        row = jnp.arange(b)
        keys = self.k.at[row, :, self.pos].set(k[:, 0].astype(self.k.dtype))  # (b, K, D) into (S, K, max_len, D)
        values = self.v.at[row, :, self.pos].set(v[:, 0].astype(self.v.dtype))
        mask = jnp.arange(L)[None, None, :] <= self.pos[:, None, None]  # (b, 1, L)
        y = generate.cache_attention(q, keys[:b, :, :L], values[:b, :, :L], mask)
        return y, self.replace(k=keys, v=values)


def sample_rows(logits, temperature, top_k, top_p, keys, *, mode: str, k_max: int):
    """Each row's next token from float32 logits (b, V): greedy where temperature is 0, else generate.filter_logits
    with the row's settings, then a draw with the row's own key. mode, k_max: generate.filter_mode's."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    filtered = generate.filter_logits(logits, temperature, top_k, top_p, mode=mode, k_max=k_max)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def _merge(model_def, leaves) -> GPT:
    graphdef, treedef = model_def
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _row_keys(key_data, token_number):
    """The key of each row's next token: its own sequence's key folded with the token's number in the sequence."""
    return jax.vmap(lambda k, n: jax.random.fold_in(jax.random.wrap_key_data(k), n))(key_data, token_number)


def _prefill(model_def, params, ks, vs, ids, lengths, rows, temperature, top_k, top_p, key_data, token_number, *, mode,
             k_max):
    """ids (n, P) right-padded prompts of `lengths` into cache rows `rows` (an index past the cache: a padding row,
    dropped) -> (ks, vs, each row's next token)."""
    model = _merge(model_def, params)
    n, P = ids.shape
    x, caches = model.hidden(ids, cache=[PrefillCache()] * len(ks), positions=jnp.arange(P)[None])
    last = x[jnp.arange(n), lengths - 1]  # (n, C): the head only where the next token is read
    logits = model.logits(last[:, None])[:, 0]
    keys = _row_keys(key_data, token_number)
    token = sample_rows(logits, temperature, top_k, top_p, keys, mode=mode, k_max=k_max)
    ks = [k.at[rows, :, :P].set(c.k.swapaxes(1, 2).astype(k.dtype), mode="drop") for k, c in zip(ks, caches)]
    vs = [v.at[rows, :, :P].set(c.v.swapaxes(1, 2).astype(v.dtype), mode="drop") for v, c in zip(vs, caches)]
    return ks, vs, token


def _decode(model_def, params, ks, vs, token, pos, temperature, top_k, top_p, key_data, token_number, *, length, mode,
            k_max):
    """One token for each of rows [0, b): token, pos (b,) -> (ks, vs, the next tokens)."""
    model = _merge(model_def, params)
    b = token.shape[0]
    caches = [SlotCache(k, v, pos, b, length) for k, v in zip(ks, vs)]
    logits, caches = model(token[:, None], cache=caches, positions=pos[:, None])
    keys = _row_keys(key_data, token_number)
    token = sample_rows(logits[:, 0], temperature, top_k, top_p, keys, mode=mode, k_max=k_max)
    return [c.k for c in caches], [c.v for c in caches], token


@functools.lru_cache(maxsize=16)
def _programs(graphdef, treedef):
    """prefill and decode jitted once per model structure, which they have bound (runners of one model share their
    compiled shapes); the weights go in as a list of arrays: flattening an nnx.State, or hashing a static graphdef,
    at every call would cost milliseconds per step."""
    bound = lambda f: functools.partial(f, (graphdef, treedef))
    return (jax.jit(bound(_prefill), static_argnames=("mode", "k_max"), donate_argnames=("ks", "vs")),
            jax.jit(bound(_decode), static_argnames=("length", "mode", "k_max"), donate_argnames=("ks", "vs")))


@functools.partial(jax.jit, static_argnames=("length",), donate_argnames=("ks", "vs"))
def _copy_rows(ks, vs, src, dst, *, length):
    """Copies cache rows src into rows dst (their first `length` slots)."""
    return ([k.at[dst, :, :length].set(k[src, :, :length]) for k in ks],
            [v.at[dst, :, :length].set(v[src, :, :length]) for v in vs])


def _key_data(seq: Sequence) -> np.ndarray:
    """A sequence's key: its request's seed folded with its choice number (made once, kept on the sequence)."""
    if seq.key_data is None:
        key = jax.random.fold_in(jax.random.key(seq.request.sampling.seed), seq.index)
        seq.key_data = np.asarray(jax.random.key_data(key))
    return seq.key_data


class ModelRunner:
    """Runs a scheduler's Batches on the device; engine threads call it, one at a time."""

    def __init__(self, model: GPT, max_batch: int):
        if model.config.scan_layers:
            raise UserValueError("the engine needs a model loaded with scan_layers=False")
        cfg = self.config = model.config
        self.max_batch = max_batch
        graphdef, state = nnx.split(model)
        self.params, treedef = jax.tree.flatten(state)
        self.prefill_program, self.decode_program = _programs(graphdef, treedef)
        self.max_len = -(-cfg.block_size // MIN_LENGTH) * MIN_LENGTH
        shape = (max_batch, cfg.n_kv_head or cfg.n_head, self.max_len, cfg.head_dim)
        self.ks = [jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layer)]
        self.vs = [jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layer)]

    def run(self, batch: Batch) -> list[int]:
        """-> one token for each of the batch's sequences."""
        if batch.prefill:
            return self.prefill(batch.seqs, batch.contexts, batch.rows)
        return self.decode(batch.seqs)

    def prefill(self, seqs: list[Sequence], contexts: list[list[int]], rows: list[int]) -> list[int]:
        """Writes each context into its row (slots from 0) -> the token that follows each."""
        n = next_power_of_two(len(seqs))
        P = min(self.config.block_size, next_power_of_two(max(len(c) for c in contexts), MIN_PROMPT))
        ids, lengths = np.zeros((n, P), np.int32), np.ones(n, np.int32)
        for i, c in enumerate(contexts):
            ids[i, :len(c)], lengths[i] = c, len(c)
        padded_rows = np.array(rows + [self.max_batch] * (n - len(seqs)), np.int32)  # past the cache: dropped
        settings, mode, k_max = self._sampling_arrays(seqs, n)
        self.ks, self.vs, token = self.prefill_program(self.params, self.ks, self.vs, ids, lengths, padded_rows,
                                                       *settings, mode=mode, k_max=k_max)
        return np.asarray(token)[:len(seqs)].tolist()

    def decode(self, seqs: list[Sequence]) -> list[int]:
        """One step of rows [0, len(seqs)), each feeding its last token -> the next token of each."""
        b = next_power_of_two(len(seqs))
        token, pos = np.zeros(b, np.int32), np.zeros(b, np.int32)
        token[:len(seqs)] = [q.tokens[-1] for q in seqs]
        pos[:len(seqs)] = [q.pos for q in seqs]
        length = min(self.max_len, next_power_of_two(int(pos.max()) + 1, MIN_LENGTH))
        settings, mode, k_max = self._sampling_arrays(seqs, b)
        self.ks, self.vs, token = self.decode_program(self.params, self.ks, self.vs, token, pos, *settings,
                                                      length=length, mode=mode, k_max=k_max)
        return np.asarray(token)[:len(seqs)].tolist()

    def move_rows(self, moves: RowMoves | None) -> None:
        if moves is not None:
            length = min(self.max_len, next_power_of_two(moves.positions, MIN_LENGTH))
            self.ks, self.vs = _copy_rows(self.ks, self.vs, np.array(moves.src, np.int32),
                                          np.array(moves.dst, np.int32), length=length)

    def _sampling_arrays(self, seqs: list[Sequence], rows: int):
        """The per-row sampling arrays of seqs padded to `rows` (temperature, top_k, top_p, key data, token
        number), and the filter mode they need."""
        s = [q.request.sampling for q in seqs] + [Sampling(temperature=0.0)] * (rows - len(seqs))
        temperature = np.array([x.temperature for x in s], np.float32)
        top_k = np.array([x.top_k for x in s], np.int32)
        top_p = np.array([x.top_p for x in s], np.float32)
        keys = [_key_data(q) for q in seqs]
        key_data = np.stack(keys + [keys[0]] * (rows - len(seqs)))
        token_number = np.zeros(rows, np.int32)
        token_number[:len(seqs)] = [len(q.tokens) for q in seqs]
        mode, k_max = generate.filter_mode(temperature, top_k, top_p, self.config.vocab_size)
        return (temperature, top_k, top_p, key_data, token_number), mode, k_max
