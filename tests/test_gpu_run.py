"""bench/gpu/run.py's machinery (each item in its own process group, timeouts, the budget, what comes back) and
bench/gpu/report.py's tables, on stand-in items that take a second, not on a GPU."""
import json
import os
import sys
import tarfile
import time

import pytest

from bench.gpu import report as gpu_report
from bench.gpu import run as gpu_run

MODEL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "params": 124_475_904}


def step_result(ms: float, loss: float, **extra) -> dict:
    tokens = 65536
    return {"config": "configs/124m.py", "set": {}, "model": {**MODEL, "scan_layers": False}, "batch_size": 32,
            "grad_accum_steps": 2, "tokens_per_step": tokens, "step_ms_median": ms, "tokens_per_s": tokens / ms * 1e3,
            "compile_s": 30.0, "first_step_s": 31.0, "peak_bytes_in_use": 17 * 2**30, "losses": [loss, loss - 0.1],
            "env": {"device_kind": "NVIDIA H200"}, **extra}


def test_report_peer_and_variant_tables(tmp_path):
    """MFU = (6 (N - T d) + 12 L T d) tokens/s / 989 TFLOP/s (H200), the ratio of the sides' tokens/s, and each
    variant against the peer jaxgpt item of its shape."""
    items = {
        "peer:124m-32x2:jaxgpt": {"part": "peer", "status": "ok", "result": step_result(155.1, 10.98)},
        "peer:124m-32x2:torch": {"part": "peer", "status": "ok", "result": {
            **step_result(133.6, 10.99), "side": "torch", "device": "NVIDIA H200", "env": {}}},
        "variant:gpu": {"part": "variant", "status": "ok", "xla_flags": "", "cache_entries_added": 1,
                        "result": step_result(124.08, 10.981, set={"model.kernels": "gpu"})},
        "serve": {"part": "serve", "status": "skipped", "reason": "bench/serve.py has no --json flag"},
    }
    (tmp_path / "results.json").write_text(json.dumps({"started": "t", "smoke": False, "budget_s": 540,
                                                        "elapsed_s": 500, "env": {}, "items": items}))
    text = gpu_report.report(str(tmp_path))
    print("\n" + text)
    T, d, L, N = 1024, 768, 12, 124_475_904
    mfu = (6 * (N - T * d) + 12 * L * T * d) * 65536 / 0.1551 / 989e12
    assert mfu == pytest.approx(0.365, abs=5e-4)  # the 36.6%, with N counted slightly differently
    assert f"| 124m-32x2 | jaxgpt | 155.1 | 422,540 | {mfu:.1%} | 17.0 | 30.0 | 10.9800 | 1 | 0.86x |" in text
    assert "| variant:gpu | 124m-32x2 | kernels=gpu | `-` | 124.1 |" in text and "| 1.250x | 0.001 |" in text
    assert "- serve: skipped (bench/serve.py has no --json flag)" in text


def test_items_budget_timeouts_and_files(tmp_path, monkeypatch):
    """An item that works, one that fails, one past its timeout (killed with its process group, fast), one past the
    budget (skipped, and the next smaller one still runs); results.json, logs.tar.gz and summary.md come back."""
    out, work = tmp_path / "out", tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    out.mkdir()
    ok_json = str(work / "ok.json")
    py = sys.executable
    items = [
        gpu_run.Item("variant:ok", "variant", 1, 60, [py, "-c", f"import json; json.dump({step_result(150.0, 11.0)!r},"
                                                           f" open({ok_json!r}, 'w'))"], result_file=ok_json),
        gpu_run.Item("peer:x:torch", "peer", 1, 60, [py, "-c", "import sys; print('boom'); sys.exit(3)"]),
        gpu_run.Item("variant:slow", "variant", 1, 2, [py, "-c", "import subprocess, sys; subprocess.run(['sleep', "
                                                               "'60']); sys.exit(0)"]),
        gpu_run.Item("variant:huge", "variant", 10_000, 60, [py, "-c", "pass"]),
        gpu_run.Item("variant:small", "variant", 1, 60, [py, "-c", "pass"]),
    ]
    args = type("Args", (), {"out": str(out), "smoke": True})()
    start = time.time()
    gpu_run.run_all(items, args, budget=120, t0=start, work=str(work))
    assert time.time() - start < 60  # the sleeping grandchild went with its group
    results = json.loads((out / "results.json").read_text())["items"]
    assert {n: r["status"] for n, r in results.items()} == {
        "variant:ok": "ok", "peer:x:torch": "failed", "variant:slow": "timeout", "variant:huge": "skipped",
        "variant:small": "ok"}
    assert results["variant:ok"]["result"]["step_ms_median"] == 150.0
    assert results["peer:x:torch"]["exit_code"] == 3 and "boom" in results["peer:x:torch"]["log_tail"]
    assert "budget" in results["variant:huge"]["reason"]
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "results.json", "summary.md"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/variant_slow.log" in tar.getnames() and "logs/ok.json" in tar.getnames()


@pytest.mark.parametrize("smoke", [False, True])
def test_plan_runs_every_part_in_priority_order(smoke, tmp_path):
    args = type("Args", (), {"smoke": smoke, "serve_flags": ""})()
    names = [i.name for i in gpu_run.plan(args, str(tmp_path))]
    parts = [i.part for i in gpu_run.plan(args, str(tmp_path))]
    assert names[:3] == ["peer:124m-32x2:jaxgpt", "profile:124m", "peer:124m-32x2:torch"]
    assert {"peer", "profile", "variant", "pytest", "serve", "train"} == set(parts)
    assert parts.index("pytest") < parts.index("serve") < parts.index("train")
    assert len(names) == len(set(names))
    assert [i.name for i in gpu_run.select(gpu_run.plan(args, str(tmp_path)), "peer:*", "*torch*")] == \
        [n for n in names if n.startswith("peer:") and "torch" not in n]
