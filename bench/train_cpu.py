"""nanoGPT's CPU recipe on tinyshakespeare: jaxgpt vs PyTorch (HF GPT2LMHeadModel + torch.optim.AdamW), and the
speedrun recipe (configs/shakespeare_char_speedrun.py) and its ablations against jaxgpt's run of the recipe.

    python -m bench.train_cpu [--input=../shared/data/tinyshakespeare.txt] [--steps=N] [--rounds=2]
    python -m bench.train_cpu --sides=jaxgpt,speedrun --rounds=4          # the speedrun's wall against the recipe's
    python -m bench.train_cpu --sides=speedrun,speedrun-adamw,... --rounds=1   # ablations (names: ABLATIONS)

jaxgpt and PyTorch train 4L/4H/128, T=64, B=12, dropout 0, for 2000 steps with AdamW (b2 0.99, weight decay 0.1 on
2-D weights, clip 1.0) under the same warmup-cosine schedule (1e-3 peak, 100 warmup steps, down to 1e-4 at step
2000), on the same batches of the same prepared char shards, and both evaluate the same 20 val batches every 250
steps and at the end, saving a checkpoint at each evaluation (as nanoGPT does). jaxgpt runs its own
`jaxgpt.train.train` on configs/shakespeare_char_cpu.py with the text sample turned off (nanoGPT samples nothing
while training). The speedrun runs the same `train` on its own config (200 steps of 24 x 64 tokens), evaluating
once, at the end, on the same 240 val windows (10 batches of 24; the script checks they are the recipe's 20 of 12).
Wall time covers model build, compilation, training, evaluations and checkpoints; the data is prepared once
beforehand. The PyTorch side is bench/peers.py's cpu_recipe: HF GPT2LMHeadModel with nanoGPT's 65-row vocabulary
(jaxgpt pads to 128 rows). --steps overrides every
side's step count (a smoke run); 0 keeps each config's own.

Each run is a fresh process (no compile cache or allocator state carried over), and the sides alternate in ABBA
order over --rounds rounds (A, B, B, A, ...): a shared machine's speed drifts over half an hour, and a drift then
weighs on both sides alike. The ratios compare the medians with the --baseline side's.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from bench import harness, peers
from bench.harness import REPO

FLAGS = flags.FLAGS
flags.DEFINE_string("input", os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"),
                    "tinyshakespeare text file (prepared into --data_dir when that holds no shards).")
flags.DEFINE_string("data_dir", os.path.join(REPO, "data", "shakespeare_char"), "Prepared char shards.")
flags.DEFINE_integer("steps", 0, "Training steps of every side; 0: each config's own (2000, the speedrun 200).")
flags.DEFINE_bool("torch_compile", False, "torch.compile the PyTorch model (nanoGPT's CPU recipe does not).")
flags.DEFINE_integer("rounds", 2, "Runs of each side, in ABBA order (1: each side once, in the order given).")
flags.DEFINE_list("sides", ["jaxgpt", "torch"], "jaxgpt (the CPU recipe), torch, speedrun, speedrun-ABLATION.")
flags.DEFINE_string("baseline", "", "The side the wall-time ratios divide by; empty: torch if run, else the first.")
flags.DEFINE_string("side", None, "Internal: run one side in this process and print JSON.")

# The speedrun with one of its switches set back (or one it leaves off, set): what each buys.
ABLATIONS = {
    "adamw": {"optim.name": "adamw"},  # AdamW on the hidden matrices too, at the recipe's lr
    "learned": {"model.positions": "learned"},
    "no_qk_norm": {"model.qk_norm": False},
    "no_value_embeds": {"model.value_embeds": 0},
    "gelu": {"model.mlp": "gelu"},
    "cosine": {"optim.schedule": "cosine"},
    "b12": {"batch_size": 12, "eval_iters": 20},  # the recipe's batch, the same 200 steps
    "b12_400": {"batch_size": 12, "eval_iters": 20, "max_steps": 400, "eval_every": 400,
                "optim.decay_steps": 400},  # the recipe's batch, as many tokens
    "softcap": {"model.logit_softcap": 30.0},
    "zero_init": {"model.zero_init_proj": True},
    "untied": {"model.tie_embeddings": False},
    "blocks_off": {"model.positions": "learned", "model.qk_norm": False, "model.value_embeds": 0,
                   "model.mlp": "gelu"},  # Muon and the schedule alone
    "gpt2": {"model.positions": "learned", "model.qk_norm": False, "model.value_embeds": 0, "model.mlp": "gelu",
             "optim.name": "adamw", "optim.schedule": "cosine"},  # the CPU recipe's model and optimizer, 200 steps
}


def side_config(side: str):
    """The training config of a jaxgpt side: the CPU recipe, the speedrun, or an ablation of it."""
    c = harness.config("shakespeare_char_cpu" if side == "jaxgpt" else "shakespeare_char_speedrun")
    if side.startswith("speedrun-"):
        c.update_from_flattened_dict(ABLATIONS[side.removeprefix("speedrun-")])
    c.data.dir, c.data.input = FLAGS.data_dir, FLAGS.input
    if FLAGS.steps:
        c.max_steps = FLAGS.steps
    c.sample_tokens = 0
    c.progress_bar = False
    c.log_every = 250
    return c


def recipe_config():
    return side_config("jaxgpt")


def run_jaxgpt(config, workdir: str) -> tuple[float, float]:
    from jaxgpt import train
    start = time.perf_counter()
    train.train(config, workdir)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        val = [row["val_loss"] for row in map(json.loads, f) if "val_loss" in row]
    return wall, val[-1]


def run_side(side: str) -> dict:
    """One run of one side in this process: {"wall": seconds, "val": final val loss, "steps": steps}."""
    config = recipe_config() if side == "torch" else side_config(side)  # data.dir prepared by the parent process
    workdir = tempfile.mkdtemp(prefix="train_cpu_")
    try:
        if side == "torch":
            wall, val = peers.cpu_recipe(config, workdir, FLAGS.torch_compile)
        else:
            wall, val = run_jaxgpt(config, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"wall": wall, "val": val, "steps": config.max_steps}


def check_sides():
    """Unknown side names are an error; every jaxgpt side must evaluate the recipe's val windows."""
    from jaxgpt import data
    for side in FLAGS.sides:
        if side not in ("jaxgpt", "torch", "speedrun") and side.removeprefix("speedrun-") not in ABLATIONS:
            raise app.UsageError(f"--sides: unknown side {side!r} (jaxgpt, torch, speedrun, speedrun-NAME with NAME "
                                 f"in {sorted(ABLATIONS)})")

    def val_windows(c):
        batches = data.eval_batches(data.find_shards(c.data.dir, "val"), block_size=c.model.block_size,
                                    batch_size=c.batch_size, n_batches=c.eval_iters, seed=c.seed)
        return np.concatenate([b["inputs"] for b in batches])
    recipe = val_windows(recipe_config())
    for side in FLAGS.sides:
        if side != "torch" and not np.array_equal(val_windows(side_config(side)), recipe):
            raise app.UsageError(f"{side} evaluates other val windows than the CPU recipe")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    if FLAGS.side:
        print(json.dumps(run_side(FLAGS.side)))
        return
    from jaxgpt import run_config
    run_config.prepare_data(recipe_config(), is_main=True)  # once, outside every timing
    check_sides()
    names = {"jaxgpt": "jaxgpt", "torch": "PyTorch eager" + (" +compile" if FLAGS.torch_compile else "")}
    runs = {side: [] for side in FLAGS.sides}
    passed = [f"--{name}={getattr(FLAGS, name)}" for name in ("input", "data_dir", "steps", "torch_compile")]
    print(harness.describe(harness.environment("jax", "torch")), flush=True)
    for i, side in enumerate(harness.abba(FLAGS.sides, FLAGS.rounds)):
        runs[side].append(harness.run_json("bench.train_cpu", f"--side={side}", *passed))
        r = runs[side][-1]
        print(f"run {i + 1}: {names.get(side, side)} {r['wall']:.1f} s, val loss {r['val']:.4f} "
              f"(load {harness.load()})", flush=True)
    baseline = FLAGS.baseline or ("torch" if "torch" in runs else FLAGS.sides[0])
    base = statistics.median(r["wall"] for r in runs[baseline])
    print(f"\n{FLAGS.rounds} run(s) per side in ABBA order, medians; load average at the end: {harness.load()}")
    print(f"{'':24s} {'steps':>6s} {'wall s':>8s} {'ms/step':>8s} {'val loss':>9s} {'wall vs ' + baseline:>18s}")
    for side in FLAGS.sides:
        wall, steps = statistics.median(r["wall"] for r in runs[side]), runs[side][-1]["steps"]
        print(f"{names.get(side, side):24s} {steps:6d} {wall:8.1f} {1e3 * wall / steps:8.1f} "
              f"{runs[side][-1]['val']:9.4f} {wall / base:17.2f}x")


if __name__ == "__main__":
    app.run(main)
