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
# WORKDIR/checkpoints/<step>/ holds four items: params (like a model dir's), train (step, optimizer state, RNG, loss
# scale), position (where the global window stream stands, what it is, and the layout that wrote it) and config
# (the model config and the whole training config). Orbax writes each step to a temporary directory and renames it
# when complete, so a run killed mid-save leaves the previous checkpoint as the latest usable one. Checkpoints
# written before the position item hold `data` instead: each process's grain iterator state (LEGACY_DATA).
LEGACY_DATA = "data"
SET_ASIDE = "set_aside"  # WORKDIR/set_aside/<step>: later checkpoints moved out of the way by resume_step


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
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                                 item_handlers=_item_handlers())


def _item_handlers() -> dict:
    """Registered up front, so that item_metadata can read any step before anything was restored."""
    import grain
    return {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
            "position": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
            LEGACY_DATA: grain.checkpoint.CheckpointHandler()}


def _quiet_untracked_save(record) -> bool:
    return "did not provide metrics" not in record.getMessage()  # orbax, at every save without a val loss


def save_training(manager, step: int, *, params, train, position: dict, config: dict, val_loss=None):
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
                              position=ocp.args.JsonSave(position), config=ocp.args.JsonSave(config))
    manager.save(step, args=args, metrics=None if val_loss is None else {"val_loss": float(val_loss)})


def restore_training(manager, step: int, *, params, train):
    """params/train: abstract targets (ShapeDtypeStruct with shardings), so a checkpoint saved on one mesh restores
    onto another, by any number of processes. Returns (params, train)."""
    check_structure(manager, step, params=params, train=train)
    restored = readable(manager.restore, step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params), train=ocp.args.StandardRestore(train)),
        where=f"{manager.directory}/{step}")
    return restored.params, restored.train


def saved_config(manager, step: int) -> dict:
    """The config stored with a training checkpoint: {"model": GPTConfig fields, "train": the training config}."""
    return readable(manager.restore, step, args=ocp.args.Composite(config=ocp.args.JsonRestore()),
                    where=f"{manager.directory}/{step}").config


def saved_position(manager, step: int, global_batch: int) -> dict:
    """The position item of a checkpoint: {"windows": consumed, "stream": data.stream_identity, "layout": ...}.
    A checkpoint from before it has each process's grain state instead, {"next_index": local batches taken}, the
    same on every process: windows = next_index x the global batch it was written with (`global_batch`)."""
    where = f"{manager.directory}/{step}"
    legacy = os.path.join(where, LEGACY_DATA)
    if os.path.isdir(legacy) and not os.path.isdir(os.path.join(where, "position")):
        states = sorted(f for f in os.listdir(legacy) if f.startswith("process_") and f.endswith(".json"))
        if not states:
            raise UnreadableCheckpoint(where, f"{legacy} holds no process_*-of-*.json iterator state")
        processes = int(states[0].rpartition("-of-")[2].removesuffix(".json"))
        state = readable(_read_json, os.path.join(legacy, states[0]), where=where)
        return {"windows": int(state["next_index"]) * global_batch, "stream": None, "layout": {"processes": processes}}
    return readable(manager.restore, step, args=ocp.args.Composite(position=ocp.args.JsonRestore()),
                    where=where).position


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


class UnreadableCheckpoint(UserValueError):
    """A checkpoint step whose files fail to read (missing, truncated or corrupt): `where`, `problem`."""

    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem
        super().__init__(f"cannot read the checkpoint {where}: {problem}")


def readable(restore, *args, where: str = "", **kwargs):
    """restore(*args, **kwargs), its failure (a missing, truncated or corrupt file) an UnreadableCheckpoint."""
    try:
        return restore(*args, **kwargs)
    except UnreadableCheckpoint:
        raise
    except Exception as e:  # orbax and tensorstore raise many types for unreadable files
        problem = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UnreadableCheckpoint(where, problem) from e


def check_structure(manager, step: int, **targets):
    """Each item's saved tree (paths and shapes, from its metadata) against the abstract target it is to be
    restored into: a checkpoint written by another configuration (another optimizer, say) is refused as that, not
    reported as unreadable."""
    where = f"{manager.directory}/{step}"
    metadata = readable(manager.item_metadata, step, where=where)
    for name, target in targets.items():
        if metadata.get(name) is None:
            raise UnreadableCheckpoint(where, f"its {name} item is missing")
        saved, wanted = _shapes(metadata[name]), _shapes(target)
        if saved != wanted:
            diff = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
            shown = ", ".join(f"{k}: {saved.get(k, 'absent')} there, {wanted.get(k, 'absent')} here" for k in diff[:4])
            raise UserValueError(f"{where} was written by another training configuration: its {name} differ in "
                                 f"{len(diff)} entries ({shown}{', ...' if len(diff) > 4 else ''})")


def _shapes(tree) -> dict:
    """{'a/b/0': shape} of a tree of arrays, ShapeDtypeStructs, nnx Variables or orbax metadata."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, nnx.Variable))[0]  # a Variable: .value
    return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path):
            tuple(leaf.shape) for path, leaf in flat if leaf is not None}


def readable_before(manager, step: int, probe) -> int | None:
    """The latest checkpoint step before `step` for which probe(step) reads, or None."""
    for earlier in sorted((s for s in manager.all_steps() if s < step), reverse=True):
        try:
            probe(earlier)
            return earlier
        except UnreadableCheckpoint:
            continue
    return None


def set_aside(manager, steps) -> str:
    """Moves these checkpoint steps to WORKDIR/set_aside/ (never deletes them); returns that directory."""
    root = os.path.join(os.path.dirname(os.fspath(manager.directory)), SET_ASIDE)
    os.makedirs(root, exist_ok=True)
    for step in steps:
        target = os.path.join(root, str(step))
        n = 1
        while os.path.exists(target):  # an earlier set-aside of the same step stays too
            target, n = os.path.join(root, f"{step}.{n}"), n + 1
        os.replace(os.path.join(os.fspath(manager.directory), str(step)), target)
    manager.reload()
    return root


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
    """The parameters of a training run's checkpoint at `step` (see select_step) as a model. An unreadable step's
    error names the latest earlier one that reads (--step=N)."""
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                    item_handlers=_item_handlers())

    def load(step):
        config = saved_config(manager, step)
        def restore(target):
            return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
        return restored_model(dataclasses.replace(GPTConfig(**config["model"]), **overrides), restore,
                              f"{manager.directory}/{step}")
    step = select_step(manager, step)
    try:
        return load(step)
    except UnreadableCheckpoint as e:
        earlier = readable_before(manager, step, load)
        advice = f"step {earlier} reads: use --step={earlier}" if earlier else "no earlier checkpoint reads either"
        raise UnreadableCheckpoint(e.where, f"{e.problem}; {advice}") from e
