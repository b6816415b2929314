"""Training: `python -m jaxgpt.train --config=configs/shakespeare_char_cpu.py --workdir=out/shakespeare`.

`train(config, workdir)` is the loop: data, state, the jitted steps of jaxgpt/step.py, evaluation, checkpoints
and metrics. `main` only parses flags (jaxgpt/cli.py) and calls it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys

import jax
import numpy as np
from absl import flags, logging
from flax import nnx
from ml_collections import ConfigDict, config_flags

from jaxgpt import checkpoint, cli, data, loader, metrics, model, preemption, resume, sharding, tokenizer
from jaxgpt.errors import UserFileNotFoundError, UserValueError
from jaxgpt.step import TrainState, fresh_state, make_steps


class Trainer:
    """Holds what the loop needs: the mesh, compiled steps, shardings, checkpoint manager and data."""

    def __init__(self, config: ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        self.is_main = jax.process_index() == 0
        self.tokenizer, self.data_dir = prepare_data(config, self.is_main)
        self.model_config = self._model_config()
        self.mesh = sharding.make_mesh(config.mesh)
        self.config = config = resolve_batch(config, self.mesh, self.model_config.block_size)
        self._check_batch()
        self.steps = make_steps(config, self.model_config, self.mesh)
        self.manager = checkpoint.checkpoint_manager(workdir, keep=config.keep_checkpoints)
        train_files = data.find_shards(self.data_dir, "train")
        self.stream = data.stream_identity(train_files, block_size=self.model_config.block_size, seed=config.seed)
        self.resume = resume.plan(self.manager, workdir, config, self.model_config, self.stream,
                                  has_loss_scale=self.steps.loss_scale is not None)  # refuses before any write
        if config.hellaswag_file:  # a missing or malformed file fails now, not at the first evaluation
            from jaxgpt import evaluate
            evaluate.read_hellaswag(config.hellaswag_file, config.hellaswag_limit or None)

        local_batch = config.batch_size // jax.process_count()
        self.train_data = iter(data.make_dataset(
            train_files, block_size=self.model_config.block_size, batch_size=local_batch, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            vocab_size=self.tokenizer.vocab_size, start=self.resume.windows if self.resume else 0))
        val = data.eval_batches(
            data.find_shards(self.data_dir, "val"), block_size=self.model_config.block_size, batch_size=local_batch,
            n_batches=config.eval_iters, seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count(), vocab_size=self.tokenizer.vocab_size)
        self.val_batches = sharding.host_batch_to_global(  # fixed: stacked to (eval_iters, B, T) once
            {k: np.stack([b[k] for b in val]) for k in ("inputs", "targets")}, self.mesh, batch_axis=1)
        if self.is_main:  # kept with the checkpoints: sample and export find it there
            os.makedirs(workdir, exist_ok=True)
            self.tokenizer.save(workdir)

    def _model_config(self) -> model.GPTConfig:
        if loader.is_weights_spec(self.config.init_from):  # the architecture comes from the weights
            return dataclasses.replace(self._pretrained().config, **loader.lora_fields(self.config))
        return loader.model_config(self.config, self.tokenizer.vocab_size)

    def _check_batch(self):
        c, n_proc = self.config, jax.process_count()
        shards = sharding.batch_shards(self.mesh)
        if c.batch_size % n_proc or c.batch_size % shards:
            raise UserValueError(f"batch_size={c.batch_size} must divide evenly over {n_proc} processes and the "
                                 f"{shards} batch shards of the mesh {dict(self.mesh.shape)}")
        for name in ("grad_accum_steps", "steps_per_call", "log_every", "eval_every", "eval_iters"):
            if c[name] < 1:
                raise UserValueError(f"{name}={c[name]} must be at least 1")

    @functools.cache  # noqa: B019 -- the trainer lives for the whole run
    def _pretrained(self) -> model.GPT:
        pretrained = loader.load(self.config.init_from, **loader.compute_overrides(self.config.model))
        n, tok = pretrained.config.n_valid_vocab, self.tokenizer
        gpt2_weights = n >= tokenizer.GPT2_VOCAB_SIZE
        if (tok.name == "gpt2") != gpt2_weights or (tok.name != "gpt2" and n != tok.vocab_size):
            raise UserValueError(
                f"init_from={self.config.init_from!r} has {'GPT-2 BPE weights' if gpt2_weights else f'{n} tokens'} "
                f"but data.dir={self.data_dir}'s tokenizer is {tok.name} with {tok.vocab_size} tokens: the token ids "
                "mean different things; prepare the data with the weights' tokenizer (--tokenizer=gpt2)")
        return loader.crop_block_size(pretrained, self.config.model.block_size)  # nanoGPT's crop_block_size

    def initial_state(self) -> tuple[TrainState, int]:
        """Resumes from the checkpoint resume.plan chose when there is one, else starts per init_from."""
        if self.resume is not None:
            return self._resumed(self.resume), self.resume.step
        if self.config.init_from == "resume":
            raise UserFileNotFoundError(f"init_from='resume' but {self.workdir} has no checkpoint to resume from")
        if self.config.init_from == "scratch":
            params = None  # drawn inside fresh_state's one jitted call
        elif loader.is_weights_spec(self.config.init_from):
            params = nnx.state(self._pretrained(), nnx.Param)
            if self.model_config.lora_rank:  # fresh adapters beside the pretrained weights
                params = model.with_weights(model.build(self.model_config, self.config.seed), params)
            params = jax.device_put(params, self.steps.state_sharding.params)
        else:
            raise UserValueError(f"init_from={self.config.init_from!r}: expected scratch, resume, hf:DIR, "
                                 "nanogpt:FILE, openai:DIR or ckpt:DIR")
        return fresh_state(self.steps, self.model_config, self.config.seed, params), 0

    def _resumed(self, start: resume.Resume) -> TrainState:
        """The state of checkpoint `start.step`, restored onto this run's mesh; the later steps (resume_step)
        moved aside once it has read."""
        def read(step):
            return checkpoint.restore_training(self.manager, step, params=self.steps.abstract_state.params,
                                               train=self.steps.abstract_state.train_items())
        params, items = resume.readable_or_advice(self.manager, start.step, read)
        if start.later_steps and self.is_main:
            where = checkpoint.set_aside(self.manager, start.later_steps)
            log(self.is_main, f"resume_step={start.step}: moved the later checkpoints {list(start.later_steps)} to "
                              f"{where}")
        if start.later_steps:
            sync_processes("set_aside")
            self.manager.reload()
        log(self.is_main, f"resumed from {self.workdir} at step {start.step}"
                          f"{resume.changed(start.written_by, resume.layout(self.mesh, self.config))}")
        return TrainState(params=params, **items)

    def last_checkpoint(self) -> int | None:
        """The latest complete checkpoint's step, once the saves in flight are done."""
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def compile_ahead(self, n: int) -> concurrent.futures.Future:
        """Compiles the first training call (n steps) and the evaluation on a background thread, while the caller
        builds or restores the state: XLA compiles outside the GIL, so the compilations overlap the model's
        initialisation. The later calls with these shapes and shardings find the executables in jit's cache;
        `.result()` re-raises a compile error."""
        c, mc = self.config, self.model_config

        def compile_both():
            train_shape = (n, c.grad_accum_steps, c.batch_size, mc.block_size)
            self.steps.train_steps.lower(self.steps.abstract_state,
                                         sharding.abstract_batch(self.mesh, train_shape, 2)).compile()
            val_shape = self.val_batches["inputs"].shape
            self.steps.eval_loss.lower(self.steps.abstract_state.params,
                                       sharding.abstract_batch(self.mesh, val_shape, 1)).compile()
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_ahead")
        future = pool.submit(compile_both)
        pool.shutdown(wait=False)
        return future

    def local_batches(self, n: int) -> dict[str, np.ndarray]:
        """This process's micro-batches for the next n steps, stacked to (n, accum, B_local, T)."""
        accum = self.config.grad_accum_steps
        micro = [next(self.train_data) for _ in range(n * accum)]
        return {k: np.stack([m[k] for m in micro]).reshape(n, accum, *micro[0][k].shape)
                for k in ("inputs", "targets")}

    def next_batches(self, n: int):
        """local_batches(n) assembled into global arrays sharded over the mesh's batch axes."""
        return sharding.host_batch_to_global(self.local_batches(n), self.mesh, batch_axis=2)

    def describe(self):
        mc = self.model_config
        log(self.is_main, f"model: {self.steps.n_params / 1e6:.2f}M parameters, {mc}")
        log(self.is_main, f"data: {self.data_dir}, {self.tokenizer.name} tokenizer of {self.tokenizer.vocab_size} "
                          "tokens")
        c = self.config
        log(self.is_main, f"mesh: {dict(self.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
                          f"devices, {jax.process_count()} process(es); {self.tokens_per_step:,} tokens per step "
                          f"({c.grad_accum_steps} x {c.batch_size} x {self.model_config.block_size})")

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accum_steps * self.model_config.block_size

    def step_log(self, writer: metrics.MetricWriter, say, start: int) -> metrics.StepLog:
        mc = self.model_config
        return metrics.StepLog(
            writer, say, self.config, start=start, tokens_per_step=self.tokens_per_step, workdir=self.workdir,
            last_checkpoint=self.last_checkpoint, flops_per_token=metrics.flops_per_token(
                self.steps.n_params, mc.n_lookup_params, mc.n_layer, mc.block_size, mc.n_embd))

    def evaluate(self, params, step: int, writer: metrics.MetricWriter, say) -> float:
        """The val loss (and HellaSwag, a sample when configured), written and said; returns the val loss."""
        val_loss = float(self.steps.eval_loss(params, self.val_batches))
        if not np.isfinite(val_loss):  # stop before it is saved, let alone taken as the best
            raise metrics.NonFiniteLoss(step, f"val loss {val_loss}", self.workdir, self.last_checkpoint())
        writer.write(step, {"val_loss": val_loss})
        message, c = f"step {step}: val loss {val_loss:.4f}", self.config
        if c.hellaswag_file:
            from jaxgpt import evaluate
            scores = evaluate.hellaswag_eval(nnx.merge(self.steps.graphdef, params), self.tokenizer,
                                             c.hellaswag_file, c.hellaswag_limit or None)
            writer.write(step, {f"hellaswag_{k}": v for k, v in scores.items() if k != "examples"})
            message += f", HellaSwag acc {scores['acc']:.4f} acc_norm {scores['acc_norm']:.4f}"
        if c.sample_tokens:
            message += "\n" + self.sample(params)
        say(message)
        return val_loss

    def save(self, state: TrainState, step: int, val_loss=None):
        position = {"windows": step * self.config.batch_size * self.config.grad_accum_steps, "stream": self.stream,
                    "layout": resume.layout(self.mesh, self.config)}
        checkpoint.save_training(
            self.manager, step, params=state.params, train=state.train_items(), position=position,
            config={"model": dataclasses.asdict(self.model_config), "train": self.config.to_dict()},
            val_loss=val_loss)

    def sample(self, params) -> str:
        from jaxgpt import generate
        c = self.config
        m = nnx.merge(self.steps.graphdef, params)
        prompt = self.tokenizer.encode(c.sample_prompt) or [self.tokenizer.eot or 0]
        out = generate.generate(m, [prompt], max_new_tokens=c.sample_tokens, temperature=0.8, top_k=200,
                                seed=c.seed, eot_id=self.tokenizer.eot)
        return self.tokenizer.decode(prompt + out[0])


def sync_processes(name: str):
    """Every process waits here until all have arrived (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def log(is_main: bool, message: str):
    if is_main:
        print(message, flush=True)


def prepare_data(config: ConfigDict, is_main: bool):
    """The tokenizer and data dir, preparing the dir first (process 0 only) when it does not exist yet."""
    from jaxgpt import prepare
    d = config.data
    if not os.path.exists(d.dir):
        if jax.process_count() > 1:
            raise UserFileNotFoundError(f"data.dir={d.dir} does not exist; prepare it before a multi-process launch: "
                                        f"python -m jaxgpt.prepare --out={d.dir} ...")
        log(is_main, f"data.dir={d.dir} does not exist: preparing it from data.dataset={d.dataset!r}")
        prepare.prepare(d.dir, dataset=d.dataset, input=d.input or None, tokenizer=d.tokenizer, vocab_size=d.vocab_size)
    elif not data.has_shards(d.dir):
        held = sorted(os.listdir(d.dir)) if os.path.isdir(d.dir) else None
        what = "is not a directory" if held is None else f"holds {held[:8] if held else 'nothing'}"
        raise UserFileNotFoundError(f"data.dir={d.dir} has no train and val shards (it {what}): point it at prepared "
                                    "data, or at a directory that does not exist yet to prepare one there")
    return tokenizer.load_tokenizer(d.dir), d.dir


def resolve_batch(config: ConfigDict, mesh, block_size: int) -> ConfigDict:
    """The config with batch_size and grad_accum_steps derived, as build-nanogpt does, from device_batch_size
    (sequences per device: times the mesh's batch shards) and tokens_per_step (over batch_size x block_size),
    when those are set; the same config runs on 1 device or 8, accumulating more on fewer."""
    if not (config.device_batch_size or config.tokens_per_step):
        return config
    c = ConfigDict(config.to_dict())
    shards = sharding.batch_shards(mesh)
    if config.device_batch_size < 0 or config.tokens_per_step < 0:
        raise UserValueError(f"device_batch_size={config.device_batch_size} and tokens_per_step="
                             f"{config.tokens_per_step} must be >= 0")
    if config.device_batch_size:
        c.batch_size = config.device_batch_size * shards
    if config.tokens_per_step:
        micro = c.batch_size * block_size
        if config.tokens_per_step % micro:
            how = (f"device_batch_size={config.device_batch_size} x {shards} batch shards"
                   if config.device_batch_size else f"batch_size={c.batch_size}")
            raise UserValueError(f"tokens_per_step={config.tokens_per_step} is not a multiple of the micro-batch's "
                                 f"{micro} tokens ({how} x block_size={block_size}) on the mesh {dict(mesh.shape)}")
        c.grad_accum_steps = config.tokens_per_step // micro
    return c


def call_length(step: int, config: ConfigDict, checkpoint_every: int) -> int:
    """Steps in the next jitted call: config.steps_per_call, cut short to end on the next eval or checkpoint step
    (which need the state there; a steps_per_call that divides them compiles a single call length). Log steps
    come from the call's per-step metrics and do not end calls."""
    n = min(config.steps_per_call, config.max_steps - step)
    for every in (config.eval_every, checkpoint_every):
        n = min(n, every - step % every)
    return n


def train(config: ConfigDict, workdir: str) -> TrainState:
    """Trains config.max_steps optimizer steps, resuming from workdir's checkpoints; returns the final state.
    SIGTERM or SIGINT ends it early, with a checkpoint at the step reached: preemption.Preempted."""
    watch = preemption.Watch()  # first: a signal during the set-up or the first compile stops the run cleanly
    try:
        return _train(config, workdir, watch)
    finally:
        watch.restore()


def _train(config: ConfigDict, workdir: str, watch: preemption.Watch) -> TrainState:
    t = Trainer(config, workdir)
    config = t.config  # batch_size and grad_accum_steps resolved for this mesh
    checkpoint_every = config.checkpoint_every or config.eval_every
    compiled = t.compile_ahead(call_length(t.resume.step if t.resume else 0, config, checkpoint_every))
    state, start = t.initial_state()
    compiled.result()
    t.describe()
    writer = metrics.MetricWriter(workdir, config, enabled=t.is_main, start=start)
    bar = None
    if t.is_main and config.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=config.max_steps, initial=start, unit="step", dynamic_ncols=True)
    say = bar.write if bar is not None else functools.partial(log, t.is_main)  # a line that keeps the bar intact
    steps_log = t.step_log(writer, say, start)
    done = saved = start
    try:
        while done < config.max_steps and not watch.stop_before_call(done):
            n = call_length(done, config, checkpoint_every)
            state, call_metrics = t.steps.train_steps(state, t.next_batches(n))
            steps_log.add(done + 1, call_metrics)
            done += n
            if bar is not None:
                bar.update(n)
            is_eval = done % config.eval_every == 0 or done == config.max_steps
            if is_eval or done % checkpoint_every == 0:
                steps_log.flush()
                val_loss = None
                if is_eval:
                    val_loss = t.evaluate(state.params, done, writer, say)
                    steps_log.restart_clock()
                t.save(state, done, val_loss)
                saved = done
            if done < config.max_steps and watch.stop_after_call(done):
                break
        steps_log.flush()
        if watch.stopped:  # preempted: the step reached, saved unless it just was (or none was taken)
            if saved != done:
                t.save(state, done)
            t.manager.wait_until_finished()
            raise preemption.Preempted(done, watch.cause, workdir, saved=done != start)
    finally:
        t.manager.wait_until_finished()
        writer.close()
        if bar is not None:
            bar.close()
    return state


def define_flags():
    config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/124m.py.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints and logs go; an existing run there is resumed.")
    cli.define_distributed_flags()


def main(argv):
    if len(argv) > 1:
        raise UserValueError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; the trainer prints its own lines
    cli.maybe_initialize_distributed()
    try:
        train(flags.FLAGS.config, flags.FLAGS.workdir)
    except preemption.Preempted as stop:
        log(jax.process_index() == 0, str(stop))
        sys.exit(preemption.EXIT_STATUS)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
