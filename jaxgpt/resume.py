"""Where a resumed run starts, and what it must share with the run that wrote its checkpoint.

A run may come back on another cluster shape: another number of processes, devices per process, mesh (data /
fsdp / tensor), micro-batch and accumulation. It may not silently change its model, its data stream (the shards and
the seed that orders them) or its tokens per step: each of those is one error naming the old and the new value,
raised before anything is written. The data position is the count of windows the global stream has given, so the
steps after the resume draw the windows the uninterrupted run would have drawn. docs/scaling.md has the table.
"""
from __future__ import annotations

import dataclasses

import jax
from ml_collections import ConfigDict

from jaxgpt import checkpoint, loss_scale, model
from jaxgpt.errors import UserFileNotFoundError, UserValueError


@dataclasses.dataclass(frozen=True)
class Resume:
    """A checkpoint to resume from: its step, the global windows consumed by then, the layout that wrote it."""
    step: int
    windows: int
    written_by: dict
    later_steps: tuple[int, ...] = ()  # checkpoints after `step` (config.resume_step), to be set aside


def layout(mesh, config: ConfigDict) -> dict:
    """The cluster shape a checkpoint records, for the line that says what changed."""
    return {"processes": jax.process_count(), "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "batch_size": int(config.batch_size), "grad_accum_steps": int(config.grad_accum_steps)}


def describe(shape: dict) -> str:
    """'2 processes on data=2, micro-batches of 8 x 2' (what a layout record holds; older ones hold less)."""
    n = shape["processes"]
    text = f"{n} process{'es' if n != 1 else ''}"
    if "mesh" in shape:
        axes = [f"{k}={v}" for k, v in shape["mesh"].items() if v != 1] or ["data=1"]
        text += f" on {' x '.join(axes)}, micro-batches of {shape['batch_size']} x {shape['grad_accum_steps']}"
    return text


def changed(written_by: dict, now: dict) -> str:
    """'' when the layout is the same, else '; written by ..., now ...' for the resume line."""
    if all(written_by.get(k) == v for k, v in now.items() if k in written_by):
        return ""
    return f", written by {describe(written_by)}; now {describe(now)}"


def plan(manager, workdir: str, config: ConfigDict, model_config: model.GPTConfig, stream: dict,
         has_loss_scale: bool) -> Resume | None:
    """The checkpoint this run resumes from (the latest, or config.resume_step), checked against this run; None
    for a fresh start. Raises before anything is written."""
    steps = sorted(manager.all_steps())
    if config.resume_step and not went_back_already(manager, steps, config.resume_step):
        if config.resume_step not in steps:
            raise UserFileNotFoundError(f"resume_step={config.resume_step}: {workdir} holds no checkpoint at that "
                                        f"step; it holds steps {steps}")
        step = config.resume_step
    elif steps:
        step = steps[-1]
    else:
        return None
    saved = readable_or_advice(manager, step, lambda s: checkpoint.saved_config(manager, s))
    refusal = Refusal(workdir, step)
    refusal.check_model(saved["model"], model_config)
    refusal.check_training(saved["train"], config, model_config, has_loss_scale)
    per_step = config.batch_size * config.grad_accum_steps  # windows a step takes
    position = readable_or_advice(
        manager, step, lambda s: checkpoint.saved_position(manager, s, saved["train"]["batch_size"]))
    if position["stream"] is not None:  # older checkpoints did not record it
        refusal.check_stream(position["stream"], stream, config)
    if position["windows"] != step * per_step:
        raise UserValueError(f"{workdir}/checkpoints/{step}: its data position ({position['windows']} windows) is not "
                             f"{step} steps of {per_step} windows; the checkpoint was not written by this trainer")
    return Resume(step, position["windows"], position["layout"], tuple(s for s in steps if s > step))


def went_back_already(manager, steps: list[int], resume_step: int) -> bool:
    """Whether the latest checkpoint was written by a run that already resumed from resume_step: the same command
    run again (a requeue) then goes on from it instead of going back again."""
    if not steps or steps[-1] <= resume_step:
        return False
    try:
        return checkpoint.saved_config(manager, steps[-1])["train"].get("resume_step") == resume_step
    except checkpoint.UnreadableCheckpoint:
        return False


def readable_or_advice(manager, step: int, read):
    """read(step); when that step's files fail to read, the error names the latest earlier step that reads and how
    to resume from it. Nothing is deleted or moved."""
    try:
        return read(step)
    except checkpoint.UnreadableCheckpoint as e:
        raise unreadable(e, manager, step, read) from e


def unreadable(error: checkpoint.UnreadableCheckpoint, manager, step: int, read) -> checkpoint.UnreadableCheckpoint:
    earlier = checkpoint.readable_before(manager, step, read)
    if earlier is None:
        advice = "no earlier checkpoint reads either"
    else:
        advice = (f"step {earlier} reads: resume from it with --config.resume_step={earlier} (later steps are moved "
                  f"to {checkpoint.SET_ASIDE}/, not deleted), or move {error.where} out of the checkpoints directory")
    return checkpoint.UnreadableCheckpoint(error.where, f"{error.problem}; {advice}")


class Refusal:
    """The checks of a resume against the run that wrote the checkpoint; each failure one error line."""

    def __init__(self, workdir: str, step: int):
        self.workdir, self.step = workdir, step
        self.new_run = f"start a new run from its weights with --workdir=NEW_DIR --config.init_from={workdir}"

    def refuse(self, what: str, how: str):
        raise UserValueError(f"{self.workdir}'s checkpoint (step {self.step}) {what}; {how}, or {self.new_run}")

    def check_model(self, saved: dict, ours: model.GPTConfig):
        """Compute-only fields (dtype, remat, kernels, ...) may differ; the shape may not."""
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}  # JSON has lists
        if diff := [f"{k}={saved.get(k)!r} there, {v!r} here" for k, v in dataclasses.asdict(ours).items()
                    if k not in model.COMPUTE_FIELDS and saved.get(k, v) != v]:
            self.refuse(f"is of another model: {', '.join(diff)}", "resume with the model config that made it")

    def check_training(self, saved: dict, config: ConfigDict, model_config: model.GPTConfig, has_scale: bool):
        block = model_config.block_size
        old = saved["batch_size"] * saved["grad_accum_steps"] * block
        new = config.batch_size * config.grad_accum_steps * block
        if old != new:
            self.refuse(f"was trained with {old:,} tokens per step (batch_size={saved['batch_size']} x "
                        f"grad_accum_steps={saved['grad_accum_steps']} x block_size={block}), this run takes {new:,} "
                        f"(batch_size={config.batch_size} x grad_accum_steps={config.grad_accum_steps})",
                        f"resume with --config.tokens_per_step={old}")
        if saved["optim"].get("name", "adamw") != config.optim.name:
            self.refuse(f"was trained with optim.name={saved['optim'].get('name', 'adamw')}, this run has "
                        f"{config.optim.name}: the optimizer state does not carry over",
                        f"resume with --config.optim.name={saved['optim'].get('name', 'adamw')}")
        setting = saved["optim"].get("loss_scale", "auto")  # older checkpoints: auto
        dtype = saved.get("model", {}).get("dtype") or config.model.dtype
        if (loss_scale.resolve(setting, dtype) is None) == has_scale:
            self.refuse(f"was trained with model.dtype={dtype} and optim.loss_scale={setting}, which "
                        f"{'does not' if has_scale else 'does'} keep a loss scale",
                        "resume with those")

    def check_stream(self, saved: dict, ours: dict, config: ConfigDict):
        if saved["seed"] != ours["seed"]:
            self.refuse(f"was trained with seed={saved['seed']}, this run has seed={ours['seed']}: the data order "
                        "would change", f"resume with --config.seed={saved['seed']}")
        old, new = saved["window_tokens"], ours["window_tokens"]
        if old != new:
            self.refuse(f"was trained on windows of {old} tokens, this run's are {new}",
                        f"resume with --config.model.block_size={old - 1}")
        orders = saved.get("order"), ours.get("order")  # checkpoints of the first position item have none
        if None not in orders and orders[0] != orders[1] and saved["shards"] == ours["shards"]:
            self.refuse("was trained on the same data in another order than this version of jaxgpt and grain gives "
                        "(the shuffle or the window offsets changed): resuming would read other windows",
                        "resume with the versions that wrote it (constraints.txt)")
        if {**saved, "order": None} != {**ours, "order": None}:
            self.refuse(f"was trained on another data set: {_shard_diff(saved['shards'], ours['shards'])} in "
                        f"data.dir={config.data.dir}", "point --config.data.dir at the data it was trained on")


def _shard_diff(saved: list, ours: list) -> str:
    """The train shards that differ (at most 3 named), e.g. 'train_000001.bin: 1,000 tokens (ab12) there, 900 (cd34)
    here'."""
    old, new = ({name: (tokens, digest) for name, tokens, digest in shards} for shards in (saved, ours))
    def one(entry):
        return "absent" if entry is None else f"{entry[0]:,} tokens ({entry[1]})"
    names = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
    text = "; ".join(f"{n}: {one(old.get(n))} there, {one(new.get(n))} here" for n in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{len(saved)} train shards there, {len(ours)} here, differing in {text}{more},"
