"""The serving policy, in plain Python (no jax): which requests join, which rows slide past the context, which
sequences end, and where each running sequence's cache row is.

Requests wait in a FIFO queue. Each model call is one Batch: a prefill of every waiting request whose n sequences
fit the free rows, taken in arrival order (a request that does not fit stops the admission: none overtakes
another); else a prefill of the rows that reached the end of the context; else a decode step of every running row.
Running sequences always hold rows [0, running): a finished one's row takes the last running row's cache.
"""
from __future__ import annotations

import collections
import dataclasses
import threading

from jaxgpt.serving.request import CANCELLED, LENGTH, STOP, QueueFull, Request, Sequence


@dataclasses.dataclass
class Batch:
    """One model call: a prefill of each sequence's context into its row, or a decode step of rows
    [0, len(seqs)) (each feeding its last token)."""
    seqs: list[Sequence]
    prefill: bool
    contexts: list[list[int]] = dataclasses.field(default_factory=list)
    rows: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RowMoves:
    """Cache rows src copied into rows dst, their first `positions` slots: refilling finished sequences' rows."""
    src: list[int]
    dst: list[int]
    positions: int


@dataclasses.dataclass
class Counters:
    steps: int = 0  # decode steps
    tokens: int = 0  # tokens emitted
    max_rows: int = 0  # the most rows a decode step ran
    batch_rows: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # rows -> steps
    slides: int = 0  # rows prefilled again to continue past the context


class Scheduler:
    """`add` and `cancel` may be called from any thread; the rest from the engine's thread only."""

    def __init__(self, *, max_batch: int, block_size: int, max_queue: int, eot_id: int | None):
        self.max_batch, self.block_size, self.max_queue, self.eot_id = max_batch, block_size, max_queue, eot_id
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Sequence] = []  # row i of the cache holds running[i]
        self.lock = threading.Lock()
        self.counters = Counters()

    # ---- any thread ----
    def add(self, request: Request) -> None:
        """Queues a request; raises QueueFull when max_queue requests wait already."""
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are waiting")
            request.sequences = [Sequence(request, i) for i in range(request.n)]
            self.waiting.append(request)

    @staticmethod
    def cancel(request: Request, choice: int | None = None) -> None:
        """Marks a request's sequences (or its one `choice`) to end, as 'cancelled', before the next model call."""
        if choice is None:
            request.cancelled = True
        else:
            request.sequences[choice].cancelled = True

    # ---- the engine's thread ----
    def release_cancelled(self) -> RowMoves | None:
        """Ends the running sequences whose cancel was requested; -> the row moves that free their rows."""
        for seq in self.running:
            if seq.cancel_requested:
                self.finish(seq, CANCELLED)
        return self.compact()

    def schedule(self) -> Batch | None:
        """The next model call (see the module's docstring); None when nothing runs."""
        new = self._admit()
        if new:
            first = len(self.running)
            self.running.extend(new)
            return Batch(new, True, [self.context(q) for q in new], list(range(first, first + len(new))))
        full = [q for q in self.running if q.pos >= self.block_size - 1]
        if full:
            self.counters.slides += len(full)
            return Batch(full, True, [self.context(q) for q in full], [self.running.index(q) for q in full])
        if self.running:
            return Batch(list(self.running), False)
        return None

    def _admit(self) -> list[Sequence]:
        new: list[Sequence] = []
        with self.lock:
            while self.waiting and len(self.running) + len(new) + self.waiting[0].n <= self.max_batch:
                request = self.waiting.popleft()
                if not request.cancelled:
                    new.extend(request.sequences)
                else:
                    for seq in request.sequences:
                        self.finish(seq, CANCELLED)
        return new

    def context(self, seq: Sequence) -> list[int]:
        """What a row is prefilled from, as jaxgpt.generate windows a single prompt: the prompt while it leaves
        room in the context, else (a prompt of block_size or more, and every later window) the last half-block of
        the prompt and the tokens so far. A window ends where its next token would take the context's last
        position (a window's prompt plus its new tokens fill block_size), as generate's does."""
        block, text = self.block_size, seq.request.prompt + seq.tokens
        return text if not seq.tokens and len(text) < block else text[-(block // 2):]

    def postprocess(self, batch: Batch, tokens: list[int]) -> RowMoves | None:
        """Takes a model call's tokens, one per sequence of the batch; -> the row moves that free finished rows."""
        if not batch.prefill:
            rows = len(batch.seqs)
            self.counters.steps += 1
            self.counters.max_rows = max(self.counters.max_rows, rows)
            self.counters.batch_rows[rows] += 1
        for i, (seq, token) in enumerate(zip(batch.seqs, tokens)):
            seq.pos = len(batch.contexts[i]) if batch.prefill else seq.pos + 1
            self._emit(seq, token)
        return self.compact()

    def _emit(self, seq: Sequence, token: int) -> None:
        """A running sequence's new token: the end of text ends it unseen; max_tokens ends it after."""
        if self.eot_id is not None and token == self.eot_id:
            return self.finish(seq, STOP)
        seq.tokens.append(token)
        self.counters.tokens += 1
        seq.request.on_token(seq.index, token)
        if len(seq.tokens) >= seq.request.sampling.max_tokens:
            self.finish(seq, LENGTH)

    @staticmethod
    def finish(seq: Sequence, reason: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = reason
            seq.request.on_finish(seq.index, reason)

    def compact(self) -> RowMoves | None:
        """Drops finished sequences; the last running rows move into their rows, so rows [0, running) are busy."""
        if all(q.finish_reason is None for q in self.running):
            return None
        keep = [q for q in self.running if q.finish_reason is None]
        old_row = {id(q): i for i, q in enumerate(self.running)}
        stay = [q for q in keep if old_row[id(q)] < len(keep)]
        free = sorted(set(range(len(keep))) - {old_row[id(q)] for q in stay})
        movers = [q for q in keep if old_row[id(q)] >= len(keep)]
        row = {id(q): old_row[id(q)] for q in stay} | {id(q): d for q, d in zip(movers, free)}
        self.running = sorted(keep, key=lambda q: row[id(q)])
        if not movers:
            return None
        return RowMoves([old_row[id(q)] for q in movers], free, max(q.pos for q in movers) + 1)

    def take_all(self) -> list[Sequence]:
        """Empties the queue and the rows (the engine failed) -> every sequence that was running or waiting."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), collections.deque()
        seqs, self.running = self.running + [s for r in waiting for s in r.sequences], []
        return seqs

    def stats(self) -> dict:
        c = self.counters
        return dict(running=len(self.running), waiting=len(self.waiting), max_batch=self.max_batch, steps=c.steps,
                    tokens=c.tokens, max_rows=c.max_rows, slides=c.slides)
