"""Serving speed on the same random 124M GPT-2 weights in one run: batch-1 decoding with float32 / bfloat16 / int8
weights against Hugging Face generate, then `python -m jaxgpt.serve` under 1, 8 and 32 concurrent HTTP clients.

    python bench/serve.py [--prompt_len=64] [--new_tokens=128] [--load_tokens=32] [--requests=8] [--repeats=3]

Decoding: one greedy request through jaxgpt.engine (prefill included, as in HF generate), best of --repeats,
round-robin, after an untimed warm-up; 'same' counts greedy tokens equal to float32's. Load: a server process on
127.0.0.1; each client sends --requests streamed requests one after another (--load_tokens new tokens each, greedy,
distinct random prompts); every shape is compiled by a warm-up wave first. Latency is per request, from sending
it to [DONE]; 'first' is the time to its first streamed text: a request joining a running batch waits for one
step and its prefill, not for the batch to end.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import transformers
from absl import app, flags

import torch_bridge
from jaxgpt import engine, quantize, serve

FLAGS = flags.FLAGS


def decode_once(eng: engine.Engine, prompt, n) -> tuple[float, list[int]]:
    tokens, done = [], threading.Event()
    start = time.perf_counter()
    eng.submit(engine.Request(prompt, engine.Sampling(max_tokens=n, temperature=0.0), 1,
                              on_token=lambda c, t: tokens.append(t), on_finish=lambda c, why: done.set()))
    done.wait()
    return time.perf_counter() - start, tokens


def batch1(hf, prompt, n):
    engines = {w: engine.Engine(quantize.convert(torch_bridge.from_hf(hf), w), max_batch=1).start()
               for w in quantize.WEIGHTS}

    def hf_run(threads):
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=50256)
        return None, out[0, len(prompt):].tolist()
    runs = {f"jaxgpt {w}": (lambda e=e: decode_once(e, prompt, n)) for w, e in engines.items()}
    for threads in sorted({1, os.cpu_count()}):  # torch's thread pool can crawl on oversubscribed cores
        runs[f"HF generate ({threads} thr)"] = lambda threads=threads: hf_run(threads)
    compile_s = {name: run()[0] for name, run in runs.items()}  # warm-up: compiles
    times, tokens = {name: [] for name in runs}, {}
    for _ in range(FLAGS.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            tokens[name] = run()[1]
            times[name].append(time.perf_counter() - start)
    for e in engines.values():
        e.stop()
    best = {name: min(t) for name, t in times.items()}
    hf_best = min(s for name, s in best.items() if name.startswith("HF"))
    print(f"\nbatch-1 greedy decoding, {len(prompt)}-token prompt, {n} new tokens, best of {FLAGS.repeats}; "
          "'vs HF' is against the faster HF row")
    print(f"{'contender':<22}{'tokens/s':>10}{'vs HF':>8}{'same as f32':>13}{'compile s':>11}")
    for name, s in best.items():
        same = sum(a == b for a, b in zip(tokens[name], tokens["jaxgpt float32"]))
        warm = f"{compile_s[name] - s:.1f}" if compile_s[name] else "-"
        print(f"{name:<22}{n / s:>10.1f}{hf_best / s:>7.2f}x{f'{same}/{n}':>13}{warm:>11}")


async def client(url, prompts, n, latencies, errors, firsts):
    import httpx
    async with httpx.AsyncClient(timeout=600) as http:
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
                    tokens += last["usage"]["completion_tokens"]
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(repr(e))
                continue
            latencies.append(time.perf_counter() - start)
        return tokens


def wave(url, clients, requests, n, rng):
    prompts = [[rng.integers(0, 50257, FLAGS.load_prompt_len).tolist() for _ in range(requests)]
               for _ in range(clients)]
    latencies, errors, firsts = [], [], []

    async def run():
        return await asyncio.gather(*(client(url, p, n, latencies, errors, firsts) for p in prompts))
    start = time.perf_counter()
    tokens = sum(asyncio.run(run()))
    return tokens, time.perf_counter() - start, latencies, errors, firsts


def load(hf, weights):
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        proc = subprocess.Popen([sys.executable, "-m", "jaxgpt.serve", f"--hf={d}", f"--port={port}",
                                 f"--weights={weights}", "--max_batch=32"])
        url = f"http://127.0.0.1:{port}"
        import httpx
        try:
            serve.wait_until_serving(url, 600, proc)
            rng = np.random.default_rng(0)
            start = time.perf_counter()
            for clients in (1, 2, 4, 8, 16, 32):  # every batch bucket compiles before timing
                wave(url, clients, 1, FLAGS.load_tokens, rng)
            print(f"\n{weights} weights over HTTP: warm-up (compiling every batch size) "
                  f"{time.perf_counter() - start:.0f} s; {FLAGS.load_prompt_len}-token prompts, {FLAGS.load_tokens} "
                  "new tokens per request, greedy, streamed")
            print(f"{'clients x requests':<20}{'tokens/s':>10}{'vs 1 client':>13}{'p50 s':>8}{'p99 s':>8}"
                  f"{'first p50':>11}{'first p99':>11}{'errors':>8}")
            one = None
            for clients in (1, 8, 32):
                tokens, seconds, lat, errors, first = wave(url, clients, FLAGS.requests, FLAGS.load_tokens, rng)
                rate = tokens / seconds
                one = one or rate
                print(f"{f'{clients} x {FLAGS.requests}':<20}{rate:>10.1f}{rate / one:>12.2f}x"
                      f"{np.percentile(lat, 50):>8.2f}{np.percentile(lat, 99):>8.2f}{np.percentile(first, 50):>11.2f}"
                      f"{np.percentile(first, 99):>11.2f}{len(errors):>8}")
                for e in errors[:3]:
                    print("   ", e)
            print(f"server: {httpx.get(f'{url}/healthz').json()}")
        finally:
            proc.terminate()
            proc.wait(30)


def main(argv):
    del argv
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # the 124M shape, random init
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"GPT-2 124M (random init); {cpu}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    if FLAGS.batch1:
        batch1(hf, np.random.default_rng(0).integers(0, 50257, FLAGS.prompt_len).tolist(), FLAGS.new_tokens)
    for weights in FLAGS.load_weights:
        load(hf, weights)


if __name__ == "__main__":
    flags.DEFINE_integer("prompt_len", 64, "batch-1 prompt tokens")
    flags.DEFINE_integer("new_tokens", 128, "batch-1 tokens generated per run")
    flags.DEFINE_integer("repeats", 3, "batch-1 timed runs per contender; the best counts")
    flags.DEFINE_bool("batch1", True, "measure batch-1 decoding")
    flags.DEFINE_list("load_weights", ["float32"], "weights of the load test's server (empty: no load test)")
    flags.DEFINE_integer("load_prompt_len", 32, "load-test prompt tokens")
    flags.DEFINE_integer("load_tokens", 32, "load-test new tokens per request")
    flags.DEFINE_integer("requests", 8, "requests per client, one after another")
    app.run(main)
