"""Loss scaling for float16 training: the loss is multiplied by a scale before differentiation, so that small
gradients survive float16's narrow range, and the float32 gradients are divided by it before the optimizer.

Dynamic (PyTorch's GradScaler, jmp's DynamicLossScale): a step whose gradients are not all finite changes no weight
and no optimizer moment (optax.apply_if_finite's semantics: nor Adam's step count, nor the schedule's), halves the
scale and is counted; after `period` finite steps in a row the scale doubles; a step skipped at the least scale
ends the run (divergence). A fixed scale skips such steps alike but never changes; more than MAX_SKIPS_IN_A_ROW in a
row end the run (jaxgpt/metrics.py). The scale and the counters are part of the training state: checkpointed,
resumed exactly and logged. Written here rather than taken from jmp (last released 2023): three scalars, one select.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxgpt.errors import UserValueError

INITIAL_DYNAMIC_SCALE = 2.0 ** 16  # PyTorch GradScaler's init_scale
MIN_SCALE = 1.0
MAX_SKIPS_IN_A_ROW = 10  # a fixed scale: more overflowing steps in a row end the run (jaxgpt/metrics.py)


@struct.dataclass
class LossScale:
    scale: jax.Array  # float32 (): what the loss is multiplied by
    good_steps: jax.Array  # int32 (): finite steps since the scale last changed
    skipped: jax.Array  # int32 (): steps skipped so far for non-finite gradients
    period: int = struct.field(pytree_node=False, default=2000)  # 0: a fixed scale

    def adjust(self, finite: jax.Array) -> LossScale:
        """The state after a step whose gradients were all finite (or not)."""
        if not self.period:
            return self.replace(skipped=self.skipped + jnp.where(finite, 0, 1))
        grow = finite & (self.good_steps + 1 >= self.period)
        scale = jnp.where(finite, jnp.where(grow, 2 * self.scale, self.scale), jnp.maximum(self.scale / 2, MIN_SCALE))
        return LossScale(scale=scale, good_steps=jnp.where(finite & ~grow, self.good_steps + 1, 0),
                         skipped=self.skipped + jnp.where(finite, 0, 1), period=self.period)


def resolve(setting: str, dtype: str) -> str | float | None:
    """optim.loss_scale for a compute dtype -> 'dynamic', a fixed float, or None (no scaling).

    auto: dynamic for float16, none otherwise. float16 without a scale, or a scale with another dtype, is an error:
    bfloat16 has float32's range, and float16's gradients would underflow unscaled."""
    setting = str(setting).strip().lower()
    if setting == "auto":
        return "dynamic" if dtype == "float16" else None
    if setting == "none":
        scale = None
    elif setting == "dynamic":
        scale = "dynamic"
    else:
        try:
            scale = float(setting)
        except ValueError:
            raise UserValueError(f"optim.loss_scale={setting!r}: expected auto, dynamic, none or a number") from None
        if not scale > 0 or scale == float("inf"):
            raise UserValueError(f"optim.loss_scale={setting}: a fixed scale must be a positive finite number")
    if dtype == "float16" and scale is None:
        raise UserValueError("model.dtype=float16 needs a loss scale (its small gradients underflow without one): "
                             "set optim.loss_scale=dynamic (or auto), or a fixed number")
    if dtype != "float16" and scale is not None:
        raise UserValueError(f"optim.loss_scale={setting} is for model.dtype=float16; {dtype} needs none "
                             "(optim.loss_scale=auto or none)")
    return scale


def create(setting: str, dtype: str, period: int) -> LossScale | None:
    """The initial state for optim.loss_scale / loss_scale_period under a compute dtype; None without scaling."""
    scale = resolve(setting, dtype)
    if scale is None:
        return None
    if scale == "dynamic" and period < 1:
        raise UserValueError(f"optim.loss_scale_period={period}: the finite steps before the scale doubles, >= 1")
    value = INITIAL_DYNAMIC_SCALE if scale == "dynamic" else scale
    return LossScale(scale=jnp.float32(value), good_steps=jnp.int32(0), skipped=jnp.int32(0),
                     period=period if scale == "dynamic" else 0)


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def select(finite: jax.Array, new, old):
    """new where the step's gradients were finite, else old, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
