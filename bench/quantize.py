"""Decoding weights (jaxgpt/quantize.py): what float32, bfloat16 and int8 weights decode, against float32. Their
speed is bench/serve.py's (batch-1 decoding through the serving engine, beside HF generate).

    python bench/quantize.py [--new_tokens=128] [--workdir=/tmp/q_run --data=data/shakespeare_char]

Greedy tokens of the random 124M GPT-2 shape from a 64-token prompt; and, given a trained workdir, its validation
loss and greedy tokens under each weight format. Agreement counts the tokens equal to float32's at the same
position, and those before the first difference.
"""
from __future__ import annotations

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
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # the 124M shape, random init
    base = torch_bridge.from_hf(hf)
    prompt = np.random.default_rng(0).integers(0, 50257, 64).tolist()
    n = FLAGS.new_tokens
    reference = generate.generate(base, [prompt], max_new_tokens=n, temperature=0)[0]
    print(f"GPT-2 124M (random init), greedy from a 64-token prompt, {n} tokens; bfloat16 computes in "
          f"{quantize.BF16_COMPUTE}")
    for w in quantize.WEIGHTS[1:]:
        got = generate.generate(quantize.convert(base, w), [prompt], max_new_tokens=n, temperature=0)[0]
        print(f"  {w:<9} tokens {agreement(got, reference)}")

    if FLAGS.workdir:
        trained = loader.load(FLAGS.workdir)
        val = data.read_shard(data.find_shards(FLAGS.data, "val")[0])
        print(f"\nvalidation loss of {FLAGS.workdir} on {FLAGS.data}'s val split ({FLAGS.val_windows} windows of "
              f"{trained.config.block_size} tokens), and greedy agreement over {n} tokens from its first tokens:")
        start = val[:16].tolist()
        reference = generate.generate(trained, [start], max_new_tokens=n, temperature=0)[0]
        for w in quantize.WEIGHTS:
            m = quantize.convert(trained, w)
            got = generate.generate(m, [start], max_new_tokens=n, temperature=0)[0]
            print(f"  {w:<9} loss {val_loss(m, val, FLAGS.val_windows):.5f}   tokens {agreement(got, reference)}")


if __name__ == "__main__":
    flags.DEFINE_integer("new_tokens", 128, "tokens generated per run")
    flags.DEFINE_string("workdir", "", "a trained workdir (jaxgpt.loader.load) for the validation loss")
    flags.DEFINE_string("data", "data/shakespeare_char", "its data dir, whose val split is scored")
    flags.DEFINE_integer("val_windows", 256, "validation windows scored")
    app.run(main)
