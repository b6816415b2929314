"""Continuous batching: many requests decode together in one jitted step, on the engine's own thread.

Each step reads schedule -> run -> postprocess: the Scheduler (plain Python) picks the next model call, the
ModelRunner runs it on the device, the Scheduler takes its tokens (ending sequences, freeing rows). If the thread
fails (a bug, device memory), every request ends with finish reason "error", `failure` says why and `submit`
refuses more: the server turns that into 503s and exits (docs/serving.md).
"""
from __future__ import annotations

import threading

from absl import logging

from jaxgpt.errors import UserValueError
from jaxgpt.model import GPT
from jaxgpt.serving.model_runner import ModelRunner
from jaxgpt.serving.request import ERROR, InvalidRequest, Request, Sampling
from jaxgpt.serving.scheduler import Scheduler

MAX_TOKENS = 4096  # the default most new tokens a request may ask for (past the context, windows slide)


class EngineFailed(RuntimeError):
    """The engine's thread has failed: nothing more runs. `reason`: the exception, as one line."""

    def __init__(self, reason: str):
        super().__init__(f"the engine failed: {reason}")
        self.reason = reason


class Engine:
    """Runs the decode loop on its own thread; `submit` and `cancel` may be called from any thread."""

    def __init__(self, model: GPT, *, max_batch: int = 32, eot_id: int | None = None, max_queue: int = 1024,
                 max_tokens: int = MAX_TOKENS):
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise UserValueError(f"max_batch={max_batch} must be a power of two")
        if max_tokens < 1:
            raise UserValueError(f"max_tokens={max_tokens} must be >= 1")
        self.config, self.max_batch, self.max_tokens = model.config, max_batch, max_tokens
        self.runner = ModelRunner(model, max_batch)
        self.scheduler = Scheduler(max_batch=max_batch, block_size=model.config.block_size, max_queue=max_queue,
                                   eot_id=eot_id)
        self.counters = self.scheduler.counters
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.stopping, self.thread = False, None
        self.failure: str | None = None  # why the thread failed; set once, under the lock
        self.failed = threading.Event()

    # ---- any thread ----
    def submit(self, request: Request) -> None:
        """Queues a request (validated by the caller, see check); raises QueueFull (a UserValueError) when the
        queue is full, EngineFailed once the engine has failed."""
        with self.lock:
            if self.failure is not None:
                raise EngineFailed(self.failure)
            self.scheduler.add(request)
        self.wake.set()

    def cancel(self, request: Request, choice: int | None = None) -> None:
        """Stops a request's sequences (or its one `choice`) at the next step: a client went away, a stop string
        matched. Their finish reason is 'cancelled'."""
        self.scheduler.cancel(request, choice)
        self.wake.set()

    def check(self, prompt: list[int], sampling: Sampling, n: int) -> None:
        """Raises InvalidRequest (naming the field) for a request this engine cannot run."""
        cfg = self.config
        if not prompt:
            raise InvalidRequest("the prompt has no tokens", "prompt")
        if bad := [t for t in prompt if not 0 <= t < cfg.n_valid_vocab]:
            raise InvalidRequest(f"prompt token {bad[0]} is outside the vocabulary [0, {cfg.n_valid_vocab})",
                                 "prompt")
        if sampling.max_tokens > self.max_tokens:
            raise InvalidRequest(f"max_tokens ({sampling.max_tokens}) exceeds this server's limit of "
                                 f"{self.max_tokens} tokens per choice", "max_tokens")
        if not 1 <= n <= self.max_batch:
            raise InvalidRequest(f"n={n} must be between 1 and the server's max_batch, {self.max_batch}", "n")

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
        return self.scheduler.stats()

    # ---- the engine's thread ----
    def step(self) -> bool:
        """One model call: schedule -> run -> postprocess. False when nothing was there to run."""
        self.runner.move_rows(self.scheduler.release_cancelled())
        batch = self.scheduler.schedule()
        if batch is None:
            return False
        tokens = self.runner.run(batch)
        self.runner.move_rows(self.scheduler.postprocess(batch, tokens))
        return True

    def _loop(self):
        while not self.stopping:
            try:
                if not self.step():
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
            seqs = self.scheduler.take_all()
        for seq in seqs:
            try:
                self.scheduler.finish(seq, ERROR)
            except Exception:  # noqa: BLE001 - one broken callback must not keep the others waiting
                logging.exception("a request's on_finish failed")
        self.failed.set()
