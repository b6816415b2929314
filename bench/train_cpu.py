"""nanoGPT's CPU recipe on tinyshakespeare, jaxgpt vs PyTorch (HF GPT2LMHeadModel + torch.optim.AdamW), one run.

    python bench/train_cpu.py [--input=../shared/data/tinyshakespeare.txt] [--steps=2000]

Both sides train 4L/4H/128, T=64, B=12, dropout 0, for --steps steps (2000: the recipe) with AdamW (b2 0.99,
weight decay 0.1 on 2-D weights, clip 1.0) under the same warmup-cosine schedule (1e-3 peak, 100 warmup steps,
down to 1e-4 at step 2000), on the same batches of the same prepared char shards, and both evaluate the same 20
val batches every 250 steps and at the end, saving a checkpoint at each evaluation (as nanoGPT does). jaxgpt runs
its own `jaxgpt.train.train` on configs/shakespeare_char_cpu.py with the text sample turned off (nanoGPT samples
nothing while training). Wall time covers model build, compilation, training, evaluations and checkpoints; the
data is prepared once beforehand. The PyTorch model has nanoGPT's 65-row vocabulary (jaxgpt pads to 128 rows).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string("input", os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt"),
                    "tinyshakespeare text file (prepared into --data_dir when that holds no shards).")
flags.DEFINE_string("data_dir", os.path.join(REPO, "data", "shakespeare_char"), "Prepared char shards.")
flags.DEFINE_integer("steps", 2000, "Training steps (the recipe: 2000; fewer for a smoke run).")
flags.DEFINE_bool("torch_compile", False, "torch.compile the PyTorch model (nanoGPT's CPU recipe does not).")


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


def main(argv):
    del argv
    import torch
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO

    from jaxgpt import train
    config = recipe_config()
    train.prepare_data(config, is_main=True)  # once, outside both timings
    rows = []
    for name, run in (("jaxgpt", run_jaxgpt), ("PyTorch eager" + (" +compile" if FLAGS.torch_compile else ""),
                                                run_torch)):
        workdir = tempfile.mkdtemp(prefix="train_cpu_")
        try:
            wall, val = run(config, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        rows.append((name, wall, val))
    base = rows[1][1]
    print(f"\nnanoGPT CPU recipe, {FLAGS.steps} steps, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs")
    print(f"{'':16s} {'wall s':>8s} {'ms/step':>8s} {'val loss':>9s} {'wall vs PyTorch':>16s}")
    for name, wall, val in rows:
        print(f"{name:16s} {wall:8.1f} {1e3 * wall / FLAGS.steps:8.1f} {val:9.4f} {wall / base:15.2f}x")


if __name__ == "__main__":
    app.run(main)
