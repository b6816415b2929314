"""Training: `python -m jaxgpt.train --config=configs/shakespeare_char_cpu.py --workdir=out/shakespeare`.

`train(config, workdir)` does the work; `main` only parses flags. The step is a pure function
`(state, batch) -> (state, metrics)`, jitted with shardings from jaxgpt/sharding.py and its state donated.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx, struct
from ml_collections import ConfigDict, config_flags

from jaxgpt import checkpoint, data, metrics, model, optim, sharding, tokenizer


@struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken
    params: nnx.State  # float32 master weights
    opt_state: Any
    rng: jax.Array  # dropout key, split every step

    def train_items(self):  # what checkpoints store beside the params
        return {"step": self.step, "opt_state": self.opt_state, "rng": self.rng}


def model_config(config: ConfigDict, vocab_size: int) -> model.GPTConfig:
    """The GPTConfig of a training config; vocab_size is the tokenizer's (padded here to a multiple of 64)."""
    m = config.model
    shape = model.PRESETS[m.preset] if m.preset else dict(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd)
    if m.preset and m.preset not in model.PRESETS:
        raise ValueError(f"model.preset={m.preset!r}: expected one of {sorted(model.PRESETS)} or ''")
    rows = m.vocab_size or 64 * math.ceil(vocab_size / 64)
    if rows < vocab_size:
        raise ValueError(f"model.vocab_size={rows} is smaller than the tokenizer's vocabulary ({vocab_size})")
    return model.GPTConfig(vocab_size=rows, valid_vocab_size=vocab_size, block_size=m.block_size, dropout=m.dropout,
                           bias=m.bias, dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat, **shape)


def loss_fn(params, graphdef, inputs, targets, rng):
    logits, _ = nnx.merge(graphdef, params)(inputs, rng=rng)
    return model.cross_entropy(logits, targets)


def train_step(state: TrainState, batch, *, graphdef, tx, schedule, use_dropout: bool):
    """One optimizer step over batch['inputs'/'targets'] of shape (grad_accum_steps, B, T).

    Micro-batches are accumulated by a lax.scan inside this one jit: one dispatch and one optimizer update per
    step (what optax.MultiSteps would spread over grad_accum_steps calls)."""
    rng, step_rng = jax.random.split(state.rng)
    n_micro = batch["inputs"].shape[0]
    keys = jax.random.split(step_rng, n_micro)
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(grad_sum, xs):
        inputs, targets, key = xs
        loss, grads = grad_fn(state.params, graphdef, inputs, targets, key if use_dropout else None)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    if n_micro == 1:  # no scan: a one-trip loop keeps XLA from fusing across it and costs an extra grads copy
        loss, grads = grad_fn(state.params, graphdef, batch["inputs"][0], batch["targets"][0],
                              keys[0] if use_dropout else None)
        losses = loss[None]
    else:
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, losses = jax.lax.scan(micro_step, zeros, (batch["inputs"], batch["targets"], keys))
        grads = jax.tree.map(lambda g: g / n_micro, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state, rng=rng)
    return new_state, {"loss": losses.mean(), "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}


def train_steps(state: TrainState, batches, **step_args):
    """len(batches) optimizer steps in one call: a lax.scan of train_step over batches of shape (n, accum, B, T);
    the metrics come back stacked, one entry per step. On CPU a small model's per-call cost (argument handling,
    buffer allocation, waking the thread pool) is a quarter of its step time; scanning amortises it."""
    return jax.lax.scan(functools.partial(train_step, **step_args), state, batches)


def eval_loss(params, batches, *, graphdef):
    """Mean loss over batches of shape (n, B, T), one batch at a time (lax.map) in a single call."""
    losses = jax.lax.map(lambda b: loss_fn(params, graphdef, b["inputs"], b["targets"], None), batches)
    return losses.mean()


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
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    rep = sharding.replicated(mesh)
    state_sharding = TrainState(step=rep, params=params_sharding, rng=rep,
                                opt_state=sharding.optimizer_shardings(tx, abstract_opt, params_sharding, mesh))
    abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                                opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_sharding)
    steps = under_mesh(mesh, functools.partial(train_steps, graphdef=graphdef, tx=tx, schedule=schedule,
                                               use_dropout=model_config.dropout > 0))
    return Steps(
        graphdef=graphdef, n_params=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params)), tx=tx,
        state_sharding=state_sharding, abstract_state=abstract_state,
        train_steps=jax.jit(steps, in_shardings=(state_sharding, sharding.batch_sharding(mesh, ndim=4, batch_axis=2)),
                            out_shardings=(state_sharding, rep), donate_argnums=0),
        eval_loss=jax.jit(under_mesh(mesh, functools.partial(eval_loss, graphdef=graphdef)),
                          in_shardings=(params_sharding, sharding.batch_sharding(mesh, ndim=3, batch_axis=1)),
                          out_shardings=rep))


class Trainer:
    """Holds what the loop needs: the mesh, compiled steps, shardings, checkpoint manager and data."""

    def __init__(self, config: ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        self.is_main = jax.process_index() == 0
        self.tokenizer, self.data_dir = prepare_data(config, self.is_main)
        self.model_config = self._model_config()
        self.mesh = sharding.make_mesh(config.mesh)
        self._check_batch()
        self.steps = make_steps(config, self.model_config, self.mesh)

        local_batch = config.batch_size // jax.process_count()
        self.train_data = iter(data.make_dataset(
            data.find_shards(self.data_dir, "train"), block_size=self.model_config.block_size,
            batch_size=local_batch, seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count(), vocab_size=self.tokenizer.vocab_size))
        val = data.eval_batches(
            data.find_shards(self.data_dir, "val"), block_size=self.model_config.block_size, batch_size=local_batch,
            n_batches=config.eval_iters, seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count())
        self.val_batches = sharding.host_batch_to_global(  # fixed: stacked to (eval_iters, B, T) once
            {k: np.stack([b[k] for b in val]) for k in ("inputs", "targets")}, self.mesh, batch_axis=1)
        self.manager = checkpoint.checkpoint_manager(workdir, keep=config.keep_checkpoints)
        if config.hellaswag_file:  # a missing or malformed file fails now, not at the first evaluation
            from jaxgpt import evaluate
            evaluate.read_hellaswag(config.hellaswag_file, config.hellaswag_limit or None)

    def _model_config(self) -> model.GPTConfig:
        source = self.config.init_from
        if source.startswith(("hf:", "nanogpt:", "ckpt:")):  # the architecture comes from the weights
            return self._pretrained().config
        return model_config(self.config, self.tokenizer.vocab_size)

    def _check_batch(self):
        c, n_proc = self.config, jax.process_count()
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if c.batch_size % n_proc or c.batch_size % shards:
            raise ValueError(f"batch_size={c.batch_size} must divide evenly over {n_proc} processes and the "
                             f"{shards} data x fsdp shards of the mesh {dict(self.mesh.shape)}")
        for name in ("grad_accum_steps", "steps_per_call", "log_every", "eval_every", "eval_iters"):
            if c[name] < 1:
                raise ValueError(f"{name}={c[name]} must be at least 1")

    @functools.cache  # noqa: B019 -- the trainer lives for the whole run
    def _pretrained(self) -> model.GPT:
        kind, _, path = self.config.init_from.partition(":")
        m = self.config.model
        overrides = dict(dropout=m.dropout, dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat)
        if kind == "ckpt":
            pretrained = checkpoint.load_model(path, **overrides)
        else:
            import torch_bridge
            pretrained = (torch_bridge.from_hf if kind == "hf" else torch_bridge.from_nanogpt)(path, **overrides)
        if pretrained.config.n_valid_vocab < self.tokenizer.vocab_size:
            raise ValueError(f"init_from={self.config.init_from!r} has {pretrained.config.n_valid_vocab} tokens but "
                             f"the data's tokenizer ({self.tokenizer.name}) has {self.tokenizer.vocab_size}")
        return pretrained

    def initial_state(self) -> tuple[TrainState, int]:
        """Resumes from the workdir's latest checkpoint when there is one, else starts per init_from."""
        latest = self.manager.latest_step()
        if latest is not None:
            params, items = checkpoint.restore_training(
                self.manager, latest, params=self.steps.abstract_state.params,
                train=self.steps.abstract_state.train_items(), data_iterator=self.train_data)
            log(self.is_main, f"resumed from {self.workdir} at step {latest}")
            return TrainState(params=params, **items), latest
        if self.config.init_from == "resume":
            raise FileNotFoundError(f"init_from='resume' but {self.workdir} has no checkpoint to resume from")
        if self.config.init_from == "scratch":
            params = None  # drawn inside the one jitted call below
        elif self.config.init_from.startswith(("hf:", "nanogpt:", "ckpt:")):
            params = jax.device_put(nnx.state(self._pretrained(), nnx.Param), self.steps.state_sharding.params)
        else:
            raise ValueError(f"init_from={self.config.init_from!r}: expected scratch, resume, hf:DIR, "
                             "nanogpt:FILE or ckpt:DIR")

        def fresh_state(params):  # one compilation for the whole state (four separate ones took ~0.5 s more)
            if params is None:
                params = nnx.state(model.build(self.model_config, self.config.seed), nnx.Param)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.steps.tx.init(params),
                              rng=jax.random.PRNGKey(self.config.seed + 1))
        return jax.jit(fresh_state, out_shardings=self.steps.state_sharding)(params), 0

    def compile_ahead(self, n: int) -> concurrent.futures.Future:
        """Compiles the first training call (n steps) and the evaluation on a background thread, while the caller
        builds or restores the state: XLA compiles outside the GIL, so the compilations overlap the model's
        initialisation (a 10-step CPU recipe run 6.97 -> 6.52 s; see bench/RESULTS.md). The later calls with
        these shapes and shardings find the executables in jit's cache; `.result()` re-raises a compile error."""
        c, mc = self.config, self.model_config

        def batch(shape, batch_axis):
            spec = sharding.batch_sharding(self.mesh, len(shape), batch_axis)
            return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=spec) for k in ("inputs", "targets")}

        def compile_both():
            self.steps.train_steps.lower(
                self.steps.abstract_state, batch((n, c.grad_accum_steps, c.batch_size, mc.block_size), 2)).compile()
            self.steps.eval_loss.lower(self.steps.abstract_state.params, batch(self.val_batches["inputs"].shape, 1)
                                       ).compile()
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_ahead")
        future = pool.submit(compile_both)
        pool.shutdown(wait=False)
        return future

    def next_batches(self, n: int):
        """Local micro-batches for n steps stacked to (n, accum, B_local, T), assembled into global arrays."""
        accum = self.config.grad_accum_steps
        micro = [next(self.train_data) for _ in range(n * accum)]
        stacked = {k: np.stack([m[k] for m in micro]).reshape(n, accum, *micro[0][k].shape)
                   for k in ("inputs", "targets")}
        return sharding.host_batch_to_global(stacked, self.mesh, batch_axis=2)

    def evaluate(self, params) -> float:
        return float(self.steps.eval_loss(params, self.val_batches))

    def save(self, state: TrainState, step: int, val_loss=None):
        checkpoint.save_training(
            self.manager, step, params=state.params, train=state.train_items(), data_iterator=self.train_data,
            config={"model": dataclasses.asdict(self.model_config), "train": self.config.to_dict()},
            val_loss=val_loss)

    def hellaswag(self, params) -> dict:
        from jaxgpt import evaluate
        return evaluate.hellaswag_eval(nnx.merge(self.steps.graphdef, params), self.tokenizer,
                                       self.config.hellaswag_file, self.config.hellaswag_limit or None)

    def sample(self, params) -> str:
        from jaxgpt import generate
        c = self.config
        m = nnx.merge(self.steps.graphdef, params)
        prompt = self.tokenizer.encode(c.sample_prompt) or [self.tokenizer.eot or 0]
        out = generate.generate(m, [prompt], max_new_tokens=c.sample_tokens, temperature=0.8, top_k=200,
                                seed=c.seed, eot_id=self.tokenizer.eot)
        return self.tokenizer.decode(prompt + out[0])


def log(is_main: bool, message: str):
    if is_main:
        print(message, flush=True)


def prepare_data(config: ConfigDict, is_main: bool):
    """The tokenizer and data dir, preparing the dir first (process 0 only) when it holds no shards."""
    from jaxgpt import prepare
    d = config.data
    if not data.has_shards(d.dir):
        if jax.process_count() > 1:
            raise FileNotFoundError(f"data.dir={d.dir} holds no shards; prepare it before a multi-process launch: "
                                    f"python -m jaxgpt.prepare --out={d.dir} ...")
        log(is_main, f"data.dir={d.dir} holds no shards: preparing it from data.dataset={d.dataset!r}")
        prepare.prepare(d.dir, dataset=d.dataset, input=d.input or None, tokenizer=d.tokenizer)
    return tokenizer.load_tokenizer(d.dir), d.dir


def call_length(step: int, config: ConfigDict, checkpoint_every: int) -> int:
    """Steps in the next jitted call: config.steps_per_call, cut short to end on the next eval or checkpoint step
    (which need the state there; a steps_per_call that divides them compiles a single call length). Log steps
    come from the call's per-step metrics and do not end calls."""
    n = min(config.steps_per_call, config.max_steps - step)
    for every in (config.eval_every, checkpoint_every):
        n = min(n, every - step % every)
    return n


def train(config: ConfigDict, workdir: str) -> TrainState:
    """Trains config.max_steps optimizer steps, resuming from workdir's checkpoints; returns the final state."""
    t = Trainer(config, workdir)
    checkpoint_every = config.checkpoint_every or config.eval_every
    compiled = t.compile_ahead(call_length(t.manager.latest_step() or 0, config, checkpoint_every))
    state, start = t.initial_state()
    compiled.result()
    mc = t.model_config
    tokens_per_step = config.batch_size * config.grad_accum_steps * mc.block_size
    flops_per_step = tokens_per_step * metrics.flops_per_token(
        t.steps.n_params, mc.block_size * mc.n_embd, mc.n_layer, mc.block_size, mc.n_embd)
    peak = metrics.peak_flops_per_device(config.peak_flops)
    log(t.is_main, f"model: {t.steps.n_params / 1e6:.2f}M parameters, {mc}")
    log(t.is_main, f"mesh: {dict(t.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
                   f"{jax.process_count()} process(es); {tokens_per_step:,} tokens per step")
    writer = metrics.MetricWriter(workdir, config, enabled=t.is_main)
    bar = None
    if t.is_main and config.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=config.max_steps, initial=start, unit="step", dynamic_ncols=True)
    say = bar.write if bar is not None else functools.partial(log, t.is_main)  # a line that keeps the bar intact
    pending = None  # the last call's metrics, read one call late so the host never stalls the device
    t_last, step_last = time.perf_counter(), start

    def drain():
        """Fetches the pending call's metrics (once), raises at its first step whose loss or gradient norm is not
        finite, and writes a line for each log step inside it: log steps do not end calls or wait for the
        device, and a call's tokens/s is measured when its metrics arrive."""
        nonlocal pending, t_last, step_last
        if pending is None:
            return
        (first_step, call_metrics), pending = pending, None
        values = {k: np.asarray(v) for k, v in jax.device_get(call_metrics).items()}  # each (steps in the call,)
        bad = np.flatnonzero(~(np.isfinite(values["loss"]) & np.isfinite(values["grad_norm"])))
        if bad.size:
            t.manager.wait_until_finished()
            last = t.manager.latest_step()
            kept = (f"The last good checkpoint (step {last}) is kept in {workdir}" if last is not None else
                    f"no checkpoint was saved yet in {workdir}")
            raise FloatingPointError(f"loss {values['loss'][bad[0]]}, grad norm {values['grad_norm'][bad[0]]} at "
                                     f"step {first_step + bad[0]}: stopping. {kept}")
        now, last_step = time.perf_counter(), first_step + len(values["loss"]) - 1
        tok_s = tokens_per_step * (last_step - step_last) / (now - t_last)
        for step in range(first_step, last_step + 1):
            i = step - first_step
            if step % config.log_every and step != config.max_steps:
                continue
            row = {k: float(v[i]) for k, v in values.items()} | {"tokens_per_sec": tok_s}
            line = (f"step {step}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, grad norm {row['grad_norm']:.3f}, "
                    f"{tok_s:,.0f} tok/s")
            if peak:
                row["mfu"] = flops_per_step * tok_s / tokens_per_step / (peak * jax.device_count())
                line += f", MFU {100 * row['mfu']:.1f}%"
            writer.write(step, row)
            say(line)
        t_last, step_last = now, last_step

    done = start
    try:
        while done < config.max_steps:
            n = call_length(done, config, checkpoint_every)
            state, call_metrics = t.steps.train_steps(state, t.next_batches(n))
            drain()  # the previous call's, finished by now or soon
            pending = (done + 1, call_metrics)
            done += n
            if bar is not None:
                bar.update(n)
            is_eval = done % config.eval_every == 0 or done == config.max_steps
            if is_eval or done % checkpoint_every == 0:
                drain()
                val_loss = None
                if is_eval:
                    val_loss = t.evaluate(state.params)
                    writer.write(done, {"val_loss": val_loss})
                    message = f"step {done}: val loss {val_loss:.4f}"
                    if config.hellaswag_file:
                        scores = t.hellaswag(state.params)
                        writer.write(done, {f"hellaswag_{k}": v for k, v in scores.items() if k != "examples"})
                        message += f", HellaSwag acc {scores['acc']:.4f} acc_norm {scores['acc_norm']:.4f}"
                    if config.sample_tokens:
                        message += "\n" + t.sample(state.params)
                    say(message)
                    t_last = time.perf_counter()  # evaluation time is not training throughput
                t.save(state, done, val_loss)
        drain()
    finally:
        t.manager.wait_until_finished()
        writer.close()
        if bar is not None:
            bar.close()
    return state


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/124m.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and logs go; an existing run there is resumed.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process launch that JAX "
                    "cannot detect by itself (SLURM, Open MPI and Kubernetes are detected).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process launch.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process launch.")
flags.DEFINE_integer("heartbeat_timeout", 60, "Seconds without a heartbeat after which a multi-process run "
                     "declares a peer dead and every process exits with an error (instead of hanging).")


def maybe_initialize_distributed():
    """jax.distributed for multi-process launches: explicit flags, or the cluster environment JAX detects."""
    if FLAGS.coordinator_address or FLAGS.num_processes:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                                   heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
    elif any(int(os.environ.get(v, "1")) > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")) or \
            os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)


def parse_flags(argv):
    """absl's parser, with an unknown config field reported as one line instead of ml_collections' traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}")
    except (AttributeError, KeyError) as e:
        field = str(e).strip("'\"")
        bad = [a for a in argv[1:] if a.startswith(("--config.", "-config.")) and field in a]
        sys.exit(f"FATAL Flags parsing error: unknown config field {field!r} in {' '.join(bad) or argv[1:]}; "
                 "every field is listed in configs/base.py")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; the trainer prints its own lines
    maybe_initialize_distributed()
    train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
