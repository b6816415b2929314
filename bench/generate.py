"""Greedy decoding speed, jaxgpt vs Hugging Face generate, on the same random 124M GPT-2 weights in one run.

    python bench/generate.py [--prompt_len=64] [--new_tokens=128] [--repeats=3]

Batch 1, no early stop. jaxgpt's tokens/s exclude compilation (a first, untimed call compiles; its extra time is
reported as compile s); both of jaxgpt's decode loops are timed, and HF with 1 and with all torch threads.
Every figure is the best of --repeats round-robin runs.
"""
from __future__ import annotations

import functools
import os
import time

import numpy as np
import torch
import transformers
from absl import app, flags

import torch_bridge
from jaxgpt import generate

FLAGS = flags.FLAGS


def main(argv):
    del argv
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # the 124M shape, random init
    model = torch_bridge.from_hf(hf)
    prompt = np.random.default_rng(0).integers(0, 50257, FLAGS.prompt_len).tolist()
    n = FLAGS.new_tokens

    def hf_run(threads):
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=50256)
        return out[0, len(prompt):].tolist()

    def jaxgpt_run(loop):
        return generate.generate(model, [prompt], max_new_tokens=n, temperature=0, loop=loop)[0]

    contenders = {f"jaxgpt ({loop} loop)": functools.partial(jaxgpt_run, loop) for loop in ("python", "device")}
    first_call = {}
    for name, run in contenders.items():  # the first call compiles
        start = time.perf_counter()
        run()
        first_call[name] = time.perf_counter() - start
    for threads in sorted({1, default_threads}):  # oversubscribed cores can make torch's thread pool crawl
        contenders[f"HF generate ({threads} thr)"] = functools.partial(hf_run, threads)
        hf_run(threads)  # warm-up
    times = {name: [] for name in contenders}
    tokens = {}
    for _ in range(FLAGS.repeats):  # round-robin, so that load from other processes hits every contender alike
        for name, run in contenders.items():
            start = time.perf_counter()
            tokens[name] = run()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    hf_name = min((name for name in best if name.startswith("HF")), key=best.get)
    hf_seconds, hf_tokens = best[hf_name], tokens[hf_name]

    print(f"GPT-2 124M (random init), batch 1, {len(prompt)}-token prompt, {n} new tokens, greedy; "
          f"load average {os.getloadavg()[0]:.1f}; 'vs HF' is against the faster HF row")
    print(f"{'contender':<24}{'tokens/s':>10}{'time s':>9}{'compile s':>11}{'vs HF':>8}{'same tokens':>13}")
    for name, seconds in best.items():
        compile_s = f"{first_call[name] - seconds:.2f}" if name in first_call else "-"
        same = f"{sum(a == b for a, b in zip(tokens[name], hf_tokens))}/{n}"
        print(f"{name:<24}{n / seconds:>10.1f}{seconds:>9.2f}{compile_s:>11}{hf_seconds / seconds:>7.2f}x{same:>13}")


if __name__ == "__main__":
    flags.DEFINE_integer("prompt_len", 64, "prompt tokens")
    flags.DEFINE_integer("new_tokens", 128, "tokens generated per run")
    flags.DEFINE_integer("repeats", 3, "timed runs per contender; the best counts")
    app.run(main)
