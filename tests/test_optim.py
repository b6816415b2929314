"""The optimizer against nanoGPT: get_lr's values in both warmup forms, and ten training steps (accumulation,
AdamW's two parameter groups, clipping, the schedule) step by step against PyTorch running nanoGPT's loop."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from configs import base
from jaxgpt import optim
from jaxgpt.errors import UserValueError


def nanogpt_get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """nanoGPT's train.py get_lr, transcribed."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def build_nanogpt_get_lr(it, max_lr, min_lr, warmup_steps, max_steps):
    """build-nanogpt's train_gpt2.py get_lr, transcribed."""
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return min_lr
    decay_ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (max_lr - min_lr)


REFERENCE_LR = {"nanogpt": nanogpt_get_lr, "build_nanogpt": build_nanogpt_get_lr}


def optim_config(**overrides) -> ConfigDict:
    o = base.get_config().optim
    o.update(overrides)
    return o


@pytest.mark.parametrize("warmup", list(REFERENCE_LR))
def test_schedule_matches_the_reference_get_lr(warmup):
    o = optim_config(lr=6e-4, min_lr_ratio=0.1, warmup_steps=100, decay_steps=1000, warmup=warmup)
    schedule = jax.jit(optim.learning_rate_schedule(o, max_steps=5000))  # a traced int32 step, as optax's count
    steps = [0, 1, 37, 99, 100, 101, 550, 999, 1000, 1001, 4999]  # warmup, its end, mid-decay, the decay's end, past
    ours = [float(schedule(jnp.int32(s))) for s in steps]
    expected = [REFERENCE_LR[warmup](s, 6e-4, 6e-5, 100, 1000) for s in steps]
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)
    first = 6e-4 / 101 if warmup == "nanogpt" else 6e-4 / 100
    assert ours[0] == pytest.approx(first, rel=1e-7)
    assert ours[-3:] == [pytest.approx(6e-5, rel=1e-7)] * 3


def test_decay_steps_zero_means_max_steps_and_no_warmup_starts_at_the_peak():
    schedule = optim.learning_rate_schedule(optim_config(lr=1e-3, warmup_steps=0, decay_steps=0), max_steps=10)
    ours = [float(schedule(s)) for s in range(12)]
    np.testing.assert_allclose(ours, [nanogpt_get_lr(s, 1e-3, 1e-4, 0, 10) for s in range(12)], rtol=1e-6)
    assert ours[0] == pytest.approx(1e-3, rel=1e-7)


def test_bad_schedule_settings_are_user_errors():
    with pytest.raises(UserValueError, match=r"optim.warmup='linear'.*\['nanogpt', 'build_nanogpt'\]"):
        optim.learning_rate_schedule(optim_config(warmup="linear", decay_steps=1000), max_steps=5000)
    with pytest.raises(UserValueError, match="warmup_steps=100 must be smaller than decay_steps=100"):
        optim.learning_rate_schedule(optim_config(warmup_steps=100), max_steps=100)


# ---------------------------------------------------------------- ten steps against nanoGPT's loop in PyTorch

STEPS, ACCUM, B, T, VOCAB = 10, 4, 2, 16, 64
LR, WARMUP, DECAY, WD, CLIP = 1e-3, 3, 8, 0.1, 1.0  # DECAY < STEPS: the last steps run past the decay


def torch_nanogpt_loop(model, inputs, targets, o):
    """nanoGPT's train.py loop: configure_optimizers' two AdamW groups, get_lr per iteration, accumulation,
    clip_grad_norm_, step, zero_grad. Returns the per-step losses (mean over micro-batches) and lrs."""
    import torch
    import torch.nn.functional as F
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head weight appears once
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    losses, lrs = [], []
    for it in range(STEPS):
        lr = nanogpt_get_lr(it, o.lr, o.lr * o.min_lr_ratio, o.warmup_steps, o.decay_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(ACCUM):
            logits = model(torch.from_numpy(inputs[it, micro]).long())
            y = torch.from_numpy(targets[it, micro]).long()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)) / ACCUM
            total += loss.item()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        lrs.append(lr)
    return np.asarray(losses), np.asarray(lrs)


def train_both(bias: bool, scan_layers: bool):
    """Ten steps from the same weights and batches: jaxgpt's train_steps and nanoGPT's loop on the reference
    module. Returns (jaxgpt metrics, torch losses, torch lrs, jaxgpt model, torch module, the start weights)."""
    import torch
    from nanogpt_reference import GPT as NanoGPT
    from nanogpt_reference import GPTConfig as NanoGPTConfig

    import torch_bridge
    from jaxgpt import sharding, step

    torch.manual_seed(0)
    reference = NanoGPT(NanoGPTConfig(block_size=T, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, bias=bias))
    with torch.no_grad():  # larger weights than nanoGPT's init: gradient norms above CLIP, so clipping acts
        for p in reference.parameters():
            p.add_(0.2 * torch.randn_like(p))
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    copies = {k: v.clone() for k, v in start.items()}  # the import may share their memory; torch steps in place
    model = torch_bridge.from_nanogpt({"model": copies, "model_args": dataclasses.asdict(reference.config)},
                                      scan_layers=scan_layers)
    assert model.config.activation == "gelu" and model.config.vocab_size == VOCAB and model.config.dropout == 0

    tokens = np.random.RandomState(0).randint(0, VOCAB, (STEPS, ACCUM, B, T + 1)).astype(np.int32)
    inputs, targets = np.ascontiguousarray(tokens[..., :-1]), np.ascontiguousarray(tokens[..., 1:])
    config = base.get_config()
    config.update_from_flattened_dict({
        "max_steps": STEPS, "grad_accum_steps": ACCUM, "optim.lr": LR, "optim.min_lr_ratio": 0.1,
        "optim.warmup_steps": WARMUP, "optim.decay_steps": DECAY, "optim.weight_decay": WD,
        "optim.grad_clip": CLIP, "mesh.data": 1})
    losses, lrs = torch_nanogpt_loop(reference.train(), inputs, targets, config.optim)

    steps = step.make_steps(config, model.config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    state = step.fresh_state(steps, model.config, config.seed, nnx.state(model, nnx.Param))
    state, metrics = steps.train_steps(state, {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)})
    nnx.update(model, state.params)
    return jax.tree.map(np.asarray, metrics), losses, lrs, model, reference.eval(), start


def param_differences(model, reference) -> dict[str, float]:
    """Max |jaxgpt - torch| per nanoGPT tensor. The key third of c_attn.bias is left out: softmax ignores a shift
    shared by all keys, so its gradient is rounding noise (~1e-8, Adam's eps) that Adam scales up to steps of ~lr,
    different in each framework. It has no effect on the output, which the logits check covers."""
    from torch_bridge import convert
    from torch_bridge.mapping import NANOGPT
    ours, theirs = convert.state_dict(model, NANOGPT), reference.state_dict()
    assert ours.keys() == theirs.keys()
    diffs = {}
    for k in ours:
        diff = (ours[k] - theirs[k]).abs()
        if k.endswith("attn.c_attn.bias"):
            diff[reference.config.n_embd:2 * reference.config.n_embd] = 0
        diffs[k] = diff.max().item()
    return diffs


@pytest.mark.parametrize("bias, scan_layers", [(True, False), (False, True)])  # scan: norm scales stacked to 2-D
def test_ten_steps_match_nanogpts_loop_in_pytorch(bias, scan_layers):
    torch = pytest.importorskip("torch")
    metrics, losses, lrs, model, reference, start = train_both(bias, scan_layers)

    assert (metrics["grad_norm"] > CLIP).sum() >= 5, metrics["grad_norm"]  # clipping acts on most steps
    np.testing.assert_allclose(metrics["lr"], lrs, rtol=1e-6, atol=0)
    np.testing.assert_allclose(lrs[[0, WARMUP, DECAY, STEPS - 1]], [LR / (WARMUP + 1), LR, LR / 10, LR / 10])
    loss_diff = np.abs(metrics["loss"] - losses).max()
    param_diff = param_differences(model, reference)
    idx = np.random.RandomState(1).randint(0, VOCAB, (B, T))
    with torch.no_grad():
        logits_diff = np.abs(np.asarray(model(jnp.asarray(idx))[0]) - reference(torch.from_numpy(idx)).numpy()).max()
    print(f"\nbias={bias}, scan_layers={scan_layers}: max |loss diff| {loss_diff:.2e}, "
          f"max |param diff| {max(param_diff.values()):.2e}, max |logits diff| {logits_diff:.2e}, "
          f"grad norms {np.round(metrics['grad_norm'], 3)}")
    assert loss_diff <= 1e-5, (metrics["loss"], losses)
    assert max(param_diff.values()) <= 1e-5, sorted(param_diff.items(), key=lambda kv: -kv[1])[:5]
    assert logits_diff <= 1e-5
    moved = {k: (v - start[k]).abs().max().item() for k, v in reference.state_dict().items()}
    assert min(moved.values()) > 10 * LR * WD, moved  # every tensor took real steps, not just decay
