"""The one prepared GPU device run: issue 23 first (jaxgpt against nanoGPT's PyTorch step on the same GPU, profiles,
variants of the step), then the GPU-marked tests, the serving benchmark and two short training runs. Every item runs
in a fresh process with its own timeout, in the order below, while the budget lasts; results and logs land in OUT as
they come, at most 8 files of under 16 MB (what a device run brings back).

    bash bench/gpu/gpu.sh --all OUT [--smoke] [flags below]      (installs what is missing, then runs this)
    python -m bench.gpu.run OUT [--smoke] [--budget=540] [--only=GLOB,...] [--skip=GLOB,...] [--list]

OUT gets: results.json (every item: status, seconds, its result; rewritten after each item), summary.md (the tables
bench/gpu/report.py makes of it), logs.tar.gz (every item's log, the tests' JUnit XML, the serving JSON) and one
profile-NAME.tar.gz per profile (trace.json.gz, hlo.txt.gz, analysis.json, xplane.pb when it fits; read them with
bench/gpu/trace_table.py). A run stopped from outside keeps what it had written.

The plan, with each item's estimated seconds on one H200 (--list prints it; estimates, not measurements):
  1. issue 23's core: peer:124m-32x2 (jaxgpt, then the profile, which compiles with command buffers off, then
     PyTorch), the variants gpu and scan, peer:124m-16x4, peer:350m-16x4;
  2. pytest (`pytest -m gpu`, pass/fail per test), serve (bench/serve.py --json),
     train (200 steps of configs/124m_speedrun.py, skipped where it is missing, and of configs/124m.py);
  3. issue 23's tail: the other variants, two more profiles, a second alternation round (the sides reversed).
A peer item is one side of one shape: jaxgpt's step (bench/gpu/check.py --worker=step, configs/124m.py or 350m.py
as they are, micro-batch x accumulation as named) or nanoGPT's (bench/gpu/peer.py), alternating. Variants change
config fields (--set) or XLA_FLAGS; the report compares them with the peer jaxgpt item of the same shape.
An item is skipped when the budget left (from GPU_RUN_T0, which gpu.sh sets before installing) is below its estimate,
and runs with at most the budget left as its timeout. JAX_COMPILATION_CACHE_DIR (and inductor's and Triton's cache
directories) are shared by the run's processes, so a program compiled once loads from the cache afterwards; each
jaxgpt item records its compile time and whether it added cache entries.

--smoke: bench/gpu/check.py's tiny model, batches divided by 8, a shorter plan (every part once), torch.compile off
off a GPU; on a CPU it proves the script end to end. Its figures mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

from bench import harness
from bench.harness import REPO, module_command, write_json

MAX_FILE = 15 * 2**20  # a returned file must stay under 16 MiB
SHAPES = {  # peer shape -> (config, micro-batch, accumulation, bench/gpu/peer.py --model)
    "124m-32x2": ("configs/124m.py", 32, 2, "124m"),
    "124m-16x4": ("configs/124m.py", 16, 4, "124m"),
    "350m-16x4": ("configs/350m.py", 16, 4, "350m"),  # 350m.py as it is: scan over layers, remat dots
}
GPU, SCAN = {"model.kernels": "gpu"}, {"model.scan_layers": "true"}
VARIANTS = {  # name -> (peer shape, config fields, XLA_FLAGS, estimated seconds); the first two are the core
    "gpu": ("124m-32x2", GPU, "", 60),
    "scan": ("124m-32x2", SCAN, "", 50),
    "scan+remat-dots": ("124m-32x2", {**SCAN, "model.remat": "dots"}, "", 50),
    "gpu+scan": ("124m-32x2", {**GPU, **SCAN}, "", 50),
    "cublaslt": ("124m-32x2", {}, "--xla_gpu_enable_cublaslt=true", 60),
    "gpu+cublaslt": ("124m-32x2", GPU, "--xla_gpu_enable_cublaslt=true", 60),
    "no-triton-gemm": ("124m-32x2", {}, "--xla_gpu_enable_triton_gemm=false", 55),
    "gpu-16x4": ("124m-16x4", GPU, "", 60),
    "gpu+chunk16k": ("124m-32x2", {**GPU, "model.loss_chunk": "16384"}, "", 60),
    "gpu+chunk0": ("124m-32x2", {**GPU, "model.loss_chunk": "0"}, "", 60),
    "remat-dots": ("124m-32x2", {"model.remat": "dots"}, "", 60),
    "scan+dynamic-slice-fusion": ("124m-32x2", SCAN, "--xla_gpu_enable_dynamic_slice_fusion=true", 50),
    "scan+double-buffering": ("124m-32x2", SCAN, "--xla_gpu_enable_while_loop_double_buffering=true", 50),
    "latency-hiding": ("124m-32x2", {}, "--xla_gpu_enable_latency_hiding_scheduler=true", 55),
    "cudnn-layernorm": ("124m-32x2", {}, "--xla_gpu_enable_cudnn_layer_norm=true", 55),
    "350m-unrolled": ("350m-16x4", {"model.scan_layers": "false", "model.remat": "none"}, "", 90),
    "350m-no-remat": ("350m-16x4", {"model.remat": "none"}, "", 60),
    "350m-gpu": ("350m-16x4", GPU, "", 60),
}
PROFILES = {"124m": {}, "124m-scan": SCAN, "124m-gpu": GPU}  # profiles of the 124m-32x2 step
TRAIN_CONFIGS = ("configs/124m_speedrun.py", "configs/124m.py")
# Tests and the serving benchmark start more than one JAX process on the GPU (a server beside its client): none may
# take the 75% of the memory that JAX preallocates by default.
ON_DEMAND = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


@dataclasses.dataclass
class Item:
    name: str
    part: str  # peer | profile | variant | pytest | serve | train
    est: float  # seconds on an H200, start-up and compiles included
    cap: float  # its timeout at most
    cmd: list
    env: dict = dataclasses.field(default_factory=dict)
    result_file: str | None = None  # the JSON the process writes
    profile_dir: str | None = None


def plan(args, work: str) -> list[Item]:
    """Every item in priority order (before --only/--skip): issue 23's core, the other parts, issue 23's tail."""
    if args.smoke:  # every part once
        a, c = side_items("124m-32x2", args, work, "jaxgpt"), side_items("350m-16x4", args, work, "torch")
        core = [a[0], profile_item("124m", args, work), a[1], *(variant_item(v, args, work) for v in ("gpu", "scan")),
                *c]
        tail = [variant_item("cublaslt", args, work)]
    else:
        a, b, c = (side_items(shape, args, work, first) for shape, first in
                   (("124m-32x2", "jaxgpt"), ("124m-16x4", "torch"), ("350m-16x4", "jaxgpt")))
        core = [a[0], profile_item("124m", args, work), a[1], *(variant_item(v, args, work) for v in ("gpu", "scan")),
                *b, *c]
        tail = [variant_item(v, args, work) for v in list(VARIANTS)[2:]]
        tail += [profile_item(p, args, work) for p in ("124m-scan", "124m-gpu")]
        tail += [i for shape, first in (("124m-32x2", "torch"), ("124m-16x4", "jaxgpt"), ("350m-16x4", "torch"))
                 for i in side_items(shape, args, work, first, round_=2)]
    rest = [pytest_item(args, work), serve_item(args, work), *(train_item(c, args, work) for c in TRAIN_CONFIGS)]
    return core + rest + tail


def side_items(shape: str, args, work: str, first: str, round_: int = 1) -> list[Item]:
    """jaxgpt's and PyTorch's items of one shape, `first` first."""
    config, batch, accum, model = SHAPES[shape]
    batch = max(1, batch // 8) if args.smoke else batch
    suffix = "" if round_ == 1 else f"#{round_}"
    big = shape.startswith("350m")
    jax_item = step_item(f"peer:{shape}:jaxgpt{suffix}", "peer", config, batch, accum, {}, "", args, work,
                         est=(60 if big else 70) if round_ == 1 else 35)
    out = os.path.join(work, f"peer-{shape}-torch{suffix}.json")
    steps = 3 if args.smoke else (10 if big else 20)
    cmd = [*module_command("bench.gpu.peer", out, f"--model={model}", f"--batch={batch}", f"--accum={accum}"),
           f"--steps={steps}", *(["--smoke"] if args.smoke else [])]
    torch_item = Item(f"peer:{shape}:torch{suffix}", "peer", (120 if big else 90) if round_ == 1 else 40, 300, cmd,
                      result_file=out)
    return [jax_item, torch_item] if first == "jaxgpt" else [torch_item, jax_item]


def step_item(name, part, config, batch, accum, sets, xla_flags, args, work, est, profile_dir=None) -> Item:
    out = os.path.join(work, re.sub(r"[^\w.-]", "_", name) + ".json")
    steps = 3 if args.smoke else (10 if "350m" in config else 20)
    cmd = [*module_command("bench.gpu.check", out, "--worker=step", f"--config={config}"),
           f"--step_batch={batch}", f"--step_accum={accum}", f"--step_steps={steps}",
           *(f"--set={k}={v}" for k, v in sets.items()), *(["--smoke"] if args.smoke else []),
           *([f"--profile={profile_dir}"] if profile_dir else [])]
    env = {"XLA_FLAGS": " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), xla_flags) if f)} if xla_flags else {}
    return Item(name, part, est, 300, cmd, env, result_file=out, profile_dir=profile_dir)


def variant_item(name: str, args, work: str) -> Item:
    shape, sets, flags, est = VARIANTS[name]
    config, batch, accum, _ = SHAPES[shape]
    batch = max(1, batch // 8) if args.smoke else batch
    return step_item(f"variant:{name}", "variant", config, batch, accum, sets, flags, args, work, est)


def profile_item(name: str, args, work: str) -> Item:
    config, batch, accum, _ = SHAPES["124m-32x2"]
    batch = max(1, batch // 8) if args.smoke else batch
    # Command buffers (CUDA graphs) off: kernels run inside one can lose their HLO names in traces
    # (openxla/xprof#3070). Its timing is also the A/B of command buffers off against the peer item.
    return step_item(f"profile:{name}", "profile", config, batch, accum, PROFILES[name],
                     "--xla_gpu_enable_command_buffer=", args, work, est=60 if name == "124m" else 55,
                     profile_dir=os.path.join(work, f"profile-{name}"))


def pytest_item(args, work: str) -> Item:
    xml = os.path.join(work, "pytest-gpu.xml")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    return Item("pytest:gpu", "pytest", 90, 240, cmd, ON_DEMAND, result_file=xml)


def serve_item(args, work: str) -> Item:
    out = os.path.join(work, "serve.json")
    cmd = module_command("bench.serve", f"--json={out}", *shlex.split(args.serve_flags))
    return Item("serve", "serve", 180, 150 if args.smoke else 300, cmd, ON_DEMAND, result_file=out)


def train_item(config: str, args, work: str) -> Item:
    name = os.path.splitext(os.path.basename(config))[0]
    out = os.path.join(work, f"train-{name}.json")
    cap = 400 if args.smoke else 240
    cmd = [*module_command("bench.gpu.check", out, "--only=train", f"--config={config}"),
           f"--timeout={cap - 20}", *(["--smoke"] if args.smoke else [])]
    return Item(f"train:{name}", "train", 80, cap, cmd, result_file=out)


# ---- running

def why_not(item: Item) -> str | None:
    """A reason to skip an item that cannot run in this checkout, before spending time on it."""
    if item.part == "train":
        config = next(a.split("=", 1)[1] for a in item.cmd if a.startswith("--config="))
        if not os.path.exists(os.path.join(REPO, config)):
            return f"{config} is not in this checkout"
    return None


def run_item(item: Item, timeout: float, logs: str, cache: str) -> dict:
    """Runs one item in its own process group; -> its record (status, seconds, result or error)."""
    log_path = os.path.join(logs, re.sub(r"[^\w.-]", "_", item.name) + ".log")
    before = count_files(cache)
    env = {**os.environ, **item.env}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(shlex.quote(c) for c in item.cmd)}\n# env: {item.env}\n")
        log.flush()
        proc = subprocess.Popen(item.cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 or (item.part == "pytest" and code == 5) else "failed"  # 5: none selected
        except subprocess.TimeoutExpired:
            stop(proc)
            code, status = None, "timeout"
    record = {"part": item.part, "status": status, "exit_code": code, "seconds": round(time.perf_counter() - start, 1),
              "timeout_s": round(timeout), "est_s": item.est, "log": os.path.basename(log_path),
              "xla_flags": item.env.get("XLA_FLAGS", ""), "cache_entries_added": count_files(cache) - before}
    record.update(read_result(item, status))
    if status != "ok":
        record["log_tail"] = tail(log_path)
    return record


def stop(proc):
    """SIGTERM to the item's process group, SIGKILL 10 s later: compile workers and servers go with it."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def read_result(item: Item, status: str) -> dict:
    if item.part == "pytest":  # no test carries the marker (exit status 5): zero counts
        return {"tests": junit(item.result_file)} if item.result_file and os.path.exists(item.result_file) else {}
    if not item.result_file or not os.path.exists(item.result_file):
        return {}
    with open(item.result_file) as f:
        result = json.load(f)
    if item.part == "train":  # gpu_check's whole-run JSON: the train check is what counts
        result = result.get("checks", {}).get("train", result)
    if status == "ok" and result.get("passed") is False:
        return {"status": "failed", "result": result}
    return {"result": result}


def junit(path: str) -> dict:
    """pytest's JUnit XML -> {test id: {outcome, seconds, message}} and the totals."""
    tests = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = ("failed" if tag == "failure" else tag), (node.get("message") or "")[:500]
        tests[f"{case.get('classname')}::{case.get('name')}"] = {"outcome": outcome,
                                                                 "seconds": float(case.get("time", 0)),
                                                                 "message": message}
    counts = {o: sum(t["outcome"] == o for t in tests.values()) for o in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": tests}


def count_files(folder: str) -> int:
    return sum(len(files) for _, _, files in os.walk(folder)) if os.path.isdir(folder) else 0


def tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


# ---- what comes back

def bundle_profile(item: Item, out: str) -> str | None:
    """OUT/profile-NAME.tar.gz of the item's profile dir, under MAX_FILE: xplane.pb only when it fits."""
    if not item.profile_dir or not os.path.isdir(item.profile_dir):
        return None
    name = os.path.basename(item.profile_dir)
    target = os.path.join(out, f"{name}.tar.gz")
    files = sorted(os.listdir(item.profile_dir))
    for keep in (files, [f for f in files if f != "xplane.pb"]):
        with tarfile.open(target, "w:gz") as tar:
            for f in keep:
                tar.add(os.path.join(item.profile_dir, f), arcname=f"{name}/{f}")
        if os.path.getsize(target) < MAX_FILE:
            return target
    os.remove(target)
    return None


def bundle_logs(work: str, out: str):
    """OUT/logs.tar.gz: the logs and the small results (the JSONs and XML in the work dir)."""
    target = os.path.join(out, "logs.tar.gz")
    with tarfile.open(target + ".tmp", "w:gz") as tar:
        for root in (os.path.join(work, "logs"), work):
            for f in sorted(os.listdir(root)):
                path = os.path.join(root, f)
                if os.path.isfile(path) and os.path.getsize(path) < MAX_FILE // 4:
                    tar.add(path, arcname=f"logs/{f}")
    os.replace(target + ".tmp", target)


def environment() -> dict:
    """The machine (bench/harness.py's record, with the versions of what the run used) and the GPU as nvidia-smi
    reads it (read only)."""
    env = harness.environment("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
                              "orbax-checkpoint", "grain", "numpy", "torch", "triton", "transformers", "fastapi",
                              "uvicorn", "pytest", "tensorstore")
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        env["nvidia_smi"] = {"query": query, "output": smi.stdout.strip()}
    return env


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the folder that comes back (created)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and a short plan, on any backend")
    p.add_argument("--budget", type=float, help="seconds from GPU_RUN_T0 (default 540; --smoke 1500)")
    p.add_argument("--only", default="", help="comma-separated globs of item names to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated globs of item names to leave out")
    p.add_argument("--serve_flags", help="more flags for bench/serve.py (default: a short run)")
    p.add_argument("--work", default="/tmp/jaxgpt_gpu_run", help="scratch: logs, caches, results before bundling")
    p.add_argument("--list", action="store_true", help="print the plan with its estimates and exit")
    args = p.parse_args()
    if args.serve_flags is None:
        args.serve_flags = ("--new_tokens=8 --repeats=1 --load_weights=" if args.smoke else  # docs/serving.md
                            "--time_limit=200 --repeats=3 --requests=8 --load_tokens=64 --load_weights=float32")
    budget = args.budget or (1500 if args.smoke else 540)
    t0 = float(os.environ.get("GPU_RUN_T0") or time.time())
    work = args.work
    items = select(plan(args, work), args.only, args.skip)
    if args.list:
        print_plan(items, budget)
        return
    shutil.rmtree(work, ignore_errors=True)
    for d in (args.out, os.path.join(work, "logs")):
        os.makedirs(d, exist_ok=True)
    run_all(items, args, budget, t0, work)


def select(items: list[Item], only: str, skip: str) -> list[Item]:
    def hit(name, globs):
        return any(fnmatch.fnmatch(name, g.strip()) for g in globs.split(",") if g.strip())
    return [i for i in items if (not only or hit(i.name, only)) and not hit(i.name, skip)]


def print_plan(items: list[Item], budget: float):
    total = 0.0
    for i in items:
        total += i.est
        print(f"{i.name:32s} {i.part:8s} est {i.est:4.0f} s  cumulative {total:5.0f} s"
              + ("" if total <= budget else "  (past the budget)"))


def run_all(items: list[Item], args, budget: float, t0: float, work: str):
    cache = os.path.join(work, "jax_cache")
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": cache, "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor"),
                       "TRITON_CACHE_DIR": os.path.join(work, "triton"), "PYTHONUNBUFFERED": "1",
                       "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    results = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke,
               "budget_s": budget, "plan": [{"name": i.name, "part": i.part, "est_s": i.est} for i in items],
               "env": environment(), "items": {}}
    install = os.environ.get("GPU_RUN_INSTALL_LOG")
    if install and os.path.exists(install):
        results["install"] = tail(install, 4000)
    print(f"=== {len(items)} items, budget {budget:.0f} s from the start of gpu.sh "
          f"({time.time() - t0:.0f} s gone); results in {args.out}", flush=True)
    for item in items:
        left = budget - (time.time() - t0)
        reason = why_not(item) or (f"budget: {left:.0f} s left, estimated {item.est:.0f} s" if left < item.est
                                   else None)
        if reason:
            results["items"][item.name] = {"part": item.part, "status": "skipped", "reason": reason, "est_s": item.est}
            print(f"--- {item.name}: skipped ({reason})", flush=True)
        else:
            print(f"--- {item.name} (est {item.est:.0f} s, timeout {min(item.cap, left - 3):.0f} s)", flush=True)
            record = run_item(item, min(item.cap, left - 3), os.path.join(work, "logs"), cache)
            if item.profile_dir and (bundle := bundle_profile(item, args.out)):
                record["bundle"] = os.path.basename(bundle)
            results["items"][item.name] = record
            print(f"    {record['status']} in {record['seconds']} s" + one_line(record), flush=True)
        results["elapsed_s"] = round(time.time() - t0, 1)
        write_json(os.path.join(args.out, "results.json"), results)
        bundle_logs(work, args.out)
    finish(results, args.out)


def one_line(record: dict) -> str:
    r = record.get("result", {})
    if "step_ms_median" in r:
        mem = r.get("peak_bytes_in_use")
        start = f"compile {r['compile_s']:.0f} s" if "compile_s" in r else f"first step {r['first_step_s']:.0f} s"
        return (f": {r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:,.0f} tok/s"
                + (f", peak {mem / 2**30:.1f} GiB" if mem else "") + f", {start}")
    if "tests" in record:
        return f": {record['tests']['counts']}"
    return ""


def finish(results: dict, out: str):
    """summary.md from bench/gpu/report.py, printed last (a device run's reply shows the end of the output)."""
    try:
        from bench.gpu import report
        text = report.report(out)
    except Exception as e:  # noqa: BLE001 - the report is a convenience; results.json is what counts
        text = f"(bench/gpu/report.py failed: {type(e).__name__}: {e})"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    files = sorted(os.listdir(out))
    print(text)
    print(f"=== done in {results['elapsed_s']} s; {len(files)} files in {out}: {', '.join(files)}")
    if len(files) > 8 or any(os.path.getsize(os.path.join(out, f)) >= 16 * 2**20 for f in files):
        print("warning: more than 8 files or one of 16 MiB or more: not all of them come back")


if __name__ == "__main__":
    main()
