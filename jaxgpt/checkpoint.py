"""Model checkpoints on disk: a directory with config.json and an orbax tree of parameters.

`save_model`/`load_model` are the exchange format between torch_bridge, the trainer (init_from) and the
sampler. Training checkpoints (optimizer state, data iterator, ...) live in jaxgpt/train.py's manager and
are read here too, so every consumer takes either kind of directory.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxgpt.model import GPT, GPTConfig, abstract

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_model(model: GPT, directory: str) -> str:
    """Writes DIR/config.json and DIR/params (orbax). Returns the absolute directory."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(model.config), f, indent=2)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    return directory


def read_config(directory: str) -> GPTConfig:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a jaxgpt model directory: {CONFIG_FILE} is missing")
    with open(path) as f:
        fields = json.load(f)
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    if unknown := sorted(set(fields) - known):
        raise ValueError(f"{path}: unknown GPTConfig fields {unknown}")
    return GPTConfig(**fields)


def load_model(directory: str, **overrides) -> GPT:
    """Loads a model dir written by `save_model`, or the latest checkpoint of a training workdir.
    `overrides` change compute-only fields (dtype, scan_layers, ...)."""
    directory = os.path.abspath(directory)
    if is_training_dir(directory):
        return load_trained_model(directory, **overrides)
    def restore(target):
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(os.path.join(directory, PARAMS_DIR), target.to_pure_dict())
    return restored_model(dataclasses.replace(read_config(directory), **overrides), restore)


def restored_model(config: GPTConfig, restore) -> GPT:
    """A model whose parameters come from restore(abstract nnx.State of ShapeDtypeStructs), never initialised."""
    graphdef, target = nnx.split(abstract(config))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    restored = restore(target)
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
    """The latest `keep` checkpoints are kept, and the one with the lowest val_loss."""
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if keep_best:
        policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 item_names=TRAIN_ITEMS, options=options)


def save_training(manager, step: int, *, params, train, data_iterator, config: dict, val_loss=None):
    import grain
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
                              data=grain.checkpoint.CheckpointSave(data_iterator), config=ocp.args.JsonSave(config))
    manager.save(step, args=args, metrics=None if val_loss is None else {"val_loss": float(val_loss)})


def restore_training(manager, step: int, *, params, train, data_iterator):
    """params/train: abstract targets (ShapeDtypeStruct with shardings), so a checkpoint saved on one mesh restores
    onto another. The data iterator is restored in place. Returns (params, train)."""
    import grain
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), train=ocp.args.StandardRestore(train),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.params, restored.train


def is_training_dir(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, "checkpoints"))


def load_trained_model(workdir: str, step: int | None = None, **overrides) -> GPT:
    """The parameters of a training run's latest (or given) checkpoint as a model."""
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), item_names=TRAIN_ITEMS)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir} holds no training checkpoint yet")
    config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    def restore(target):
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    return restored_model(dataclasses.replace(GPTConfig(**config["model"]), **overrides), restore)
