"""The optimizer against nanoGPT: get_lr's values in both warmup forms, and ten training steps (accumulation,
AdamW's two parameter groups, clipping, the schedule) step by step against PyTorch running nanoGPT's loop."""
import dataclasses
import math

import compare
import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    # lr, min_lr_ratio and warmup_steps away from their defaults (6e-4, 0.1, 100): an ignored field would show
    o = optim_config(lr=1e-3, min_lr_ratio=0.2, warmup_steps=120, decay_steps=1000, warmup=warmup)
    schedule = jax.jit(optim.learning_rate_schedule(o, max_steps=5000))  # a traced int32 step, as optax's count
    steps = [0, 1, 37, 119, 120, 121, 550, 999, 1000, 1001, 4999]  # warmup, its end, mid-decay, the decay's end, past
    ours = [float(schedule(jnp.int32(s))) for s in steps]
    expected = [REFERENCE_LR[warmup](s, 1e-3, 2e-4, 120, 1000) for s in steps]
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)
    first = 1e-3 / 121 if warmup == "nanogpt" else 1e-3 / 120
    assert ours[0] == pytest.approx(first, rel=3e-7)  # float32 arithmetic: a few roundings of 6e-8
    assert ours[-3:] == [pytest.approx(2e-4, rel=3e-7)] * 3


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
# every optimizer field away from its default (configs/base.py), so that one ignored field fails the test
LR, MIN_LR_RATIO, WARMUP, DECAY, WD, CLIP = 1e-3, 0.2, 3, 8, 0.05, 1.7  # DECAY < STEPS: the last steps run past it
B1, B2, EPS = 0.85, 0.98, 1e-7


def torch_nanogpt_loop(model, inputs, targets, o):
    """nanoGPT's train.py loop: configure_optimizers' two AdamW groups, get_lr per iteration, accumulation,
    clip_grad_norm_, step, zero_grad. Returns the per-step losses (mean over micro-batches), lrs and gradient norms
    (of the mean gradient, before clipping)."""
    import torch
    import torch.nn.functional as F
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head weight appears once
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    losses, lrs, norms = [], [], []
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
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip).item())  # before clipping
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        lrs.append(lr)
    return np.asarray(losses), np.asarray(lrs), np.asarray(norms)


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
        "max_steps": STEPS, "grad_accum_steps": ACCUM, "optim.lr": LR, "optim.min_lr_ratio": MIN_LR_RATIO,
        "optim.warmup_steps": WARMUP, "optim.decay_steps": DECAY, "optim.weight_decay": WD,
        "optim.grad_clip": CLIP, "optim.b1": B1, "optim.b2": B2, "optim.eps": EPS, "mesh.data": 1})
    defaults, tested = base.get_config().optim, ("lr", "min_lr_ratio", "warmup_steps", "decay_steps", "weight_decay",
                                                  "grad_clip", "b1", "b2", "eps")
    assert all(config.optim[k] != defaults[k] for k in tested), "a field at its default value cannot show it is ignored"
    losses, lrs, norms = torch_nanogpt_loop(reference.train(), inputs, targets, config.optim)

    steps = step.make_steps(config, model.config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    state = step.fresh_state(steps, model.config, config.seed, nnx.state(model, nnx.Param))
    state, metrics = steps.train_steps(state, {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)})
    nnx.update(model, state.params)
    return jax.tree.map(np.asarray, metrics), losses, lrs, norms, model, reference.eval(), start


def param_differences(model, reference) -> dict[str, float]:
    """Max |jaxgpt - torch| per nanoGPT tensor, but for the key third of c_attn.bias, whose gradient is rounding
    noise that Adam scales up differently in each framework (tests/compare.py); the logits check covers it."""
    from torch_bridge import convert
    from torch_bridge.mapping import NANOGPT
    ours, theirs = convert.state_dict(model, NANOGPT), reference.state_dict()
    return compare.max_differences({k: v.numpy() for k, v in ours.items()}, {k: v.numpy() for k, v in theirs.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("bias, scan_layers", [(True, False), (False, True)])  # scan: norm scales stacked to 2-D
def test_ten_steps_match_nanogpts_loop_in_pytorch(bias, scan_layers):
    torch = pytest.importorskip("torch")
    metrics, losses, lrs, norms, model, reference, start = train_both(bias, scan_layers)

    assert (norms > CLIP).sum() >= 5 and (norms < CLIP).sum() >= 1, norms  # clipping acts on most steps, not all
    np.testing.assert_allclose(metrics["grad_norm"], norms, rtol=1e-5, atol=0)  # the mean gradient, not the sum
    np.testing.assert_allclose(metrics["lr"], lrs, rtol=1e-6, atol=0)
    end = LR * MIN_LR_RATIO
    np.testing.assert_allclose(lrs[[0, WARMUP, DECAY, STEPS - 1]], [LR / (WARMUP + 1), LR, end, end])
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


def one_step(config, model_config, params, inputs, targets):
    from jaxgpt import sharding, step
    steps = step.make_steps(config, model_config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    state = step.fresh_state(steps, model_config, config.seed, params)
    batch = {"inputs": jnp.asarray(inputs)[None], "targets": jnp.asarray(targets)[None]}  # (1 step, accum, B, T)
    state, metrics = steps.train_steps(state, batch)
    return jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, state.params.to_pure_dict())


@pytest.mark.gpu
def test_accumulating_a_split_batch_equals_one_step_on_the_whole_batch():
    """grad_accum_steps=4 over quarters of a batch of 8 takes the step that grad_accum_steps=1 takes over all 8: the
    mean gradient (its norm, a clipped step's size) and the loss, not a sum over micro-batches (Adam alone would
    hide a 4x gradient: its update is nearly scale-free)."""
    from jaxgpt import model as gpt
    model_config = gpt.GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=2, n_head=2, n_embd=32)
    params = nnx.state(gpt.build(model_config, seed=3), nnx.Param)
    tokens = np.random.RandomState(2).randint(0, VOCAB, (8, T + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    results = []
    for accum in (1, 4):
        config = base.get_config()
        config.update_from_flattened_dict({"max_steps": 10, "grad_accum_steps": accum, "batch_size": 8 // accum,
                                           "optim.grad_clip": 0.5, "optim.warmup_steps": 2, "mesh.data": 1})
        results.append(one_step(config, model_config, params, inputs.reshape(accum, 8 // accum, T),
                                targets.reshape(accum, 8 // accum, T)))
    (whole, whole_params), (split, split_params) = results
    assert whole["grad_norm"][0] > 0.5  # clipped: the step's size is set by the norm
    np.testing.assert_allclose(split["grad_norm"], whole["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(split["loss"], whole["loss"], rtol=1e-6)
    compare.assert_weights_close(compare.flat(split_params), compare.flat(whole_params), atol=1e-7)


# ---------------------------------------------------------------- Muon and the trapezoid schedule

NS = (3.4445, -4.7750, 2.0315)


def modded_get_lr(it, warmup_iters, num_iterations, cooldown_frac, min_ratio):
    """modded-nanogpt's lr multiplier (2025 records: constant, then a line down to min_ratio over the last
    cooldown_frac), with its earlier records' linear warmup (it + 1) / warmup_iters in front."""
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    x = it / num_iterations
    if x < 1 - cooldown_frac:
        return 1.0
    w = (1 - x) / cooldown_frac
    return w * 1.0 + (1 - w) * min_ratio


def test_trapezoid_schedule_matches_modded_nanogpts_get_lr():
    o = optim_config(lr=2e-3, min_lr_ratio=0.1, warmup_steps=10, decay_steps=0, warmup="build_nanogpt",
                     schedule="trapezoid", cooldown_frac=0.4)
    schedule = jax.jit(optim.learning_rate_schedule(o, max_steps=500))
    steps = [0, 5, 9, 10, 11, 150, 299, 300, 301, 400, 499, 500, 600]
    ours = [float(schedule(jnp.int32(s))) for s in steps]
    expected = [2e-3 * modded_get_lr(min(s, 500), 10, 500, 0.4, 0.1) for s in steps]
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)
    assert ours[steps.index(150)] == ours[steps.index(299)] == pytest.approx(2e-3)  # the constant phase
    peak = optim.learning_rate_schedule(o, max_steps=500, peak=0.05)  # a group's own peak, the same shape
    np.testing.assert_allclose([float(peak(s)) / 0.05 for s in steps], [x / 2e-3 for x in ours], rtol=1e-6)


@pytest.mark.parametrize("warmup", list(REFERENCE_LR))
def test_trapezoid_options_at_other_values(warmup):
    """cooldown_frac, min_lr_ratio, decay_steps < max_steps and both warmup forms away from the defaults: the
    warmup form's ramp (configs/base.py), modded-nanogpt's line over the last cooldown_frac of decay_steps down to
    lr * min_lr_ratio, constant after decay_steps."""
    o = optim_config(lr=1e-3, min_lr_ratio=0.3, warmup_steps=8, decay_steps=200, warmup=warmup,
                     schedule="trapezoid", cooldown_frac=0.25)
    schedule = jax.jit(optim.learning_rate_schedule(o, max_steps=300))
    steps = [0, 3, 7, 8, 9, 100, 149, 150, 151, 175, 199, 200, 201, 299]
    ours = [float(schedule(jnp.int32(s))) for s in steps]
    ramp = 9 if warmup == "nanogpt" else 8  # lr * (s + 1) / (warmup_steps + 1) | / warmup_steps
    expected = [1e-3 * (s + 1) / ramp if s < 8 else 1e-3 * modded_get_lr(min(s, 200), 0, 200, 0.25, 0.3)
                for s in steps]
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)
    assert ours[-3:] == [pytest.approx(3e-4, rel=1e-6)] * 3 and ours[steps.index(150)] == pytest.approx(1e-3)


def test_cooldown_frac_is_in_0_to_1_inclusive():
    """(0, 1]: 1 is allowed (no constant phase: modded-nanogpt's line from step 0), above 1 or at 0 is not."""
    o = optim_config(lr=1e-3, min_lr_ratio=0.1, warmup_steps=0, decay_steps=0, schedule="trapezoid",
                     cooldown_frac=1.0)
    schedule = optim.learning_rate_schedule(o, max_steps=50)
    ours = [float(schedule(s)) for s in (0, 10, 25, 49, 50)]
    np.testing.assert_allclose(ours, [1e-3 * modded_get_lr(s, 0, 50, 1.0, 0.1) for s in (0, 10, 25, 49, 50)],
                               rtol=1e-6)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(UserValueError, match=rf"optim.cooldown_frac={bad} must be in \(0, 1\]"):
            optim.learning_rate_schedule(optim_config(schedule="trapezoid", cooldown_frac=bad), max_steps=500)


def test_decay_mask_and_param_groups_by_name():
    """nanoGPT's rule: decay on the weights of 2+ dims (kernels, embeddings, an untied head), never on biases or
    norm scales, even where scan_layers stacks them into 2-D arrays; Muon's groups: the kernels (muon), wte, wpe
    and the value embeddings (embed), lm_head (head), everything else (other)."""
    from flax.traverse_util import flatten_dict

    from jaxgpt.model import GPTConfig, build
    for scan_layers in (False, True):
        config = GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False,
                           value_embeds=1, scan_layers=scan_layers)
        params = nnx.state(build(config), nnx.Param)
        mask = flatten_dict(optim.decay_mask(params).to_pure_dict())
        groups = flatten_dict(optim.param_groups(params).to_pure_dict())
        shapes = {k: v.shape for k, v in flatten_dict(params.to_pure_dict()).items()}
        assert set(mask) == set(groups) == set(shapes)
        for k in shapes:
            assert mask[k] == (k[-1] in ("kernel", "embedding", "lm_head")), k
            assert groups[k] == {"kernel": "muon", "embedding": "embed", "lm_head": "head"}.get(k[-1], "other"), k
        assert {k[-1] for k in shapes if not mask[k]} >= {"bias", "scale"}  # never biases nor norms
        assert {"muon", "embed", "head", "other"} == set(groups.values())


@pytest.mark.parametrize("grad_clip", [0.0, 0.3])
def test_grad_clip_is_optax_clip_by_global_norm_and_0_disables_it(grad_clip):
    """configs/base.py: clip by global norm; 0 disables. Against optax's clip_by_global_norm + adamw, with a large
    eps so that AdamW's update shows the gradient's scale."""
    o = optim_config(grad_clip=grad_clip, eps=1.0, warmup_steps=0, decay_steps=10, lr=0.1, weight_decay=0.0)
    params = {"w": {"kernel": jnp.ones((3, 4))}, "b": {"bias": jnp.zeros(4)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 5.0), params)
    ours = optim.make_optimizer(o, max_steps=10)
    adamw = optax.adamw(optim.learning_rate_schedule(o, 10), b1=o.b1, b2=o.b2, eps=1.0, weight_decay=0.0)
    reference = optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip else adamw
    u_ours = ours.update(grads, ours.init(params), params)[0]
    u_ref = reference.update(grads, reference.init(params), params)[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u_ours, u_ref)
    assert float(jnp.abs(u_ours["w"]["kernel"]).max()) > 1e-3  # a real step


def test_bad_optimizer_settings_are_user_errors():
    with pytest.raises(UserValueError, match=r"optim.name='sgd': expected one of \['adamw', 'muon'\]"):
        optim.make_optimizer(optim_config(name="sgd"), max_steps=100)
    with pytest.raises(UserValueError, match=r"optim.schedule='linear'.*\['cosine', 'trapezoid'\]"):
        optim.learning_rate_schedule(optim_config(schedule="linear", warmup_steps=10), max_steps=100)
    with pytest.raises(UserValueError, match=r"optim.cooldown_frac=0.0 must be in \(0, 1\]"):
        optim.learning_rate_schedule(optim_config(schedule="trapezoid", cooldown_frac=0.0, warmup_steps=10),
                                     max_steps=100)


def numpy_newton_schulz(G, steps=5):
    """modded-nanogpt's zeropower_via_newtonschulz5 (train_gpt.py, 2024-12 records) in float64: a torch weight
    G (out, in)."""
    a, b, c = NS
    X = G / (np.linalg.norm(G) + 1e-7)
    if G.shape[0] > G.shape[1]:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if G.shape[0] > G.shape[1] else X


class NumpyMuon:
    """modded-nanogpt's Muon.step for torch weights (out, in): buf.lerp_(g, 1 - momentum);
    g = g.lerp_(buf, momentum) (nesterov); p -= lr * max(1, out / in) ** 0.5 * zeropower(g); with decoupled decay
    p *= 1 - lr * wd first (the later records')."""

    def __init__(self, lr, momentum, wd, nesterov=True, ns_steps=5):
        self.lr, self.momentum, self.wd, self.buf = lr, momentum, wd, {}
        self.nesterov, self.ns_steps = nesterov, ns_steps

    def step(self, name, p, g):
        buf = self.buf.setdefault(name, np.zeros_like(g))
        buf += (1 - self.momentum) * (g - buf)
        g = g + self.momentum * (buf - g) if self.nesterov else buf  # nesterov=False: the buffer itself
        p = p * (1 - self.lr * self.wd)
        return p - self.lr * max(1, p.shape[0] / p.shape[1]) ** 0.5 * numpy_newton_schulz(g, self.ns_steps)


def torch_weights(path: str, kernel: np.ndarray, stacked: bool) -> list[np.ndarray]:
    """A jaxgpt kernel as the records' torch weights (out, in): c_attn's q, k and v apart (c_q, c_k, c_v),
    attn.c_proj's heads merged, a scan_layers kernel (stacked) one set per layer."""
    if stacked:
        return [w for layer in kernel for w in torch_weights(path, layer, False)]
    if path.endswith("c_attn.kernel"):  # (C, 3, H, D)
        return [kernel[:, j].reshape(kernel.shape[0], -1).T for j in range(3)]
    return [kernel.reshape(-1, kernel.shape[-1]).T]  # (H, D, C) or (in, out)


def jaxgpt_kernel(path: str, weights: list[np.ndarray], shape, stacked: bool) -> np.ndarray:
    """torch_weights' inverse."""
    if stacked:
        n = len(weights) // shape[0]
        return np.stack([jaxgpt_kernel(path, weights[i * n:(i + 1) * n], shape[1:], False) for i in range(shape[0])])
    if path.endswith("c_attn.kernel"):
        return np.stack([w.T.reshape(shape[0], *shape[2:]) for w in weights], axis=1)
    return weights[0].T.reshape(shape)


MUON = dict(name="muon", lr=3e-3, muon_lr=0.05, embed_lr=0.02, head_lr=7e-3, muon_momentum=0.9, grad_clip=0.7,
            muon_weight_decay=0.1, weight_decay=0.1, warmup_steps=0, schedule="trapezoid", cooldown_frac=0.5)
GROUP_LRS = {"embedding": 0.02, "lm_head": 7e-3}  # by name; norms, biases, value-mix lambdas: lr


@pytest.mark.parametrize("scan_layers, nesterov, ns_steps", [(False, True, 5), (True, True, 5), (False, False, 3)])
def test_muon_steps_match_a_numpy_transcription_of_modded_nanogpt(scan_layers, nesterov, ns_steps):
    """Three steps of optim.name=muon on a model with every kernel layout (c_attn's (C, 3, H, D), attn.c_proj's
    (H, D, C), the MLP's; stacked by scan_layers or not): its kernels against NumPy's Muon in float64 (momentum,
    Nesterov, the Newton-Schulz coefficients, shape scaling, decay, the schedule), the other parameters against
    optax.adamw at their group's lr; gradient clipping before both. Also optim.muon_nesterov=False (the buffer
    orthogonalised) and optim.ns_steps=3, away from their defaults."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    from jaxgpt.model import GPTConfig, build
    config = GPTConfig(vocab_size=64, valid_vocab_size=None, block_size=8, n_layer=2, n_head=2, n_embd=16,
                       tie_embeddings=False, value_embeds=1, scan_layers=scan_layers)
    params = nnx.state(build(config), nnx.Param)
    o, steps = optim_config(**MUON, muon_nesterov=nesterov, ns_steps=ns_steps), 4  # the trapezoid: the peak at
    # steps 0 and 1, then 2/4 and 1/4 of the way down
    tx = optim.make_optimizer(o, max_steps=steps)
    state = tx.init(params)
    start = {k: np.asarray(v, np.float64) for k, v in flatten_dict(params.to_pure_dict()).items()}
    expected, reference, adam = dict(start), NumpyMuon(0.05, 0.9, 0.1, nesterov, ns_steps), {}
    for k in start:
        if k[-1] != "kernel":
            lr = GROUP_LRS.get(k[-1], o.lr)
            tx_k = optax.adamw(optim.learning_rate_schedule(o, steps, lr), b1=o.b1, b2=o.b2, eps=o.eps,
                               weight_decay=o.weight_decay if k[-1] in GROUP_LRS else 0.0)
            adam[k] = tx_k, tx_k.init(jnp.asarray(start[k], jnp.float32))
    rng = np.random.default_rng(0)
    for s in range(3):
        grads = {k: rng.normal(size=v.shape) * (1.0 if k[-1] == "kernel" else 0.1) for k, v in start.items()}
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
        assert norm > o.grad_clip  # clipping acts
        clipped = {k: g * o.grad_clip / norm for k, g in grads.items()}
        reference.lr = float(optim.learning_rate_schedule(o, steps, 0.05)(s))
        for k, v in expected.items():
            if k[-1] == "kernel":
                stacked, name = scan_layers and k[0] == "h", ".".join(map(str, k))
                weights = [reference.step(f"{name}/{i}", w, g) for i, (w, g) in enumerate(zip(
                    torch_weights(name, v, stacked), torch_weights(name, clipped[k], stacked)))]
                expected[k] = jaxgpt_kernel(name, weights, v.shape, stacked)
            else:
                tx_k, st = adam[k]
                u, st = tx_k.update(jnp.asarray(clipped[k], jnp.float32), st, jnp.asarray(v, jnp.float32))
                adam[k], expected[k] = (tx_k, st), v + np.asarray(u, np.float64)
        g_state = nnx.state(build(config), nnx.Param)
        g_state.replace_by_pure_dict(unflatten_dict({k: jnp.asarray(g, jnp.float32) for k, g in grads.items()}))
        updates, state = jax.jit(tx.update)(g_state, state, params)
        params = optax.apply_updates(params, updates)
    ours = {k: np.asarray(v) for k, v in flatten_dict(params.to_pure_dict()).items()}
    diffs = {k: float(np.abs(ours[k] - expected[k]).max()) for k in ours}
    moved = {k: float(np.abs(ours[k] - start[k]).max()) for k in ours}
    print(f"\n[muon, scan_layers={scan_layers}, nesterov={nesterov}, ns_steps={ns_steps}] max |jaxgpt - NumPy| "
          f"{max(diffs.values()):.2g} over "
          f"{len(diffs)} parameters; the smallest move {min(moved.values()):.2g}")
    assert max(diffs.values()) <= 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:4]
    assert min(moved.values()) > 1e-3  # every parameter really stepped
