"""bench/gpu/trace_table.py: device time by kind from a real CPU trace of jaxgpt's train step (captured here), and
from a GPU-like trace written here with the names a CUDA trace carries (cuBLAS/nvjet/Triton GEMMs, cuDNN attention, XLA
fusions, copies, NCCL) and the derived lines it must not count twice."""
import gzip
import json
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from bench.gpu import trace_table
from jaxgpt import loader, sharding
from jaxgpt.step import fresh_state, make_steps


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    """Two steps of configs/tiny.py's train step (batch 4 x 32, 2 micro-batches) under jax.profiler, with the
    compiled step's HLO beside the trace, as bench/gpu/check.py --profile writes them."""
    from configs import tiny
    config = tiny.get_config()
    config.batch_size, config.grad_accum_steps = 4, 2
    mc = loader.model_config(config, 65)
    mesh = sharding.make_mesh(config.mesh)
    steps = make_steps(config, mc, mesh)
    state = fresh_state(steps, mc, config.seed)
    tokens = np.random.default_rng(0).integers(0, 65, (1, 2, 4, 33), dtype=np.int32)
    batch = sharding.host_batch_to_global({"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}, mesh, batch_axis=2)
    compiled = steps.train_steps.lower(state, batch).compile()
    state = jax.block_until_ready(compiled(state, batch)[0])  # warm
    out = tmp_path_factory.mktemp("profile")
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with jax.profiler.trace(str(out / "log"), create_perfetto_trace=True, profiler_options=options):
        for _ in range(2):
            state = jax.block_until_ready(compiled(state, batch)[0])
    with gzip.open(out / "log" / "hlo.txt.gz", "wt") as f:
        f.write(compiled.as_text())
    return out / "log"


def test_cpu_trace_of_the_train_step(cpu_profile):
    s = trace_table.summarize(str(cpu_profile))
    events, _, _ = trace_table.load(str(cpu_profile))
    ran = [e for e in events if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == "jit_train_steps"]
    print("\n" + trace_table.markdown(s))
    assert s["backend"] == "cpu" and s["hlo"] and s["steps"] == 2  # two runs of the step, counted from run ids
    hlo = trace_table.parse_hlo(trace_table.load(str(cpu_profile))[1])
    ops = [e for e in ran if hlo[e["args"]["hlo_op"]]["opcode"] not in ("while", "call")]
    assert len(ops) < len(ran) and s["events"] == len(ops)  # every op the step ran once; loops' bodies, not loops
    total = sum(e["dur"] for e in ops) / 2 / 1e3
    assert sum(v["ms_per_step"] for v in s["by_kind"].values()) == pytest.approx(s["device_ms_per_step"])
    assert s["device_ms_per_step"] == pytest.approx(total)
    assert {"matmul", "optimizer", "fusion"} <= set(s["by_kind"])  # step.py's named scope reaches the profile
    assert {"optimizer", "loss", "attention"} <= set(s["by_scope"])  # and ops/__init__.py's
    assert s["by_phase"]["backward"]["ms_per_step"] > 0 and s["by_phase"]["optimizer"]["ms_per_step"] > 0


ENTRY_OPS = [  # (instruction, its right-hand side, the op_name its metadata carries): one line each in the HLO
    ("gemm_fusion_dot.5", 'bf16[64,64]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_gemm, backend_config='
                          '{"fusion_backend_config":{"kind":"__triton_gemm"}}', "while/body/jvp(loss)/dot_general"),
    ("custom-call.3", '(bf16[64,64]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"',
     "while/body/transpose(jvp())/dot_general"),
    ("custom-call.7", '(bf16[2,64,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), '
                      'custom_call_target="__cudnn$fmhaSoftmax"', "while/body/jvp(attention)/dot_product_attention"),
    ("loop_add_fusion.3", "f32[8]{0} fusion(%param.1), kind=kLoop, calls=%fused_add", "while/body/jvp()/add"),
    ("input_reduce_fusion.2", "f32[8]{0} fusion(%param.1), kind=kInput, calls=%fused_add", "optimizer/mul"),
    ("loop_transpose_fusion", "f32[8]{0} fusion(%param.1), kind=kLoop, calls=%fused_add",
     "while/body/jvp(attention)/slice"),
    ("while.1", "f32[8]{0} while(%param.1), condition=%cond, body=%body", "while"),
]
HLO = "\n".join([
    "HloModule jit_train_steps, entry_computation_layout={(f32[8]{0})->f32[8]{0}}", "",
    "%fused_gemm (p0: bf16[64,64], p1: bf16[64,64]) -> bf16[64,64] {",
    "  %p0 = bf16[64,64]{1,0} parameter(0)",
    "  %p1 = bf16[64,64]{1,0} parameter(1)",
    "  ROOT %dot.1 = bf16[64,64]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
    "}", "",
    "%fused_add (p0: f32[8]) -> f32[8] {",
    "  %p0 = f32[8]{0} parameter(0)",
    "  ROOT %add.1 = f32[8]{0} add(%p0, %p0)",
    "}", "",
    "ENTRY %main.1 (param.1: f32[8]) -> f32[8] {",
    "  %param.1 = f32[8]{0} parameter(0)",
    *(f'  %{name} = {rhs}, metadata={{op_name="jit(train_steps)/{op_name}"}}' for name, rhs, op_name in ENTRY_OPS),
    "  ROOT %copy.1 = f32[8]{0} copy(%param.1)",
    "}"])
GPU = 5  # the device pid; 900 is the host
KERNELS = [  # (kernel name, hlo_op, microseconds per step, the kind it must get)
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "custom-call.3", 400.0, "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "", 300.0, "matmul"),
    ("gemm_fusion_dot_5", "gemm_fusion_dot.5", 250.0, "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0", "custom-call.7", 200.0, "attention"),
    ("loop_add_fusion_3", "loop_add_fusion.3", 50.0, "fusion"),
    ("input_reduce_fusion_2", "input_reduce_fusion.2", 40.0, "optimizer"),
    ("loop_transpose_fusion", "loop_transpose_fusion", 30.0, "copy/transpose"),
    ("MemcpyD2D", "copy.1", 20.0, "copy/transpose"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", "", 15.0, "collective"),
    ("some_other_kernel", "", 5.0, "other"),
]


def gpu_like_trace(steps: int = 2) -> dict:
    """Process and thread names as xprof writes them; kernels on two streams, plus an "XLA Ops" line over the same
    time and host events, neither of which is device work to count."""
    events = [{"ph": "M", "pid": GPU, "name": "process_name", "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "pid": 900, "name": "process_name", "args": {"name": "/host:CPU"}},
              {"ph": "M", "pid": GPU, "tid": 7, "name": "thread_name", "args": {"name": "Stream #7(Compute)"}},
              {"ph": "M", "pid": GPU, "tid": 13, "name": "thread_name", "args": {"name": "Stream #13(MemcpyD2D)"}},
              {"ph": "M", "pid": GPU, "tid": 2001, "name": "thread_name", "args": {"name": "XLA Ops"}},
              {"ph": "M", "pid": 900, "tid": 1, "name": "thread_name", "args": {"name": "python"}}]
    ts = 0.0
    for _ in range(steps):
        for name, hlo_op, dur, _kind in KERNELS:
            args = {"hlo_module": "jit_train_steps", **({"hlo_op": hlo_op} if hlo_op else {})}
            tid = 13 if name.startswith("Memcpy") else 7
            events.append({"ph": "X", "pid": GPU, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args})
            events.append({"ph": "X", "pid": GPU, "tid": 2001, "ts": ts, "dur": dur, "name": hlo_op or name})
            events.append({"ph": "X", "pid": 900, "tid": 1, "ts": ts, "dur": 3.0, "name": "cuLaunchKernel",
                           "args": {"hlo_op": hlo_op}})
            ts += dur + 1.0
    return {"displayTimeUnit": "ns", "traceEvents": events}


@pytest.fixture
def gpu_profile(tmp_path):
    with gzip.open(tmp_path / "trace.json.gz", "wt") as f:
        json.dump(gpu_like_trace(), f)
    with gzip.open(tmp_path / "hlo.txt.gz", "wt") as f:
        f.write(HLO)
    (tmp_path / "analysis.json").write_text(json.dumps({"profile_steps": 2}))
    return tmp_path


def test_gpu_like_trace_by_kind(gpu_profile):
    s = trace_table.summarize(str(gpu_profile))
    print("\n" + trace_table.markdown(s))
    expected = {}
    for _, _, dur, kind in KERNELS:
        expected[kind] = expected.get(kind, 0.0) + dur / 1e3
    assert s["backend"] == "gpu" and s["steps"] == 2  # no run ids here: analysis.json's profile_steps
    assert {k: v["ms_per_step"] for k, v in s["by_kind"].items()} == pytest.approx(expected)
    assert s["device_ms_per_step"] == pytest.approx(sum(d for _, _, d, _ in KERNELS) / 1e3)
    assert s["by_scope"]["optimizer"]["ms_per_step"] == pytest.approx(0.040)
    assert s["by_scope_and_kind"]["attention / copy/transpose"]["ms_per_step"] == pytest.approx(0.030)
    assert s["by_phase"]["backward"]["ms_per_step"] == pytest.approx(0.400)
    assert s["top"][0]["kind"] == "matmul" and s["top"][0]["ms_per_step"] == pytest.approx(0.400)


def test_gpu_like_trace_without_hlo_by_names_alone(gpu_profile):
    """Kernel names alone: the Triton GEMM and the optimizer's reduction lose their HLO, the rest keeps its kind."""
    (gpu_profile / "hlo.txt.gz").unlink()
    s = trace_table.summarize(str(gpu_profile), steps=2)
    kinds = {k: v["ms_per_step"] for k, v in s["by_kind"].items()}
    assert kinds["attention"] == pytest.approx(0.2) and kinds["collective"] == pytest.approx(0.015)
    assert kinds["matmul"] == pytest.approx(0.95)  # gemm_fusion_dot_5 by its name
    assert "optimizer" not in kinds and kinds["fusion"] == pytest.approx(0.09)


def test_tarball_and_cli(gpu_profile, tmp_path):
    """bench/gpu/run.py brings profiles back as tarballs; the CLI reads them as it reads a directory."""
    tarball = tmp_path / "profile-x.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in ("trace.json.gz", "hlo.txt.gz", "analysis.json"):
            tar.add(gpu_profile / name, arcname=f"profile-x/{name}")
    assert trace_table.summarize(str(tarball))["by_kind"] == trace_table.summarize(str(gpu_profile))["by_kind"]
    out = subprocess.run([sys.executable, "-m", "bench.gpu.trace_table", str(tarball), "--json",
                          str(tmp_path / "s.json")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "| matmul | 3 | 0.950 |" in out.stdout
    assert json.loads((tmp_path / "s.json").read_text())["steps"] == 2
    missing = subprocess.run([sys.executable, "-m", "bench.gpu.trace_table", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error:") and "\n" not in \
        missing.stderr.strip()
