"""The optax chain: global-norm clipping, then AdamW under a warmup-cosine schedule, decaying 2-D+ weights only."""
from __future__ import annotations

import jax
import optax

from jaxgpt.errors import UserValueError


def learning_rate_schedule(optim, max_steps: int) -> optax.Schedule:
    """Linear warmup to optim.lr, then cosine to optim.lr * optim.min_lr_ratio at decay_steps (0: max_steps)."""
    decay_steps = optim.decay_steps or max_steps
    if optim.warmup_steps >= decay_steps:
        raise UserValueError(f"warmup_steps={optim.warmup_steps} must be smaller than decay_steps={decay_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
        decay_steps=decay_steps, end_value=optim.lr * optim.min_lr_ratio)


DECAYED = ("kernel", "embedding")  # the 2-D weights of matmuls and embeddings


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
