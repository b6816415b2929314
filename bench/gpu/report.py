"""Markdown tables for bench/RESULTS.md from what a device run of bench/gpu/run.py brought back, on any CPU.

    python -m bench.gpu.report OUT            (OUT: the folder with results.json and the profile-*.tar.gz files)

Tables: jaxgpt against PyTorch per shape (ms/step, tokens/s, MFU, peak memory, compile or first-step time, the first
step's loss, and the tokens/s ratio; a shape run in two rounds shows each side's mean of the rounds' medians);
the variants against the peer jaxgpt item of their shape (the profiles are variants too: command buffers off);
device time by kind for each profile (bench/gpu/trace_table.py); the GPU-marked tests; the serving benchmark's JSON;
the training runs; and every item that failed, timed out or was skipped, with why.

MFU: jaxgpt/metrics.py's FLOPs per token (6N + 12 L T d, N without the position embeddings; the same N for nanoGPT,
whose parameters are jaxgpt's) times tokens/s over the device's dense bf16 peak in jaxgpt/metrics.py's table.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import sys

from bench.gpu import trace_table


def flops_per_token(model: dict) -> float:
    from jaxgpt.metrics import flops_per_token as fpt  # jax is imported, never initialised: no device is touched
    T, C = model["block_size"], model["n_embd"]
    return fpt(model["params"], T * C, model["n_layer"], T, C)


def peak_flops(kind: str) -> float | None:
    from jaxgpt.metrics import PEAK_BF16_FLOPS
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in (kind or "").lower()), None)


def device_kind(results: dict) -> str:
    for record in results["items"].values():
        r = record.get("result", {})
        if r.get("env", {}).get("device_kind"):
            return r["env"]["device_kind"]
        if r.get("side") == "torch" and r.get("device"):
            return r["device"]
    return "?"


def mfu(r: dict, peak: float | None) -> float | None:
    return flops_per_token(r["model"]) * r["tokens_per_s"] / peak if peak and r.get("tokens_per_s") else None


def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def peer_table(results: dict, peak) -> list[str]:
    items = results["items"]
    shapes = sorted({n.split(":")[1] for n in items if n.startswith("peer:")})
    lines = ["| shape | side | ms/step | tok/s | MFU | peak GiB | compile / first step s | step-1 loss | rounds |"
             " jaxgpt / PyTorch tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        sides = {}
        for side in ("jaxgpt", "torch"):
            runs = [items[n]["result"] for n in items if n.split("#")[0] == f"peer:{shape}:{side}"
                    and items[n].get("status") == "ok" and "result" in items[n]]
            if runs:
                sides[side] = runs
        ratio = (statistics.mean(r["tokens_per_s"] for r in sides["jaxgpt"])
                 / statistics.mean(r["tokens_per_s"] for r in sides["torch"])) if len(sides) == 2 else None
        for side, runs in sides.items():
            r = runs[0]
            ms = statistics.mean(x["step_ms_median"] for x in runs)
            tok = statistics.mean(x["tokens_per_s"] for x in runs)
            compile_s = r.get("compile_s", r.get("first_step_s"))
            lines.append(f"| {shape} | {'jaxgpt' if side == 'jaxgpt' else 'nanoGPT (PyTorch)'} | {ms:.1f} | "
                         f"{tok:,.0f} | {fmt(mfu({**r, 'tokens_per_s': tok}, peak), '.1%')} | "
                         f"{fmt(r.get('peak_bytes_in_use') and r['peak_bytes_in_use'] / 2**30, '.1f')} | "
                         f"{fmt(compile_s, '.1f')} | {r['losses'][0]:.4f} | {len(runs)} | "
                         f"{fmt(ratio, '.2f') + 'x' if side == 'jaxgpt' and ratio else ''} |")
    return lines


def variant_table(results: dict, peak) -> list[str]:
    items = results["items"]
    lines = ["| variant | shape | config fields | XLA_FLAGS | ms/step | tok/s | MFU | peak GiB | compile s |"
             " new cache entries | vs peer jaxgpt | step-1 loss diff |", "|---" * 12 + "|"]
    for name, record in items.items():
        if record.get("part") not in ("variant", "profile") or "result" not in record:
            continue
        r = record["result"]
        shape = f"{os.path.splitext(os.path.basename(r['config']))[0]}-{r['batch_size']}x{r['grad_accum_steps']}"
        base = baseline(items, r)
        vs = fmt(base and r["tokens_per_s"] / base["tokens_per_s"], ".3f")
        diff = fmt(base and abs(r["losses"][0] - base["losses"][0]), ".2g")
        if base and r["model"]["scan_layers"] != base["model"]["scan_layers"]:
            diff += " (other init)"  # stacked layers draw their weights from per-layer keys: not the same model
        lines.append(f"| {name} | {shape} | {fields(r.get('set', {}))} | `{record.get('xla_flags') or '-'}` | "
                     f"{r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | {fmt(mfu(r, peak), '.1%')} | "
                     f"{fmt(r.get('peak_bytes_in_use') and r['peak_bytes_in_use'] / 2**30, '.1f')} | "
                     f"{r['compile_s']:.1f} | {record.get('cache_entries_added', '-')} | {vs}x | {diff} |")
    return lines


def fields(sets: dict) -> str:
    return ", ".join(f"{k.removeprefix('model.')}={v}" for k, v in sets.items()) or "-"


def baseline(items: dict, r: dict) -> dict | None:
    """The first-round peer jaxgpt result of the same config and batch."""
    for name, record in items.items():
        b = record.get("result", {})
        if name.startswith("peer:") and name.endswith(":jaxgpt") and record.get("status") == "ok" \
                and b.get("config") == r.get("config") and b.get("batch_size") == r.get("batch_size") \
                and b.get("grad_accum_steps") == r.get("grad_accum_steps"):
            return b
    return None


def profile_sections(out: str) -> list[str]:
    lines = []
    for bundle in sorted(glob.glob(os.path.join(out, "profile-*.tar.gz"))):
        s = trace_table.summarize(bundle, top=15)
        s["by_scope_and_kind"] = dict(list(s["by_scope_and_kind"].items())[:12])
        lines += [f"### {os.path.basename(bundle)}", "", trace_table.markdown(s), ""]
    return lines


def other_parts(results: dict) -> list[str]:
    items, lines = results["items"], []
    for name, record in items.items():
        if record.get("status") == "skipped" or record.get("part") in ("peer", "variant", "profile"):
            continue
        if record.get("part") == "pytest":
            tests = record.get("tests", {"counts": {}, "cases": {}})
            counts = ", ".join(f"{n} {k}" for k, n in tests["counts"].items() if n) or "no test carries the marker"
            lines.append(f"- `pytest -m gpu`: {record['status']}: {counts}, in {record['seconds']} s")
            lines += [f"  - {t}: {c['outcome']} {c['message'][:200]}" for t, c in tests["cases"].items()
                      if c["outcome"] in ("failed", "error")]
        elif record.get("part") == "train" and "result" in record:
            r = record["result"]
            lines.append(f"- {name}: {record['status']}: {r.get('steps')} steps of {r.get('tokens_per_step')} tokens, "
                         f"loss {fmt(r.get('loss_first10_mean'), '.3f')} (first 10) -> "
                         f"{fmt(r.get('loss_last10_mean'), '.3f')} (last 10), "
                         f"{fmt(r.get('tokens_per_s_median'), ',.0f')} tok/s, MFU {fmt(r.get('mfu_median'), '.1%')}, "
                         f"{fmt(r.get('wall_s'), '.0f')} s wall")
        elif record.get("part") == "serve":
            lines.append(f"- serve: {record['status']} in {record['seconds']} s: "
                         f"`{json.dumps(record.get('result', {}))[:1500]}`")
    return lines


def problems(results: dict) -> list[str]:
    lines = []
    for name, record in results["items"].items():
        if record.get("status") == "ok":
            continue
        why = record.get("reason") or record.get("result", {}).get("error") or \
            (record.get("log_tail", "").strip().splitlines() or [""])[-1][:300]
        lines.append(f"- {name}: {record['status']}" + (f" ({why})" if why else ""))
    return lines


def report(out: str) -> str:
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    kind = device_kind(results)
    peak = peak_flops(kind)
    statuses = [r.get("status") for r in results["items"].values()]
    versions = results.get("env", {}).get("versions", {})
    head = [f"## GPU run {results['started']}{' (SMOKE: figures mean nothing)' if results['smoke'] else ''}", "",
            f"Device: {kind}; peak for MFU {fmt(peak and peak / 1e12, '.0f')} TFLOP/s; "
            f"{', '.join(f'{k} {v}' for k, v in versions.items())}; Python {results.get('env', {}).get('python')}.",
            f"Items: {statuses.count('ok')} ok, {statuses.count('failed')} failed, {statuses.count('timeout')} timed "
            f"out, {statuses.count('skipped')} skipped, of {len(statuses)}; {results.get('elapsed_s')} s of a "
            f"{results['budget_s']:.0f} s budget.", ""]
    sections = [("### jaxgpt against nanoGPT's PyTorch step", peer_table(results, peak)),
                ("### Variants of the jaxgpt step", variant_table(results, peak)),
                ("### Tests, serving, training", other_parts(results)),
                ("### Failed, timed out or skipped", problems(results))]
    body = []
    for title, lines in sections:
        empty = not lines or (lines[0].startswith("|") and len(lines) == 2)  # a table's header alone
        body += [title, "", *(["(none)"] if empty else lines), ""]
    return "\n".join(head + body + profile_sections(out)).rstrip()


def main():
    if len(sys.argv) != 2 or not os.path.exists(os.path.join(sys.argv[1], "results.json")):
        sys.exit("error: usage: python -m bench.gpu.report OUT (a folder holding results.json from bench/gpu/run.py)")
    print(report(sys.argv[1]))


if __name__ == "__main__":
    main()
