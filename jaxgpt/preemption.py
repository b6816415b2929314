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
    """Installs the handlers on creation (restore() puts the previous ones back); stop_after_call() is asked after
    every call, on every process alike."""

    def __init__(self):
        self.cause: str | None = None
        self.multi = jax.process_count() > 1
        ours = {signal.SIGINT: self._forward if self.multi else self._note}
        if not self.multi:  # several processes: JAX's preemption service handles SIGTERM
            ours[signal.SIGTERM] = self._note
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            ours = {}
        self.previous = {s: signal.signal(s, handler) for s, handler in ours.items()}

    def _note(self, signum, frame):
        if self.cause is None:
            self.cause = f"{signal.Signals(signum).name} received"
            print(f"{self.cause}: stopping after the step in flight, then saving a checkpoint", flush=True)

    def _forward(self, signum, frame):
        if self.cause is None:
            self.cause = f"{signal.Signals(signum).name} received"
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_before_call(self) -> bool:
        """One process: a signal came before this call (during the set-up, the first compile, a save)."""
        return not self.multi and self.cause is not None

    def stop_after_call(self, first: int, last: int) -> bool:
        """After a call that took steps first..last. Several processes: every step id goes to the sync point check,
        in order and once, as orbax's saves pass theirs: the service picks the step after the furthest process's
        last one, so every process stops after the same call."""
        if not self.multi:
            return self.cause is not None
        reached = [multihost_utils.reached_preemption_sync_point(s) for s in range(first, last + 1)]
        if any(reached):
            self.cause = self.cause or "a preemption notice (SIGTERM to one of the processes)"
        return any(reached)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
