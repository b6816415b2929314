"""Resume anywhere (docs/scaling.md, "Resuming on another cluster shape"): a run stopped on one cluster shape goes on
on another (processes, devices, mesh, micro-batch and accumulation) drawing, at every later step, exactly the windows
the uninterrupted run on the new shape draws, with losses within float32 reduction noise; what may not change (the
model, the data, tokens per step, the seed) is one error that writes nothing; an unreadable checkpoint names the
latest earlier step that reads, and resume_step resumes from it without deleting anything."""
import collections
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import corpus
import numpy as np
import pytest

from jaxgpt import checkpoint, plot, prepare, train
from jaxgpt.errors import UserFileNotFoundError, UserValueError

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
EXIT_REQUEUE = 75  # docs/scaling.md: a preempted run exits 75 (EX_TEMPFAIL)
NOISE = dict(rtol=2e-5, atol=0)  # float32 losses of the same windows reduced in another order (measured: ~1e-6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    text = corpus.write(tmp_path_factory.mktemp("text") / "corpus_60k.txt", 60_000)
    return prepare.prepare(str(tmp_path_factory.mktemp("char")), dataset="text", input=text, tokenizer="char")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, data_dir, *flags, processes=1, devices=1, record=None):
    """The tiny config through tests/resume_worker.py (jaxgpt.train's flags), on `processes` processes of `devices`
    forced CPU devices each; one log line a step, a checkpoint every 4 steps, all kept."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "RECORD_TO": str(record) if record else ""}
    command = [sys.executable, "tests/resume_worker.py", "--config=configs/tiny.py", f"--workdir={workdir}",
               f"--config.data.dir={data_dir}", "--config.optim.decay_steps=16", "--config.eval_every=4",
               "--config.keep_checkpoints=100", "--config.sample_tokens=0", "--config.log_every=1", *flags]
    address = [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
    return [subprocess.Popen(command + (address + [f"--process_id={i}"] if processes > 1 else []), cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(processes)]


def finish(procs, status=0):
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [status] * len(procs), "\n".join(o[-3000:] for o in outputs)
    return outputs[0]


def run(workdir, data_dir, *flags, processes=1, devices=1, record=None):
    return finish(launch(workdir, data_dir, *flags, processes=processes, devices=devices, record=record))


def windows(record) -> dict[int, list]:
    """step -> the sorted token rows every process fed into it (the windows, identified by their tokens)."""
    rows = collections.defaultdict(list)
    for path in pathlib.Path(record).parent.glob(f"{pathlib.Path(record).name}.*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            rows[entry["step"]] += [tuple(r) for r in entry["rows"]]
    return {step: sorted(r) for step, r in rows.items()}


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in plot.read_metrics(str(workdir)) if "loss" in r}


def keep_until(source, target, step):
    """A copy of a workdir as it stood at `step`: the later checkpoints are left out of the copy."""
    shutil.copytree(source, target, ignore=lambda d, names: [n for n in names if n.isdigit() and int(n) > step
                                                             and os.path.basename(d) == "checkpoints"])


def assert_same_later_steps(resumed, reference, after, last, rec_resumed, rec_reference):
    got, want = windows(rec_resumed), windows(rec_reference)
    assert sorted(got) == list(range(after + 1, last + 1)), sorted(got)  # nothing rerun, nothing skipped
    for step in range(after + 1, last + 1):
        assert got[step] == want[step], f"step {step} drew other windows"
    a, b = losses(resumed), losses(reference)
    np.testing.assert_allclose([a[s] for s in range(after + 1, last + 1)],
                               [b[s] for s in range(after + 1, last + 1)], **NOISE)


@pytest.fixture(scope="module")
def references(data_dir, tmp_path_factory):
    """Uninterrupted runs to step 24 on one process, and to step 8 on two (2 devices each), with their windows."""
    root = tmp_path_factory.mktemp("references")
    run(root / "one", data_dir, "--config.max_steps=24", record=root / "one.rec")
    run(root / "two", data_dir, "--config.max_steps=8", processes=2, devices=2, record=root / "two.rec")
    return root


@pytest.mark.slow
def test_two_processes_resume_on_one_and_one_on_two(data_dir, references, tmp_path):
    keep_until(references / "two", tmp_path / "from_two", 4)
    out = run(tmp_path / "from_two", data_dir, "--config.max_steps=8", record=tmp_path / "from_two.rec")
    assert ("resumed from" in out and "at step 4, written by 2 processes on data=4, micro-batches of 8 x 1; now 1 "
            "process on data=1, micro-batches of 8 x 1") in out, out
    assert_same_later_steps(tmp_path / "from_two", references / "one", 4, 8, tmp_path / "from_two.rec",
                            references / "one.rec")

    keep_until(references / "one", tmp_path / "from_one", 4)
    out = run(tmp_path / "from_one", data_dir, "--config.max_steps=8", processes=2, devices=2,
              record=tmp_path / "from_one.rec")
    assert "at step 4, written by 1 process on data=1, micro-batches of 8 x 1; now 2 processes on data=4" in out, out
    assert_same_later_steps(tmp_path / "from_one", references / "two", 4, 8, tmp_path / "from_one.rec",
                            references / "two.rec")


@pytest.mark.slow
def test_sigterm_on_two_processes_then_resumed_on_one(data_dir, references, tmp_path):
    procs = launch(tmp_path / "run", data_dir, "--config.max_steps=24", processes=2, devices=2)
    for line in procs[0].stdout:  # both train
        if line.startswith("step 2:"):
            break
    procs[1].send_signal(signal.SIGTERM)
    out = finish(procs, status=EXIT_REQUEUE)
    reached = max(int(n) for n in os.listdir(tmp_path / "run" / "checkpoints"))
    assert f"stopped at step {reached}, saved a checkpoint" in out and reached < 24, out
    out = run(tmp_path / "run", data_dir, "--config.max_steps=24", record=tmp_path / "resumed.rec")
    assert f"at step {reached}, written by 2 processes" in out, out
    assert_same_later_steps(tmp_path / "run", references / "one", reached, 24, tmp_path / "resumed.rec",
                            references / "one.rec")


@pytest.mark.slow
def test_eight_devices_resume_on_four_with_fsdp_tensor_and_another_accumulation(data_dir, tmp_path):
    """data=8 with micro-batches of 8 -> fsdp=2 x tensor=2 with micro-batches of 4 x 2 accumulated: the same 8
    windows a step. float16 (its dynamic loss scale moving every 2 steps) and Muon (its momentum) carry over: the
    losses and the scale after the resume are those of the uninterrupted run on the new layout."""
    common = ["--config.model.dtype=float16", "--config.optim.loss_scale_period=2", "--config.optim.name=muon"]
    new = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.batch_size=4",
           "--config.grad_accum_steps=2", "--config.max_steps=8"]
    run(tmp_path / "run", data_dir, *common, "--config.mesh.data=8", "--config.max_steps=4", devices=8)
    out = run(tmp_path / "run", data_dir, *common, *new, devices=4, record=tmp_path / "resumed.rec")
    assert ("at step 4, written by 1 process on data=8, micro-batches of 8 x 1; now 1 process on fsdp=2 x tensor=2, "
            "micro-batches of 4 x 2") in out, out
    run(tmp_path / "reference", data_dir, *common, *new, devices=4, record=tmp_path / "reference.rec")
    scales = [{r["step"]: r["loss_scale"] for r in plot.read_metrics(str(d)) if "loss_scale" in r}
              for d in (tmp_path / "run", tmp_path / "reference")]
    assert len(set(scales[1].values())) > 1 and scales[0] == scales[1]  # the scale moved, and moved alike
    assert_same_later_steps(tmp_path / "run", tmp_path / "reference", 4, 8, tmp_path / "resumed.rec",
                            tmp_path / "reference.rec")


# --- what may not change, and unreadable checkpoints (in this process) ------------------------------------------

def config(data_dir, **overrides):
    from configs import tiny
    c = tiny.get_config()
    c.update_from_flattened_dict({"data.dir": str(data_dir), "sample_tokens": 0, "eval_every": 4,
                                  "optim.decay_steps": 16, "max_steps": 4, **overrides})
    return c


def snapshot(workdir) -> dict:
    """Every file under workdir with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in pathlib.Path(workdir).rglob("*")}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    train.train(config(data_dir), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Another data set of the same characters (so of the same vocabulary): the corpus backwards."""
    root = tmp_path_factory.mktemp("other")
    (root / "text.txt").write_text(corpus.text(60_000)[::-1])
    return prepare.prepare(str(root / "data"), dataset="text", input=str(root / "text.txt"), tokenizer="char")


NEW_RUN = "start a new run from its weights with --workdir=NEW_DIR --config.init_from="


@pytest.mark.parametrize("overrides, says", [
    ({"model.n_embd": 64}, "is of another model: n_embd=32 there, 64 here; resume with the model config"),
    ({"batch_size": 4}, "was trained with 256 tokens per step (batch_size=8 x grad_accum_steps=1 x block_size=32), "
                        "this run takes 128 (batch_size=4 x grad_accum_steps=1); resume with "
                        "--config.tokens_per_step=256"),
    ({"seed": 1}, "was trained with seed=0, this run has seed=1: the data order would change; resume with "
                  "--config.seed=0"),
    ({"optim.name": "muon"}, "was trained with optim.name=adamw, this run has muon"),
    ({"model.dtype": "float16"}, "was trained with model.dtype=float32 and optim.loss_scale=auto, which does not keep "
                                 "a loss scale"),
])
def test_what_may_not_change_is_one_error_that_writes_nothing(data_dir, trained, overrides, says):
    before = snapshot(trained)
    with pytest.raises(UserValueError) as e:
        train.train(config(data_dir, max_steps=8, **overrides), str(trained))
    message = str(e.value)
    assert "\n" not in message and says in message and f"{NEW_RUN}{trained}" in message, message
    assert snapshot(trained) == before


def test_another_data_set_is_refused_naming_both(data_dir, trained, other_data):
    before = snapshot(trained)
    with pytest.raises(UserValueError, match=r"was trained on another data set: 1 train shards there, 1 here, "
                                             r"differing in train_000000.bin: [\d,]+ tokens \(\w{16}\) there, "
                                             r"[\d,]+ tokens \(\w{16}\) here, in data.dir=\S+; point "
                                             "--config.data.dir at the data it was trained on, or start a new run"):
        train.train(config(other_data, max_steps=8), str(trained))
    assert snapshot(trained) == before  # its tokenizer.json too


def test_the_data_directory_may_move(data_dir, trained, tmp_path):
    """Another cluster mounts the data elsewhere: the same shards under another path resume."""
    moved = shutil.copytree(data_dir, tmp_path / "mounted_elsewhere")
    workdir = shutil.copytree(trained, tmp_path / "run")
    train.train(config(moved, max_steps=5, eval_every=5), str(workdir))
    assert (workdir / "checkpoints" / "5").is_dir()


def test_one_line_on_the_command_line(data_dir, trained):
    before = snapshot(trained)
    result = subprocess.run([sys.executable, "-m", "jaxgpt.train", "--config=configs/tiny.py", f"--workdir={trained}",
                             f"--config.data.dir={data_dir}", "--config.optim.decay_steps=16", "--config.batch_size=16",
                             "--config.max_steps=8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: {trained}'s checkpoint (step 4) was trained with 256 tokens per step")
    assert snapshot(trained) == before


def test_an_unreadable_step_names_the_latest_that_reads_and_resume_step_goes_back_to_it(data_dir, tmp_path):
    workdir = tmp_path / "run"
    train.train(config(data_dir, max_steps=12), str(workdir))
    broken = workdir / "checkpoints" / "12" / "train"
    for f in broken.rglob("*"):  # the step's optimizer state, truncated (a disk that filled up, say)
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[:64])
    with pytest.raises(checkpoint.UnreadableCheckpoint) as e:
        train.train(config(data_dir, max_steps=16), str(workdir))
    message = str(e.value)
    assert message.startswith(f"cannot read the checkpoint {workdir}/checkpoints/12: ") and "\n" not in message
    assert ("; step 8 reads: resume from it with --config.resume_step=8 (later steps are moved to set_aside/, not "
            f"deleted), or move {workdir}/checkpoints/12 out of the checkpoints directory") in message, message
    assert "delete " not in message.replace("not deleted", "")
    kept = snapshot(workdir / "checkpoints" / "12")

    train.train(config(data_dir, max_steps=16, resume_step=8), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "16"]  # 12 written anew from 8; keep_checkpoints=2
    moved = workdir / "set_aside" / "12"
    assert {p.replace(str(moved), "") for p in snapshot(moved)} == {p.replace(str(workdir / "checkpoints" / "12"), "")
                                                                    for p in kept}  # nothing lost


def test_a_step_missing_an_item_is_unreadable_and_says_which(data_dir, trained, tmp_path):
    workdir = shutil.copytree(trained, tmp_path / "run")
    shutil.rmtree(workdir / "checkpoints" / "4" / "train")  # a copy that lost a directory on the way
    with pytest.raises(checkpoint.UnreadableCheckpoint, match=r"checkpoints/4: its train item is missing; no earlier "
                                                              r"checkpoint reads either$"):
        train.train(config(data_dir, max_steps=8), str(workdir))


def test_resume_step_that_is_not_there_names_the_steps(data_dir, trained):
    with pytest.raises(UserFileNotFoundError, match=r"resume_step=6: .* holds no checkpoint at that step; it holds "
                                                    r"steps \[4\]"):
        train.train(config(data_dir, max_steps=8, resume_step=6), str(trained))


def test_a_checkpoint_of_another_structure_is_refused_as_that_not_as_unreadable(data_dir, trained):
    from jaxgpt import loader, sharding, step
    c = config(data_dir)
    steps = step.make_steps(c, loader.model_config(c, 65), sharding.make_mesh(c.mesh))
    other = {**steps.abstract_state.train_items(), "extra": steps.abstract_state.step}
    with checkpoint.checkpoint_manager(str(trained)) as manager:
        with pytest.raises(UserValueError, match=r"written by another training configuration: its train differ in 1 "
                                                 r"entries \(extra: absent there, \(\) here\)") as e:
            checkpoint.restore_training(manager, 4, params=steps.abstract_state.params, train=other)
    assert not isinstance(e.value, checkpoint.UnreadableCheckpoint)


def test_a_checkpoint_from_before_the_position_item_resumes(tmp_path, monkeypatch):
    """tests/fixtures/legacy_run was written by the trainer before this change (each process's grain iterator state,
    no position item): it resumes on its layout and draws the windows a run of today draws."""
    import resume_worker
    legacy = shutil.copytree(FIXTURES / "legacy_run", tmp_path / "legacy")
    settings = {"model.n_layer": 1, "model.n_embd": 16, "model.block_size": 16, "batch_size": 4, "eval_iters": 1,
                "optim.warmup_steps": 2, "optim.decay_steps": 8, "max_steps": 8, "log_every": 1}
    originals = {name: getattr(train.Trainer, name) for name in ("initial_state", "local_batches")}
    for workdir, record in ((legacy, "legacy.rec"), (tmp_path / "today", "today.rec")):
        for name, method in originals.items():  # recording() replaces them; monkeypatch puts them back at the end
            monkeypatch.setattr(train.Trainer, name, method)
        resume_worker.recording(train.Trainer, str(tmp_path / record))
        train.train(config(legacy / "data", **settings), str(workdir))
    assert_same_later_steps(legacy, tmp_path / "today", 4, 8, tmp_path / "legacy.rec", tmp_path / "today.rec")


# --- the pieces, without a run ----------------------------------------------------------------------------------

def test_the_layout_line_names_what_changed_and_nothing_when_nothing_did():
    from jaxgpt import resume
    two = {"processes": 2, "mesh": {"data": 4, "fsdp": 1, "tensor": 1}, "batch_size": 8, "grad_accum_steps": 1}
    one = {"processes": 1, "mesh": {"data": 1, "fsdp": 2, "tensor": 2}, "batch_size": 4, "grad_accum_steps": 2}
    assert resume.describe(two) == "2 processes on data=4, micro-batches of 8 x 1"
    assert resume.describe(one) == "1 process on fsdp=2 x tensor=2, micro-batches of 4 x 2"
    assert resume.describe({**one, "mesh": {"data": 1, "fsdp": 1, "tensor": 1}}) == \
        "1 process on data=1, micro-batches of 4 x 2"
    assert resume.describe({"processes": 3}) == "3 processes"  # a checkpoint from before the layout record
    assert resume.changed(two, two) == ""
    assert resume.changed(two, one) == f", written by {resume.describe(two)}; now {resume.describe(one)}"
    assert resume.changed(two, {**two, "grad_accum_steps": 2}).endswith("micro-batches of 8 x 2")
    assert resume.changed({"processes": 2}, two) == ""  # what an old record holds is all it can compare
    assert resume.changed({"processes": 1}, two) == f", written by 1 process; now {resume.describe(two)}"


def refusal():
    from jaxgpt import resume
    return resume.Refusal("runs/a", 40)


def test_compute_only_fields_may_change_and_the_shape_may_not():
    from jaxgpt import model
    ours = model.GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
    saved = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ours).items()}  # as JSON
    for field, value in (("dtype", "bfloat16"), ("remat", "full"), ("kernels", "reference"), ("loss_chunk", 0),
                         ("scan_layers", True), ("dropout", 0.1)):
        refusal().check_model({**saved, field: value}, ours)
    with pytest.raises(UserValueError, match=r"^runs/a's checkpoint \(step 40\) is of another model: n_layer=4 there, "
                                             r"2 here, n_head=4 there, 2 here; resume with the model config that "
                                             r"made it, or start a new run from its weights with --workdir=NEW_DIR "
                                             r"--config.init_from=runs/a$"):
        refusal().check_model({**saved, "n_layer": 4, "n_head": 4}, ours)


def training(**fields):
    from configs import tiny
    c = tiny.get_config()
    c.update_from_flattened_dict(fields)
    return c


def saved_training(**fields):
    return training(**fields).to_dict()


def test_tokens_per_step_may_be_split_otherwise_but_not_changed():
    from jaxgpt import loader
    mc = loader.model_config(training(), 65)
    refusal().check_training(saved_training(batch_size=8, grad_accum_steps=2), training(batch_size=16), mc, False)
    refusal().check_training(saved_training(batch_size=8, grad_accum_steps=2),
                             training(batch_size=4, grad_accum_steps=4), mc, False)
    with pytest.raises(UserValueError, match=r"trained with 512 tokens per step \(batch_size=8 x grad_accum_steps=2 x "
                                             r"block_size=32\), this run takes 1,024 \(batch_size=8 x "
                                             r"grad_accum_steps=4\); resume with --config.tokens_per_step=512, or "):
        refusal().check_training(saved_training(batch_size=8, grad_accum_steps=2),
                                 training(batch_size=8, grad_accum_steps=4), mc, False)


def test_the_optimizer_and_the_loss_scale_may_not_change():
    from jaxgpt import loader
    mc = loader.model_config(training(), 65)
    with pytest.raises(UserValueError, match="trained with optim.name=muon, this run has adamw: the optimizer state "
                                             "does not carry over; resume with --config.optim.name=muon, or "):
        refusal().check_training(saved_training(**{"optim.name": "muon"}), training(), mc, False)
    old = saved_training()
    del old["optim"]["name"]  # a checkpoint from before Muon: AdamW
    refusal().check_training(old, training(), mc, False)
    fp16 = saved_training(**{"model.dtype": "float16"})
    refusal().check_training(fp16, training(**{"model.dtype": "float16"}), mc, True)
    with pytest.raises(UserValueError, match="trained with model.dtype=float16 and optim.loss_scale=auto, which does "
                                             "keep a loss scale; resume with those, or "):
        refusal().check_training(fp16, training(), mc, False)
    with pytest.raises(UserValueError, match="optim.loss_scale=none, which does not keep a loss scale"):
        refusal().check_training(saved_training(**{"optim.loss_scale": "none"}), training(), mc, True)


def test_the_data_stream_may_move_but_not_change():
    stream = {"seed": 0, "window_tokens": 33, "shards": [["train_000000.bin", 1000, "aa"]]}
    c = training(**{"data.dir": "/mnt/x"})
    refusal().check_stream(stream, {**stream, "shards": [list(s) for s in stream["shards"]]}, c)
    with pytest.raises(UserValueError, match="trained with seed=0, this run has seed=3: the data order would change; "
                                             "resume with --config.seed=0, or "):
        refusal().check_stream(stream, {**stream, "seed": 3}, c)
    many = {**stream, "shards": [[f"train_{i:06d}.bin", 1000, "aa"] for i in range(6)]}
    other = {**stream, "shards": [[f"train_{i:06d}.bin", 999 if i % 2 else 1000, "bb" if i else "aa"]
                                  for i in range(1, 7)]}
    with pytest.raises(UserValueError) as e:
        refusal().check_stream(many, other, c)
    assert ("was trained on another data set: 6 train shards there, 6 here, differing in train_000000.bin: 1,000 "
            "tokens (aa) there, absent here; train_000001.bin: 1,000 tokens (aa) there, 999 tokens (bb) here; "
            "train_000002.bin: 1,000 tokens (aa) there, 1,000 tokens (bb) here and 4 more, in data.dir=/mnt/x; point "
            "--config.data.dir at the data it was trained on, or ") in str(e.value)
    with pytest.raises(UserValueError, match="trained on windows of 33 tokens, this run's are 65; resume with "
                                             "--config.model.block_size=32, or "):
        refusal().check_stream(stream, {**stream, "window_tokens": 65}, c)


def test_the_layout_record_is_what_describe_reads():
    import types

    from jaxgpt import resume
    mesh = types.SimpleNamespace(shape={"data": np.int64(2), "fsdp": 1, "tensor": 2})
    shape = resume.layout(mesh, training(batch_size=4, grad_accum_steps=3))
    assert shape == {"processes": 1, "mesh": {"data": 2, "fsdp": 1, "tensor": 2}, "batch_size": 4,
                     "grad_accum_steps": 3}
    assert resume.describe(shape) == "1 process on data=2 x tensor=2, micro-batches of 4 x 3"


def test_the_shard_diff_names_at_most_three():
    from jaxgpt import resume
    ours = [[f"train_{i:06d}.bin", 1000, "aa"] for i in range(3)]
    three = [[name, tokens, "bb"] for name, tokens, _ in ours]
    text = resume._shard_diff(three, ours)
    assert text.endswith("train_000002.bin: 1,000 tokens (bb) there, 1,000 tokens (aa) here,") and " more" not in text
    assert resume._shard_diff(three + [["train_000003.bin", 5, "cc"]], ours).endswith(
        "train_000002.bin: 1,000 tokens (bb) there, 1,000 tokens (aa) here and 1 more,")


class FakeManager:
    """What plan reads of a checkpoint manager: the steps there and their directory."""

    def __init__(self, steps):
        self.steps, self.directory = list(steps), "runs/a/checkpoints"

    def all_steps(self):
        return self.steps


def fake_checkpoints(monkeypatch, saved_train, windows_per_step, *, stream=None, unreadable=(), layout=None):
    """checkpoint.saved_config / saved_position of a run whose checkpoints at every step were written with
    `saved_train`, at step x windows_per_step windows; the steps in `unreadable` fail to read."""
    from jaxgpt import loader
    model_config = loader.model_config(training(), 65)
    model_fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model_config).items()}
    global_batches = []

    def check(manager, step):
        if step in unreadable:
            raise checkpoint.UnreadableCheckpoint(f"{manager.directory}/{step}", "a truncated file")

    def saved_config(manager, step):
        check(manager, step)
        return {"model": model_fields, "train": saved_train}

    def saved_position(manager, step, global_batch):
        check(manager, step)
        global_batches.append(global_batch)
        return {"windows": step * windows_per_step, "stream": stream, "layout": layout or {"processes": 2}}

    monkeypatch.setattr(checkpoint, "saved_config", saved_config)
    monkeypatch.setattr(checkpoint, "saved_position", saved_position)
    return model_config, global_batches


STREAM = {"seed": 0, "window_tokens": 33, "shards": [["train_000000.bin", 1000, "aa"]]}


def test_plan_resumes_from_the_latest_step_or_resume_step_on_another_split_of_the_batch(monkeypatch):
    """The latest checkpoint, or config.resume_step (the later ones to be set aside); the position is the windows
    the stream gave, step x batch_size x grad_accum_steps, whatever the new split of tokens per step; a checkpoint
    from before the stream record resumes unchecked (docs/scaling.md, "Resuming on another cluster shape")."""
    from jaxgpt import resume
    saved = saved_training(batch_size=8, grad_accum_steps=2)
    model_config, global_batches = fake_checkpoints(monkeypatch, saved, 16, layout={"processes": 2, "mesh": {}})
    config = training(batch_size=4, grad_accum_steps=4)
    assert resume.plan(FakeManager([]), "runs/a", config, model_config, STREAM, False) is None
    start = resume.plan(FakeManager([30, 10, 20]), "runs/a", config, model_config, STREAM, False)
    assert start == resume.Resume(30, 30 * 16, {"processes": 2, "mesh": {}}, ())
    assert global_batches == [8]  # an old checkpoint's position: its batch count x the batch it was written with
    config.resume_step = 10
    assert resume.plan(FakeManager([30, 10, 20]), "runs/a", config, model_config, STREAM, False) == \
        resume.Resume(10, 10 * 16, {"processes": 2, "mesh": {}}, (20, 30))
    config.resume_step = 25
    with pytest.raises(UserFileNotFoundError, match=r"^resume_step=25: runs/a holds no checkpoint at that step; it "
                                                    r"holds steps \[10, 20, 30\]$"):
        resume.plan(FakeManager([30, 10, 20]), "runs/a", config, model_config, STREAM, False)

    fake_checkpoints(monkeypatch, saved, 16, stream=None)
    other_stream = {**STREAM, "seed": 5}
    old = resume.plan(FakeManager([10]), "runs/a", training(batch_size=16), model_config, other_stream, False)
    assert old.step == 10


def test_plan_refuses_what_may_not_change_and_a_position_off_the_steps(monkeypatch):
    from jaxgpt import resume
    saved = saved_training(batch_size=8, grad_accum_steps=2)
    model_config, _ = fake_checkpoints(monkeypatch, saved, 16, stream=STREAM)
    manager = FakeManager([10, 20])
    with pytest.raises(UserValueError, match=r"^runs/a's checkpoint \(step 20\) is of another model: n_layer="):
        resume.plan(manager, "runs/a", training(batch_size=16), dataclasses.replace(model_config, n_layer=7), STREAM,
                    False)
    with pytest.raises(UserValueError, match=r"^runs/a's checkpoint \(step 20\) was trained with 512 tokens per step"):
        resume.plan(manager, "runs/a", training(batch_size=8, grad_accum_steps=1), model_config, STREAM, False)
    with pytest.raises(UserValueError, match=r"^runs/a's checkpoint \(step 20\) was trained with seed=0, this run "
                                             r"has seed=5"):
        resume.plan(manager, "runs/a", training(batch_size=16), model_config, {**STREAM, "seed": 5}, False)
    fake_checkpoints(monkeypatch, saved, 15, stream=STREAM)
    with pytest.raises(UserValueError, match=r"^runs/a/checkpoints/20: its data position \(300 windows\) is not 20 "
                                             r"steps of 16 windows; the checkpoint was not written by this trainer$"):
        resume.plan(manager, "runs/a", training(batch_size=16), model_config, STREAM, False)


def test_an_unreadable_step_names_the_latest_earlier_one_that_reads(monkeypatch):
    """docs/scaling.md: "No error costs a checkpoint": the error names the latest earlier step that reads and how to
    resume from it; nothing is moved."""
    from jaxgpt import resume
    saved = saved_training(batch_size=8, grad_accum_steps=2)
    model_config, _ = fake_checkpoints(monkeypatch, saved, 16, unreadable={40, 20})
    manager = FakeManager([10, 20, 30, 40])
    with pytest.raises(checkpoint.UnreadableCheckpoint) as e:
        resume.plan(manager, "runs/a", training(batch_size=16), model_config, STREAM, False)
    assert str(e.value) == (
        "cannot read the checkpoint runs/a/checkpoints/40: a truncated file; step 30 reads: resume from it with "
        "--config.resume_step=30 (later steps are moved to set_aside/, not deleted), or move "
        "runs/a/checkpoints/40 out of the checkpoints directory")
    assert manager.steps == [10, 20, 30, 40]
    fake_checkpoints(monkeypatch, saved, 16, unreadable={10, 20})
    with pytest.raises(checkpoint.UnreadableCheckpoint, match=r"^cannot read the checkpoint runs/a/checkpoints/20: a "
                                                              r"truncated file; no earlier checkpoint reads either$"):
        resume.plan(FakeManager([10, 20]), "runs/a", training(batch_size=16), model_config, STREAM, False)


def test_the_same_shards_in_another_order_are_refused():
    """Another grain or jaxgpt that shuffles the same shards otherwise would silently read other windows."""
    stream = {"seed": 0, "window_tokens": 33, "shards": [["train_000000.bin", 1000, "aa"]], "order": "0123"}
    c = training(**{"data.dir": "/mnt/x"})
    refusal().check_stream(stream, dict(stream), c)
    refusal().check_stream({k: v for k, v in stream.items() if k != "order"}, stream, c)  # recorded without one
    with pytest.raises(UserValueError, match="trained on the same data in another order than this version of jaxgpt "
                                             "and grain gives .*: resuming would read other windows; resume with "
                                             r"the versions that wrote it \(constraints.txt\), or start a new run"):
        refusal().check_stream(stream, {**stream, "order": "4567"}, c)


def test_the_same_resume_step_run_again_goes_on_from_what_it_wrote(monkeypatch):
    """A requeue runs the same command: a run that already went back to resume_step and wrote later checkpoints is
    resumed from the latest of them, not sent back again (docs/scaling.md)."""
    from jaxgpt import resume
    saved = saved_training(batch_size=8, resume_step=10)
    model_config, _ = fake_checkpoints(monkeypatch, saved, 8)
    config = training(batch_size=8, resume_step=10)
    assert resume.plan(FakeManager([10, 20, 30]), "runs/a", config, model_config, STREAM, False).step == 30
    config.resume_step = 20  # going back elsewhere still goes back
    assert resume.plan(FakeManager([10, 20, 30]), "runs/a", config, model_config, STREAM, False).step == 20
    config.resume_step = 30
    assert resume.plan(FakeManager([10, 20, 30]), "runs/a", config, model_config, STREAM, False).step == 30
    fake_checkpoints(monkeypatch, saved_training(batch_size=8), 8)  # written without resume_step: go back
    config.resume_step = 10
    assert resume.plan(FakeManager([10, 20, 30]), "runs/a", config, model_config, STREAM, False) == \
        resume.Resume(10, 80, {"processes": 2}, (20, 30))
