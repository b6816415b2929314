"""What a training config means on this machine: the data (prepared when its directory does not exist yet) and its
tokenizer, the model config (from the config, or from the weights it starts from), the mesh's batch (tokens per step
and device batch derived as build-nanogpt does) and the checks a config must pass before anything runs."""
from __future__ import annotations

import dataclasses
import os

import jax
from ml_collections import ConfigDict

from jaxgpt import cli, data, loader, model, sharding, tokenizer
from jaxgpt.errors import UserFileNotFoundError, UserValueError


def prepare_data(config: ConfigDict, is_main: bool):
    """The tokenizer and data dir, preparing the dir first (process 0 only) when it does not exist yet."""
    from jaxgpt import prepare
    d = config.data
    if not os.path.exists(d.dir):
        if jax.process_count() > 1:
            raise UserFileNotFoundError(f"data.dir={d.dir} does not exist; prepare it before a multi-process launch: "
                                        f"python -m jaxgpt.prepare --out={d.dir} ...")
        cli.log(is_main, f"data.dir={d.dir} does not exist: preparing it from data.dataset={d.dataset!r}")
        prepare.prepare(d.dir, dataset=d.dataset, input=d.input or None, tokenizer=d.tokenizer, vocab_size=d.vocab_size)
    elif not data.has_shards(d.dir):
        held = sorted(os.listdir(d.dir)) if os.path.isdir(d.dir) else None
        what = "is not a directory" if held is None else f"holds {held[:8] if held else 'nothing'}"
        raise UserFileNotFoundError(f"data.dir={d.dir} has no train and val shards (it {what}): point it at prepared "
                                    "data, or at a directory that does not exist yet to prepare one there")
    return tokenizer.load_tokenizer(d.dir), d.dir


def model_config(config: ConfigDict, vocab_size: int, pretrained) -> model.GPTConfig:
    """The model a run trains: the config's, or with init_from naming weights, theirs (pretrained() loads them)
    with the config's LoRA fields."""
    if loader.is_weights_spec(config.init_from):  # the architecture comes from the weights
        return dataclasses.replace(pretrained().config, **loader.lora_fields(config))
    return loader.model_config(config, vocab_size)


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


def check_batch(config: ConfigDict, mesh):
    """The batch divides over the processes and the mesh's batch shards; the step counts are positive."""
    n_proc, shards = jax.process_count(), sharding.batch_shards(mesh)
    if config.batch_size % n_proc or config.batch_size % shards:
        raise UserValueError(f"batch_size={config.batch_size} must divide evenly over {n_proc} processes and the "
                             f"{shards} batch shards of the mesh {dict(mesh.shape)}")
    for name in ("grad_accum_steps", "steps_per_call", "log_every", "eval_every", "eval_iters"):
        if config[name] < 1:
            raise UserValueError(f"{name}={config[name]} must be at least 1")
