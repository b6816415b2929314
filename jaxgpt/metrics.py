"""Where training metrics go: metrics.jsonl, TensorBoard event files and (optionally) Weights & Biases; the
per-step log that reads each jitted call's metrics one call late; the FLOPs arithmetic behind MFU.

Only process 0 writes.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import pathlib
import secrets
import socket
import struct
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxgpt import loss_scale
from jaxgpt.errors import UserError, UserRuntimeError

PEAK_BF16_FLOPS = {  # device_kind substring -> dense bf16 FLOP/s of one device (vendor datasheets)
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
    "V100": 125e12, "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v4": 275e12,
}


def peak_flops_per_device(configured: float) -> float | None:
    """The configured figure, else a datasheet default for known accelerators, else None (no MFU)."""
    if configured:
        return configured
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in kind.lower()), None)


def flops_per_token(n_params: int, n_position_params: int, n_layer: int, block_size: int, n_embd: int) -> float:
    """Training FLOPs per token as in nanoGPT/PaLM: 6N (N without position embeddings) + attention 12*L*T*d."""
    return 6 * (n_params - n_position_params) + 12 * n_layer * block_size * n_embd


class NonFiniteLoss(UserError, FloatingPointError):
    """A step's loss, gradient norm or val loss (`what`) was not finite: training stopped there."""

    def __init__(self, step: int, what: str, workdir: str, last_checkpoint: int | None):
        self.step, self.last_checkpoint = step, last_checkpoint
        kept = (f"The last good checkpoint (step {last_checkpoint}) is kept in {workdir}"
                if last_checkpoint is not None else f"no checkpoint was saved yet in {workdir}")
        super().__init__(f"{what} at step {step}: stopping. {kept}")


class StepLog:
    """Each jitted call's per-step metrics, fetched one call late so the host never waits for the device: checked
    for non-finite values (NonFiniteLoss names the first bad step) and written at log steps, with the tokens/s
    of the calls since the last report."""

    def __init__(self, writer: MetricWriter, say: Callable[[str], None], config, *, start: int,
                 tokens_per_step: int, flops_per_token: float, workdir: str,
                 last_checkpoint: Callable[[], int | None]):
        self.writer, self.say, self.log_every, self.max_steps = writer, say, config.log_every, config.max_steps
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops = (peak_flops_per_device(config.peak_flops) or 0) * jax.device_count()
        self.workdir, self.last_checkpoint = workdir, last_checkpoint
        self.pending = None  # (first step, metrics) of the call in flight
        self.fixed_scale = isinstance(loss_scale.resolve(config.optim.loss_scale, config.model.dtype), float)
        self.skips_in_a_row = 0
        self.clock = (time.perf_counter(), start)  # (time, step) of the last report

    def add(self, first_step: int, call_metrics: dict):
        """Takes the call just dispatched and reports the one before it, finished by now or soon."""
        self.flush()
        self.pending = (first_step, call_metrics)

    def flush(self):
        """Reports the pending call, if any."""
        if self.pending is None:
            return
        (first, call_metrics), self.pending = self.pending, None
        values = {k: np.asarray(v) for k, v in jax.device_get(call_metrics).items()}  # each (steps in the call,)
        finite = np.isfinite(values["loss"]) & np.isfinite(values["grad_norm"])
        if "skipped" in values:  # float16: skipped steps are the loss scale at work, within bounds
            finite |= self._tolerable_skips(values.pop("skipped") > 0, values["loss_scale"])
        bad = np.flatnonzero(~finite)
        if bad.size:
            i = bad[0]
            raise NonFiniteLoss(first + i, f"loss {values['loss'][i]}, grad norm {values['grad_norm'][i]}",
                                self.workdir, self.last_checkpoint())
        now, last = time.perf_counter(), first + len(values["loss"]) - 1
        tok_s = self.tokens_per_step * (last - self.clock[1]) / (now - self.clock[0])
        for step in range(first, last + 1):
            if step % self.log_every == 0 or step == self.max_steps:
                self._write(step, {k: float(v[step - first]) for k, v in values.items()}, tok_s)
        self.clock = (now, last)

    def _tolerable_skips(self, skipped: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Which skipped steps of a call are no cause to stop: a dynamic scale's above its least (it halves each
        time), a fixed scale's up to MAX_SKIPS_IN_A_ROW in a row (a scale too large for every step would otherwise
        train nothing, silently)."""
        ok = np.zeros_like(skipped)
        for i, skip in enumerate(skipped):
            self.skips_in_a_row = self.skips_in_a_row + 1 if skip else 0
            ok[i] = skip and (scales[i] > loss_scale.MIN_SCALE if not self.fixed_scale
                              else self.skips_in_a_row <= loss_scale.MAX_SKIPS_IN_A_ROW)
        return ok

    def restart_clock(self):
        """After an evaluation: its time is not training throughput."""
        self.clock = (time.perf_counter(), self.clock[1])

    def _write(self, step: int, row: dict, tok_s: float):
        row["tokens_per_sec"] = tok_s
        line = (f"step {step}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, grad norm {row['grad_norm']:.3f}, "
                f"{tok_s:,.0f} tok/s")
        if "loss_scale" in row:
            line += f", loss scale {row['loss_scale']:g} ({row['skipped_steps']:.0f} skipped)"
        if self.peak_flops:
            row["mfu"] = self.flops_per_token * tok_s / self.peak_flops
            line += f", MFU {100 * row['mfu']:.1f}%"
        self.writer.write(step, row)
        self.say(line)


class MetricWriter:
    """Appends to a workdir's metrics; a run resumed at step `start` first drops the rows after it, which the
    interrupted run wrote after its last checkpoint and this one writes again."""

    def __init__(self, workdir: str, config, enabled: bool, start: int = 0):
        self.enabled = enabled
        self.jsonl = self.tb = self.wandb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path, logdir = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tensorboard")
        if os.path.exists(path):
            with open(path) as f:
                rows = [line for line in f if _step_of(line) <= start]
            _replace(path, "".join(rows).encode())
        for events in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
            _drop_events_after(events, start)
        self.jsonl = open(path, "a")
        self.tb = EventFile(logdir)
        if config.wandb_project:
            self.wandb = _wandb_run(workdir, config)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        finite = {k: v if math.isfinite(v) else None for k, v in scalars.items()}  # JSON has no inf: a skipped step
        self.jsonl.write(json.dumps({"step": step, **finite}) + "\n")
        self.jsonl.flush()
        self.tb.write_scalars(step, scalars)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


def _wandb_run(workdir: str, config):
    """The workdir's W&B run, continued on resume (its id is kept in the workdir)."""
    try:
        import wandb
    except ImportError:
        raise UserRuntimeError(f"wandb_project={config.wandb_project!r} is set but wandb is not installed: "
                               "pip install wandb, or unset --config.wandb_project") from None
    id_file = pathlib.Path(workdir, "wandb_run_id")
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=config.wandb_project, config=config.to_dict(), dir=workdir, id=run_id,
                      resume="allow")


def _step_of(line: str) -> float:
    """A metrics.jsonl row's step; infinite for a line a killed run left unfinished."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _replace(path: str, content: bytes):
    with open(path + ".tmp", "wb") as f:
        f.write(content)
    os.replace(path + ".tmp", path)


class EventFile:
    """Scalars in a TensorBoard event file (`tensorboard --logdir DIR`): TFRecord-framed `Event` protos, encoded
    here because tensorboardX imports torch whenever it is installed, a second of every training start."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.file = open(os.path.join(logdir, name), "ab")
        self._write(_field(3, 2, b"brain.Event:2"))  # file_version: the first record of every event file

    def write_scalars(self, step: int, scalars: dict[str, float]):
        for tag, value in scalars.items():  # Summary.Value{tag = 1, simple_value = 2}
            value_proto = _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value))
            self._write(_field(2, 0, step) + _field(5, 2, _field(1, 2, value_proto)))  # Event{step, summary}
        self.file.flush()

    def _write(self, event_fields: bytes):
        data = _field(1, 1, struct.pack("<d", time.time())) + event_fields  # Event.wall_time = 1
        length = struct.pack("<Q", len(data))
        self.file.write(length + _masked_crc(length) + data + _masked_crc(data))

    def close(self):
        self.file.close()


def _drop_events_after(path: str, step: int):
    """Rewrites an event file without its events after `step` (records are kept byte for byte)."""
    with open(path, "rb") as f:
        blob = f.read()
    kept, pos = [], 0
    while pos + 12 <= len(blob):  # a record: length (8 bytes), its CRC (4), the Event, its CRC (4)
        (n,) = struct.unpack_from("<Q", blob, pos)
        if pos + 16 + n > len(blob):  # cut short by a killed run
            break
        if _event_step(blob[pos + 12:pos + 12 + n]) <= step:
            kept.append(blob[pos:pos + 16 + n])
        pos += 16 + n
    _replace(path, b"".join(kept))


def _event_step(event: bytes) -> int:
    """Event.step (field 2) of a serialized Event; 0 when absent."""
    pos = 0
    while pos < len(event):
        key, pos = _read_varint(event, pos)
        if key & 7 == 0:
            value, pos = _read_varint(event, pos)
            if key >> 3 == 2:
                return value
        elif key & 7 == 2:
            length, pos = _read_varint(event, pos)
            pos += length
        else:  # fixed64 (1) or fixed32 (5)
            pos += 8 if key & 7 == 1 else 4
    return 0


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value, shift, pos = value | (byte & 0x7F) << shift, shift + 7, pos + 1
        if byte < 0x80:
            return value, pos


def _field(number: int, wire_type: int, value) -> bytes:
    """One protobuf field: wire type 0 takes an int (varint), 2 bytes (length-prefixed), 1 and 5 packed bytes."""
    if wire_type == 2:
        value = _varint(len(value)) + value
    elif wire_type == 0:
        value = _varint(value)
    return _varint(number << 3 | wire_type) + value


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _masked_crc(data: bytes) -> bytes:
    """TFRecord's masked CRC-32C (Castagnoli) of data, little-endian."""
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ crc >> 8
    crc ^= 0xFFFFFFFF
    return struct.pack("<I", ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF)


@functools.cache
def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = n >> 1 ^ (0x82F63B78 if n & 1 else 0)
        table.append(n)
    return table
