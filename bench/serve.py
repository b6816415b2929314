"""Serving speed on the same random GPT-2 124M weights in one run, on whatever device jax and torch find (a GPU when
there is one): batch-1 decoding with float32 / bfloat16 / int8 weights against Hugging Face generate on the same
device, then `python -m jaxgpt.serve` under 1, 8 and 32 concurrent HTTP clients.

    python -m bench.serve [--json=serve_results.json] [--time_limit=180] [--prompt_len=64] [--new_tokens=128]
                          [--clients=1,8,32] [--requests=8] [--load_tokens=32] [--repeats=3] [--smoke]

Decoding: one greedy request through jaxgpt.serving.engine (prefill included, as in HF generate), best of --repeats,
round-robin, after an untimed warm-up; 'same' counts greedy tokens equal to float32's. HF generate runs in float32
(and, on a GPU, bfloat16 too; on a CPU at 1 and all threads); 'vs HF' is against its fastest float32 row. Load: a
server process on 127.0.0.1; each client sends --requests streamed requests one after another (--load_tokens new
tokens each, greedy, distinct random prompts); every batch size is compiled by a warm-up wave first. Latency is per
request, from sending it to [DONE]; 'first' is the time to its first streamed text.

Bounded: no measurement starts once --time_limit seconds have passed since the start (what is left is listed as
skipped), and every request times out within the time left plus 60 s. The JSON (--json) is rewritten after each part, so
a run cut short still leaves what it measured. --smoke: a 2-layer, 64-wide model and short runs, to prove the script
on any machine; its figures mean nothing. On a GPU jax does not preallocate (the server process, torch and this one
share the device).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax starts: three users of one GPU

import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402

import torch_bridge  # noqa: E402
from bench import harness, peers  # noqa: E402
from jaxgpt import generate, quantize  # noqa: E402
from jaxgpt.serving import app as http_app  # noqa: E402
from jaxgpt.serving import engine
from jaxgpt.serving.request import Request, Sampling  # noqa: E402

FLAGS = flags.FLAGS
BATCH1_TARGET = 8.0  # issue 25: jaxgpt batch-1 decoding >= 8x HF generate on one H200/H100
LOAD_TARGET = 12.0  # issue 25: 32 clients' tokens/s >= 12x one client's
START = time.monotonic()
GRACE = 60  # seconds past --time_limit that a part already started may take before its requests time out


def left() -> float:
    return FLAGS.time_limit - (time.monotonic() - START)


def wait_s() -> float:
    return max(left(), 0) + GRACE


class Results:
    """The run's JSON: rewritten after every part."""

    def __init__(self, path: str | None):
        self.path, self.data = path, dict(skipped=[])

    def update(self, **parts):
        self.data.update(parts, wall_s=round(time.monotonic() - START, 1))
        if self.path:
            harness.write_json(self.path, self.data)

    def skip(self, what: str):
        print(f"skipped (time limit of {FLAGS.time_limit} s reached): {what}")
        self.update(skipped=self.data["skipped"] + [what])


def decode_once(eng: engine.Engine, prompt, n) -> tuple[float, list[int]]:
    tokens, done = [], threading.Event()
    start = time.perf_counter()
    eng.submit(Request(prompt, Sampling(max_tokens=n, temperature=0.0), 1,
                              on_token=lambda c, t: tokens.append(t), on_finish=lambda c, why: done.set()))
    if not done.wait(wait_s()):
        raise TimeoutError(f"a batch-1 request outlasted the time limit and {GRACE} s more")
    return time.perf_counter() - start, tokens


def hf_runs(hf, prompt, n) -> dict:
    """HF generate's contenders on this device: name -> run() -> tokens."""
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)
    models = {"float32": hf.to(device)}
    if gpu:
        models["bfloat16"] = transformers.GPT2LMHeadModel(hf.config).to(device, torch.bfloat16).eval()
        models["bfloat16"].load_state_dict(hf.state_dict())

    def run(model, threads):
        if threads:
            torch.set_num_threads(threads)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=50256)
        return out[0, len(prompt):].tolist()  # .tolist() waits for the device
    if gpu:
        return {f"HF generate {w}": (lambda m=m: run(m, None)) for w, m in models.items()}
    # torch's thread pool can crawl on oversubscribed cores: its best thread count counts
    return {f"HF generate ({t} thr)": (lambda t=t: run(models["float32"], t)) for t in sorted({1, os.cpu_count()})}


def batch1(hf, prompt, n, results: Results):
    engines = {w: engine.Engine(quantize.convert(torch_bridge.from_hf(hf), w), max_batch=1).start()
               for w in quantize.WEIGHTS}  # from the CPU model, before HF moves to the device
    runs = {f"jaxgpt {w}": (lambda e=e: decode_once(e, prompt, n)[1]) for w, e in engines.items()}
    runs |= hf_runs(hf, prompt, n)
    try:  # the first call of each compiles; the repeats stop at the time limit
        first_s, times, tokens = harness.round_robin(runs, FLAGS.repeats, stop=lambda: left() < 0)
        if left() < 0 and min(map(len, times.values())) < FLAGS.repeats:
            results.skip("batch-1 repeats")
    finally:
        for e in engines.values():
            e.stop()
    best = {name: min(t or [first_s[name]]) for name, t in times.items()}
    hf_best = min(s for name, s in best.items() if name.startswith("HF") and "bfloat16" not in name)
    rows = {name: dict(tokens_per_s=round(n / s, 1), vs_hf_float32=round(hf_best / s, 2),
                       same_as_float32=sum(a == b for a, b in zip(tokens[name], tokens["jaxgpt float32"])),
                       first_run_s=round(first_s[name], 2), timed_runs=len(times[name])) for name, s in best.items()}
    print(f"\nbatch-1 greedy decoding, {len(prompt)}-token prompt, {n} new tokens, best of {FLAGS.repeats}; "
          "'vs HF' is against HF's fastest float32 row")
    print(f"{'contender':<24}{'tokens/s':>10}{'vs HF':>8}{'same as f32':>13}{'first run s':>13}")
    for name, r in rows.items():
        same = f"{r['same_as_float32']}/{n}"
        untimed = "  (no timed run: the first, compiling, counts)" if not r["timed_runs"] else ""
        print(f"{name:<24}{r['tokens_per_s']:>10.1f}{r['vs_hf_float32']:>7.2f}x{same:>13}{r['first_run_s']:>13.2f}"
              f"{untimed}")
    met = {name: r["vs_hf_float32"] >= BATCH1_TARGET for name, r in rows.items() if name.startswith("jaxgpt")}
    results.update(batch1=dict(prompt_len=len(prompt), new_tokens=n, repeats=FLAGS.repeats, rows=rows,
                               target=f">= {BATCH1_TARGET}x HF generate float32", met=met))
    del engines
    gc.collect()


async def client(url, prompts, n, latencies, errors, firsts):
    import httpx
    async with httpx.AsyncClient(timeout=wait_s()) as http:
        tokens = 0
        for prompt in prompts:
            start = time.perf_counter()
            try:
                async with http.stream("POST", f"{url}/v1/completions", json=dict(
                        prompt=prompt, max_tokens=n, temperature=0, stream=True)) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {(await r.aread())[:200]}")
                        continue
                    last = None
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            if last is None:
                                firsts.append(time.perf_counter() - start)
                            last = json.loads(line[6:])
                    if last is None or "usage" not in last:
                        errors.append(f"no usage event: {last}")
                        continue
                    tokens += last["usage"]["completion_tokens"]
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e))
                continue
            latencies.append(time.perf_counter() - start)
        return tokens


def wave(url, clients, requests, n, rng, vocab):
    prompts = [[rng.integers(0, vocab, FLAGS.load_prompt_len).tolist() for _ in range(requests)]
               for _ in range(clients)]
    latencies, errors, firsts = [], [], []

    async def run():
        return await asyncio.wait_for(asyncio.gather(*(client(url, p, n, latencies, errors, firsts)
                                                       for p in prompts)), wait_s())
    start = time.perf_counter()
    tokens = sum(asyncio.run(run()))
    return tokens, time.perf_counter() - start, latencies, errors, firsts


def warm_up(url, rows, rng, vocab):
    """Compiles every shape a wave can meet: one request of b prompts for each batch size b up to `rows` is admitted
    in one prefill of b rows, whose decode steps then run b rows (and the sizes below, as the rows finish)."""
    import httpx
    for b in [1 << i for i in range(rows.bit_length())]:
        prompts = [rng.integers(0, vocab, FLAGS.load_prompt_len).tolist() for _ in range(b)]
        r = httpx.post(f"{url}/v1/completions", json=dict(prompt=prompts, max_tokens=FLAGS.load_tokens,
                                                          temperature=0), timeout=wait_s())
        r.raise_for_status()


def start_server(hf_dir, weights, clients):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", f"--hf={hf_dir}", f"--port={port}",
                             f"--weights={weights}", f"--max_batch={generate.next_power_of_two(max(clients))}"])
    return proc, f"http://127.0.0.1:{port}"


def load(hf, weights, clients: list[int], results: Results):
    import httpx
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        proc, url = start_server(d, weights, clients)
        try:
            http_app.wait_until_serving(url, wait_s(), proc)
            rng = np.random.default_rng(0)
            start = time.perf_counter()
            warm_up(url, generate.next_power_of_two(max(clients)), rng, hf.config.vocab_size)
            for c in clients:  # and the HTTP side of each wave
                wave(url, c, 1, FLAGS.load_tokens, rng, hf.config.vocab_size)
            warm = time.perf_counter() - start
            print(f"\n{weights} weights over HTTP: warm-up (compiling every batch size) {warm:.0f} s; "
                  f"{FLAGS.load_prompt_len}-token prompts, {FLAGS.load_tokens} new tokens per request, greedy, "
                  "streamed")
            print(f"{'clients x requests':<20}{'tokens/s':>10}{'vs 1 client':>13}{'p50 s':>8}{'p99 s':>8}"
                  f"{'first p50':>11}{'first p99':>11}{'errors':>8}")
            rows, one = {}, None
            for c in clients:
                if left() < 0:
                    results.skip(f"load {weights} {c} clients")
                    continue
                tokens, seconds, lat, errors, first = wave(url, c, FLAGS.requests, FLAGS.load_tokens, rng,
                                                           hf.config.vocab_size)
                rate = tokens / seconds
                one = one or rate
                pct = lambda xs, q: round(float(np.percentile(xs, q)), 3) if xs else None
                rows[c] = dict(requests=c * FLAGS.requests, tokens_per_s=round(rate, 1), vs_one=round(rate / one, 2),
                               p50_s=pct(lat, 50), p99_s=pct(lat, 99), first_p50_s=pct(first, 50),
                               first_p99_s=pct(first, 99), errors=len(errors), error_examples=errors[:3])
                r = rows[c]
                print(f"{f'{c} x {FLAGS.requests}':<20}{rate:>10.1f}{r['vs_one']:>12.2f}x{r['p50_s'] or 0:>8.2f}"
                      f"{r['p99_s'] or 0:>8.2f}{r['first_p50_s'] or 0:>11.2f}{r['first_p99_s'] or 0:>11.2f}"
                      f"{len(errors):>8}")
                for e in errors[:3]:
                    print("   ", e)
            stats = httpx.get(f"{url}/healthz", timeout=10).json()
            print(f"server: {stats}")
            top = rows.get(max(clients))
            results.update(load={**results.data.get("load", {}), weights: dict(
                prompt_len=FLAGS.load_prompt_len, new_tokens=FLAGS.load_tokens, warmup_s=round(warm, 1),
                clients=rows, server=stats, target=f"{max(clients)} clients >= {LOAD_TARGET}x one client, 0 errors",
                met=bool(top and 1 in rows and top["vs_one"] >= LOAD_TARGET
                         and not any(r["errors"] for r in rows.values())))})
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def main(argv):
    del argv
    if FLAGS.smoke:  # flags given on the command line still win
        for name, value in dict(new_tokens=16, repeats=1, requests=2, load_tokens=8, clients=["1", "4"]).items():
            if not FLAGS[name].present:
                FLAGS[name].value = value
    clients = sorted(int(c) for c in FLAGS.clients)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    hf = peers.hf_gpt2(**(dict(n_layer=2, n_head=4, n_embd=64) if FLAGS.smoke else {})).eval()  # else 124M
    device = jax.devices()[0]
    env = harness.environment()
    torch_device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"GPT-2 {'smoke (2 layers, 64 wide)' if FLAGS.smoke else '124M'} (random init); jax {jax.__version__} on "
          f"{device.device_kind}, torch {torch.__version__} on {torch_device}; {env['cpu']}, {env['cores']} cores; "
          f"load average {env['load']}")
    results = Results(FLAGS.json)
    results.update(smoke=FLAGS.smoke, jax=jax.__version__, jax_device=device.device_kind, torch=torch.__version__,
                   torch_device=torch_device, cpu=env["cpu"], cores=env["cores"], python=env["python"],
                   time_limit_s=FLAGS.time_limit, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if FLAGS.batch1:
        prompt = np.random.default_rng(0).integers(0, hf.config.vocab_size, FLAGS.prompt_len).tolist()
        batch1(hf, prompt, FLAGS.new_tokens, results)
    hf = hf.to("cpu")  # the server process loads the saved copy
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for weights in FLAGS.load_weights:
        if left() < 0:
            results.skip(f"load {weights}")
            continue
        load(hf, weights, clients, results)
    print(f"\ntotal {time.monotonic() - START:.0f} s" + (f"; results in {FLAGS.json}" if FLAGS.json else ""))


if __name__ == "__main__":
    flags.DEFINE_integer("prompt_len", 64, "batch-1 prompt tokens")
    flags.DEFINE_integer("new_tokens", 128, "batch-1 tokens generated per run")
    flags.DEFINE_integer("repeats", 3, "batch-1 timed runs per contender; the best counts")
    flags.DEFINE_bool("batch1", True, "measure batch-1 decoding")
    flags.DEFINE_list("load_weights", ["float32"], "weights of the load test's server (empty: no load test)")
    flags.DEFINE_list("clients", ["1", "8", "32"], "concurrent clients of each load wave (the largest sets "
                      "--max_batch)")
    flags.DEFINE_integer("load_prompt_len", 32, "load-test prompt tokens")
    flags.DEFINE_integer("load_tokens", 32, "load-test new tokens per request")
    flags.DEFINE_integer("requests", 8, "requests per client, one after another")
    flags.DEFINE_float("time_limit", 600, "seconds after which no measurement starts (requests time out 60 s "
                       "after it)")
    flags.DEFINE_string("json", None, "write the results here as JSON (rewritten after each part)")
    flags.DEFINE_bool("smoke", False, "a 2-layer, 64-wide model and short runs: proves the script anywhere")
    app.run(main)
