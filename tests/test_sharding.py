"""Scale-out on CPU devices: every mesh computes what one device does; checkpoints restore across meshes;
two jax.distributed processes match one process; a dead peer ends the run in bounded time."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import compare
import corpus
import jax
import numpy as np
import pytest

from jaxgpt import prepare

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6
BF16_ATOL = 3e-2  # bf16 rounds at ~4e-3 relative; meshes reduce in another order, and six steps compound it


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    text = corpus.write(tmp_path_factory.mktemp("text") / "corpus_100k.txt", 100_000)
    return prepare.prepare(str(tmp_path_factory.mktemp("char")), dataset="text", input=text, tokenizer="char")


def worker(jobs, devices, *distributed, background=False):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": str(REPO)}  # the checkout under test, whatever else is installed
    command = [sys.executable, "tests/mesh_worker.py", json.dumps(jobs), *map(str, distributed)]
    if background:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def job(tmp, name, data_dir, mesh, max_steps=STEPS, workdir=None, **extra):
    return dict(workdir=str(tmp / (workdir or name)), data_dir=data_dir, mesh=mesh, max_steps=max_steps,
                out=str(tmp / f"{name}.npz"), **extra)


def assert_same_run(a, b, atol=1e-5):
    """The same losses and weights, but for the entries whose gradient is pure noise (tests/compare.py)."""
    a, b = np.load(a), np.load(b)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=0, atol=atol)
    compare.assert_weights_close({k: a[k] for k in a.files if k != "losses"},
                                 {k: b[k] for k in b.files if k != "losses"}, atol)


MESHES = {"data8": [8, 1, 1], "data2_fsdp4": [2, 4, 1], "data2_fsdp2_tensor2": [2, 2, 2], "tensor4": [2, 1, 4]}
SPLITS = {  # parameter -> the mesh axis each of its dimensions is split over (when that axis is larger than 1)
    "wte": ("tensor", "fsdp"), "wpe": (None, "fsdp"), "ln_1": ("fsdp",), "ln_2": ("fsdp",), "ln_f": ("fsdp",),
    "c_attn.kernel": ("fsdp", None, "tensor", None), "c_attn.bias": (None, "tensor", None),
    "attn.c_proj.kernel": ("tensor", None, "fsdp"),
    "q_proj.kernel": ("fsdp", "tensor", None), "q_proj.bias": ("tensor", None),
    "k_proj.kernel": ("fsdp", None, None), "v_proj.kernel": ("fsdp", None, None),  # 2 kv heads: not split 4 ways
    "c_gate.kernel": ("fsdp", "tensor"), "lm_head": ("tensor", "fsdp"),
    "c_fc.kernel": ("fsdp", "tensor"), "c_fc.bias": ("tensor",), "mlp.c_proj.kernel": ("tensor", "fsdp"),
    "c_proj.bias": ("fsdp",),
}


def assert_shardings(specs_file, mesh, count=4 + 12 * 2):
    """Every parameter is split as SPLITS says over the mesh [data, fsdp, tensor]: its actual sharding."""
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh))
    specs = json.loads(pathlib.Path(specs_file).read_text())
    for key, spec in specs.items():
        name = ".".join(re.findall(r"'(\w+)'", key))
        kind = next(k for k in SPLITS if k in name)
        assert spec == [a if a and sizes[a] > 1 else None for a in SPLITS[kind]], (key, spec, mesh)
    assert len(specs) == count  # GPT-2: wte, wpe, ln_f scale and bias; 12 per block


@pytest.mark.slow
def test_every_mesh_and_resharded_restores_match_one_device(data_dir, tmp_path):
    half = STEPS // 2
    worker([job(tmp_path, name, data_dir, mesh) for name, mesh in MESHES.items()] + [
        # a checkpoint saved on one mesh continues on another mesh ...
        job(tmp_path, "first_half", data_dir, [2, 2, 2], half, workdir="remeshed"),
        job(tmp_path, "remeshed", data_dir, [1, 4, 2]),
        job(tmp_path, "first_half_for_one", data_dir, [2, 2, 2], half, workdir="to_one_device"),
    ], devices=8)
    # ... and on a single device
    worker([job(tmp_path, "one_device", data_dir, [1, 1, 1]), job(tmp_path, "to_one_device", data_dir, [1, 1, 1])],
           devices=1)
    for name in [*MESHES, "remeshed", "to_one_device"]:
        assert_same_run(tmp_path / "one_device.npz", tmp_path / f"{name}.npz")
    for name, mesh in [*MESHES.items(), ("remeshed", [1, 4, 2]), ("one_device", [1, 1, 1])]:
        assert_shardings(tmp_path / f"{name}.npz.specs.json", mesh)


LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_head=2, tie_embeddings=False, bias=False)
SPEEDRUN = dict(model=dict(qk_norm=True, mlp="relu2", logit_softcap=30.0, zero_init_proj=True, tie_embeddings=False,
                           value_embeds=1, positions="rope"), optim=dict(name="muon", schedule="trapezoid"))


def all_gather_shapes(hlo_file) -> list[list[int]]:
    text = pathlib.Path(hlo_file).read_text()
    found = re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", text)
    return [[int(d) for d in dims.split(",") if d] for dims in found]


@pytest.mark.slow
def test_modern_blocks_and_bf16_on_a_mesh_match_one_device(data_dir, tmp_path):
    """Also the speedrun's blocks and Muon (its Newton-Schulz over FSDP- and tensor-split matrices) on a mixed
    mesh."""
    worker([job(tmp_path, "llama_tensor4", data_dir, [2, 1, 4], model=LLAMA),
            job(tmp_path, "bf16_mixed", data_dir, [2, 2, 2], model={"dtype": "bfloat16"}),
            job(tmp_path, "speedrun_mixed", data_dir, [2, 2, 2], **SPEEDRUN),
            job(tmp_path, "gpt2_hlo", data_dir, [2, 1, 4], hlo=str(tmp_path / "gpt2.hlo")),
            job(tmp_path, "llama_hlo", data_dir, [2, 1, 4], model=LLAMA, hlo=str(tmp_path / "llama.hlo"))], devices=8)
    worker([job(tmp_path, "llama_one", data_dir, [1, 1, 1], model=LLAMA),
            job(tmp_path, "bf16_one", data_dir, [1, 1, 1], model={"dtype": "bfloat16"}),
            job(tmp_path, "speedrun_one", data_dir, [1, 1, 1], **SPEEDRUN)], devices=1)
    assert_same_run(tmp_path / "llama_one.npz", tmp_path / "llama_tensor4.npz")
    assert_same_run(tmp_path / "speedrun_one.npz", tmp_path / "speedrun_mixed.npz")
    assert_shardings(tmp_path / "llama_tensor4.npz.specs.json", [2, 1, 4], count=3 + 9 * 2)
    a, b = np.load(tmp_path / "bf16_one.npz"), np.load(tmp_path / "bf16_mixed.npz")
    print(f"\nbf16, mesh [2, 2, 2] vs one device: max |loss diff| {np.abs(a['losses'] - b['losses']).max():.3g}, "
          f"max |param diff| {max(np.abs(a[k] - b[k]).max() for k in a.files if k != 'losses'):.3g}")
    assert_same_run(tmp_path / "bf16_one.npz", tmp_path / "bf16_mixed.npz", atol=BF16_ATOL)
    # tensor parallel splits whole heads: the q/k/v activations are never gathered (B, T, [3,] heads, head_dim)
    for name in ("gpt2", "llama"):
        gathered = [s for s in all_gather_shapes(tmp_path / f"{name}.hlo") if s[-2:] == [4, 16] or s[-1:] == [192]]
        assert not gathered, (name, gathered)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(data_dir, tmp_path):
    jobs = [job(tmp_path, "two_processes", data_dir, [-1, 1, 1])]
    address = f"127.0.0.1:{free_port()}"
    procs = [worker(jobs, 2, address, 2, i, background=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    worker([job(tmp_path, "one_process", data_dir, [-1, 1, 1])], devices=4)
    assert_same_run(tmp_path / "one_process.npz", tmp_path / "two_processes.npz")
    assert (tmp_path / "two_processes" / "checkpoints" / str(STEPS)).is_dir()


@pytest.mark.slow
def test_a_dead_process_ends_the_other_in_bounded_time(data_dir, tmp_path):
    jobs = [job(tmp_path, "doomed", data_dir, [-1, 1, 1], max_steps=100_000)]
    address = f"127.0.0.1:{free_port()}"
    survivor, victim = (worker(jobs, 2, address, 2, i, background=True) for i in range(2))
    log = []
    for line in survivor.stdout:  # wait until the two train together
        log.append(line)
        if line.startswith("step 3:"):
            break
    victim.send_signal(signal.SIGKILL)
    rest, _ = survivor.communicate(timeout=120)  # it must end by itself (heartbeat_timeout 10 s), not hang
    assert survivor.returncode != 0
    assert "another task died" in rest or "unhealthy" in rest, "".join(log)[-2000:] + rest[-3000:]


def cli_train(workdir, data_dir, max_steps, devices, *distributed):
    """`python -m jaxgpt.train` as a user launches it, on `devices` forced CPU devices."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, "-m", "jaxgpt.train", "--config=configs/tiny.py", f"--workdir={workdir}",
               f"--config.data.dir={data_dir}", f"--config.max_steps={max_steps}", "--config.optim.decay_steps=8",
               "--config.eval_every=4", "--config.checkpoint_every=2", "--config.sample_tokens=8",
               "--config.log_every=1", *distributed]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*procs):
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    return outputs


@pytest.mark.slow
def test_two_cli_processes_resume_and_match_one_process(data_dir, tmp_path):
    """Two `jaxgpt.train` processes (2 CPU devices each, --coordinator_address/--num_processes/--process_id) train
    past a checkpoint and an evaluation with a sample, stop, are launched again and resume; the result equals one
    4-device process running the same 8 steps."""
    from flax import nnx

    from jaxgpt import checkpoint

    def two(max_steps):
        address = f"--coordinator_address=127.0.0.1:{free_port()}"
        return finish(*(cli_train(tmp_path / "two", data_dir, max_steps, 2, address, "--num_processes=2",
                                  f"--process_id={i}") for i in range(2)))
    first = two(5)
    assert "step 4: val loss" in first[0] and "step 4: val loss" not in first[1]  # process 0 alone speaks
    second = two(8)
    assert "at step 5" in second[0] and "step 5: loss" not in second[0] and "step 8: loss" in second[0]
    finish(cli_train(tmp_path / "one", data_dir, 8, 4))
    one, two = (checkpoint.load_model(str(tmp_path / d)) for d in ("one", "two"))
    compare.assert_weights_close(*(compare.flat(nnx.state(m, nnx.Param).to_pure_dict()) for m in (one, two)), atol=1e-6)
    tokens = jax.random.randint(jax.random.key(1), (4, one.config.block_size), 0, one.config.n_valid_vocab)
    np.testing.assert_allclose(np.asarray(one(tokens)[0]), np.asarray(two(tokens)[0]), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(data_dir, tmp_path):
    """SIGTERM to process 1 only: JAX's preemption service tells process 0, both stop after the same call, the one
    checkpoint (orbax commits a step once every process wrote its part) is at the step process 0 reports, and both
    exit with the requeue status."""
    from jaxgpt import preemption
    address = f"--coordinator_address=127.0.0.1:{free_port()}"
    procs = [cli_train(tmp_path / "two", data_dir, 2000, 2, address, "--num_processes=2", f"--process_id={i}",
                       "--config.checkpoint_every=2000", "--config.eval_every=2000", "--config.steps_per_call=3")
             for i in range(2)]
    for line in procs[0].stdout:  # both train
        if line.startswith("step 12:"):
            break
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [preemption.EXIT_STATUS] * 2, outputs[1][-3000:]
    reached = int(re.search(r"stopped at step (\d+), saved a checkpoint at step \1 in ", outputs[0]).group(1))
    assert reached % 3 == 0 and 12 <= reached < 2000  # after a whole call of 3 steps
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == [str(reached)]  # no temporaries


def test_abstract_batch_is_int32_sharded_over_the_batch_axes():
    """What a step is compiled from ahead of data: inputs and targets of the shape, split at batch_axis only."""
    from jax.sharding import PartitionSpec

    from jaxgpt import sharding
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    batch = sharding.abstract_batch(mesh, (1, 4, 2, 8), batch_axis=2)
    assert sorted(batch) == ["inputs", "targets"]
    for x in batch.values():
        assert x.shape == (1, 4, 2, 8) and x.dtype == np.int32
        assert x.sharding.spec == PartitionSpec(None, None, sharding.RULES["batch"], None)
        assert x.sharding == sharding.batch_sharding(mesh, 4, batch_axis=2)
