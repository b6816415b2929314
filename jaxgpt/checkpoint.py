"""Model checkpoints on disk: a directory with config.json and an orbax tree of parameters.

`save_model`/`load_model` are the exchange format between torch_bridge, the trainer (init_from) and the
sampler. Training checkpoints (optimizer state, data iterator, ...) live in jaxgpt/train.py's manager and
are read here too, so every consumer takes either kind of directory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt.errors import UserFileNotFoundError, UserValueError
from jaxgpt.model import GPT, GPTConfig, abstract
from jaxgpt.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_model(model: GPT, directory: str, tokenizer: Tokenizer | None = None) -> str:
    """Writes DIR/config.json, DIR/params (orbax) and the tokenizer's DIR/tokenizer.json when given. Returns the
    absolute directory."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(model.config), f, indent=2)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def read_config(directory: str) -> GPTConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise UserFileNotFoundError(f"{directory}: no such model directory or training workdir")
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{directory} is not a jaxgpt model directory: {CONFIG_FILE} is missing")
    try:
        with open(path) as f:
            fields = json.load(f)
    except json.JSONDecodeError as e:
        raise UserValueError(f"{path}: not valid JSON ({e.msg}): a corrupt model directory?") from None
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    if unknown := sorted(set(fields) - known):
        raise UserValueError(f"{path}: unknown GPTConfig fields {unknown}")
    return GPTConfig(**fields)


def load_model(directory: str, step: str | int | None = None, **overrides) -> GPT:
    """Loads a model dir written by `save_model`, or a training workdir's checkpoint at `step` (latest, best or a
    number; see select_step). `overrides` change compute-only fields (dtype, scan_layers, ...)."""
    directory = os.path.abspath(directory)
    if is_training_dir(directory):
        return load_trained_model(directory, step, **overrides)
    if step not in (None, "latest"):
        raise UserValueError(f"step={step!r}: {directory} is a model directory, steps belong to training workdirs")
    def restore(target):
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(os.path.join(directory, PARAMS_DIR), target.to_pure_dict())
    return restored_model(dataclasses.replace(read_config(directory), **overrides), restore, directory)


def restored_model(config: GPTConfig, restore, where: str) -> GPT:
    """A model whose parameters come from restore(abstract nnx.State of ShapeDtypeStructs), never initialised."""
    graphdef, target = nnx.split(abstract(config))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever the mesh it was saved from
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    restored = readable(restore, target, where=where)
    if not isinstance(restored, nnx.State):  # a pure dict (model dirs)
        target.replace_by_pure_dict(restored)
        restored = target
    return nnx.merge(graphdef, restored)


# Training checkpoints --------------------------------------------------------------------------------------------
# WORKDIR/checkpoints/<step>/ holds four items: params (like a model dir's), train (step, optimizer state, RNG),
# data (each process's grain iterator state) and config (the model config and the whole training config).
# Orbax writes each step to a temporary directory and renames it when complete, so a run killed mid-save
# leaves the previous checkpoint as the latest usable one.
TRAIN_ITEMS = ("params", "train", "data", "config")


def checkpoint_manager(workdir: str, *, keep: int = 2, keep_best: bool = True,
                       async_save: bool = True) -> ocp.CheckpointManager:
    """The latest `keep` checkpoints are kept, and the one with the lowest val_loss (checkpoints saved without
    one are not candidates for best)."""
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best:
        policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                                      keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(  # best_fn: orbax writes a step's metrics to disk only with it
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=lambda m: m["val_loss"], best_mode="min", enable_async_checkpointing=async_save, create=True)
    logging.getLogger("absl").addFilter(_quiet_untracked_save)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 item_names=TRAIN_ITEMS, options=options)


def _quiet_untracked_save(record) -> bool:
    return "did not provide metrics" not in record.getMessage()  # orbax, at every save without a val loss


def save_training(manager, step: int, *, params, train, data_iterator, config: dict, val_loss=None):
    import grain
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
                              data=grain.checkpoint.CheckpointSave(data_iterator), config=ocp.args.JsonSave(config))
    manager.save(step, args=args, metrics=None if val_loss is None else {"val_loss": float(val_loss)})


def restore_training(manager, step: int, *, params, train, data_iterator):
    """params/train: abstract targets (ShapeDtypeStruct with shardings), so a checkpoint saved on one mesh restores
    onto another. The data iterator is restored in place. Returns (params, train)."""
    import grain
    restored = readable(manager.restore, step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), train=ocp.args.StandardRestore(train),
        data=grain.checkpoint.CheckpointRestore(data_iterator)), where=f"{manager.directory}/{step}")
    return restored.params, restored.train


def saved_config(manager, step: int) -> dict:
    """The config stored with a training checkpoint: {"model": GPTConfig fields, "train": the training config}."""
    return readable(manager.restore, step, args=ocp.args.Composite(config=ocp.args.JsonRestore()),
                    where=f"{manager.directory}/{step}").config


def readable(restore, *args, where: str = "", **kwargs):
    """restore(*args, **kwargs), its failure (a missing, truncated or corrupt file) a UserValueError naming it."""
    try:
        return restore(*args, **kwargs)
    except Exception as e:  # orbax and tensorstore raise many types for unreadable files
        problem = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserValueError(f"cannot read the checkpoint {where}: {problem}; it is missing files or corrupt "
                             "(delete that step's directory to go back to an earlier checkpoint)") from e


def is_training_dir(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, "checkpoints"))


def select_step(manager, step: str | int | None = None) -> int:
    """A step the manager holds: 'latest' (or None), 'best' (the lowest val loss) or a step number."""
    steps, where = sorted(manager.all_steps()), manager.directory
    if not steps:
        raise UserFileNotFoundError(f"{where} holds no training checkpoint yet")
    if step in (None, "latest"):
        return steps[-1]
    if step == "best":
        scored = {s: m["val_loss"] for s in steps if (m := manager.metrics(s))}
        if not scored:
            raise UserValueError(f"{where}: no checkpoint has a val loss yet (steps {steps}); use step=latest")
        return min(scored, key=scored.get)
    if not str(step).isdigit():
        raise UserValueError(f"step={step!r}: expected latest, best or a step number")
    if int(step) not in steps:
        raise UserFileNotFoundError(f"{where} holds no checkpoint at step {int(step)}; it holds steps {steps}")
    return int(step)


def load_trained_model(workdir: str, step: str | int | None = None, **overrides) -> GPT:
    """The parameters of a training run's checkpoint at `step` (see select_step) as a model."""
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), item_names=TRAIN_ITEMS)
    step = select_step(manager, step)
    config = saved_config(manager, step)
    def restore(target):
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    return restored_model(dataclasses.replace(GPTConfig(**config["model"]), **overrides), restore,
                          f"{manager.directory}/{step}")
