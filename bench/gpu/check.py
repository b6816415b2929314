"""The GPU device check behind bench/gpu/gpu.sh: three checks, a printed summary and one JSON of results.

    python -m bench.gpu.check [RESULTS_JSON (default gpu_results.json)] [--smoke] [--only=attention,step,train]
        [--config=configs/124m.py] [--set=model.kernels=gpu ...] [--profile=DIR]

attention: jax.nn.dot_product_attention(is_causal=True) with implementation="cudnn" against "xla", in bf16 at the
    124M shape (B=8, T=1024, 12 heads of 64), inputs N(0, 1): the output and the gradients (dq, dk, dv of
    sum(out * g) for a fixed random g) must agree within TOL (below); XLA's float32 result is reported beside them
    for scale. Then jaxgpt's own path: a 2-layer model of 124M's widths with model.attention=cudnn against xla
    (same parameters: the loss and every gradient), and which implementation attention=auto resolves to here.
step: the 124M train step of configs/124m.py (--config) in bf16, built as jaxgpt/train.py's Trainer builds it
    (make_steps, fresh_state, sharding.host_batch_to_global), on random tokens (`step_tokens`, which
    bench/gpu/peer.py feeds PyTorch too): compiled (lower + compile, timed), warmed up, then each step timed to
    block_until_ready. Tokens/s, MFU (jaxgpt/metrics.py's FLOPs per token over the datasheet dense bf16 peak of its
    table, H100/H200 989 TFLOP/s; PEAK_FLOPS=... for other devices), and peak device memory (memory_stats()).
    --set=FIELD=VALUE (repeatable) overrides config fields as --config.FIELD=VALUE would (the variants of
    bench/gpu/run.py; ml_collections parses them, bench/harness.py's load_config); XLA_FLAGS from the
    environment is recorded. --profile=DIR then traces --profile_steps more steps (jax.profiler, perfetto JSON)
    and writes DIR/trace.json.gz, DIR/xplane.pb, DIR/hlo.txt.gz (the compiled step's optimized HLO) and
    DIR/analysis.json (cost_analysis, memory_analysis), for bench/gpu/trace_table.py.
train: `python -m jaxgpt.train --config=configs/124m.py` (--config; a missing file is a skip) for 200 steps on
    synthetic tokens a model can learn in that time (a fixed random Markov chain over 512 GPT-2 tokens, about 0.9
    nats per token; uniform tokens could not go below ln 50257), written as llm.c shards with a GPT-2
    tokenizer.json. Each step's loss comes from the
    workdir's metrics.jsonl: the mean of the last 10 must lie --min_fall nats below the mean of the first 10.

Batches are set with batch_size and grad_accum_steps (--step_batch/--step_accum, --train_batch/--train_accum); a
config's device_batch_size and tokens_per_step, where it has them, are set to 0 so that they do not override them.
The 200 steps keep the recipe's optimizer and schedule (configs/124m.py: warmup of 715 steps, decay over 19,073): the
first 200 steps of the real run, at a smaller batch.

--smoke: a 2-layer, 64-wide, T=64 model, short runs and lr 1e-2 after 5 warmup steps (so that 60 steps show a
fall), on any backend (a CPU too): it proves the script, its figures mean nothing. Without cuDNN (off a GPU) the
attention check compares jaxgpt's blocked kernel with XLA's instead, and says so in the JSON. Each check runs in a
process of its own (a GPU process preallocates most of the memory, and one that crashes takes no other with it); the
JSON is rewritten after each check.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import harness
from bench.harness import REPO, write_json

CONFIG = "configs/124m.py"
VOCAB = 50257  # GPT-2's tokenizer, which configs/124m.py trains with
# bf16 agreement: elementwise |a - b| <= TOL * (1 + |b|), 2e-2 absolute on unit-scale values and relative on larger
# ones (gradients exceed 1). bf16 keeps 8 significant bits (one ulp is 2**-8 = 3.9e-3 of the value); the
# implementations round scores, probabilities and results to bf16 at different points, a few ulps apart at most,
# and 2e-2 is ~5 ulps. A wrong mask, scale or layout is off by O(1).
TOL = 2e-2
# jaxgpt's model, cudnn against xla: the mean loss over B*T tokens (bf16 noise averages out) and the gradients'
# relative distance ||g_a - g_b|| / ||g_b||, per parameter and over all of them.
MODEL_LOSS_TOL = 1e-2
MODEL_GRAD_TOL = 2e-2
SMOKE_MODEL = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)  # --smoke's model (bench/gpu/peer.py's too)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default="gpu_results.json", help="the results JSON to write")
    p.add_argument("--smoke", action="store_true", help="tiny model, short runs, any backend")
    p.add_argument("--only", default="attention,step,train", help="checks to run, comma-separated")
    p.add_argument("--step_batch", type=int, default=16, help="sequences per micro-batch of the timed step")
    p.add_argument("--step_accum", type=int, default=4, help="micro-batches per timed step")
    p.add_argument("--step_steps", type=int, default=20, help="timed steps (after compiling and 3 warm-up steps)")
    p.add_argument("--train_steps", type=int, default=200)
    p.add_argument("--train_batch", type=int, default=16, help="sequences per step of the training run")
    p.add_argument("--train_accum", type=int, default=1)
    p.add_argument("--min_fall", type=float, default=1.0, help="nats the loss must fall, first 10 steps to last 10")
    p.add_argument("--timeout", type=int, default=300, help="seconds each check's process may take")
    p.add_argument("--config", default=CONFIG, help="the training config of the step and train checks")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field of the step and train checks (repeatable)")
    p.add_argument("--profile", help="step check: also write a profile of --profile_steps steps into this dir")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run this one check here, write its JSON to out
    if "--smoke" in sys.argv[1:]:  # small enough for a 2-core CPU; flags given still win
        p.set_defaults(step_batch=4, step_accum=2, step_steps=3, train_steps=60, train_batch=8, min_fall=0.5)
    args = p.parse_args()
    args.set = dict(parse_set(item) for item in args.set)
    if args.worker:
        result = {"attention": check_attention, "step": check_step}[args.worker](args)
        result["env"] = harness.jax_device()
        write_json(args.out, result)
        return

    checks = [c.strip() for c in args.only.split(",") if c.strip()]
    if unknown := set(checks) - {"attention", "step", "train"}:
        sys.exit(f"error: --only names unknown checks {sorted(unknown)}")
    results = {"smoke": args.smoke, "started": datetime.datetime.now().isoformat(timespec="seconds"),
               **harness.environment("jax"), "tolerance": TOL, "checks": {}}
    results["jax"] = results["versions"]["jax"]  # the workers add the device's details
    t0 = time.perf_counter()
    for name in checks:
        print(f"--- {name}", flush=True)
        start = time.perf_counter()
        try:
            result = run_train(args) if name == "train" else run_worker(name, args)
        except Exception as e:  # a failed check is a result too; the others still run
            result = {"passed": False, "error": f"{type(e).__name__}: {e}"}
        if env := result.pop("env", None):
            results.update(env)
        result["seconds"] = round(time.perf_counter() - start, 1)
        results["checks"][name] = result
        results["passed"] = all(c.get("passed") for c in results["checks"].values() if "skipped" not in c)
        results["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(args.out, results)
        print(summary(name, result), flush=True)
    print(f"=== {'PASSED' if results['passed'] else 'FAILED'}: {', '.join(checks)} in {results['seconds']} s on "
          f"{results.get('device_kind', '?')} (jax {results.get('jax', '?')}){', SMOKE' if args.smoke else ''}; "
          f"results in {args.out}")
    sys.exit(0 if results["passed"] else 1)


def run_worker(name: str, args) -> dict:
    """One check in a fresh process (this file with --worker), its result read back from a temporary JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "part.json")
        cmd = [*harness.module_command("bench.gpu.check", part, f"--worker={name}"), *(["--smoke"] * args.smoke),
               f"--step_batch={args.step_batch}", f"--step_accum={args.step_accum}", f"--step_steps={args.step_steps}",
               f"--config={args.config}", *(f"--set={k}={v}" for k, v in args.set.items()),
               *([f"--profile={args.profile}", f"--profile_steps={args.profile_steps}"] if args.profile else [])]
        proc = subprocess.run(cmd, cwd=REPO, timeout=args.timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        if proc.returncode or not os.path.exists(part):
            return {"passed": False, "error": f"exit status {proc.returncode}", "log_tail": proc.stdout[-3000:]}
        with open(part) as f:
            return json.load(f)


def compare(a, b) -> dict:
    """Max |a - b|, the worst |a - b| / (1 + |b|) (<= TOL passes), and max |b| for scale."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    diff = np.abs(a - b)
    return {"max_abs_diff": float(diff.max()), "worst_ratio": float((diff / (1 + np.abs(b))).max()),
            "max_abs": float(np.abs(b).max())}


def check_attention(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxgpt.ops import Ops, resolve_attention

    on_gpu = jax.default_backend() == "gpu"
    test = "cudnn" if on_gpu else "blocked"  # cuDNN exists only on NVIDIA GPUs
    B, T, H, D = (2, 256, 4, 64) if args.smoke else (8, 1024, 12, 64)
    q, k, v, g = (jax.random.normal(key, (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
                  for key in jax.random.split(jax.random.PRNGKey(0), 4))

    def attention(impl: str, dtype):
        def out(q, k, v):
            q, k, v = (x.astype(dtype) for x in (q, k, v))
            if impl == "blocked":  # jaxgpt's own kernel, (B, T, 3, H, D) in
                return Ops(attention="blocked", dtype=jnp.dtype(dtype).name).causal_attention(
                    jnp.stack([q, k, v], axis=2))
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

        def loss(q, k, v):
            return jnp.sum(out(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))
        return jax.jit(lambda q, k, v: (out(q, k, v), *jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))

    names = ("out", "dq", "dk", "dv")
    ref = attention("xla", jnp.float32)(q, k, v)
    xla = attention("xla", jnp.bfloat16)(q, k, v)
    tested = attention(test, jnp.bfloat16)(q, k, v)
    kernel = {n: {f"{test}_vs_xla": compare(a, b), f"{test}_vs_f32": compare(a, r), "xla_vs_f32": compare(b, r)}
              for n, a, b, r in zip(names, tested, xla, ref)}
    kernel_ok = all(kernel[n][f"{test}_vs_xla"]["worst_ratio"] <= TOL for n in names)

    model_result = check_model_attention(test, args.smoke)
    auto = resolve_attention("auto", "bfloat16")
    result = {
        "compared": f"{test} vs xla" + ("" if on_gpu else " (no cuDNN off a GPU: jaxgpt's blocked kernel instead)"),
        "shape_BTHD": [B, T, H, D], "dtype": "bfloat16", "criterion": f"|a - b| <= {TOL} * (1 + |b|)",
        "kernel": kernel, "kernel_passed": kernel_ok, "model": model_result, "auto_resolves_to": auto,
        "auto_passed": auto == ("cudnn" if on_gpu else "blocked"),
    }
    result["passed"] = kernel_ok and model_result["passed"] and result["auto_passed"]
    return result


def check_model_attention(test: str, smoke: bool) -> dict:
    """jaxgpt's GPT, 2 layers of 124M's widths in bf16, with model.attention=test against xla: the same parameters
    (one seed), the loss and every parameter's gradient on one batch."""
    import jax
    from flax import nnx

    from jaxgpt import model as gpt

    shape = dict(n_head=2, n_embd=64, block_size=64) if smoke else dict(n_head=12, n_embd=768, block_size=1024)
    B = 2 if smoke else 4
    tokens = np.random.default_rng(0).integers(0, VOCAB, (B, shape["block_size"] + 1), dtype=np.int32)

    def loss_and_grads(impl: str):
        config = gpt.GPTConfig(n_layer=2, **shape, dtype="bfloat16", attention=impl)
        graphdef, params = nnx.split(gpt.build(config, seed=0), nnx.Param)

        def loss(params):
            logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1])
            return gpt.cross_entropy(logits, tokens[:, 1:])
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return float(value), {jax.tree_util.keystr(path).replace(".value", ""): np.asarray(g, np.float32)
                              for path, g in jax.tree_util.tree_leaves_with_path(grads)}

    (la, ga), (lb, gb) = loss_and_grads(test), loss_and_grads("xla")
    per_param = {name: float(np.linalg.norm(ga[name] - gb[name]) / max(np.linalg.norm(gb[name]), 1e-30))
                 for name in gb}
    total = float(np.sqrt(sum(np.sum((ga[n] - gb[n]) ** 2) for n in gb) / sum(np.sum(gb[n] ** 2) for n in gb)))
    worst = max(per_param, key=per_param.get)
    return {"layers": 2, **shape, "batch": B, f"loss_{test}": la, "loss_xla": lb, "loss_abs_diff": abs(la - lb),
            "grad_rel_diff": total, "worst_param": worst, "worst_param_rel_diff": per_param[worst],
            "criterion": f"|loss diff| <= {MODEL_LOSS_TOL}, each gradient's ||a - b|| / ||b|| <= {MODEL_GRAD_TOL}",
            "passed": abs(la - lb) <= MODEL_LOSS_TOL and per_param[worst] <= MODEL_GRAD_TOL}


def parse_set(item: str) -> tuple[str, str]:
    """--set=FIELD=VALUE -> (FIELD, VALUE as text; harness.load_config converts it to the field's type)."""
    field, sep, value = item.partition("=")
    if not sep or not field:
        sys.exit(f"error: --set={item!r}: expected FIELD=VALUE, e.g. --set=model.kernels=gpu")
    return field, value


def overrides(args, *, batch: int, accum: int) -> dict:
    """The config fields the check sets, for harness.load_config and as --config.FIELD=VALUE flags alike: the batch,
    then the smoke model (with --smoke), then --set."""
    base = harness.load_config(args.config)
    o = {"batch_size": batch, "grad_accum_steps": accum}
    for name in ("device_batch_size", "tokens_per_step"):  # they would derive batch_size and grad_accum_steps
        if name in base:
            o[name] = 0
    if args.smoke:
        o.update({"model.preset": "", **{f"model.{k}": v for k, v in SMOKE_MODEL.items()}, "optim.lr": 1e-2,
                  "optim.warmup_steps": 5})
        if base.model.get("value_embeds", 0):  # at most n_layer / 2 of them
            o["model.value_embeds"] = min(base.model.value_embeds, SMOKE_MODEL["n_layer"] // 2)
    return {**o, **args.set}


def step_tokens(accum: int, batch: int, block_size: int) -> np.ndarray:
    """One optimizer step's random tokens (1, accum, batch, block_size + 1), int32: the same for every process of
    a run, jaxgpt's and PyTorch's (bench/gpu/peer.py)."""
    return np.random.default_rng(0).integers(0, VOCAB, (1, accum, batch, block_size + 1), dtype=np.int32)


def check_step(args) -> dict:
    import jax

    from jaxgpt import metrics
    from jaxgpt.ops import resolve_attention
    from jaxgpt.step import fresh_state

    config = harness.load_config(args.config, overrides(args, batch=args.step_batch, accum=args.step_accum))
    steps, mc, mesh = harness.train_steps(config, VOCAB)
    state = fresh_state(steps, mc, config.seed)
    A, B, T = config.grad_accum_steps, config.batch_size, mc.block_size
    batch = harness.global_batch(mesh, step_tokens(A, B, T))
    compiled, trace_s, xla_s = harness.compile_step(steps, mesh, (1, A, B, T))  # from JAX_COMPILATION_CACHE_DIR
    holder = [state]

    def one_step(state):
        state, step_metrics = compiled(state, batch)
        jax.block_until_ready((state, step_metrics))
        return state, float(step_metrics["loss"][0])

    def next_step():
        holder[0], loss = one_step(holder[0])
        return loss

    timing, losses = harness.step_timing(next_step, args.step_steps, A * B * T)
    state, tok_s = holder[0], timing["tokens_per_s"]
    fpt = metrics.flops_per_token(steps.n_params, mc.n_lookup_params, mc.n_layer, mc.block_size, mc.n_embd)
    peak = metrics.peak_flops_per_device(float(os.environ.get("PEAK_FLOPS", 0)))
    stats = jax.local_devices()[0].memory_stats() or {}
    result = {
        "config": args.config, "set": args.set, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "model": {"n_layer": mc.n_layer, "n_head": mc.n_head, "n_embd": mc.n_embd, "block_size": T,
                  "params": steps.n_params, "dtype": mc.dtype, "attention": resolve_attention(mc.attention, mc.dtype),
                  "kernels": mc.kernels, "scan_layers": mc.scan_layers, "remat": mc.remat,
                  "loss_chunk": mc.loss_chunk},
        "batch_size": B, "grad_accum_steps": A, "compile_s": trace_s + xla_s, **timing,
        "flops_per_token": fpt, "peak_flops_per_device": peak,
        "mfu": fpt * tok_s / (peak * jax.device_count()) if peak else None,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit"),
        "losses": losses, "passed": bool(np.all(np.isfinite(losses))),
    }
    if args.profile:
        result["profile"] = capture_profile(compiled, one_step, state, args.profile, args.profile_steps)
    return result


def capture_profile(compiled, one_step, state, out_dir: str, n_steps: int) -> dict:
    """n_steps more steps under jax.profiler (no Python tracer), and what an offline analysis needs of the compiled
    step, into out_dir: trace.json.gz (perfetto), xplane.pb, hlo.txt.gz, analysis.json."""
    import gzip
    import shutil

    import jax
    os.makedirs(out_dir, exist_ok=True)
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True, profiler_options=options):
            for _ in range(n_steps):
                state, _ = one_step(state)
        for pattern, name in (("perfetto_trace.json.gz", "trace.json.gz"), ("*.xplane.pb", "xplane.pb")):
            found = glob.glob(os.path.join(tmp, "**", pattern), recursive=True)
            if found:
                shutil.copy(found[0], os.path.join(out_dir, name))
    with gzip.open(os.path.join(out_dir, "hlo.txt.gz"), "wt") as f:
        f.write(compiled.as_text())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict in older jax
    memory = compiled.memory_analysis()
    analysis = {
        "profile_steps": n_steps, "module": "train_steps",
        "cost_analysis": {k: float(v) for k, v in (cost or {}).items() if isinstance(v, (int, float))},
        "memory_analysis": {k: getattr(memory, k) for k in dir(memory) if k.endswith("_in_bytes")},
    }
    write_json(os.path.join(out_dir, "analysis.json"), analysis)
    return {"dir": out_dir, "steps": n_steps, "files": sorted(os.listdir(out_dir)),
            "flops_per_step_xla": analysis["cost_analysis"].get("flops"),
            "temp_bytes": analysis["memory_analysis"].get("temp_size_in_bytes")}


def markov_tokens(n: int, seed: int, *, states: int = 512, chains: int = 256) -> np.ndarray:
    """n tokens of `chains` runs of one fixed random Markov chain over `states` GPT-2 token ids: each token is
    followed by one of 4 successors with probabilities .7/.15/.1/.05 (entropy ~0.9 nats; uniform over the states,
    ln 512 = 6.2, is what a model knowing only the token counts would reach)."""
    rng = np.random.default_rng(1234)  # the chain is the same for train and val; seed draws the runs
    ids = rng.choice(VOCAB - 1, states, replace=False)  # the end-of-text token stays out
    successors = rng.integers(0, states, (states, 4))
    cumulative = np.cumsum([0.7, 0.15, 0.1, 0.05])
    runs = np.random.default_rng(seed)
    length = -(-n // chains)
    out = np.empty((chains, length), np.int64)
    s = runs.integers(0, states, chains)
    for t in range(length):
        out[:, t] = s
        s = successors[s, np.searchsorted(cumulative, runs.random(chains) * cumulative[-1])]
    return ids[out.reshape(-1)[:n]]


def train_flags(args) -> list[str]:
    """--config.FIELD=VALUE flags: the check's batch and --set, 200 steps of the config's own schedule (its decay
    steps kept), logging every step, one evaluation at the end; run-time extras only where the config has them."""
    base = harness.load_config(args.config)
    o = overrides(args, batch=args.train_batch, accum=args.train_accum)
    extras = {"max_steps": args.train_steps, "optim.decay_steps": base.optim.get("decay_steps") or base.max_steps,
              "log_every": 1, "eval_every": args.train_steps, "eval_iters": 2, "sample_tokens": 0,
              "progress_bar": False, "hellaswag_file": ""}
    if os.environ.get("PEAK_FLOPS"):  # as the step check: a device the table lacks
        extras["peak_flops"] = float(os.environ["PEAK_FLOPS"])
    o.update({k: v for k, v in extras.items() if has_field(base, k)})
    return [f"--config.{k}={v}" for k, v in o.items()]


def has_field(config, dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    for name in parents:
        if name not in config:
            return False
        config = config[name]
    return leaf in config


def run_train(args) -> dict:
    from jaxgpt import data, plot

    if not os.path.exists(os.path.join(REPO, args.config)):
        return {"skipped": f"{args.config} does not exist in this checkout"}
    config = harness.load_config(args.config, overrides(args, batch=args.train_batch, accum=args.train_accum))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, workdir = os.path.join(tmp, "data"), os.path.join(tmp, "run")
        os.makedirs(data_dir)
        data.write_shard(os.path.join(data_dir, "synthetic_train_000000.bin"), markov_tokens(2_000_000, seed=0))
        data.write_shard(os.path.join(data_dir, "synthetic_val_000000.bin"), markov_tokens(200_000, seed=1))
        with open(os.path.join(data_dir, "tokenizer.json"), "w") as f:
            json.dump({"kind": "gpt2"}, f)
        cmd = [sys.executable, "-m", "jaxgpt.train", f"--config={args.config}", f"--workdir={workdir}",
               f"--config.data.dir={data_dir}", *train_flags(args)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, timeout=args.timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        wall = time.perf_counter() - start
        log = proc.stdout
        if proc.returncode:
            return {"passed": False, "error": f"jaxgpt.train exit status {proc.returncode}", "log_tail": log[-3000:],
                    "command": " ".join(cmd)}
        rows = plot.read_metrics(workdir)
    losses = [r["loss"] for r in sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    speeds = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][len(losses) // 4:]  # past compilation
    mfus = [r["mfu"] for r in rows if "mfu" in r][len(losses) // 4:]
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    return {
        "command": f"python -m jaxgpt.train --config={args.config} --workdir=TMP --config.data.dir=TMP/data "
                   + " ".join(train_flags(args)),
        "steps": len(losses), "tokens_per_step": args.train_batch * args.train_accum * config.model.block_size,
        "wall_s": wall, "loss_first10_mean": first, "loss_last10_mean": last, "loss_fall": first - last,
        "min_fall": args.min_fall, "loss_every_20": losses[::20] + losses[-1:], "val_loss": val[-1] if val else None,
        "tokens_per_s_median": float(np.median(speeds)) if speeds else None,
        "mfu_median": float(np.median(mfus)) if mfus else None,
        "log_lines": [line for line in log.splitlines() if line.startswith(("model:", "mesh:", "data:"))],
        "passed": bool(len(losses) == args.train_steps and np.all(np.isfinite(losses))
                       and first - last >= args.min_fall),
    }


def summary(name: str, r: dict) -> str:
    if "skipped" in r:
        return f"{name}: SKIPPED: {r['skipped']}"
    verdict = "PASS" if r.get("passed") else "FAIL"
    if "error" in r:
        return f"{name}: {verdict}: {r['error']}\n{r.get('log_tail', '')}"
    if name == "attention":
        test = r["compared"].split()[0]
        worst = {n: f"{v[f'{test}_vs_xla']['max_abs_diff']:.2e}" for n, v in r["kernel"].items()}
        m = r["model"]
        return (f"attention: {verdict}: {r['compared']}, {r['shape_BTHD']} bf16, max |diff| {worst}, worst ratio "
                f"{max(v[f'{test}_vs_xla']['worst_ratio'] for v in r['kernel'].values()):.2e} (tolerance {TOL}); "
                f"model: loss diff {m['loss_abs_diff']:.2e}, gradient rel diff {m['grad_rel_diff']:.2e} (worst "
                f"{m['worst_param_rel_diff']:.2e}, {m['worst_param']}); auto -> {r['auto_resolves_to']}")
    if name == "step":
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak for this device)"
        mem = f"{r['peak_bytes_in_use'] / 2**30:.2f} GiB" if r["peak_bytes_in_use"] else "n/a"
        return (f"step: {verdict}: {r['model']['params'] / 1e6:.1f}M params, {r['batch_size']} x "
                f"{r['model']['block_size']} x {r['grad_accum_steps']} tokens/step, "
                f"attention {r['model']['attention']}: "
                f"{r['step_ms_median']:.1f} ms/step (median of {r['timed_steps']}), {r['tokens_per_s']:,.0f} tok/s, "
                f"MFU {mfu}, peak memory {mem}, compile {r['compile_s']:.1f} s")
    return (f"train: {verdict}: {r['steps']} steps, loss {r['loss_first10_mean']:.3f} (first 10) -> "
            f"{r['loss_last10_mean']:.3f} (last 10), fall {r['loss_fall']:.3f} (needed {r['min_fall']}), val loss "
            f"{r['val_loss'] or float('nan'):.3f}, {r['tokens_per_s_median'] or 0:,.0f} tok/s"
            + (f", MFU {100 * r['mfu_median']:.1f}%" if r["mfu_median"] is not None else "")
            + f", {r['wall_s']:.0f} s wall")


if __name__ == "__main__":
    main()
