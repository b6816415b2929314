"""TensorBoard event files, checked against tensorboardX: its protobuf classes
decode every record, its CRC-32C checks every frame, and its SummaryWriter, given the same scalars, writes the same
events."""
import glob
import pathlib
import struct
import time

from tensorboardX.proto import event_pb2  # a dev dependency (pip install -e .[dev]), not a runtime one

from jaxgpt import metrics


def read_events(logdir):
    """Every event of every event file in logdir (oldest file first), each record's CRCs checked."""
    from tensorboardX.record_writer import masked_crc32c
    paths = sorted(glob.glob(f"{logdir}/events.out.tfevents.*"), key=lambda p: pathlib.Path(p).stat().st_mtime)
    events, raw = [], b"".join(pathlib.Path(p).read_bytes() for p in paths)
    assert paths
    while raw:
        header, (length_crc,) = raw[:8], struct.unpack("<I", raw[8:12])
        (length,) = struct.unpack("<Q", header)
        data, (data_crc,) = raw[12:12 + length], struct.unpack("<I", raw[12 + length:16 + length])
        assert (length_crc, data_crc) == (masked_crc32c(header), masked_crc32c(data))
        events.append(event_pb2.Event.FromString(data))
        raw = raw[16 + length:]
    return events


def scalars(events):
    return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]


def test_event_file_decodes_as_tensorboardx_writes_it(tmp_path):
    logged = [(5, {"loss": 2.5, "lr": 1e-3}), (300, {"loss": 1.2345678, "tokens_per_sec": 123456.0})]
    start = time.time()
    ours = metrics.EventFile(str(tmp_path / "ours"))
    for step, values in logged:
        ours.write_scalars(step, values)
    ours.close()
    from tensorboardX import SummaryWriter
    theirs = SummaryWriter(str(tmp_path / "theirs"))
    for step, values in logged:
        for tag, value in values.items():
            theirs.add_scalar(tag, value, step)
    theirs.close()

    events = read_events(tmp_path / "ours")
    assert events[0].file_version == "brain.Event:2"
    assert all(start - 1 < e.wall_time < time.time() + 1 for e in events)
    assert scalars(events) == scalars(read_events(tmp_path / "theirs"))
    assert [(s, t) for s, t, _ in scalars(events)] == [(5, "loss"), (5, "lr"), (300, "loss"), (300, "tokens_per_sec")]


def step_log(tmp_path, loss_scale: str, said: list) -> metrics.StepLog:
    from configs import base
    config = base.get_config()
    config.update_from_flattened_dict({"model.dtype": "float16", "optim.loss_scale": loss_scale, "log_every": 1,
                                       "max_steps": 100})
    writer = metrics.MetricWriter(str(tmp_path), config, enabled=True)
    return metrics.StepLog(writer, said.append, config, start=0, tokens_per_step=1, flops_per_token=1.0,
                           workdir=str(tmp_path), last_checkpoint=lambda: None)


def float16_call(skipped, scales):
    """One call's metrics as train_step returns them, each skipped step with an infinite gradient norm."""
    import numpy as np
    skipped = np.asarray(skipped)
    return {"loss": np.full(len(skipped), 2.0), "grad_norm": np.where(skipped, np.inf, 1.0),
            "lr": np.full(len(skipped), 1e-3), "loss_scale": np.asarray(scales, np.float32), "skipped": skipped,
            "skipped_steps": np.cumsum(skipped)}


def test_skipped_float16_steps_are_logged_until_they_mean_divergence(tmp_path):
    """A dynamic scale's skipped steps are its work until the scale is at its least; a fixed scale's, up to ten in a
    row (more: every step overflows, nothing trains). metrics.jsonl writes an infinite norm as null."""
    import json

    import pytest
    said = []
    log = step_log(tmp_path / "dynamic", "dynamic", said)
    log.add(1, float16_call([0, 1, 1, 0], [4.0, 4.0, 2.0, 1.0]))
    log.add(5, float16_call([1, 0], [1.0, 1.0]))
    with pytest.raises(metrics.NonFiniteLoss) as stopped:
        log.flush()  # step 5 skipped with the scale at its least
    assert stopped.value.step == 5 and "loss scale 4 (1 skipped)" in said[1]
    rows = [json.loads(line) for line in (tmp_path / "dynamic" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["grad_norm"] is None and rows[0]["grad_norm"] == 1.0
    log = step_log(tmp_path / "fixed", "1024", said)
    log.add(1, float16_call([1] * 10, [1024.0] * 10))
    log.add(11, float16_call([0] + [1] * 10, [1024.0] * 11))  # a finite step ends the streak
    log.add(22, float16_call([1], [1024.0]))
    with pytest.raises(metrics.NonFiniteLoss) as stopped:
        log.flush()  # the eleventh in a row
    assert stopped.value.step == 22
