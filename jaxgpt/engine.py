"""Continuous batching for serving (jaxgpt/serve.py): many requests decode together in one jitted step.

The KV cache has `max_batch` rows ("slots"). Policy: requests wait in a FIFO queue; between two decode steps the
engine admits, in order, every waiting request whose n sequences fit the free slots (one batched prefill for all
of them), so a request that arrives while others decode joins them at the next step. Running sequences always
occupy rows [0, running): a finished one's row is refilled by the last running row. A step computes the first
b rows and reads the first L cache slots, b and L rounded up to powers of two, so its cost follows the load and
only a few shapes ever compile. Each row samples with its own temperature, top-k, top-p and seed; with
temperature 0 it is greedy and its tokens are those of jaxgpt.generate for the same prompt, whatever else runs.

Past the context a row slides as jaxgpt.generate's windows do: once its next token would take the last position,
it is prefilled again, in its own row, from the last block_size // 2 tokens of its prompt and output.
If the engine's thread fails (a bug, device memory), every request ends with finish reason "error", `failure` says
why and `submit` refuses more: the server turns that into 503s and exits (docs/serving.md).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx, struct

from jaxgpt import generate
from jaxgpt.errors import UserValueError
from jaxgpt.model import GPT

MIN_LENGTH = 64  # the shortest cache view a step reads
MAX_TOKENS = 4096  # the default most new tokens a request may ask for (past the context, windows slide)


class EngineFailed(RuntimeError):
    """The engine's thread has failed: nothing more runs. `reason`: the exception, as one line."""

    def __init__(self, reason: str):
        super().__init__(f"the engine failed: {reason}")
        self.reason = reason


def bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


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
    """A layer's keys and values for every slot, (S, n_kv_head, max_len, head_dim) as generate.KVCache's. A step
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


def _row_keys(key_data, count):
    """The key of each row's token number `count`: its own seed's key folded with the count."""
    return jax.vmap(lambda k, c: jax.random.fold_in(jax.random.wrap_key_data(k), c))(key_data, count)


def _prefill(model_def, params, ks, vs, ids, lengths, rows, temperature, top_k, top_p, key_data, count, *, mode,
             k_max):
    """ids (n, P) right-padded prompts of `lengths` into cache rows `rows` (an index past the cache: a padding row,
    dropped) -> (ks, vs, each row's next token, its token number `count`)."""
    model = _merge(model_def, params)
    n, P = ids.shape
    x, caches = model.hidden(ids, cache=[PrefillCache()] * len(ks), positions=jnp.arange(P)[None])
    last = x[jnp.arange(n), lengths - 1]  # (n, C): the head only where the next token is read
    logits = model.logits(last[:, None])[:, 0]
    token = sample_rows(logits, temperature, top_k, top_p, _row_keys(key_data, count), mode=mode, k_max=k_max)
    ks = [k.at[rows, :, :P].set(c.k.swapaxes(1, 2).astype(k.dtype), mode="drop") for k, c in zip(ks, caches)]
    vs = [v.at[rows, :, :P].set(c.v.swapaxes(1, 2).astype(v.dtype), mode="drop") for v, c in zip(vs, caches)]
    return ks, vs, token


def _decode(model_def, params, ks, vs, token, pos, temperature, top_k, top_p, key_data, count, *, length, mode,
            k_max):
    """One token for each of rows [0, b): token, pos (b,) -> (ks, vs, the next tokens)."""
    model = _merge(model_def, params)
    b = token.shape[0]
    caches = [SlotCache(k, v, pos, b, length) for k, v in zip(ks, vs)]
    logits, caches = model(token[:, None], cache=caches, positions=pos[:, None])
    token = sample_rows(logits[:, 0], temperature, top_k, top_p, _row_keys(key_data, count), mode=mode, k_max=k_max)
    return [c.k for c in caches], [c.v for c in caches], token


@functools.lru_cache(maxsize=16)
def _programs(graphdef, treedef):
    """prefill and decode jitted once per model structure, which they have bound (engines of one model share their
    compiled shapes); the weights go in as a list of arrays: flattening an nnx.State, or hashing a static graphdef,
    at every call would cost milliseconds per step."""
    bound = lambda f: functools.partial(f, (graphdef, treedef))
    return (jax.jit(bound(_prefill), static_argnames=("mode", "k_max"), donate_argnames=("ks", "vs")),
            jax.jit(bound(_decode), static_argnames=("length", "mode", "k_max"), donate_argnames=("ks", "vs")))


@functools.partial(jax.jit, static_argnames=("length",), donate_argnames=("ks", "vs"))
def _move(ks, vs, src, dst, *, length):
    """Copies cache rows src into rows dst (first `length` slots): refilling the rows of finished sequences."""
    return ([k.at[dst, :, :length].set(k[src, :, :length]) for k in ks],
            [v.at[dst, :, :length].set(v[src, :, :length]) for v in vs])


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's settings; checked where the request comes in (jaxgpt/serve.py)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0


@dataclasses.dataclass(eq=False)
class Sequence:
    """One choice of a request: its tokens so far and how it ended."""
    request: Request
    index: int  # the choice number; its key is the request seed's folded with it
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # stop (end-of-text or a stop string), length, cancelled, error
    pos: int = 0  # the cache slot its next token writes
    cancelled: bool = False  # set by Engine.cancel, from any thread; the engine's thread ends it

    def __post_init__(self):
        key = jax.random.fold_in(jax.random.key(self.request.sampling.seed), self.index)
        self.key_data = np.asarray(jax.random.key_data(key))


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling
    n: int
    on_token: Callable[[int, int], None]  # (choice, token), from the engine's thread
    on_finish: Callable[[int, str], None]  # (choice, finish_reason)
    sequences: list[Sequence] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)


class Engine:
    """Runs the decode loop on its own thread; `submit` and `cancel` may be called from any thread."""

    def __init__(self, model: GPT, *, max_batch: int = 32, eot_id: int | None = None, max_queue: int = 1024,
                 max_tokens: int = MAX_TOKENS):
        if model.config.scan_layers:
            raise UserValueError("the engine needs a model loaded with scan_layers=False")
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise UserValueError(f"max_batch={max_batch} must be a power of two")
        if max_tokens < 1:
            raise UserValueError(f"max_tokens={max_tokens} must be >= 1")
        self.config, self.max_batch, self.eot_id, self.max_queue = model.config, max_batch, eot_id, max_queue
        self.max_tokens = max_tokens
        graphdef, state = nnx.split(model)
        self.params, treedef = jax.tree.flatten(state)
        self.prefill, self.decode = _programs(graphdef, treedef)
        cfg = model.config
        self.max_len = -(-cfg.block_size // MIN_LENGTH) * MIN_LENGTH
        shape = (max_batch, cfg.n_kv_head or cfg.n_head, self.max_len, cfg.head_dim)
        self.ks = [jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layer)]
        self.vs = [jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layer)]
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Sequence] = []  # row i of the cache holds running[i]
        self.next_token = np.zeros(max_batch, np.int32)
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.stopping, self.thread = False, None
        self.failure: str | None = None  # why the thread failed; set once, under the lock
        self.failed = threading.Event()
        self.steps, self.tokens, self.max_rows, self.batch_rows = 0, 0, 0, collections.Counter()
        self.slides = 0  # rows prefilled again to continue past the context

    # ---- any thread ----
    def submit(self, request: Request) -> None:
        """Queues a request (validated by the caller, see check); raises UserValueError when the queue is full,
        EngineFailed once the engine has failed."""
        with self.lock:
            if self.failure is not None:
                raise EngineFailed(self.failure)
            if len(self.waiting) >= self.max_queue:
                raise UserValueError(f"the server is busy: {len(self.waiting)} requests are waiting")
            request.sequences = [Sequence(request, i) for i in range(request.n)]
            self.waiting.append(request)
        self.wake.set()

    def cancel(self, request: Request, choice: int | None = None) -> None:
        """Stops a request's sequences (or its one `choice`) at the next step: a client went away, a stop string
        matched. Their finish reason is 'cancelled'."""
        if choice is None:
            request.cancelled = True
        else:
            request.sequences[choice].cancelled = True
        self.wake.set()

    def check(self, prompt: list[int], sampling: Sampling, n: int) -> None:
        """Raises UserValueError for a request this engine cannot run."""
        cfg = self.config
        if not prompt:
            raise UserValueError("the prompt has no tokens")
        if bad := [t for t in prompt if not 0 <= t < cfg.n_valid_vocab]:
            raise UserValueError(f"prompt token {bad[0]} is outside the vocabulary [0, {cfg.n_valid_vocab})")
        if sampling.max_tokens > self.max_tokens:
            raise UserValueError(f"max_tokens ({sampling.max_tokens}) exceeds this server's limit of "
                                 f"{self.max_tokens} tokens per choice")
        if not 1 <= n <= self.max_batch:
            raise UserValueError(f"n={n} must be between 1 and the server's max_batch, {self.max_batch}")

    def start(self) -> Engine:
        self.thread = threading.Thread(target=self._loop, name="jaxgpt-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread:
            self.thread.join()

    def stats(self) -> dict:
        return dict(running=len(self.running), waiting=len(self.waiting), max_batch=self.max_batch,
                    steps=self.steps, tokens=self.tokens, max_rows=self.max_rows, slides=self.slides)

    # ---- the engine's thread ----
    def _loop(self):
        while not self.stopping:
            try:
                self._drop_cancelled()
                self._admit()
                self._slide()
                if self.running:
                    self._step()
                else:
                    self.wake.wait(0.1)
                    self.wake.clear()
            except Exception as e:  # noqa: BLE001 - a bug or device memory: fail every request, refuse more
                self._fail(e)
                return

    def _fail(self, e: Exception):
        """Ends every running and waiting request with finish reason 'error', at once: nothing waits on a thread
        that no longer runs."""
        logging.error("the engine failed; every request ends with an error", exc_info=e)
        with self.lock:
            self.failure = f"{type(e).__name__}: {e}".splitlines()[0]
            waiting, self.waiting = list(self.waiting), collections.deque()
        for seq in list(self.running) + [s for r in waiting for s in r.sequences]:
            try:
                self._finish(seq, "error")
            except Exception:  # noqa: BLE001 - one broken callback must not keep the others waiting
                logging.exception("a request's on_finish failed")
        self.running = []
        self.failed.set()

    def _settings(self, seqs: list[Sequence], rows: int):
        """The per-row sampling arrays of seqs padded to `rows`, and the sampler mode they need."""
        s = [q.request.sampling for q in seqs] + [Sampling(temperature=0.0)] * (rows - len(seqs))
        temperature = np.array([x.temperature for x in s], np.float32)
        top_k = np.array([x.top_k for x in s], np.int32)
        top_p = np.array([x.top_p for x in s], np.float32)
        key_data = np.stack([q.key_data for q in seqs] + [seqs[0].key_data] * (rows - len(seqs)))
        mode, k_max = generate.filter_mode(temperature, top_k, top_p, self.config.vocab_size)
        return (temperature, top_k, top_p, key_data), mode, k_max

    def _admit(self):
        new: list[Sequence] = []
        with self.lock:
            while self.waiting and len(self.running) + len(new) + self.waiting[0].n <= self.max_batch:
                request = self.waiting.popleft()
                if not request.cancelled:
                    new.extend(request.sequences)
                else:
                    for seq in request.sequences:
                        self._finish(seq, "cancelled")
        if not new:
            return
        first = len(self.running)
        self.running.extend(new)
        self._prefill(new, [self._context(q) for q in new], list(range(first, first + len(new))))

    def _context(self, seq: Sequence) -> list[int]:
        """What a row is prefilled from, as jaxgpt.generate windows a single prompt: the prompt while it leaves
        room in the context, else (a prompt of block_size or more, and every later window) the last half-block of
        the prompt and the tokens so far."""
        block, text = self.config.block_size, seq.request.prompt + seq.tokens
        return text if not seq.tokens and len(text) < block else text[-(block // 2):]

    def _slide(self):
        """Rows whose next token would take the context's last position start their next window: generate stops a
        window there (a window's prompt plus its new tokens fill block_size), and their tokens must be its."""
        full = [q for q in self.running if q.pos >= self.config.block_size - 1]
        if full:
            self.slides += len(full)
            self._prefill(full, [self._context(q) for q in full], [self.running.index(q) for q in full])

    def _prefill(self, seqs: list[Sequence], contexts: list[list[int]], rows: list[int]):
        """Writes each context into its sequence's cache row (slots from 0) and emits the token that follows."""
        n, P = bucket(len(seqs)), min(self.config.block_size, bucket(max(len(c) for c in contexts), 16))
        ids, lengths = np.zeros((n, P), np.int32), np.ones(n, np.int32)
        for i, c in enumerate(contexts):
            ids[i, :len(c)], lengths[i] = c, len(c)
        rows = np.array(rows + [self.max_batch] * (n - len(seqs)), np.int32)  # padding rows: dropped
        count = np.zeros(n, np.int32)
        count[:len(seqs)] = [len(q.tokens) for q in seqs]
        settings, mode, k_max = self._settings(seqs, n)
        self.ks, self.vs, token = self.prefill(self.params, self.ks, self.vs, ids, lengths, rows, *settings, count,
                                               mode=mode, k_max=k_max)
        for q, t, p in zip(seqs, np.asarray(token).tolist(), lengths.tolist()):
            q.pos = p
            self._emit(q, t)
        self._compact()

    def _step(self):
        b = bucket(len(self.running))
        self.max_rows = max(self.max_rows, len(self.running))
        self.batch_rows[len(self.running)] += 1
        pos = np.zeros(b, np.int32)
        pos[:len(self.running)] = [q.pos for q in self.running]
        count = np.zeros(b, np.int32)
        count[:len(self.running)] = [len(q.tokens) for q in self.running]
        length = min(self.max_len, bucket(int(pos.max()) + 1, MIN_LENGTH))
        settings, mode, k_max = self._settings(self.running, b)
        self.ks, self.vs, token = self.decode(self.params, self.ks, self.vs, self.next_token[:b], pos, *settings,
                                              count, length=length, mode=mode, k_max=k_max)
        self.steps += 1
        for q, t in zip(list(self.running), np.asarray(token).tolist()):
            q.pos += 1
            self._emit(q, t)
        self._compact()

    def _emit(self, seq: Sequence, token: int):
        """A running sequence's new token: the end of text ends it unseen; max_tokens ends it after."""
        row = self.running.index(seq)
        if self.eot_id is not None and token == self.eot_id:
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        self.tokens += 1
        self.next_token[row] = token
        seq.request.on_token(seq.index, token)
        if len(seq.tokens) >= seq.request.sampling.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str):
        if seq.finish_reason is None:
            seq.finish_reason = reason
            seq.request.on_finish(seq.index, reason)

    def _drop_cancelled(self):
        for seq in self.running:
            if seq.cancelled or seq.request.cancelled:
                self._finish(seq, "cancelled")
        self._compact()

    def _compact(self):
        """Removes finished sequences; the last running rows move into their rows, so rows [0, running) are busy."""
        if all(q.finish_reason is None for q in self.running):
            return
        keep = [q for q in self.running if q.finish_reason is None]
        old_row = {id(q): i for i, q in enumerate(self.running)}
        stay = [q for q in keep if old_row[id(q)] < len(keep)]
        free = sorted(set(range(len(keep))) - {old_row[id(q)] for q in stay})
        movers = [q for q in keep if old_row[id(q)] >= len(keep)]
        if movers:
            src = np.array([old_row[id(q)] for q in movers], np.int32)
            dst = np.array(free, np.int32)
            length = min(self.max_len, bucket(max(q.pos for q in movers) + 1, MIN_LENGTH))
            self.ks, self.vs = _move(self.ks, self.vs, src, dst, length=length)
            self.next_token[dst] = self.next_token[src]
        rows = {id(q): old_row[id(q)] for q in stay} | {id(q): int(d) for q, d in zip(movers, free)}
        self.running = sorted(keep, key=lambda q: rows[id(q)])
