"""Every CLI on input a user can fix: exit status 1, no traceback, and one line `error: ...` naming the problem
(the last on stderr, after any progress logs)."""
import json
import pathlib
import shutil
import subprocess
import sys

import corpus
import numpy as np
import pytest

from jaxgpt import data, prepare, train
from jaxgpt.tokenizer import CharTokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A prepared char data dir, a trained workdir (checkpoints at steps 2 and 4), and broken copies of both."""
    root = tmp_path_factory.mktemp("cli")
    good = prepare.prepare(str(root / "data"), dataset="text", input=corpus.write(root / "text.txt", 50_000))
    from configs import tiny
    config = tiny.get_config()
    config.data.dir, config.max_steps, config.eval_every, config.sample_tokens = good, 4, 2, 0
    config.optim.decay_steps = 20
    train.train(config, str(root / "run"))

    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    shard = truncated / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:3000])
    out_of_vocab = root / "out_of_vocab"
    out_of_vocab.mkdir()
    for split in ("train", "val"):
        data.write_shard(str(out_of_vocab / f"{split}_000000.bin"), np.arange(5000) % 60)
    CharTokenizer(list("abcdefghij")).save(str(out_of_vocab))
    (root / "empty").mkdir()
    corrupt = root / "corrupt_run"
    shutil.copytree(root / "run", corrupt)
    for f in (corrupt / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:100])
    (root / "evil.pt").write_bytes(b"\x80\x04cos\nsystem\n(S'true'\ntR.")  # a pickle that would run a command
    return {k: str(v) for k, v in dict(root=root, data=good, run=root / "run", truncated=truncated,
                                       out_of_vocab=out_of_vocab, empty=root / "empty", corrupt=corrupt,
                                       evil=root / "evil.pt").items()}


def trains(*overrides):
    return ["jaxgpt.train", "--config=configs/tiny.py", "--config.sample_tokens=0", *overrides]


CASES = {  # name -> (module and arguments, with {placeholders} from `files`; words the error must contain)
    "unknown field": (trains("--workdir={root}/w1", "--config.optim.lrr=1"), "unknown config field 'lrr'"),
    "unknown preset": (trains("--workdir={root}/w2", "--config.data.dir={data}", "--config.model.preset=gpt3"),
                       "model.preset='gpt3'"),
    "wrong type": (trains("--workdir={root}/w3", "--config.max_steps=many"), "max_steps"),
    "missing input": (trains("--workdir={root}/w4", "--config.data.dir={root}/new", "--config.data.dataset=text",
                             "--config.data.input={root}/nowhere.txt"), "nowhere.txt"),
    "empty data dir": (trains("--workdir={root}/w5", "--config.data.dir={empty}"), "holds nothing"),
    "truncated shard": (trains("--workdir={root}/w6", "--config.data.dir={truncated}"), "truncated"),
    "token out of range": (trains("--workdir={root}/w7", "--config.data.dir={out_of_vocab}"),
                           "outside the vocabulary"),
    "missing init_from": (trains("--workdir={root}/w8", "--config.data.dir={data}",
                                 "--config.init_from=ckpt:{root}/nowhere"), "no such model directory"),
    "init_from openai without hparams": (trains("--workdir={root}/w10", "--config.data.dir={data}",
                                                "--config.init_from=openai:{empty}"), "hparams.json: no such file"),
    "resume without checkpoint": (trains("--workdir={root}/w9", "--config.data.dir={data}",
                                         "--config.init_from=resume"), "no checkpoint to resume"),
    "corrupt checkpoint": (trains("--workdir={corrupt}", "--config.data.dir={data}", "--config.max_steps=6"),
                           "cannot read the checkpoint"),
    "another model's checkpoint": (trains("--workdir={run}", "--config.data.dir={data}", "--config.max_steps=6",
                                          "--config.model.n_embd=64"), "n_embd=32 there, 64 here"),
    "prepare missing input": (["jaxgpt.prepare", "--input={root}/nowhere.txt", "--out={root}/p"],
                              "no such text file"),
    "prepare over shards": (["jaxgpt.prepare", "--input={root}/text.txt", "--out={data}"], "already holds shards"),
    "sample missing checkpoint": (["jaxgpt.sample", "--ckpt={root}/nowhere"], "no such model directory"),
    "sample both sources": (["jaxgpt.sample", "--ckpt={run}", "--hf={root}"], "exactly one of"),
    "sample missing step": (["jaxgpt.sample", "--ckpt={run}", "--step=99", "--tokenizer={data}"],
                            "no checkpoint at step 99"),
    "sample negative temperature": (["jaxgpt.sample", "--ckpt={run}", "--tokenizer={data}", "--temperature=-1"],
                                    "temperature=-1.0 must be >= 0"),
    "sample top_p": (["jaxgpt.sample", "--ckpt={run}", "--tokenizer={data}", "--top_p=1.5"], "top_p=1.5"),
    "sample wrong tokenizer": (["jaxgpt.sample", "--ckpt={run}", "--tokenizer=gpt2"],
                               "pass the --tokenizer the model was trained with"),
    "sample unknown character": (["jaxgpt.sample", "--ckpt={run}", "--tokenizer={data}", "--prompt=\u2603"],
                                 "is not in this char tokenizer's vocabulary"),
    "evaluate missing data": (["jaxgpt.evaluate", "--ckpt={run}", "--data={root}/nowhere"], "neither a directory"),
    "evaluate bad stride": (["jaxgpt.evaluate", "--ckpt={run}", "--data={data}", "--stride=-3"], "stride=-3"),
    "evaluate bad step": (["jaxgpt.evaluate", "--ckpt={run}", "--data={data}", "--step=first"],
                          "expected latest, best or a step number"),
    "plot missing workdir": (["jaxgpt.plot", "{root}/nowhere"], "metrics.jsonl does not exist"),
    "bridge bad spec": (["torch_bridge", "import", "--from", "onnx:{root}", "--out", "{root}/b"],
                        "expected hf:DIR, nanogpt:FILE or openai:DIR"),
    "bridge missing file": (["torch_bridge", "import", "--from", "hf:{root}/nowhere", "--out", "{root}/b"],
                            "config.json is missing"),
    "bridge pickle with code": (["torch_bridge", "import", "--from", "nanogpt:{evil}", "--out", "{root}/b"],
                                "refusing to load this pickle"),
    "bridge export missing": (["torch_bridge", "export", "--ckpt", "{root}/nowhere", "--to", "hf:{root}/b"],
                              "no such model directory"),
}


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_line(files, name):
    argv, words = CASES[name]
    if argv[0] == "torch_bridge" or "openai:" in " ".join(argv):
        pytest.importorskip("torch")  # torch_bridge's errors; without PyTorch it is a PyTorch error (loader)
    command = [sys.executable, "-m"] + [a.format(**files) for a in argv]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # progress logs may come before
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [line for line in lines if line.startswith("error")] == lines[-1:], result.stderr[-3000:]
    assert lines[-1].startswith("error: ") and words in lines[-1], lines[-1]


def test_the_corrupt_checkpoint_was_not_taken_and_the_run_dir_is_intact(files):
    """After the failed resumes above, the good run still loads; its config was not changed."""
    from jaxgpt import checkpoint
    assert checkpoint.load_model(files["run"]).config.n_embd == 32
    assert json.loads((pathlib.Path(files["run"]) / "checkpoints" / "4" / "config" / "metadata").read_text())


def test_cluster_environments_start_jax_distributed():
    from absl import flags

    from jaxgpt import cli
    if "heartbeat_timeout" not in flags.FLAGS:
        cli.define_distributed_flags()
    flags.FLAGS(["test"])
    none = cli.distributed_options({})
    slurm = cli.distributed_options({"SLURM_NTASKS": "4"})
    one_task = cli.distributed_options({"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"})
    mpi = cli.distributed_options({"OMPI_COMM_WORLD_SIZE": "2"})
    coordinator = cli.distributed_options({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert none is None and one_task is None
    assert slurm == mpi == coordinator == {"heartbeat_timeout_seconds": 60}
    flags.FLAGS(["test", "--coordinator_address=127.0.0.1:9", "--num_processes=2", "--process_id=1"])
    assert cli.distributed_options({}) == dict(heartbeat_timeout_seconds=60, coordinator_address="127.0.0.1:9",
                                               num_processes=2, process_id=1)
    flags.FLAGS.unparse_flags()
