"""The optax chain: global-norm clipping, then AdamW (decaying 2-D+ weights only) or Muon on the hidden matrices
with AdamW on the rest, under a warmup-cosine or a trapezoid (warmup, constant, linear cool-down) schedule."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgpt.errors import UserValueError

WARMUPS = ("nanogpt", "build_nanogpt")  # optim.warmup: whose get_lr the warmup follows
SCHEDULES = ("cosine", "trapezoid")  # optim.schedule
OPTIMIZERS = ("adamw", "muon")  # optim.name
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # modded-nanogpt's quintic Newton-Schulz iteration


def learning_rate_schedule(optim, max_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup to `peak` (optim.lr when None), then down to peak * optim.min_lr_ratio at decay_steps (0:
    max_steps), constant after: nanoGPT's cosine (optim.schedule=cosine), or constant at the peak until the last
    cooldown_frac of decay_steps and a straight line from there (trapezoid, modded-nanogpt's). The warmup at step s
    is peak * (s + 1) / (warmup_steps + 1) (nanoGPT) or peak * (s + 1) / warmup_steps (build-nanogpt): neither
    starts at 0."""
    decay_steps = optim.decay_steps or max_steps
    if optim.warmup_steps >= decay_steps:
        raise UserValueError(f"warmup_steps={optim.warmup_steps} must be smaller than decay_steps={decay_steps}")
    if optim.warmup not in WARMUPS:
        raise UserValueError(f"optim.warmup={optim.warmup!r}: expected one of {list(WARMUPS)}")
    if optim.schedule not in SCHEDULES:
        raise UserValueError(f"optim.schedule={optim.schedule!r}: expected one of {list(SCHEDULES)}")
    peak = optim.lr if peak is None else peak
    end, warmup = peak * optim.min_lr_ratio, optim.warmup_steps
    ramp = max(warmup + 1 if optim.warmup == "nanogpt" else warmup, 1)  # max: no 1/0, even in the unused branch
    if optim.schedule == "cosine":
        def decay(step):
            ratio = jnp.clip((step - warmup) / (decay_steps - warmup), 0.0, 1.0)
            return end + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (peak - end)
    else:
        if not 0.0 < optim.cooldown_frac <= 1.0:
            raise UserValueError(f"optim.cooldown_frac={optim.cooldown_frac} must be in (0, 1]")
        start = max(warmup, decay_steps - round(optim.cooldown_frac * decay_steps))

        def decay(step):
            return end + jnp.clip((decay_steps - step) / max(decay_steps - start, 1), 0.0, 1.0) * (peak - end)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)  # optax's count: the 0-based index of the update, traced int32
        return jnp.where(step < warmup, peak * (step + 1) / ramp, jnp.where(step >= decay_steps, end, decay(step)))
    return schedule


DECAYED = ("kernel", "embedding", "lm_head")  # the weights of matmuls, embeddings and an untied head


def _name(path) -> str:
    """A parameter's name: the last dict key of its path (nnx.State paths end in the Variable's own keys)."""
    return next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))


def decay_mask(params):
    """nanoGPT's rule: weight decay on the 2-D weights, never on biases or norms. Decided by name, not ndim,
    because scan_layers stacks biases and norm scales into 2-D arrays."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _name(path) in DECAYED, params)


def make_optimizer(optim, max_steps: int) -> optax.GradientTransformation:
    if optim.name not in OPTIMIZERS:
        raise UserValueError(f"optim.name={optim.name!r}: expected one of {list(OPTIMIZERS)}")
    if optim.name == "adamw":
        update = _adamw(optim, learning_rate_schedule(optim, max_steps), decay=decay_mask)
    else:
        update = _muon_and_adamw(optim, max_steps)
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), update) if optim.grad_clip > 0 else update


def _adamw(optim, schedule, decay) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                       mask=decay)


# ---------------------------------------------------------------- Muon

GROUPS = {"kernel": "muon", "embedding": "embed", "lm_head": "head"}  # by name; anything else: "other"


def param_groups(params):
    """Each parameter's group under optim.name=muon: muon (the hidden matrices: every Linear kernel), embed (wte,
    wpe, the value embeddings), head (an untied lm_head) or other (norm scales, biases, value-mix lambdas, LoRA
    adapters), by name as decay_mask."""
    return jax.tree_util.tree_map_with_path(lambda path, _: GROUPS.get(_name(path), "other"), params)


def _muon_and_adamw(optim, max_steps: int) -> optax.GradientTransformation:
    """Muon on the hidden matrices, AdamW on the rest, each group at its own peak lr under the one schedule shape;
    AdamW decays the embeddings and head (optim.weight_decay), Muon its matrices (optim.muon_weight_decay)."""
    def adamw(lr, decayed: bool):
        return _adamw(optim, learning_rate_schedule(optim, max_steps, lr), decay=lambda p: jax.tree.map(
            lambda _: decayed, p))
    muon = optax.chain(
        scale_by_muon(optim.muon_momentum, optim.muon_nesterov, optim.ns_steps),
        optax.add_decayed_weights(optim.muon_weight_decay),
        optax.scale_by_learning_rate(learning_rate_schedule(optim, max_steps, optim.muon_lr)))
    return optax.partition({"muon": muon, "embed": adamw(optim.embed_lr or optim.lr, True),
                            "head": adamw(optim.head_lr or optim.lr, True), "other": adamw(optim.lr, False)},
                           param_groups)


class MuonState(NamedTuple):
    momentum: optax.Updates  # the momentum buffer, one per matrix


# A hidden kernel's (input axes, output axes), counted from its end; any axis before them (scan_layers' stacked
# layers, c_attn's q/k/v) makes a batch of matrices, each orthogonalised on its own.
MUON_AXES = {
    ("attn", "c_attn"): ((-4,), (-2, -1)),  # (C, 3, H, D): q, k and v apart, as modded-nanogpt's c_q, c_k, c_v
    ("attn", "q_proj"): ((-3,), (-2, -1)),  # (C, H, D)
    ("attn", "k_proj"): ((-3,), (-2, -1)),
    ("attn", "v_proj"): ((-3,), (-2, -1)),
    ("attn", "c_proj"): ((-3, -2), (-1,)),  # (H, D, C)
}
MATRIX = ((-2,), (-1,))  # an MLP's (in, out)


def muon_axes(path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return MUON_AXES.get(tuple(keys[-3:-1]), MATRIX)


def scale_by_muon(momentum: float, nesterov: bool, ns_steps: int) -> optax.GradientTransformation:
    """Muon's direction, modded-nanogpt's update: the momentum buffer m <- momentum * m + (1 - momentum) * g, the
    Nesterov step (1 - momentum) * g + momentum * m (or m alone), orthogonalised by ns_steps Newton-Schulz
    iterations, times sqrt(max(1, fan_out / fan_in)). optax.contrib.muon bias-corrects its momentum, which moves
    the mix of g and m in the early steps; the published update does not, so this follows it."""
    def init(params):
        return MuonState(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        buf = jax.tree.map(lambda m, g: momentum * m + (1 - momentum) * g, state.momentum, grads)
        direction = jax.tree.map(lambda m, g: (1 - momentum) * g + momentum * m, buf, grads) if nesterov else buf
        return orthogonalize(direction, ns_steps), MuonState(buf)
    return optax.GradientTransformation(init, update)


def orthogonalize(tree, ns_steps: int):
    """Each leaf's matrices (muon_axes: input x output axes, the other axes a batch) replaced by modded-nanogpt's
    zeropower_via_newtonschulz5 of each, in float32 (the records run it in bfloat16 on GPUs), times
    sqrt(max(1, fan_out / fan_in)). The iteration runs on the wide side (it commutes with transposing), and the
    matrices of one shape go through it as one batch, whichever parameter they belong to: a few large matmuls run
    much faster than many small ones."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    layouts = [_matrix_layout(leaf.shape, *muon_axes(path)) for path, leaf in leaves]
    wide = []  # (b, m, n) with m <= n
    for (_, leaf), (order, (fan_in, fan_out)) in zip(leaves, layouts):
        x = leaf.transpose(order).reshape(-1, fan_in, fan_out).astype(jnp.float32)
        wide.append(x.swapaxes(-1, -2) if fan_in > fan_out else x)
    done = {}
    for shape in sorted({x.shape[1:] for x in wide}):
        group = [i for i, x in enumerate(wide) if x.shape[1:] == shape]
        ortho = newton_schulz(jnp.concatenate([wide[i] for i in group]), ns_steps)
        done.update(zip(group, jnp.split(ortho, np.cumsum([wide[i].shape[0] for i in group])[:-1])))
    out = []
    for i, ((_, leaf), (order, (fan_in, fan_out))) in enumerate(zip(leaves, layouts)):
        x = (done[i].swapaxes(-1, -2) if fan_in > fan_out else done[i]) * math.sqrt(max(1.0, fan_out / fan_in))
        out.append(x.reshape([leaf.shape[a] for a in order]).transpose(np.argsort(order)).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def _matrix_layout(shape, in_axes, out_axes) -> tuple[tuple[int, ...], tuple[int, int]]:
    """(the transpose that puts the batch axes, then in_axes, then out_axes in order; (fan_in, fan_out))."""
    in_axes, out_axes = (tuple(a % len(shape) for a in axes) for axes in (in_axes, out_axes))
    batch = tuple(a for a in range(len(shape)) if a not in in_axes + out_axes)
    return batch + in_axes + out_axes, (math.prod(shape[a] for a in in_axes), math.prod(shape[a] for a in out_axes))


def newton_schulz(x, steps: int):
    """x (b, m, n), m <= n -> for each matrix, one near U V^T of its SVD (singular values in about [0.7, 1.2]):
    X = x / ||x||_F, then X <- a X + (b A + c A A) X with A = X X^T, steps times."""
    a, b, c = NS_COEFFICIENTS
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.swapaxes(-1, -2)
        x = a * x + (b * A + c * A @ A) @ x
    return x
