"""nanoGPT's CPU recipe on tinyshakespeare, jaxgpt vs PyTorch (HF GPT2LMHeadModel + torch.optim.AdamW), one run.

    python bench/train_cpu.py [--input=../shared/data/tinyshakespeare.txt] [--steps=2000] [--rounds=2]

Both sides train 4L/4H/128, T=64, B=12, dropout 0, for --steps steps (2000: the recipe) with AdamW (b2 0.99,
weight decay 0.1 on 2-D weights, clip 1.0) under the same warmup-cosine schedule (1e-3 peak, 100 warmup steps,
down to 1e-4 at step 2000), on the same batches of the same prepared char shards, and both evaluate the same 20
val batches every 250 steps and at the end, saving a checkpoint at each evaluation (as nanoGPT does). jaxgpt runs
its own `jaxgpt.train.train` on configs/shakespeare_char_cpu.py with the text sample turned off (nanoGPT samples
nothing while training). Wall time covers model build, compilation, training, evaluations and checkpoints; the
data is prepared once beforehand. The PyTorch model has nanoGPT's 65-row vocabulary (jaxgpt pads to 128 rows).

Each run is a fresh process (no compile cache or allocator state carried over), and the sides alternate in ABBA
order over --rounds rounds (jaxgpt, PyTorch, PyTorch, jaxgpt, ...): this shared machine's speed drifts by 10-15%
over half an hour, and a drift then weighs on both sides alike. The ratio compares the medians.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time

import fresh
import numpy as np
from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("input", os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"),
                    "tinyshakespeare text file (prepared into --data_dir when that holds no shards).")
flags.DEFINE_string("data_dir", os.path.join(REPO, "data", "shakespeare_char"), "Prepared char shards.")
flags.DEFINE_integer("steps", 2000, "Training steps (the recipe: 2000; fewer for a smoke run).")
flags.DEFINE_bool("torch_compile", False, "torch.compile the PyTorch model (nanoGPT's CPU recipe does not).")
flags.DEFINE_integer("rounds", 2, "Runs of each side, in ABBA order (1: jaxgpt then PyTorch).")
flags.DEFINE_enum("side", None, ["jaxgpt", "torch"], "Internal: run one side in this process and print JSON.")


def recipe_config():
    from configs import shakespeare_char_cpu
    c = shakespeare_char_cpu.get_config()
    c.data.dir, c.data.input = FLAGS.data_dir, FLAGS.input
    c.max_steps = FLAGS.steps
    c.sample_tokens = 0
    c.progress_bar = False
    c.log_every = 250
    return c


def run_jaxgpt(config, workdir: str) -> tuple[float, float]:
    from jaxgpt import train
    start = time.perf_counter()
    train.train(config, workdir)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        val = [row["val_loss"] for row in map(json.loads, f) if "val_loss" in row]
    return wall, val[-1]


def run_torch(config, workdir: str) -> tuple[float, float]:
    import torch
    import transformers

    from jaxgpt import data, optim, tokenizer
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    m = config.model
    vocab = tokenizer.load_tokenizer(config.data.dir).vocab_size
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
        resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout, activation_function="gelu_new",
        bos_token_id=None, eos_token_id=None))
    model = torch.compile(hf) if FLAGS.torch_compile else hf
    o = config.optim
    decayed = [p for p in hf.parameters() if p.dim() >= 2]
    others = [p for p in hf.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decayed, "weight_decay": o.weight_decay},
                             {"params": others, "weight_decay": 0.0}], lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    schedule = optim.learning_rate_schedule(o, config.max_steps)
    lrs = np.asarray([float(schedule(s)) for s in range(config.max_steps)])
    train_batches = iter(data.make_dataset(data.find_shards(config.data.dir, "train"), block_size=m.block_size,
                                           batch_size=config.batch_size, seed=config.seed))
    val_batches = [{k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()} for b in data.eval_batches(
        data.find_shards(config.data.dir, "val"), block_size=m.block_size, batch_size=config.batch_size,
        n_batches=config.eval_iters, seed=config.seed)]

    def loss_of(batch):
        logits = model(batch["inputs"]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    val = float("nan")
    for step in range(config.max_steps):
        batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in next(train_batches).items()}
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), o.grad_clip)
        opt.step()
        done = step + 1
        if done % config.eval_every == 0 or done == config.max_steps:
            hf.eval()
            with torch.no_grad():
                val = float(np.mean([loss_of(b).item() for b in val_batches]))
            hf.train()
            torch.save({"model": hf.state_dict(), "optimizer": opt.state_dict(), "step": done},
                       os.path.join(workdir, "ckpt.pt"))
    return time.perf_counter() - start, val


def run_side(side: str) -> dict:
    """One run of one side in this process: {"wall": seconds, "val": final val loss}."""
    config = recipe_config()  # its data.dir was prepared by the parent process
    workdir = tempfile.mkdtemp(prefix="train_cpu_")
    try:
        wall, val = (run_jaxgpt if side == "jaxgpt" else run_torch)(config, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"wall": wall, "val": val}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    if FLAGS.side:
        print(json.dumps(run_side(FLAGS.side)))
        return
    from jaxgpt import train
    train.prepare_data(recipe_config(), is_main=True)  # once, outside every timing
    names = {"jaxgpt": "jaxgpt", "torch": "PyTorch eager" + (" +compile" if FLAGS.torch_compile else "")}
    runs = {"jaxgpt": [], "torch": []}
    passed = [f"--{name}={getattr(FLAGS, name)}" for name in ("input", "data_dir", "steps", "torch_compile")]
    for side in fresh.abba(["jaxgpt", "torch"], FLAGS.rounds):
        runs[side].append(fresh.run_json(os.path.abspath(__file__), f"--side={side}", *passed))
        print(f"run {len(runs['jaxgpt']) + len(runs['torch'])}: {names[side]} {runs[side][-1]['wall']:.1f} s, "
              f"val loss {runs[side][-1]['val']:.4f}", flush=True)
    base = statistics.median(r["wall"] for r in runs["torch"])
    import torch
    print(f"\nnanoGPT CPU recipe, {FLAGS.steps} steps, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs, {FLAGS.rounds} run(s) per side in ABBA order, medians")
    print(f"{'':16s} {'wall s':>8s} {'ms/step':>8s} {'val loss':>9s} {'wall vs PyTorch':>16s}")
    for side in ("jaxgpt", "torch"):
        wall = statistics.median(r["wall"] for r in runs[side])
        print(f"{names[side]:16s} {wall:8.1f} {1e3 * wall / FLAGS.steps:8.1f} {runs[side][-1]['val']:9.4f} "
              f"{wall / base:15.2f}x")


if __name__ == "__main__":
    app.run(main)
