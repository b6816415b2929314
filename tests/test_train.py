"""The training job: loss goes down, exact resume (in process and after SIGKILL), clear errors, the 124M config."""
import dataclasses
import importlib
import json
import os
import pathlib
import re
import struct
import subprocess
import sys
import time

import compare
import corpus
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import checkpoint, data, plot, prepare, train

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return corpus.write(tmp_path_factory.mktemp("text") / "corpus_200k.txt", 200_000)


@pytest.fixture(scope="module")
def char_data(tmp_path_factory, text_file):
    return prepare.prepare(str(tmp_path_factory.mktemp("char")), dataset="text", input=text_file, tokenizer="char")


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, text_file):
    return prepare.prepare(str(tmp_path_factory.mktemp("gpt2")), dataset="text", input=text_file, tokenizer="gpt2")


def make_config(name="tiny", **overrides):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.update_from_flattened_dict(overrides)
    return config


def params_of(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def read_metrics(workdir):
    return plot.read_metrics(str(workdir))


def test_tiny_config_on_gpt2_bpe_lowers_the_loss(gpt2_data, tmp_path):
    config = make_config(**{"data.dir": gpt2_data, "max_steps": 40, "eval_every": 20, "log_every": 5,
                            "eval_iters": 4})
    train.train(config, str(tmp_path))
    rows = read_metrics(tmp_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert losses[0] > 10.0  # ln(50257) = 10.8 at init
    assert losses[-1] < losses[0] - 2.0, losses
    assert val[-1] < val[0], val
    assert all({"lr", "grad_norm", "tokens_per_sec"} <= set(r) for r in rows if "loss" in r)
    assert os.path.getsize(plot.plot(str(tmp_path))) > 10_000
    assert list((tmp_path / "tensorboard").iterdir())


def logged_steps(output: str) -> list[int]:
    """The steps of the training log lines ("step N: loss ...") in a run's output."""
    return [int(m) for m in re.findall(r"^step (\d+): loss", output, re.M)]


SPEEDRUN = {"optim.name": "muon", "optim.schedule": "trapezoid", "model.qk_norm": True, "model.mlp": "relu2",
            "model.logit_softcap": 30.0, "model.zero_init_proj": True, "model.tie_embeddings": False,
            "model.value_embeds": 1, "model.positions": "rope", "model.scan_layers": True}


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
def test_resume_is_bit_exact(char_data, tmp_path, capsys, recipe):
    """speedrun: Muon's momentum and the AdamW groups' moments, the blocks' parameters, scan_layers (evaluated)."""
    common = {"data.dir": char_data, "optim.decay_steps": 12, "checkpoint_every": 3, "eval_every": 6,
              "model.dropout": 0.1, "grad_accum_steps": 2, "sample_tokens": 0, "log_every": 1,
              **(SPEEDRUN if recipe == "speedrun" else {})}
    straight = train.train(make_config(**common, max_steps=12), str(tmp_path / "straight"))
    train.train(make_config(**common, max_steps=6), str(tmp_path / "halves"))
    capsys.readouterr()
    resumed = train.train(make_config(**common, max_steps=12), str(tmp_path / "halves"))
    output = capsys.readouterr().out
    for a, b in zip(params_of(straight), params_of(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.step) == 12
    # It resumed: the steps before the checkpoint were not run again.
    assert "at step 6" in output and logged_steps(output) == list(range(7, 13)), output


def test_steps_per_call_matches_one_step_per_call(char_data, tmp_path):
    """Several optimizer steps per jitted call (a lax.scan) train as one step per call (another program: equal but
    for rounding, and the key bias's noise, tests/compare.py), with calls cut short at eval and checkpoint steps,
    log the same values at log steps inside calls, and resume bit-exactly from a checkpoint taken between calls."""
    common = {"data.dir": char_data, "optim.decay_steps": 12, "log_every": 4, "eval_every": 6, "max_steps": 12,
              "model.dropout": 0.1, "grad_accum_steps": 2, "sample_tokens": 0}
    one = train.train(make_config(**common, steps_per_call=1), str(tmp_path / "one"))
    five = train.train(make_config(**common, steps_per_call=5), str(tmp_path / "five"))
    train.train(make_config(**{**common, "max_steps": 6}, steps_per_call=5), str(tmp_path / "halves"))
    resumed = train.train(make_config(**common, steps_per_call=5), str(tmp_path / "halves"))
    for a, b in zip(params_of(five), params_of(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    compare.assert_weights_close(*(compare.flat(s.params.to_pure_dict()) for s in (one, five)), atol=1e-6)
    logged = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("one", "five")]
    assert [step for step, _ in logged[0]] == [step for step, _ in logged[1]] == [4, 8, 12]
    np.testing.assert_allclose([loss for _, loss in logged[0]], [loss for _, loss in logged[1]], rtol=1e-6)


def test_training_and_evaluation_compile_once_ahead_of_the_first_call(char_data, tmp_path, caplog):
    """compile_ahead's executables are the ones the loop runs: had its shapes or shardings missed jit's cache,
    train_steps would compile a second time at the first call."""
    config = make_config(**{"data.dir": char_data, "max_steps": 10, "steps_per_call": 5, "log_every": 5,
                            "eval_every": 10, "eval_iters": 2, "sample_tokens": 0})
    jax.config.update("jax_log_compiles", True)  # globally: a `with jax.log_compiles()` is this thread's only
    try:
        with caplog.at_level("WARNING"):
            train.train(config, str(tmp_path))
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [r.getMessage().split()[4] for r in caplog.records
                if r.getMessage().startswith("Finished XLA compilation of jit(")]
    assert compiled.count("jit(train_steps)") == 1 and compiled.count("jit(eval_loss)") == 1, compiled


def test_call_length_ends_calls_on_eval_and_checkpoint_steps_only():
    config = make_config(steps_per_call=5, log_every=4, eval_every=6, max_steps=14)
    step, lengths = 0, []
    while step < config.max_steps:
        lengths.append(train.call_length(step, config, checkpoint_every=6))
        step += lengths[-1]
    assert lengths == [5, 1, 5, 1, 2]  # ends at 5, 6, 11, 12, 14: log steps 4 and 8 fall inside calls


def train_command(workdir, data_dir, *extra):
    return [sys.executable, "-m", "jaxgpt.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.dir={data_dir}", "--config.max_steps=40", "--config.optim.decay_steps=40",
            "--config.checkpoint_every=1", "--config.eval_every=20", "--config.sample_tokens=0",
            "--config.keep_checkpoints=3", *extra]


def completed_steps(workdir):
    path = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


@pytest.mark.parametrize("override, message", [
    ("--config.no_such_field=1", "no_such_field"),
    ("--config.max_steps=many", "max_steps"),
])
def test_bad_config_override_is_one_clear_error(override, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxgpt.train", "--config=configs/tiny.py",
                             f"--workdir={tmp_path}", override], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_shard_is_a_clear_error(char_data, tmp_path):
    bad = tmp_path / "data"
    bad.mkdir()
    for name in ("tokenizer.json", "val_000000.bin"):
        (bad / name).write_bytes((pathlib.Path(char_data) / name).read_bytes())
    shard = (pathlib.Path(char_data) / "train_000000.bin").read_bytes()
    (bad / "train_000000.bin").write_bytes(shard[: len(shard) // 2])  # truncated
    with pytest.raises(ValueError, match="train_000000.bin.*truncated"):
        train.train(make_config(**{"data.dir": str(bad)}), str(tmp_path / "w"))


def test_val_shard_out_of_the_vocabulary_is_a_clear_error(char_data, tmp_path):
    bad = tmp_path / "data"
    bad.mkdir()
    for name in ("tokenizer.json", "train_000000.bin"):
        (bad / name).write_bytes((pathlib.Path(char_data) / name).read_bytes())
    data.write_shard(str(bad / "val_000000.bin"), np.full(5000, 500))
    with pytest.raises(ValueError, match=r"val_000000.bin: token 500 at position \d+ is outside the vocabulary"):
        train.train(make_config(**{"data.dir": str(bad)}), str(tmp_path / "w"))


def test_missing_data_is_a_clear_error(tmp_path):
    config = make_config(**{"data.dir": str(tmp_path / "empty"), "data.dataset": "text",
                            "data.input": str(tmp_path / "nowhere.txt")})
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        train.train(config, str(tmp_path / "w"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(char_data, tmp_path):
    def bad_step(steps_per_call, checkpoint_every):
        config = make_config(**{"data.dir": char_data, "optim.lr": 1e30, "optim.grad_clip": 0.0,
                                "optim.warmup_steps": 0, "max_steps": 10, "steps_per_call": steps_per_call,
                                "checkpoint_every": checkpoint_every})
        with pytest.raises(FloatingPointError, match=r"at step \d+") as error:
            train.train(config, str(tmp_path / str(steps_per_call)))
        return error.value.step, str(error.value)

    step, _ = bad_step(1, checkpoint_every=1)
    good = completed_steps(tmp_path / "1")
    assert good and good[-1] == step - 1
    model = checkpoint.load_model(str(tmp_path / "1"))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param))), good
    # Inside a 5-step call the first bad step is named exactly too; no checkpoint exists yet, and it says so.
    step_in_call, message = bad_step(5, checkpoint_every=5)
    assert step_in_call == step and "no checkpoint was saved yet" in message


@pytest.mark.slow
def test_124m_config_runs_one_step_on_cpu(gpt2_data, tmp_path):
    config = make_config("124m", **{"data.dir": gpt2_data, "device_batch_size": 1, "tokens_per_step": 256,
                                    "model.block_size": 256, "max_steps": 1, "eval_iters": 1,
                                    "sample_tokens": 0, "optim.warmup_steps": 0, "optim.decay_steps": 10})
    start = time.perf_counter()
    state = train.train(config, str(tmp_path))
    print(f"\n124m config, B=1, T=256: first step incl. compile, eval and checkpoint: "
          f"{time.perf_counter() - start:.1f} s")
    assert int(state.step) == 1
    row = next(r for r in read_metrics(tmp_path) if "loss" in r)
    assert 10.0 < row["loss"] < 11.5  # ln(50257) = 10.82 at init
    assert json.loads((tmp_path / "checkpoints" / "1" / "config" / "metadata").read_text())["model"]["n_layer"] == 12


def test_124m_speedrun_config_takes_two_steps_on_cpu(gpt2_data, tmp_path):
    """configs/124m_speedrun.py shrunk by overrides (the blocks and optimizer as they are) builds and trains."""
    config = make_config("124m_speedrun", **{
        "data.dir": gpt2_data, "model.preset": "", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32,
        "model.block_size": 32, "model.dtype": "float32", "model.value_embeds": 1, "device_batch_size": 2,
        "tokens_per_step": 128, "max_steps": 2, "eval_every": 2, "eval_iters": 1, "log_every": 1,
        "sample_tokens": 4})
    state = train.train(config, str(tmp_path))
    assert int(state.step) == 2 and state.params["lm_head"].value.any()  # the zero-initialised head moved
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 2 and abs(losses[0] - np.log(50257)) < 0.01  # a zero head: uniform over the vocabulary
    saved = json.loads((tmp_path / "checkpoints" / "2" / "config" / "metadata").read_text())
    assert saved["train"]["optim"]["name"] == "muon" and saved["model"]["value_embeds"] == 1


def test_finetune_starts_from_hugging_face_weights(gpt2_data, tmp_path, make_hf_gpt2):
    pytest.importorskip("torch")
    import torch_bridge
    hf_dir = tmp_path / "hf"
    make_hf_gpt2(vocab_size=50257, n_positions=64).save_pretrained(hf_dir)
    config = make_config(**{"data.dir": gpt2_data, "init_from": f"hf:{hf_dir}", "max_steps": 1,
                            "optim.lr": 0.0, "optim.warmup_steps": 0, "sample_tokens": 0})
    state = train.train(config, str(tmp_path / "w"))  # lr 0: the one step leaves the weights as imported
    expected = nnx.state(torch_bridge.from_hf(str(hf_dir)), nnx.Param).to_pure_dict()
    assert expected["wpe"]["embedding"].shape[0] == 64 and config.model.block_size == 32
    expected["wpe"]["embedding"] = expected["wpe"]["embedding"][:32]  # cropped, as nanoGPT's crop_block_size
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state.params.to_pure_dict()), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saved = checkpoint.load_model(str(tmp_path / "w")).config
    assert (saved.n_embd, saved.block_size) == (64, 32)
    char = make_config(**{"data.dir": str(tmp_path / "char"), "data.dataset": "text",
                          "data.input": corpus.write(tmp_path / "t.txt", 20_000), "init_from": f"hf:{hf_dir}"})
    with pytest.raises(ValueError, match=r"has GPT-2 BPE weights but data.dir=.*'s tokenizer is char with \d+ "
                                         r"tokens: the token ids mean different things"):
        train.train(char, str(tmp_path / "w_char"))


def test_hellaswag_runs_inside_training(gpt2_data, tmp_path):
    fixture = REPO / "tests" / "fixtures" / "hellaswag_tiny.jsonl"
    config = make_config(**{"data.dir": gpt2_data, "max_steps": 2, "eval_every": 2, "sample_tokens": 0,
                            "optim.warmup_steps": 0,
                            "hellaswag_file": str(fixture)})
    train.train(config, str(tmp_path))
    row = next(r for r in read_metrics(tmp_path) if "hellaswag_acc" in r)
    assert 0.0 <= row["hellaswag_acc"] <= 1.0 and 0.0 <= row["hellaswag_acc_norm"] <= 1.0
    from jaxgpt import evaluate
    from jaxgpt.tokenizer import get_tokenizer
    alone = evaluate.hellaswag_eval(checkpoint.load_model(str(tmp_path)), get_tokenizer("gpt2"), str(fixture))
    assert (row["hellaswag_acc"], row["hellaswag_acc_norm"]) == (alone["acc"], alone["acc_norm"])
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        train.train(make_config(**{"data.dir": gpt2_data, "hellaswag_file": str(tmp_path / "nowhere.jsonl")}),
                    str(tmp_path / "w2"))


def test_checkpoints_kept_are_the_latest_and_the_best(char_data, tmp_path):
    """keep_checkpoints=3 (not the default), a checkpoint every 2 steps, val loss every 20: on disk, steps 36, 38,
    40 and the best."""
    config = make_config(**{"data.dir": char_data, "max_steps": 40, "checkpoint_every": 2, "eval_every": 20,
                            "keep_checkpoints": 3, "sample_tokens": 0, "optim.decay_steps": 40})
    train.train(config, str(tmp_path))
    val = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path) if "val_loss" in r}
    best = min(val, key=val.get)
    assert completed_steps(tmp_path) == sorted({36, 38, 40, best})
    assert set(val) == {20, 40}
    from jaxgpt import loader
    params = {step: params_of_model(loader.load(str(tmp_path), step)) for step in ("best", best, "latest", 40)}
    for a, b in zip(params["best"], params[best]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(params["latest"], params[40]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 2; it holds steps"):
        loader.load(str(tmp_path), 2)


def params_of_model(m):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]


def test_resumed_run_writes_each_step_once(char_data, tmp_path):
    """A run killed after step 9 (its checkpoints past step 5 gone) is resumed at 5: metrics.jsonl and the
    TensorBoard events hold each step once, and the plot draws one curve through the resume."""
    from test_metrics import read_events, scalars
    common = {"data.dir": char_data, "max_steps": 10, "checkpoint_every": 4, "eval_every": 5, "log_every": 1,
              "keep_checkpoints": 5, "sample_tokens": 0, "optim.decay_steps": 10}
    train.train(make_config(**common), str(tmp_path))
    for step in (8, 10):
        subprocess.run(["rm", "-rf", str(tmp_path / "checkpoints" / str(step))], check=True)
    assert completed_steps(tmp_path)[-1] == 5  # eval steps are checkpointed too
    train.train(make_config(**common), str(tmp_path))
    rows = [(r["step"], "loss" in r) for r in read_metrics(tmp_path)]
    assert sorted(rows) == sorted(set(rows)) and {s for s, _ in rows} == set(range(1, 11))
    events = [(step, tag) for step, tag, _ in scalars(read_events(tmp_path / "tensorboard"))]
    assert len(events) == len(set(events)) and {s for s, _ in events} == set(range(1, 11))
    assert os.path.getsize(plot.plot(str(tmp_path))) > 10_000


def test_non_finite_val_loss_stops_and_is_never_the_best(char_data, tmp_path, monkeypatch):
    """A val loss of nan at step 6 stops the run like a bad train loss: the checkpoint of step 3 stays the last
    and the best, and nothing is saved for step 6."""
    real = train.Trainer.evaluate

    def evaluate(self, params, step, writer, say):
        if step == 6:
            self.steps = dataclasses.replace(self.steps, eval_loss=lambda *args: jnp.float32(jnp.nan))
        return real(self, params, step, writer, say)
    monkeypatch.setattr(train.Trainer, "evaluate", evaluate)
    config = make_config(**{"data.dir": char_data, "max_steps": 9, "checkpoint_every": 3, "eval_every": 3,
                            "sample_tokens": 0, "optim.decay_steps": 9})
    with pytest.raises(FloatingPointError, match="val loss nan at step 6") as error:
        train.train(config, str(tmp_path))
    assert error.value.step == 6 and error.value.last_checkpoint == 3
    assert completed_steps(tmp_path) == [3]
    assert checkpoint.select_step(checkpoint.checkpoint_manager(str(tmp_path)), "best") == 3


def test_existing_data_dir_without_shards_is_never_filled(tmp_path):
    (tmp_path / "mistyped").mkdir()
    (tmp_path / "mistyped" / "notes.txt").write_text("mine")
    config = make_config(**{"data.dir": str(tmp_path / "mistyped")})
    with pytest.raises(FileNotFoundError, match=r"has no train and val shards \(it holds \['notes.txt'\]\)"):
        train.train(config, str(tmp_path / "w"))
    assert os.listdir(tmp_path / "mistyped") == ["notes.txt"]


def wandb_records(path):
    """The records of a W&B run file (run-ID.wandb: a ':W&B' header, then LevelDB-log blocks of 32 KiB whose
    chunks, each behind a 7-byte header (CRC, length, type: 1 whole, 2 first, 3 middle, 4 last), carry them)."""
    data, pos, pending = pathlib.Path(path).read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # too little room for a header: the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            yield pending + chunk
            pending = b""
        elif kind in (2, 3):
            pending += chunk


def test_wandb_offline_run_logs_the_metrics(char_data, tmp_path, monkeypatch):
    """With WANDB_MODE=offline, the history in the run's local W&B file holds metrics.jsonl's scalars."""
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = make_config(**{"data.dir": char_data, "max_steps": 6, "eval_every": 3, "log_every": 2,
                            "sample_tokens": 0, "wandb_project": "jaxgpt-test"})
    train.train(config, str(tmp_path))
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    logged = {}
    for raw in wandb_records(run_file):
        record = wandb_internal_pb2.Record.FromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            logged.setdefault(items.pop("_step"), {}).update({k: v for k, v in items.items() if k[0] != "_"})
    expected = {}
    for row in read_metrics(tmp_path):
        expected.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    assert logged.keys() == expected.keys() == {2, 3, 4, 6}
    for step, values in expected.items():
        assert logged[step] == pytest.approx(values, rel=1e-6), step


def test_the_best_checkpoint_survives_a_resume(tmp_path):
    """Val losses are stored with their checkpoints, so a manager opened again (a resumed run) still keeps the best
    of the earlier steps while it deletes the rest."""
    import orbax.checkpoint as ocp

    def save(manager, step, val_loss):
        manager.save(step, args=ocp.args.Composite(config=ocp.args.JsonSave({"step": step})),
                     metrics=None if val_loss is None else {"val_loss": val_loss})
        manager.wait_until_finished()
    first = checkpoint.checkpoint_manager(str(tmp_path), keep=2, async_save=False)
    for step, val_loss in ((2, 5.0), (4, None), (6, 3.0), (8, None)):
        save(first, step, val_loss)
    assert completed_steps(tmp_path) == [6, 8]
    again = checkpoint.checkpoint_manager(str(tmp_path), keep=2, async_save=False)
    for step, val_loss in ((10, 4.0), (12, None), (14, None)):
        save(again, step, val_loss)
    assert completed_steps(tmp_path) == [6, 12, 14]
    assert checkpoint.select_step(again, "best") == 6


def test_trains_on_a_nanogpt_char_dir_as_it_is(tmp_path, capsys):
    from test_tokenizer import nanogpt_char_dir, shakespeare_like
    text = shakespeare_like()
    data_dir = nanogpt_char_dir(tmp_path / "shakespeare_char", text)
    before = sorted(os.listdir(data_dir))
    config = make_config(**{"data.dir": data_dir, "max_steps": 4, "eval_every": 4, "optim.warmup_steps": 1,
                            "sample_tokens": 60, "sample_prompt": "ROMEO:"})
    train.train(config, str(tmp_path / "w"))
    out = capsys.readouterr().out
    assert f"data: {data_dir}, char tokenizer of 65 tokens" in out
    sample = out[out.index("ROMEO:"):]
    assert len(sample) > 60 and set(sample) <= set(text)  # decoded with meta.pkl's characters
    assert sorted(os.listdir(data_dir)) == before  # nothing written into the user's data
    saved = json.loads((tmp_path / "w" / "tokenizer.json").read_text())
    assert saved == {"kind": "char", "chars": sorted(set(text))}  # kept with the checkpoints for sample/export


def test_trains_on_llmc_shards_as_gpt2_bpe(tmp_path, capsys):
    from jaxgpt.tokenizer import get_tokenizer
    tokens = get_tokenizer("gpt2").encode(corpus.text(20_000))
    data.write_shard(str(tmp_path / "tiny_val_000000.bin"), tokens[:2000])  # llm.c's header and names
    data.write_shard(str(tmp_path / "tiny_train_000001.bin"), tokens[2000:])
    config = make_config(**{"data.dir": str(tmp_path), "max_steps": 2, "eval_every": 2, "optim.warmup_steps": 1,
                            "sample_tokens": 0})
    train.train(config, str(tmp_path / "w"))
    assert f"data: {tmp_path}, gpt2 tokenizer of 50257 tokens" in capsys.readouterr().out


@pytest.mark.slow
def test_124m_recipe_on_1_and_8_devices_takes_the_same_first_step(char_data, tmp_path):
    """configs/124m.py unchanged but shrunk by overrides: 8 devices run micro-batches 8x larger and accumulate 8x
    fewer, for the same tokens per step and, on the same windows, the same step-1 loss and gradient norm, and so the
    same step-2 loss."""
    overrides = {"data.dir": char_data, "model.preset": "", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32,
                 "model.block_size": 32, "model.dtype": "float32", "device_batch_size": 2, "tokens_per_step": 1024,
                 "max_steps": 2, "eval_every": 2, "eval_iters": 1, "log_every": 1, "sample_tokens": 0,
                 "optim.warmup_steps": 0, "progress_bar": False}
    runs = {}
    for devices in (1, 8):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        flags = [f"--workdir={tmp_path / str(devices)}", *(f"--config.{k}={v}" for k, v in overrides.items())]
        done = subprocess.run([sys.executable, "-m", "jaxgpt.train", "--config=configs/124m.py", *flags], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[devices] = done.stdout, read_metrics(tmp_path / str(devices))
    assert "1,024 tokens per step (16 x 2 x 32)" in runs[1][0]
    assert "1,024 tokens per step (2 x 16 x 32)" in runs[8][0]
    step = [{r["step"]: r for r in rows if "loss" in r} for _, rows in runs.values()]
    first = [s[1]["loss"] for s in step]
    print(f"\nstep-1 loss: 1 device {first[0]!r}, 8 devices {first[1]!r}, |diff| {abs(first[0] - first[1]):.2g}")
    assert abs(first[0] - first[1]) <= 1e-5, first
    assert step[0][1]["grad_norm"] == pytest.approx(step[1][1]["grad_norm"], rel=1e-5)
    assert step[0][2]["loss"] == pytest.approx(step[1][2]["loss"], abs=1e-5)


def test_batch_by_tokens_that_does_not_divide_is_a_clear_error(char_data, tmp_path):
    config = make_config(**{"data.dir": char_data, "device_batch_size": 3, "tokens_per_step": 1000})
    with pytest.raises(ValueError, match=r"tokens_per_step=1000 is not a multiple of the micro-batch's 96 tokens "
                                         r"\(device_batch_size=3 x 1 batch shards x block_size=32\)"):
        train.train(config, str(tmp_path / "w"))
