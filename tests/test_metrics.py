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
