"""Device time of a profiled jaxgpt step by kind, from a jax.profiler trace, on any CPU.

    python -m bench.gpu.trace_table PROFILE [--hlo=HLO] [--steps=N] [--top=25] [--json=OUT]

PROFILE: a perfetto trace (`perfetto_trace.json.gz` of `jax.profiler.trace(..., create_perfetto_trace=True)`, or
`*.trace.json.gz`), a directory holding one (a profile log dir; bench/gpu/check.py --profile's DIR), or a
profile-*.tar.gz that bench/gpu/run.py brings back. The optimized HLO text (hlo.txt or hlo.txt.gz beside the trace
or in the directory given, or --hlo) names what each op is and which named scope it came from; without it, kernel
and op names alone decide.

Which events count: on a GPU, the kernels, copies and memsets on the device's CUDA streams (pids named
/device:GPU:N, threads whose name holds "Stream"; the derived "XLA Ops"/"XLA Modules" lines would count them twice,
and are left out by name where no thread is a stream); on a
CPU, the XLA ops the runtime ran (host events carrying an hlo_op), control flow (while, call, conditional) left out
since their bodies' ops are counted.

Kinds, the first that applies: collective (NCCL, all-reduce, ...), attention (cuDNN/flash attention kernels, a
fused-attention custom call), matmul (GEMM kernels: cuBLAS/cuBLASLt/CUTLASS/nvjet/XLA's Triton GEMMs; a custom call
to a BLAS library; a fusion whose computation holds a dot), optimizer (any other op under jax.named_scope
"optimizer", which jaxgpt/step.py puts around the update), copy/transpose (memcpy, memset, copy, transpose,
concatenate, slices and pads, and fusions named for them), fusion (the other fused elementwise and reduction
kernels), other. Also by phase (forward, backward, optimizer: from the ops' names, "transpose(jvp(...))" being the
backward pass) and by scope (optimizer, loss, attention, other), when the HLO's metadata or the events name them.

Per step: the events' time over the number of steps, which is the number of runs (run_id) of the module that took
the most time when the events carry run ids, else --steps, else analysis.json's profile_steps beside the trace, else 1.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import io
import json
import os
import re
import sys
import tarfile

KINDS = ("matmul", "attention", "fusion", "copy/transpose", "optimizer", "collective", "other")
SCOPES = ("optimizer", "loss", "attention")
CONTROL_FLOW = ("while", "call", "conditional", "async-start", "async-done")
DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Framework", "TensorFlow", "Source", "Launch Stats", "XLA TraceMe")
PATTERNS = {  # kind -> a regex over kernel or op names, lowercased
    "collective": r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]scatter|collective[-_]permute|all[-_]to[-_]all",
    "attention": r"fmha|flash|sdpa|_attn|attention",
    "matmul": r"gemm|xmma|cutlass|nvjet|cublas|wgmma|hgmma|\bdot\b|^dot|matmul|_mm_|sm\d\d_xmma",
    "copy/transpose": r"(^|\s)memcpy|(^|\s)memset|copy|transpose|concatenate|dynamic[-_]update[-_]slice|(^|_)slice"
                      r"|(^|_)pad(_|\b|$)",
    "fusion": r"fusion|reduce|convert|add|multiply|exp|select|broadcast|divide|subtract|tanh|rsqrt|negate|maximum"
              r"|compare|iota",
}


# ---- reading the profile

def load(path: str, hlo_path: str | None = None) -> tuple[list, str | None, dict]:
    """PROFILE -> (trace events, HLO text or None, analysis.json's dict or {})."""
    if path.endswith((".tar.gz", ".tgz")):
        return _from_tarball(path, hlo_path)
    folders = [path] if os.path.isdir(path) else []
    if os.path.isdir(path):
        traces = sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
                        + glob.glob(os.path.join(path, "**", "trace.json.gz"), recursive=True)
                        + glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True))
        if not traces:
            sys.exit(f"error: no perfetto trace (*trace.json.gz) under {path}")
        path = traces[0]
    folders.insert(0, os.path.dirname(path))  # beside the trace, then the directory given

    def beside(*names):
        return next((os.path.join(d, n) for d in folders for n in names if os.path.exists(os.path.join(d, n))), None)
    hlo_path = hlo_path or beside("hlo.txt.gz", "hlo.txt")
    analysis = beside("analysis.json")
    return (_events(_read(path)), _read(hlo_path).decode() if hlo_path else None,
            json.loads(_read(analysis)) if analysis else {})


def _from_tarball(path: str, hlo_path: str | None):
    with tarfile.open(path) as tar:
        files = {os.path.basename(m.name): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    trace = next((files[n] for n in files if n.endswith("trace.json.gz") or n.endswith("trace.json")), None)
    if trace is None:
        sys.exit(f"error: {path} holds no trace.json.gz")
    hlo = _read(hlo_path) if hlo_path else files.get("hlo.txt.gz") or files.get("hlo.txt")
    analysis = json.loads(files["analysis.json"]) if "analysis.json" in files else {}
    return _events(_gunzip(trace)), _gunzip(hlo).decode() if hlo else None, analysis


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return _gunzip(f.read())


def _gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _events(data: bytes) -> list:
    trace = json.load(io.BytesIO(data))
    return trace["traceEvents"] if isinstance(trace, dict) else trace


# ---- the HLO: what each op is

def parse_hlo(text: str | None) -> dict:
    """HLO text -> {instruction name: {"opcode", "line", "op_name", "calls": [computation names]}} over every
    computation, with "dot" True for a fusion or call whose computation (transitively) holds a dot or convolution."""
    if not text:
        return {}
    ops, bodies, current = {}, collections.defaultdict(set), None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            continue
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not m:
            continue
        name, rhs = m.groups()
        opcode = re.search(r"(?<![\w.\-])([a-z][a-z0-9_\-]*)\(", rhs)
        opcode = opcode.group(1) if opcode else ""
        op_name = re.search(r'op_name="([^"]*)"', rhs)
        targets = re.finditer(r"(?:calls|to_apply|body|condition)=(\{[^}]*\}|%?[\w.\-]+)", rhs)
        calls = [c.strip().lstrip("%") for m in targets for c in m.group(1).strip("{}").split(",") if c.strip()]
        ops[name] = {"opcode": opcode, "line": rhs, "op_name": op_name.group(1) if op_name else "", "calls": calls}
        if current:
            bodies[current].add(opcode)
            bodies[current].update("@" + c for c in calls)
    holds_dot = _computations_with_dots(bodies)
    for op in ops.values():
        op["dot"] = op["opcode"] in ("dot", "convolution") or any(c in holds_dot for c in op["calls"])
    return ops


def _computations_with_dots(bodies: dict) -> set:
    found = {c for c, opcodes in bodies.items() if opcodes & {"dot", "convolution"}}
    changed = True
    while changed:  # a computation that calls one holding a dot holds one too
        new = {c for c, opcodes in bodies.items() if c not in found and any(("@" + f) in opcodes for f in found)}
        found |= new
        changed = bool(new)
    return found


# ---- which events, what kind

def device_events(events: list) -> tuple[list, str]:
    """-> (the complete events that are device work, 'gpu' | 'cpu')."""
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpus = {pid for pid, name in procs.items() if re.search(r"/device:GPU|GPU:\d", name)}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if gpus:
        on_gpu = [e for e in complete if e["pid"] in gpus]
        streams = {key for key, name in threads.items() if key[0] in gpus and re.search("stream", name, re.I)}
        if streams:
            return [e for e in on_gpu if (e["pid"], e.get("tid")) in streams], "gpu"
        return [e for e in on_gpu if not threads.get((e["pid"], e.get("tid")), "").startswith(DERIVED_LINES)], "gpu"
    return [e for e in complete if "hlo_op" in e.get("args", {}) and not e["name"].startswith("end: ")], "cpu"


def scope_of(text: str) -> str:
    """The named scope an op name (HLO metadata op_name, or an event's text) carries: optimizer, loss, attention."""
    for scope in SCOPES:
        if re.search(rf"(^|[/(]){scope}([/)]|$)", text):
            return scope
    return "other"


def phase_of(op_name: str) -> str:
    if not op_name:
        return "unknown"
    if scope_of(op_name) == "optimizer":
        return "optimizer"
    return "backward" if "transpose(" in op_name else "forward"


def classify(name: str, op: dict | None, scope: str) -> str:
    """The kind of one event from its kernel or op name and, when known, its HLO instruction."""
    op = op or {}
    names = f"{name} {op.get('name', '')}".lower()
    target = re.search(r'custom_call_target="([^"]*)"', op.get("line", ""))
    target = target.group(1).lower() if target else ""
    if re.search(PATTERNS["collective"], f"{names} {op.get('opcode', '')}"):
        return "collective"
    if re.search(PATTERNS["attention"], f"{name.lower()} {target}"):
        return "attention"
    if op.get("dot") or re.search(r"gemm|blas|matmul", target) or "__triton_gemm" in op.get("line", "") \
            or re.search(PATTERNS["matmul"], name.lower()):
        return "matmul"
    if scope == "optimizer":
        return "optimizer"
    if op.get("opcode") in ("copy", "transpose", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice",
                            "pad") or re.search(PATTERNS["copy/transpose"], names):
        return "copy/transpose"
    if op.get("opcode") == "fusion" or re.search(PATTERNS["fusion"], names):
        return "fusion"
    return "other"


def rows(events: list, hlo: dict) -> list:
    """One dict per device event: name, dur_us, kind, scope, phase, hlo_op, module, run."""
    out = []
    for e in events:
        args = e.get("args", {})
        hlo_op = args.get("hlo_op", "")
        op = hlo.get(hlo_op)
        if op is not None:
            op = {**op, "name": hlo_op}
        if op and op["opcode"] in CONTROL_FLOW:
            continue
        named = (op or {}).get("op_name", "") or " ".join(str(v) for v in args.values() if isinstance(v, str)
                                                          and "/" in v)
        scope = scope_of(named)
        out.append({"name": e["name"], "dur_us": float(e["dur"]), "kind": classify(e["name"], op, scope),
                    "scope": scope, "phase": phase_of(named), "hlo_op": hlo_op, "module": args.get("hlo_module", ""),
                    "run": args.get("run_id")})
    return out


def count_steps(table: list, given: int | None, analysis: dict) -> int:
    if given:
        return given
    time_by_module = collections.Counter()
    for r in table:
        time_by_module[r["module"]] += r["dur_us"]
    if time_by_module:
        main = time_by_module.most_common(1)[0][0]
        runs = {r["run"] for r in table if r["module"] == main and r["run"] is not None}
        if runs:
            return len(runs)
    return int(analysis.get("profile_steps") or 1)


# ---- the tables

def summarize(path: str, hlo_path: str | None = None, steps: int | None = None, top: int = 25) -> dict:
    """The whole analysis of one profile as a dict (what --json writes and bench/gpu/report.py reads)."""
    events, hlo_text, analysis = load(path, hlo_path)
    device, backend = device_events(events)
    table = rows(device, parse_hlo(hlo_text))
    n = count_steps(table, steps, analysis)
    total = sum(r["dur_us"] for r in table)
    span = (max(e["ts"] + e["dur"] for e in device) - min(e["ts"] for e in device)) if device else 0.0

    def grouped(key):
        agg = collections.defaultdict(lambda: [0, 0.0])
        for r in table:
            agg[key(r)][0] += 1
            agg[key(r)][1] += r["dur_us"]
        return {k: {"count": c / n, "ms_per_step": us / n / 1e3, "share": us / total if total else 0.0}
                for k, (c, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])}
    kernels = collections.defaultdict(lambda: {"count": 0, "us": 0.0})
    for r in table:
        k = kernels[r["name"]]
        k["count"] += 1
        k["us"] += r["dur_us"]
        k.update(kind=r["kind"], scope=r["scope"], hlo_op=r["hlo_op"])
    top_kernels = sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:top]
    return {
        "profile": path, "backend": backend, "steps": n, "events": len(table), "hlo": bool(hlo_text),
        "device_ms_per_step": total / n / 1e3, "span_ms_per_step": span / n / 1e3,
        "busy_share_of_span": _busy(device) / span if span else None,
        "by_kind": grouped(lambda r: r["kind"]), "by_phase": grouped(lambda r: r["phase"]),
        "by_scope": grouped(lambda r: r["scope"]),
        "by_scope_and_kind": grouped(lambda r: f"{r['scope']} / {r['kind']}"),
        "top": [{"name": name, "kind": k["kind"], "scope": k["scope"], "hlo_op": k["hlo_op"],
                 "count_per_step": k["count"] / n, "ms_per_step": k["us"] / n / 1e3,
                 "avg_us": k["us"] / k["count"]} for name, k in top_kernels],
        "analysis": analysis,
    }


def _busy(device: list) -> float:
    """Microseconds during which at least one device event ran (overlaps counted once)."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in device):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def markdown(summary: dict) -> str:
    s = summary
    lines = [f"`{os.path.basename(s['profile'])}`: {s['backend']} trace, {s['events']} device events over "
             f"{s['steps']} step(s), HLO {'read' if s['hlo'] else 'absent'}: {s['device_ms_per_step']:.2f} ms of "
             f"device time per step in a span of {s['span_ms_per_step']:.2f} ms"
             + (f" (busy {100 * s['busy_share_of_span']:.0f}% of it)" if s["busy_share_of_span"] else ""), ""]
    for title, key in (("kind", "by_kind"), ("phase", "by_phase"), ("scope", "by_scope"),
                       ("scope / kind", "by_scope_and_kind")):
        lines += [f"| {title} | ops per step | ms per step | share |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['count']:.0f} | {v['ms_per_step']:.3f} | {100 * v['share']:.1f}% |"
                  for k, v in s[key].items()]
        lines.append("")
    lines += ["| top kernels / ops | kind | scope | per step | ms per step | avg us |", "|---|---|---|---|---|---|"]
    lines += [f"| `{_short(t['name'])}` | {t['kind']} | {t['scope']} | {t['count_per_step']:.0f} | "
              f"{t['ms_per_step']:.3f} | {t['avg_us']:.1f} |" for t in s["top"]]
    return "\n".join(lines)


def _short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", help="a perfetto trace, a directory holding one, or a profile-*.tar.gz")
    p.add_argument("--hlo", help="the compiled step's HLO text (default: hlo.txt[.gz] beside the trace)")
    p.add_argument("--steps", type=int, help="steps in the trace (default: counted from the events' run ids)")
    p.add_argument("--top", type=int, default=25, help="rows of the top kernels table")
    p.add_argument("--json", help="also write the summary as JSON here")
    args = p.parse_args()
    if not os.path.exists(args.profile):
        sys.exit(f"error: {args.profile} does not exist")
    summary = summarize(args.profile, args.hlo, args.steps, args.top)
    print(markdown(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
