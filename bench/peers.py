"""The PyTorch side of every comparison: Hugging Face's GPT2LMHeadModel with random weights and torch.optim.AdamW
(bench/throughput.py's step, bench/train_cpu.py's nanoGPT CPU recipe, bench/serve.py's HF generate), and nanoGPT's
own model and train.py step on a GPU (bench/gpu/peer.py). torch is imported inside each function."""
from __future__ import annotations

import os
import time

import numpy as np

from bench import harness


def hf_gpt2(seed: int = 0, dropout: float = 0.0, **shape):
    """A random-init GPT2LMHeadModel: GPT2Config()'s 124M shape with `shape` (n_layer, n_head, n_embd, vocab_size,
    n_positions) over it; with a vocabulary given, nanoGPT's: tanh GELU, no BOS/EOS token."""
    import torch
    import transformers
    torch.manual_seed(seed)
    if "vocab_size" in shape:
        shape.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, activation_function="gelu_new",
                     bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape))


def adamw(params, lr: float, betas, eps: float = 1e-8, weight_decay: float = 0.1, fused: bool = False):
    """nanoGPT's configure_optimizers: weight decay on the 2-D weights only (jaxgpt masks AdamW the same way)."""
    import torch
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        except RuntimeError:  # a CPU build without the fused kernel
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def throughput_step(shape: dict, batch: int, dtype: str, compiled: bool):
    """One train step of HF GPT-2 (bench/throughput.py): forward, backward, clipping, AdamW; eager f32 or under
    torch.autocast(bfloat16), torch.compile'd when `compiled`."""
    import torch
    hf = hf_gpt2(vocab_size=shape["torch_rows"], n_positions=shape["block_size"], n_embd=shape["n_embd"],
                 n_layer=shape["n_layer"], n_head=shape["n_head"])
    net = torch.compile(hf) if compiled else hf
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, shape["vocab"], (batch, shape["block_size"] + 1)))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = net(inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
    return step


def cpu_recipe(config, workdir: str, compiled: bool) -> tuple[float, float]:
    """nanoGPT's CPU recipe as bench/train_cpu.py's PyTorch side runs it: jaxgpt's config, schedule, batches and val
    batches, HF GPT-2 with nanoGPT's AdamW groups, a checkpoint at each evaluation. -> (wall seconds, last val loss)."""
    import torch

    from jaxgpt import data, optim, tokenizer
    start = time.perf_counter()
    m, o = config.model, config.optim
    hf = hf_gpt2(config.seed, m.dropout, vocab_size=tokenizer.load_tokenizer(config.data.dir).vocab_size,
                 n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head)
    model = torch.compile(hf) if compiled else hf
    opt = adamw(hf.parameters(), o.lr, (o.b1, o.b2), o.eps, o.weight_decay)
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


NANOGPT_ROWS = 50304  # nanoGPT's vocabulary, 50257 padded to a multiple of 64 (as jaxgpt pads it)
NANOGPT_LR, NANOGPT_WARMUP = 6e-4, 715  # configs/124m.py's


def nanogpt_module():
    """tests/nanogpt_reference.py, loaded by path (a module named `tests` may be installed elsewhere)."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("nanogpt_reference",
                                                  os.path.join(harness.REPO, "tests", "nanogpt_reference.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def nanogpt_step(shape: dict, tokens: np.ndarray, steps: int, compile_: bool) -> dict:
    """nanoGPT's train.py step on the device torch finds (bench/gpu/peer.py has the details), timed as
    bench/gpu/check.py times jaxgpt's: tokens (A, B, T + 1) are one optimizer step's micro-batches."""
    import torch
    import torch.nn.functional as F
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # nanoGPT's train.py
    torch.backends.cudnn.allow_tf32 = True
    ref = nanogpt_module()
    torch.manual_seed(0)
    gpt = ref.GPT(ref.GPTConfig(vocab_size=NANOGPT_ROWS, dropout=0.0, bias=True, **shape)).to(device)

    class WithLoss(torch.nn.Module):  # nanoGPT's GPT.forward(idx, targets)
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, idx, targets):
            logits = self.gpt(idx)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
    opt = adamw(gpt.parameters(), NANOGPT_LR, (0.9, 0.95), fused=True)
    n_params = sum(p.numel() for p in gpt.parameters() if p.requires_grad)  # the tied head counted once
    step_fn = torch.compile(WithLoss()) if compile_ else WithLoss()
    A, B, T = tokens.shape[0], tokens.shape[1], shape["block_size"]
    tokens = torch.from_numpy(tokens.astype(np.int64))
    # one contiguous tensor per micro-batch, as nanoGPT's get_batch makes them (views would differ in offset only,
    # which compiled graphs may guard on)
    inputs = [tokens[m, :, :-1].contiguous().to(device) for m in range(A)]
    targets = [tokens[m, :, 1:].contiguous().to(device) for m in range(A)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    calls = [0]

    def one_step() -> float:
        for group in opt.param_groups:
            group["lr"] = NANOGPT_LR * min(1.0, (calls[0] + 1) / NANOGPT_WARMUP)
        calls[0] += 1
        total = torch.zeros((), device=device)
        for micro in range(A):
            with autocast:
                loss = step_fn(inputs[micro], targets[micro]) / A
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(total)

    timing, losses = harness.step_timing(one_step, steps, A * B * T)
    return {
        "side": "torch", "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else harness.cpu_name(),
        "compiled": compile_, "autocast": "bfloat16", "fused_adamw": bool(opt.defaults.get("fused")),
        "model": {**shape, "params": n_params, "vocab_rows": NANOGPT_ROWS}, "batch_size": B, "grad_accum_steps": A,
        **timing, "peak_bytes_in_use": torch.cuda.max_memory_allocated() if cuda else None,
        "losses": losses, "passed": bool(np.all(np.isfinite(losses))),
    }
