"""Stopping a run when its machine is taken away: SLURM, Kubernetes and spot VMs send SIGTERM (and SIGKILL after a
grace period); a user sends SIGINT (Ctrl-C). The trainer finishes the call in flight, saves a checkpoint at the step
it reached and exits with EXIT_STATUS, on which a scheduler can requeue the same command (docs/scaling.md).

One process: a signal handler notes the signal and the loop asks after each call. Several processes: JAX's
preemption service (set up by jax.distributed.initialize) takes SIGTERM on any process and agrees on the call after
which every process stops (multihost_utils.reached_preemption_sync_point), so all save the same step; SIGINT is
passed on to it as SIGTERM. Further signals while stopping are ignored: the save finishes, and orbax's rename makes
a save that does not finish leave the previous checkpoint the latest.
"""
from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_STATUS = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, run it again


class Preempted(Exception):
    """Training stopped on a signal at `step`; `saved`: whether a checkpoint of that step was written (False when
    no step was taken since the last one, or since the start)."""

    def __init__(self, step: int, cause: str, workdir: str, saved: bool):
        self.step, self.cause, self.saved = step, cause, saved
        where = f"saved a checkpoint at step {step}" if saved else f"nothing new to save (step {step})"
        super().__init__(f"{cause}: stopped at step {step}, {where} in {workdir}; run the same command to resume")


class Watch:
    """Installs the handlers on creation (restore() puts the previous ones back). The loop asks stop_before_call()
    before each call and stop_after_call() after it, on every process alike; `stopped` says whether one said yes."""

    def __init__(self):
        self.cause: str | None = None
        self.stopped = False
        self.multi = jax.process_count() > 1
        self.synced = 0  # several processes: the step ids passed to the sync point check so far (1..synced)
        ours = {signal.SIGINT: self._forward if self.multi else self._note}
        if not self.multi:  # several processes: JAX's preemption service handles SIGTERM
            ours[signal.SIGTERM] = self._note
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            ours = {}
        self.previous = {s: signal.signal(s, handler) for s, handler in ours.items()}

    def _note(self, signum, frame):
        if self.cause is not None and signum == signal.SIGINT:  # a second Ctrl-C: the user insists
            signal.signal(signal.SIGINT, self.previous.get(signal.SIGINT, signal.default_int_handler))
            raise KeyboardInterrupt
        if self.cause is None:
            self.cause = f"{signal.Signals(signum).name} received"
            # os.write, not print: a handler that prints while the main thread writes can raise in it
            os.write(2, f"{self.cause}: stopping after the step in flight, then saving a checkpoint\n".encode())

    def _forward(self, signum, frame):
        if self.cause is None:
            self.cause = f"{signal.Signals(signum).name} received"
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_before_call(self, done: int) -> bool:
        """Before the call after step `done`: one process, whether a signal came (during the set-up, the first
        compile, a save); several, whether the sync point lies at or before `done` (a notice before the first call
        of a resumed run: the service counted from 0)."""
        if not self.multi:
            self.stopped = self.cause is not None
        else:
            self.stopped = self._reached(done)
        return self.stopped

    def stop_after_call(self, done: int) -> bool:
        """After the call that reached step `done`. Several processes: every step id goes to the sync point check,
        in order and once, as orbax's saves pass theirs; the service picks the step after the furthest process's
        last one, so every process stops after the same call."""
        self.stopped = self._reached(done) if self.multi else self.cause is not None
        return self.stopped

    def _reached(self, done: int) -> bool:
        try:
            reached = [multihost_utils.reached_preemption_sync_point(s) for s in range(self.synced + 1, done + 1)]
        except RuntimeError as e:  # jax_enable_preemption_service=False: no agreement to be had
            print(f"warning: {e}: a signal ends this run without a checkpoint", flush=True)
            self.multi = False
            return False
        self.synced = max(self.synced, done)
        if any(reached):
            self.cause = self.cause or "a preemption notice (SIGTERM to one of the processes)"
        return any(reached)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
