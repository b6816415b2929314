"""The optax chain: global-norm clipping, then AdamW under a warmup-cosine schedule, decaying 2-D+ weights only."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxgpt.errors import UserValueError

WARMUPS = ("nanogpt", "build_nanogpt")  # optim.warmup: whose get_lr the warmup follows


def learning_rate_schedule(optim, max_steps: int) -> optax.Schedule:
    """nanoGPT's get_lr: linear warmup to optim.lr, then cosine to optim.lr * optim.min_lr_ratio at decay_steps
    (0: max_steps), constant after. The warmup at step s is lr * (s + 1) / (warmup_steps + 1) (nanoGPT) or
    lr * (s + 1) / warmup_steps (build-nanogpt): neither starts at 0."""
    decay_steps = optim.decay_steps or max_steps
    if optim.warmup_steps >= decay_steps:
        raise UserValueError(f"warmup_steps={optim.warmup_steps} must be smaller than decay_steps={decay_steps}")
    if optim.warmup not in WARMUPS:
        raise UserValueError(f"optim.warmup={optim.warmup!r}: expected one of {list(WARMUPS)}")
    peak, end, warmup = optim.lr, optim.lr * optim.min_lr_ratio, optim.warmup_steps
    ramp = max(warmup + 1 if optim.warmup == "nanogpt" else warmup, 1)  # max: no 1/0, even in the unused branch

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)  # optax's count: the 0-based index of the update, traced int32
        ratio = jnp.clip((step - warmup) / (decay_steps - warmup), 0.0, 1.0)
        cosine = end + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (peak - end)
        return jnp.where(step < warmup, peak * (step + 1) / ramp, jnp.where(step >= decay_steps, end, cosine))
    return schedule


DECAYED = ("kernel", "embedding", "lm_head")  # the weights of matmuls, embeddings and an untied head


def decay_mask(params):
    """nanoGPT's rule: weight decay on the 2-D weights, never on biases or norms. Decided by name, not ndim,
    because scan_layers stacks biases and norm scales into 2-D arrays."""
    def named(path):
        return next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    return jax.tree_util.tree_map_with_path(lambda path, _: named(path) in DECAYED, params)


def make_optimizer(optim, max_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(optim, max_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw) if optim.grad_clip > 0 else adamw
