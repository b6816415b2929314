"""Runs that end early: SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) saves the step reached and exits 75
(docs/scaling.md; the number, not preemption.EXIT_STATUS: a changed constant must fail here), SIGKILL mid-save
leaves the previous checkpoint, and either way the same command resumes bit-identically. The runs train in float16,
whose dynamic loss scale (doubling every 4 steps here, halving on overflow) is part of what must resume exactly."""
import os
import random
import re
import signal
import subprocess
import threading
import time

import corpus
import jax
import numpy as np
import pytest
from flax import nnx
from test_train import REPO, completed_steps, logged_steps, train_command

from jaxgpt import checkpoint, plot, preemption, prepare

STEPS = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    text = corpus.write(tmp_path_factory.mktemp("text") / "corpus_100k.txt", 100_000)
    return prepare.prepare(str(tmp_path_factory.mktemp("char")), dataset="text", input=text, tokenizer="char")


def command(workdir, data_dir, *extra):
    """tiny.py for STEPS steps in float16, a log line per step; steps_per_call=1, so checkpoint_every changes no
    step's computation and every run below computes what `straight` does."""
    return train_command(workdir, data_dir, "--config.model.dtype=float16", "--config.optim.loss_scale_period=4",
                         "--config.log_every=1", "--config.progress_bar=False", *extra)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """An uninterrupted run: its final parameters, and the loss scales it logged."""
    workdir = tmp_path_factory.mktemp("straight")
    subprocess.run(command(workdir, data_dir), cwd=REPO, check=True, capture_output=True, timeout=600)
    scales = {r["loss_scale"] for r in plot.read_metrics(str(workdir)) if "loss_scale" in r}
    assert len(scales) > 2, scales  # the scale moved: resuming must carry it
    return final_params(workdir)


def final_params(workdir):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(checkpoint.load_model(str(workdir)), nnx.Param))]


def assert_same_params(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def resume(workdir, data_dir, last):
    output = subprocess.run(command(workdir, data_dir), cwd=REPO, check=True, capture_output=True, text=True,
                            timeout=600).stdout
    assert f"at step {last}" in output and min(logged_steps(output)) == last + 1, output  # resumed, not rerun
    return final_params(workdir)


def until_line(proc, pattern: str) -> list[str]:
    """The lines proc printed up to the first that matches pattern."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError("".join(lines)[-3000:])


# ------------------------------------------------------------------------- the handlers, in this process

def deliver(sig):
    """Sends `sig` to this process and lets the main thread run its handler."""
    os.kill(os.getpid(), sig)
    time.sleep(0.01)


def test_the_exit_status_is_75():
    assert preemption.EXIT_STATUS == 75  # docs/scaling.md, README: requeue on 75 (EX_TEMPFAIL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_one_process_stops_after_the_call_on_sigterm_or_sigint_and_restores_the_handlers(sig, capfd):
    """One process: no stop until a signal, then the loop is told to stop before and after a call; the cause names
    the signal; one line on stderr; restore() puts the previous handlers back."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    watch = preemption.Watch()
    try:
        assert watch.stopped is False and watch.cause is None  # nobody said yes yet
        assert signal.getsignal(signal.SIGTERM) != previous[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) != previous[signal.SIGINT]
        assert not watch.stop_before_call(0) and not watch.stop_after_call(1) and not watch.stopped
        assert watch.cause is None
        deliver(sig)
        assert watch.cause == f"{sig.name} received"
        assert watch.stop_after_call(1) and watch.stopped and watch.stop_before_call(1)
        assert f"{sig.name} received: stopping after the step in flight" in capfd.readouterr().err
        deliver(signal.SIGTERM)  # more SIGTERMs while it saves are ignored (docs/scaling.md)
        assert watch.cause == f"{sig.name} received" and watch.stop_after_call(2)
    finally:
        watch.restore()
    assert {s: signal.getsignal(s) for s in previous} == previous


def test_a_second_sigint_interrupts():
    """Ctrl-C once stops after the call in flight like SIGTERM; Ctrl-C again (the user insists) raises
    KeyboardInterrupt at once and gives SIGINT back its previous handler."""
    previous = signal.getsignal(signal.SIGINT)
    watch = preemption.Watch()
    try:
        deliver(signal.SIGINT)
        assert watch.stop_after_call(3) and watch.cause == "SIGINT received"
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == previous
    finally:
        watch.restore()
    assert signal.getsignal(signal.SIGINT) == previous


def test_a_watch_off_the_main_thread_installs_nothing():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    made = []
    thread = threading.Thread(target=lambda: made.append(preemption.Watch()))
    thread.start()
    thread.join()
    assert made[0].previous == {} and {s: signal.getsignal(s) for s in before} == before
    assert not made[0].stop_after_call(1)


def test_several_processes_stop_where_the_preemption_sync_point_says(monkeypatch, capsys):
    """Several processes (jaxgpt/preemption.py): SIGTERM is left to JAX's preemption service, SIGINT is passed on
    to it as SIGTERM (once), and every step id goes to reached_preemption_sync_point in order and once (from 1: a
    resumed run's first check covers the steps before it); the loop stops where it says yes. Without the service
    (a RuntimeError) the run goes on as one process: a warning, no stop."""
    monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
    asked = []
    monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point",
                        lambda s: asked.append(s) or s == 6)
    forwarded = []
    theirs = signal.signal(signal.SIGTERM, lambda s, f: forwarded.append(s))  # the service's handler
    watch = preemption.Watch()
    try:
        assert signal.SIGTERM not in watch.previous and signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
        assert not watch.stop_before_call(2) and asked == [1, 2]
        assert not watch.stop_after_call(4) and not watch.stop_before_call(4) and asked == [1, 2, 3, 4]
        deliver(signal.SIGINT)
        deliver(signal.SIGINT)
        assert forwarded == [signal.SIGTERM] and watch.cause == "SIGINT received"
        assert not watch.stop_after_call(5) and watch.stop_after_call(7) and watch.stopped
        assert asked == [1, 2, 3, 4, 5, 6, 7]
    finally:
        watch.restore()
        signal.signal(signal.SIGTERM, theirs)

    def no_service(s):
        raise RuntimeError("preemption service not enabled")
    monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point", no_service)
    watch = preemption.Watch()
    try:
        assert not watch.stop_after_call(1) and not watch.multi
        assert "a signal ends this run without a checkpoint" in capsys.readouterr().out
    finally:
        watch.restore()
    quiet = preemption.Watch()  # a notice with no signal here: the cause says so
    try:
        monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point", lambda s: True)
        assert quiet.stop_before_call(1) and "preemption notice" in quiet.cause
    finally:
        quiet.restore()


def test_preempted_says_what_was_saved():
    stop = preemption.Preempted(12, "SIGTERM received", "out/gpt2", saved=True)
    assert (stop.step, stop.cause, stop.saved) == (12, "SIGTERM received", True)
    saved = str(stop)
    assert saved == ("SIGTERM received: stopped at step 12, saved a checkpoint at step 12 in out/gpt2; run the same "
                     "command to resume")  # docs/scaling.md's line
    assert "stopped at step 0, nothing new to save (step 0) in w" in str(preemption.Preempted(0, "x", "w", False))


@pytest.mark.slow
def test_sigint_saves_the_step_reached_and_exits_75_like_sigterm(data_dir, tmp_path):
    """Ctrl-C (SIGINT) is a preemption like SIGTERM (docs/scaling.md): the step reached saved, status 75."""
    long = ("--config.max_steps=1000", "--config.checkpoint_every=1000", "--config.eval_every=1000")
    proc = subprocess.Popen(command(tmp_path / "interrupted", data_dir, *long), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    until_line(proc, r"^step 3: loss")
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, output
    reached = int(re.search(r"SIGINT received: stopped at step (\d+), saved a checkpoint at step \1 in ",
                            output).group(1))
    assert 3 <= reached < 1000 and completed_steps(tmp_path / "interrupted") == [reached], output[-2000:]


@pytest.mark.slow
def test_sigterm_at_a_random_moment_saves_the_step_reached_and_resumes_exactly(data_dir, tmp_path):
    """1,000 steps with no periodic checkpoint before the end: the one checkpoint after the signal is the step the
    run reached. A second SIGTERM right after the first (during the save) changes nothing."""
    long = ("--config.max_steps=1000", "--config.checkpoint_every=1000", "--config.eval_every=1000")
    proc = subprocess.Popen(command(tmp_path / "preempted", data_dir, *long), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    until_line(proc, r"^step 5: loss")
    delay = random.uniform(0, 1.0)
    print(f"\nSIGTERM {delay:.2f} s after step 5's log line, again 0.05 s later")
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, output  # docs/scaling.md: EX_TEMPFAIL
    reached = int(re.search(r"stopped at step (\d+), saved a checkpoint at step \1 in ", output).group(1))
    assert 5 <= reached < 1000 and completed_steps(tmp_path / "preempted") == [reached], output[-2000:]
    assert max(logged_steps(output)) == reached  # the metrics of every step taken were written
    output = subprocess.run(command(tmp_path / "preempted", data_dir, *long), cwd=REPO, check=True,
                            capture_output=True, text=True, timeout=600).stdout
    assert f"at step {reached}" in output and min(logged_steps(output)) == reached + 1, output[-2000:]
    subprocess.run(command(tmp_path / "straight", data_dir, *long), cwd=REPO, check=True, capture_output=True,
                   timeout=600)
    assert_same_params(final_params(tmp_path / "preempted"), final_params(tmp_path / "straight"))


@pytest.mark.slow
def test_sigterm_during_the_first_compile_exits_cleanly_with_nothing_written(data_dir, tmp_path):
    workdir = tmp_path / "early"
    proc = subprocess.Popen(command(workdir, data_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while not (workdir / "tokenizer.json").exists() and time.time() < deadline:  # written before the compile
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, output  # docs/scaling.md: EX_TEMPFAIL
    assert "stopped at step 0, nothing new to save" in output and not logged_steps(output), output
    checkpoints = workdir / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())  # no step, no half-written temporary


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_matches_uninterrupted_run(data_dir, tmp_path, straight):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, data_dir), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it while a save is in flight, past step 10
        ckpts = killed / "checkpoints"
        in_flight = ckpts.exists() and any(not p.name.isdigit() for p in ckpts.iterdir())
        if in_flight and completed_steps(killed) and completed_steps(killed)[-1] >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    last = completed_steps(killed)[-1]
    assert 10 <= last < STEPS
    checkpoint.load_model(str(killed))  # the last complete checkpoint is usable on its own
    assert_same_params(resume(killed, data_dir, last), straight)
