"""The pure training step `(state, batch) -> (state, metrics)`, the evaluation loss, and their jitted, sharded
forms for one (config, model, mesh). jaxgpt/train.py runs them in a loop."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from ml_collections import ConfigDict

from jaxgpt import loss_scale, model, optim, sharding


@struct.dataclass
class TrainState:
    step: jax.Array  # training steps taken (a float16 step skipped for non-finite gradients counts)
    params: nnx.State  # float32 master weights
    opt_state: Any
    rng: jax.Array  # dropout key, split every step
    loss_scale: loss_scale.LossScale | None = None  # float16 training's loss scale; None without one

    def train_items(self):  # what checkpoints store beside the params
        items = {"step": self.step, "opt_state": self.opt_state, "rng": self.rng}
        return items if self.loss_scale is None else {**items, "loss_scale": self.loss_scale}


def loss_fn(params, graphdef, inputs, targets, rng, scale=None):
    """The mean loss (times `scale`, float16's loss scale, when given): never all the logits at once (loss_chunk)."""
    return nnx.merge(graphdef, params).loss(inputs, targets, rng=rng, scale=scale)


def trainable(params, lora: bool):
    """What the optimizer updates and keeps moments for: a LoRA model's adapters (its other weights stay frozen),
    else every parameter. Returns (trainable, frozen); frozen is None without LoRA."""
    if not lora:
        return params, None
    return nnx.split_state(params, nnx.LoRAParam, ...)


def train_step(state: TrainState, batch, *, graphdef, tx, schedule, use_dropout: bool, lora: bool = False):
    """One optimizer step over batch['inputs'/'targets'] of shape (grad_accum_steps, B, T).

    Micro-batches are accumulated by a lax.scan inside this one jit: one dispatch and one optimizer update per
    step (what optax.MultiSteps would spread over grad_accum_steps calls)."""
    rng, step_rng = jax.random.split(state.rng)
    n_micro = batch["inputs"].shape[0]
    keys = jax.random.split(step_rng, n_micro)
    params, frozen = trainable(state.params, lora)
    if lora:  # gradients for the adapters only; the frozen weights enter as constants
        grad_fn = jax.value_and_grad(lambda p, *args: loss_fn(nnx.merge_state(p, frozen), *args))
    else:
        grad_fn = jax.value_and_grad(loss_fn)
    scale = None if state.loss_scale is None else state.loss_scale.scale

    def micro_step(grad_sum, xs):
        inputs, targets, key = xs
        loss, grads = grad_fn(params, graphdef, inputs, targets, key if use_dropout else None, scale)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    if n_micro == 1:  # no scan: a one-trip loop keeps XLA from fusing across it and costs an extra grads copy
        loss, grads = grad_fn(params, graphdef, batch["inputs"][0], batch["targets"][0],
                              keys[0] if use_dropout else None, scale)
        losses = loss[None]
    else:
        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, losses = jax.lax.scan(micro_step, zeros, (batch["inputs"], batch["targets"], keys))
    if n_micro > 1 or scale is not None:  # the mean over micro-batches, unscaled, in float32
        grads = jax.tree.map(lambda g: g / (n_micro if scale is None else n_micro * scale), grads)
    with jax.named_scope("optimizer"):  # op names in profiles carry the scope (bench/gpu/trace_table.py groups by it)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
    metrics = {"loss": losses.mean(), "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
    new_scale = None
    if state.loss_scale is not None:  # a step with non-finite gradients changes nothing but the scale
        finite = loss_scale.all_finite(grads)
        new_params, opt_state = loss_scale.select(finite, (new_params, opt_state), (params, state.opt_state))
        new_scale = state.loss_scale.adjust(finite)
        metrics.update(loss=metrics["loss"] / scale, lr=schedule(state.step - state.loss_scale.skipped),  # optax
                       loss_scale=scale, skipped=1 - finite.astype(jnp.int32), skipped_steps=new_scale.skipped)
    params = nnx.merge_state(new_params, frozen) if lora else new_params
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                         loss_scale=new_scale), metrics


def train_steps(state: TrainState, batches, **step_args):
    """len(batches) optimizer steps in one call: a lax.scan of train_step over batches of shape (n, accum, B, T);
    the metrics come back stacked, one entry per step. Scanning amortises a small model's per-call cost."""
    return jax.lax.scan(functools.partial(train_step, **step_args), state, batches)


def eval_loss(params, batches, *, graphdef):
    """Mean loss over batches of shape (n, B, T), one batch at a time (a lax.scan) in a single call. The params
    ride in the loop's carry: nnx.scan (scan_layers) refuses a module built from an enclosing trace's values."""
    def one(params, b):
        return params, loss_fn(params, graphdef, b["inputs"], b["targets"], None)
    return jax.lax.scan(one, params, batches)[1].mean()


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted, sharded step functions of one (config, model, mesh), with what they need to be called."""
    graphdef: nnx.GraphDef
    n_params: int
    tx: optax.GradientTransformation
    state_sharding: TrainState  # a NamedSharding per leaf
    abstract_state: TrainState  # ShapeDtypeStructs carrying those shardings: restore targets
    train_steps: Any  # (state, batches of (n, accum, B, T)) -> (state, metrics of (n,)); donates state
    eval_loss: Any  # (params, batches of (n, B, T)) -> mean loss
    loss_scale: loss_scale.LossScale | None  # the initial loss scale (float16), None without one


def under_mesh(mesh, fn):
    """fn traced with `mesh` as the current mesh, so the model's activation constraints apply."""
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    traced.__name__ = getattr(fn, "func", fn).__name__  # jit(train_steps) in compile logs and profiles
    return traced


def make_steps(config: ConfigDict, model_config: model.GPTConfig, mesh) -> Steps:
    schedule = optim.learning_rate_schedule(config.optim, config.max_steps)
    tx = optim.make_optimizer(config.optim, config.max_steps)
    graphdef, abstract_params = nnx.split(model.abstract(model_config), nnx.Param)
    params_sharding = sharding.param_shardings(abstract_params, mesh)
    lora = model_config.lora_rank > 0
    abstract_opt = jax.eval_shape(lambda p: tx.init(trainable(p, lora)[0]), abstract_params)
    scale = loss_scale.create(config.optim.loss_scale, model_config.dtype, config.optim.loss_scale_period)
    rep = sharding.replicated(mesh)
    state_sharding = TrainState(step=rep, params=params_sharding, rng=rep, opt_state=sharding.optimizer_shardings(
        tx, abstract_opt, trainable(params_sharding, lora)[0], mesh), loss_scale=jax.tree.map(lambda _: rep, scale))
    abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                                opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                                loss_scale=jax.eval_shape(lambda: scale))
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_sharding)
    steps = under_mesh(mesh, functools.partial(train_steps, graphdef=graphdef, tx=tx, schedule=schedule,
                                               use_dropout=model_config.dropout > 0 or (
                                                   lora and model_config.lora_dropout > 0), lora=lora))
    return Steps(
        graphdef=graphdef, n_params=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params)), tx=tx,
        state_sharding=state_sharding, abstract_state=abstract_state,
        train_steps=jax.jit(steps, in_shardings=(state_sharding, sharding.batch_sharding(mesh, ndim=4, batch_axis=2)),
                            out_shardings=(state_sharding, rep), donate_argnums=0),
        eval_loss=jax.jit(under_mesh(mesh, functools.partial(eval_loss, graphdef=graphdef)),
                          in_shardings=(params_sharding, sharding.batch_sharding(mesh, ndim=3, batch_axis=1)),
                          out_shardings=rep),
        loss_scale=scale)


def fresh_state(steps: Steps, model_config: model.GPTConfig, seed: int, params=None) -> TrainState:
    """Step 0's state, sharded: `params`, or drawn from the seed when None. One jitted call for the whole state."""
    def build(params):
        if params is None:
            params = nnx.state(model.build(model_config, seed), nnx.Param)
        lora = model_config.lora_rank > 0
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=steps.tx.init(trainable(params, lora)[0]),
                          rng=jax.random.PRNGKey(seed + 1), loss_scale=steps.loss_scale)
    return jax.jit(build, out_shardings=steps.state_sharding)(params)
