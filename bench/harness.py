"""What every benchmark shares: timing loops, the record of the machine, fresh-process runs in ABBA order, config
files with overrides (ml_collections' own flag parsing), and jaxgpt's train step built and compiled from abstract
inputs. The scripts run as modules from the repository root (`python -m bench.NAME`), so `jaxgpt`, `configs` and
`torch_bridge` are this checkout's."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- timing

def timed_calls(fn, steps: int, warmup: int = 0) -> tuple[list[float], list]:
    """Seconds of each of `steps` calls of fn() after `warmup` untimed ones, and every call's return value."""
    out = [fn() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out.append(fn())
        times.append(time.perf_counter() - start)
    return times, out


def median_seconds(fn, steps: int, warmup: int = 2) -> float:
    return statistics.median(timed_calls(fn, steps, warmup)[0])


def step_timing(step, steps: int, tokens_per_step: int, warmup: int = 3) -> tuple[dict, list]:
    """A training step's record: the first call (which compiles) timed alone, `warmup` calls more, then `steps`
    timed calls, each of which must block until the device is done; and every call's return value."""
    times, out = timed_calls(step, 1 + warmup + steps)
    first_s, times = times[0], times[1 + warmup:]
    step_s = statistics.median(times)
    return {"first_step_s": first_s, "timed_steps": len(times), "step_ms_median": 1e3 * step_s,
            "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
            "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / step_s}, out


def round_robin(runs: dict, repeats: int, stop=lambda: False) -> tuple[dict, dict, dict]:
    """Each run() once (its first call, compiling, timed apart), then `repeats` rounds of all in turn, so that load
    from other processes hits every contender alike; stop() ends the rounds early.
    -> (first-call seconds, timed seconds per name, the last return value per name)."""
    first_s, times, out = {}, {name: [] for name in runs}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        out[name] = run()
        first_s[name] = time.perf_counter() - start
    for _ in range(repeats):
        if stop():
            break
        for name, run in runs.items():
            start = time.perf_counter()
            out[name] = run()
            times[name].append(time.perf_counter() - start)
    return first_s, times, out


# ---- the machine

def cpu_name() -> str:
    """The CPU's model name as `lscpu` gives it (which every figure in bench/RESULTS.md names)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor() or "unknown")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def versions(*dists: str) -> dict:
    """Installed versions of the named distributions (those absent left out)."""
    found = {}
    for d in dists:
        try:
            found[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def environment(*dists: str) -> dict:
    """The record beside every figure: CPU name and cores, load average, Python and the named versions."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "load": load(), "python": platform.python_version(),
            "host": platform.node(), "versions": versions(*dists)}


def describe(env: dict) -> str:
    v = ", ".join(f"{k} {x}" for k, x in env["versions"].items())
    return f"CPU: {env['cpu']}, {env['cores']} cores; load average {env['load']}; Python {env['python']}, {v}"


def jax_device() -> dict:
    import jax
    import jaxlib
    d = jax.devices()[0]
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "device_kind": d.device_kind, "device_count": jax.device_count()}


def write_json(path: str, obj):
    """Written whole or not at all (a run cut short leaves the previous version)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ---- fresh processes

def abba(items: list, rounds: int) -> list:
    """items in order, then reversed, alternately, over `rounds` rounds: A B, B A, A B, ... A drift in a shared
    machine's speed then weighs on every side alike."""
    return [x for r in range(rounds) for x in (items if r % 2 == 0 else items[::-1])]


def module_command(module: str, *args: str) -> list[str]:
    """`python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_json(module: str, *args: str) -> dict:
    """`python -m module *args` in a fresh process (no compile cache, allocator state or other framework's threads
    carried over): the JSON object printed on its last line of stdout. Raises subprocess.CalledProcessError (stderr
    attached) when the run fails."""
    out = subprocess.run(module_command(module, *args), capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- configs and the compiled step

def load_config(path: str, overrides: dict | None = None):
    """The ConfigDict of a config file (a path as jaxgpt.train takes it; relative ones from the repository root)
    with `overrides` ({dotted field: value}) applied as `--config.FIELD=VALUE` flags are: ml_collections' parsers
    convert each value to the field's type, and an unknown field is an error."""
    from absl import flags
    from ml_collections import config_flags
    full = path if os.path.isabs(path) else os.path.join(REPO, path)
    argv = ["harness", f"--config={full}", *(f"--config.{k}={v}" for k, v in (overrides or {}).items())]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, lock_config=False, sys_argv=argv)
    values(argv)
    return values.config


def config(name: str, **overrides):
    """configs/NAME.py's ConfigDict with overrides given as keyword arguments, dots as '__': model__remat='dots'."""
    c = load_config(f"configs/{name}.py")
    c.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
    return c


def train_steps(config, vocab_size: int, devices=None):
    """jaxgpt.step's jitted steps for a config, as the Trainer builds them: (steps, model config, mesh)."""
    from jaxgpt import loader, sharding, step
    model_config = loader.model_config(config, vocab_size)
    mesh = sharding.make_mesh(config.mesh, devices)
    return step.make_steps(config, model_config, mesh), model_config, mesh


def compile_step(steps, mesh, batch_shape) -> tuple:
    """The train step lowered and compiled from abstract inputs (nothing allocated or run), as
    Trainer.compile_ahead does: (compiled, trace + lower seconds, XLA compile seconds). batch_shape is
    (calls, micro-batches, batch, block_size)."""
    from jaxgpt import sharding
    start = time.perf_counter()
    lowered = steps.train_steps.lower(steps.abstract_state, sharding.abstract_batch(mesh, batch_shape, batch_axis=2))
    traced = time.perf_counter()
    compiled = lowered.compile()
    return compiled, traced - start, time.perf_counter() - traced


def global_batch(mesh, tokens) -> dict:
    """Tokens (calls, micro-batches, batch, block_size + 1) as the train step's global inputs and targets."""
    from jaxgpt import sharding
    return sharding.host_batch_to_global({"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}, mesh,
                                         batch_axis=2)
