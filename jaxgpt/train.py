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

from jaxgpt import checkpoint, cli, data, metrics, preemption, resume, run_config, sharding, start
from jaxgpt.errors import UserValueError
from jaxgpt.step import TrainState, make_steps


class Trainer:
    """Holds what the loop needs: the mesh, compiled steps, shardings, checkpoint manager and data."""

    def __init__(self, config: ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        self.is_main = jax.process_index() == 0
        self.tokenizer, self.data_dir = run_config.prepare_data(config, self.is_main)
        self.pretrained = start.Pretrained(config, self.tokenizer, self.data_dir)
        self.model_config = run_config.model_config(config, self.tokenizer.vocab_size, lambda: self.pretrained.model)
        self.mesh = sharding.make_mesh(config.mesh)
        self.config = config = run_config.resolve_batch(config, self.mesh, self.model_config.block_size)
        run_config.check_batch(config, self.mesh)
        self.steps = make_steps(config, self.model_config, self.mesh)
        self.manager = checkpoint.checkpoint_manager(workdir, keep=config.keep_checkpoints)
        train_files = data.find_shards(self.data_dir, "train")
        self.stream = data.stream_identity(train_files, block_size=self.model_config.block_size, seed=config.seed)
        self.resume = resume.plan(self.manager, workdir, config, self.model_config, self.stream,
                                  has_loss_scale=self.steps.loss_scale is not None)  # refuses before any write
        if config.hellaswag_file:  # a missing or malformed file fails now, not at the first evaluation
            from jaxgpt import evaluate
            evaluate.read_hellaswag(config.hellaswag_file, config.hellaswag_limit or None)
        self._load_data(train_files)
        if self.is_main:  # kept with the checkpoints: sample and export find it there
            os.makedirs(workdir, exist_ok=True)
            self.tokenizer.save(workdir)

    def _load_data(self, train_files: list[str]):
        """The training stream from the resumed position, and the fixed validation batches."""
        c, block, local_batch = self.config, self.model_config.block_size, self.config.batch_size // jax.process_count()
        where = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                     vocab_size=self.tokenizer.vocab_size)
        self.train_data = iter(data.make_dataset(train_files, block_size=block, batch_size=local_batch, seed=c.seed,
                                                 start=self.resume.windows if self.resume else 0, **where))
        val = data.eval_batches(data.find_shards(self.data_dir, "val"), block_size=block, batch_size=local_batch,
                                n_batches=c.eval_iters, seed=c.seed, **where)
        self.val_batches = sharding.host_batch_to_global(  # fixed: stacked to (eval_iters, B, T) once
            {k: np.stack([b[k] for b in val]) for k in ("inputs", "targets")}, self.mesh, batch_axis=1)

    def initial_state(self) -> tuple[TrainState, int]:
        """Resumes from the checkpoint resume.plan chose when there is one, else starts per init_from."""
        if self.resume is not None:
            return start.resumed(self.resume, self.manager, self.workdir, self.steps,
                                 resume.layout(self.mesh, self.config)), self.resume.step
        return start.fresh(self.config, self.workdir, self.steps, self.model_config, self.pretrained), 0

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
        cli.log(self.is_main, f"model: {self.steps.n_params / 1e6:.2f}M parameters, {mc}")
        cli.log(self.is_main, f"data: {self.data_dir}, {self.tokenizer.name} tokenizer of {self.tokenizer.vocab_size} "
                              "tokens")
        c = self.config
        cli.log(self.is_main, f"mesh: {dict(self.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
                              f"devices, {jax.process_count()} process(es); {self.tokens_per_step:,} tokens per step "
                              f"({c.grad_accum_steps} x {c.batch_size} x {self.model_config.block_size})")

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accum_steps * self.model_config.block_size

    def step_log(self, writer: metrics.MetricWriter, print_line, first_step: int) -> metrics.StepLog:
        mc = self.model_config
        return metrics.StepLog(
            writer, print_line, self.config, start=first_step, tokens_per_step=self.tokens_per_step,
            workdir=self.workdir, last_checkpoint=self.last_checkpoint, flops_per_token=metrics.flops_per_token(
                self.steps.n_params, mc.n_lookup_params, mc.n_layer, mc.block_size, mc.n_embd))

    def evaluate(self, params, step: int, writer: metrics.MetricWriter, print_line) -> float:
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
        print_line(message)
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
    trainer = Trainer(config, workdir)
    config = trainer.config  # batch_size and grad_accum_steps resolved for this mesh
    checkpoint_every = config.checkpoint_every or config.eval_every
    resumed_at = trainer.resume.step if trainer.resume else 0
    compiled = trainer.compile_ahead(call_length(resumed_at, config, checkpoint_every))
    state, first_step = trainer.initial_state()
    compiled.result()
    trainer.describe()
    writer = metrics.MetricWriter(workdir, config, enabled=trainer.is_main, start=first_step)
    bar = None
    if trainer.is_main and config.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=config.max_steps, initial=first_step, unit="step", dynamic_ncols=True)
    # a line under the progress bar that keeps the bar intact
    print_line = bar.write if bar is not None else functools.partial(cli.log, trainer.is_main)
    steps_log = trainer.step_log(writer, print_line, first_step)
    done = saved = first_step
    try:
        while done < config.max_steps and not watch.stop_before_call(done):
            n = call_length(done, config, checkpoint_every)
            state, call_metrics = trainer.steps.train_steps(state, trainer.next_batches(n))
            steps_log.add(done + 1, call_metrics)
            done += n
            if bar is not None:
                bar.update(n)
            is_eval = done % config.eval_every == 0 or done == config.max_steps
            if is_eval or done % checkpoint_every == 0:
                steps_log.flush()
                val_loss = None
                if is_eval:
                    val_loss = trainer.evaluate(state.params, done, writer, print_line)
                    steps_log.restart_clock()
                trainer.save(state, done, val_loss)
                saved = done
            if done < config.max_steps and watch.stop_after_call(done):
                break
        steps_log.flush()
        if watch.stopped:  # preempted: the step reached, saved unless it just was (or none was taken)
            if saved != done:
                trainer.save(state, done)
            trainer.manager.wait_until_finished()
            raise preemption.Preempted(done, watch.cause, workdir, saved=done != first_step)
    finally:
        trainer.manager.wait_until_finished()
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
        cli.log(jax.process_index() == 0, str(stop))
        sys.exit(preemption.EXIT_STATUS)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
