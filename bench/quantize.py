"""Decoding weights (jaxgpt/quantize.py): batch-1 greedy decode speed of float32, bfloat16 and int8 weights
against Hugging Face generate, on the same random 124M GPT-2 weights in one run; their greedy tokens against
float32's; and, given a trained workdir, the validation loss each gives.

    python bench/quantize.py [--prompt_len=64] [--new_tokens=128] [--repeats=3] \
        [--workdir=/tmp/q_run --data=data/shakespeare_char]

jaxgpt's runs use generate.generate(..., temperature=0, loop='python') after an untimed warm-up call; HF runs
with 1 and with all torch threads. Every figure is the best of --repeats round-robin runs. Agreement counts the
tokens equal to float32's at the same position, and those before each run's first difference.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

import torch_bridge
from jaxgpt import data, generate, loader, quantize

FLAGS = flags.FLAGS


def agreement(tokens, reference) -> str:
    same = sum(a == b for a, b in zip(tokens, reference))
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
    return f"{same}/{len(reference)} ({prefix} before the first difference)"


def val_loss(model, tokens: np.ndarray, n_windows: int, batch: int = 8) -> float:
    """The mean cross-entropy over n_windows evenly spaced windows of block_size + 1 tokens."""
    T = model.config.block_size
    starts = np.linspace(0, len(tokens) - T - 1, n_windows).astype(int)
    windows = np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int32)
    loss = jax.jit(lambda ids, targets: model.loss(ids, targets))
    losses = [float(loss(jnp.asarray(w[:, :-1]), jnp.asarray(w[:, 1:]))) * len(w)
              for w in np.array_split(windows, max(1, n_windows // batch))]
    return sum(losses) / n_windows


def main(argv):
    del argv
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # the 124M shape, random init
    base = torch_bridge.from_hf(hf)
    models = {w: quantize.convert(base, w) for w in quantize.WEIGHTS}
    prompt = np.random.default_rng(0).integers(0, 50257, FLAGS.prompt_len).tolist()
    n = FLAGS.new_tokens

    def hf_run(threads):
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=50256)
        return out[0, len(prompt):].tolist()

    def jaxgpt_run(weights):
        return generate.generate(models[weights], [prompt], max_new_tokens=n, temperature=0, loop="python")[0]

    contenders = {f"jaxgpt {w}": functools.partial(jaxgpt_run, w) for w in quantize.WEIGHTS}
    for threads in sorted({1, default_threads}):
        contenders[f"HF generate ({threads} thr)"] = functools.partial(hf_run, threads)
    for run in contenders.values():  # warm-up: jaxgpt compiles
        run()
    times = {name: [] for name in contenders}
    tokens = {}
    for _ in range(FLAGS.repeats):  # round-robin, so that load from other processes hits every contender alike
        for name, run in contenders.items():
            start = time.perf_counter()
            tokens[name] = run()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    hf_seconds = min(s for name, s in best.items() if name.startswith("HF"))
    print(f"GPT-2 124M (random init), batch 1, {len(prompt)}-token prompt, {n} new tokens, greedy, loop='python'; "
          f"bfloat16 computes in {quantize.BF16_COMPUTE}; load average {os.getloadavg()[0]:.1f}; 'vs HF' against "
          "the faster HF row")
    print(f"{'contender':<24}{'tokens/s':>10}{'time s':>9}{'vs HF':>8}   tokens equal to float32's")
    for name, seconds in best.items():
        print(f"{name:<24}{n / seconds:>10.1f}{seconds:>9.2f}{hf_seconds / seconds:>7.2f}x   "
              f"{agreement(tokens[name], tokens['jaxgpt float32'])}")

    if FLAGS.workdir:
        trained = loader.load(FLAGS.workdir)
        val = data.read_shard(data.find_shards(FLAGS.data, "val")[0])
        print(f"\nvalidation loss of {FLAGS.workdir} on {FLAGS.data}'s val split ({FLAGS.val_windows} windows of "
              f"{trained.config.block_size} tokens), and greedy agreement over {n} tokens from its first tokens:")
        start = val[:FLAGS.prompt_len // 4].tolist()
        reference = generate.generate(trained, [start], max_new_tokens=n, temperature=0)[0]
        for w in quantize.WEIGHTS:
            m = quantize.convert(trained, w)
            got = generate.generate(m, [start], max_new_tokens=n, temperature=0)[0]
            print(f"  {w:<9} loss {val_loss(m, val, FLAGS.val_windows):.5f}   tokens {agreement(got, reference)}")


if __name__ == "__main__":
    flags.DEFINE_integer("prompt_len", 64, "prompt tokens")
    flags.DEFINE_integer("new_tokens", 128, "tokens generated per run")
    flags.DEFINE_integer("repeats", 3, "timed runs per contender; the best counts")
    flags.DEFINE_string("workdir", "", "a trained workdir (jaxgpt.loader.load) for the validation loss")
    flags.DEFINE_string("data", "data/shakespeare_char", "its data dir, whose val split is scored")
    flags.DEFINE_integer("val_windows", 256, "validation windows scored")
    app.run(main)
