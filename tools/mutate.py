"""A small mutation tester: one-line bugs (mutants) are planted in a module, one at a time, and the tests that cover
it run against each; a mutant the tests pass on ("survived") is a bug they would not catch.

    python tools/mutate.py jaxgpt/loss_scale.py                    # every mutant, the module's tests from TESTS
    python tools/mutate.py jaxgpt/optim.py --lines 20-60 --max-mutants 30 --timeout 120
    python tools/mutate.py jaxgpt/step.py --list                   # the mutants, nothing run
    python tools/mutate.py jaxgpt/step.py --only 3,17 --tests tests/test_numerics.py::test_x

Why our own and not mutmut: mutmut 3 runs the test suite once in its own process, then forks that process once per
mutant. JAX starts thread pools (XLA's compiler and runtime) at its first use, and a fork of a multithreaded process
keeps only the forking thread: the children can deadlock on a lock a vanished thread held (os.fork warns about it
under JAX). It also rewrites every function into a trampoline, which changes what jax.jit traces and caches. Here
every mutant runs in a fresh `python -m pytest -x -q -p no:cacheprovider <tests>` subprocess with a timeout (its
process group killed past it), so a mutant cannot hang the run nor inherit a compiled program. Tried on this
repository (mutmut 3.8.1, two loss-scale tests that take 10 s alone), mutmut's first in-process run had not finished
after 3 minutes, its process at 31 threads, and was stopped.

Operators (AST-based; each mutant replaces one node's source text, so the diff is that node):
comparison swaps (< <=, > >=, == !=, is / is not, in / not in), arithmetic swaps (+ -, * /, // /, % *, ** *),
and <-> or, a dropped `not` or unary minus, constants (0 <-> 1, an int n -> n + 1, a float x -> 2x, True <-> False),
a removed keyword argument, a statement (call, assignment, augmented assignment, raise) replaced by `pass`, and
`return x` -> `return None`. Docstrings, annotations, f-strings and imports are left alone.

The mutants are written into a throw-away copy of the repository (the files git tracks or would track), one at a
time, the original text put back after each; the working tree is never touched. Results (killed / survived /
timeout, with file:line and the diff) go to a JSON report (--report) and a text summary. Survivors whose key
appears in tests/mutants_equivalent.md count as equivalent. Not part of CI: run by hand, with `nice -n 10` on a
shared machine. docs/mutation.md has the scores and the commands.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = "tests/mutants_equivalent.md"

# module -> the tests that cover it, fastest first (the run stops at the first failure: -x)
TESTS = {
    "jaxgpt/loss_scale.py": [
        "tests/test_numerics.py::test_loss_scale_settings_that_cannot_work_are_one_error",
        "tests/test_numerics.py::test_loss_scale_settings",
        "tests/test_numerics.py::test_loss_scale_spellings",
        "tests/test_numerics.py::test_a_fixed_scale_must_be_positive_and_finite",
        "tests/test_numerics.py::test_dynamic_scale_doubles_after_period_finite_steps_and_halves_on_overflow",
        "tests/test_numerics.py::test_the_dynamic_scale_follows_pytorch_gradscalers_rule",
        "tests/test_numerics.py::test_the_dynamic_scale_halves_down_to_1_and_no_lower",
        "tests/test_numerics.py::test_a_fixed_scale_never_changes_and_counts_skipped_steps",
        "tests/test_numerics.py::test_all_finite_and_select_leaf_by_leaf",
        "tests/test_metrics.py::test_skipped_float16_steps_are_logged_until_they_mean_divergence",
        "tests/test_numerics.py::test_an_overflowing_step_is_skipped_whole_and_halves_the_scale",
    ],
    "jaxgpt/optim.py": [
        "tests/test_optim.py::test_bad_schedule_settings_are_user_errors",
        "tests/test_optim.py::test_bad_optimizer_settings_are_user_errors",
        "tests/test_optim.py::test_schedule_matches_the_reference_get_lr",
        "tests/test_optim.py::test_decay_steps_zero_means_max_steps_and_no_warmup_starts_at_the_peak",
        "tests/test_optim.py::test_trapezoid_schedule_matches_modded_nanogpts_get_lr",
        "tests/test_optim.py::test_trapezoid_options_at_other_values",
        "tests/test_optim.py::test_cooldown_frac_is_in_0_to_1_inclusive",
        "tests/test_optim.py::test_grad_clip_is_optax_clip_by_global_norm_and_0_disables_it",
        "tests/test_optim.py::test_decay_mask_and_param_groups_by_name",
        "tests/test_optim.py::test_muon_steps_match_a_numpy_transcription_of_modded_nanogpt",
        "tests/test_optim.py::test_ten_steps_match_nanogpts_loop_in_pytorch",
    ],
    "jaxgpt/step.py": [
        "tests/test_numerics.py::test_float16_step_gradient_norm_equals_the_unscaled_float32_run",
        "tests/test_numerics.py::test_an_overflowing_step_is_skipped_whole_and_halves_the_scale",
        "tests/test_optim.py::test_accumulating_a_split_batch_equals_one_step_on_the_whole_batch",
        "tests/test_optim.py::test_ten_steps_match_nanogpts_loop_in_pytorch",
        "tests/test_numerics.py::test_float16_gradients_equal_float32_s_within_float16_rounding",
    ],
    "jaxgpt/preemption.py": [
        "tests/test_preemption.py::test_the_exit_status_is_75",
        "tests/test_preemption.py::test_preempted_says_what_was_saved",
        "tests/test_preemption.py::test_one_process_stops_after_the_call_on_sigterm_or_sigint_and_restores_the_handlers",
        "tests/test_preemption.py::test_a_second_sigint_interrupts",
        "tests/test_preemption.py::test_a_watch_off_the_main_thread_installs_nothing",
        "tests/test_preemption.py::test_several_processes_stop_where_the_preemption_sync_point_says",
        "tests/test_preemption.py::test_sigterm_during_the_first_compile_exits_cleanly_with_nothing_written",
    ],
    "jaxgpt/data.py": [f"tests/test_data.py::{t}" for t in (
        "test_too_little_data_is_a_clear_error", "test_corrupt_shards_raise_naming_the_file",
        "test_llmc_shard_round_trip", "test_nanogpt_raw_round_trip", "test_find_shards",
        "test_batches_are_shifted_windows_covering_an_epoch_once", "test_deterministic_for_a_seed_and_infinite",
        "test_processes_read_disjoint_windows", "test_start_continues_the_stream_exactly",
        "test_a_global_batch_holds_the_same_windows_whatever_the_process_count", "test_eval_batches_are_fixed",
        "test_shard_edges_token_range_vocabulary_and_sizes",
        "test_a_data_directory_needs_both_splits_and_a_loader_needs_a_shard", "test_the_seed_is_a_32_bit_unsigned_int",
        "test_stream_identity_names_seed_window_and_each_shard_by_name_size_and_its_ends",
        "test_the_seed_orders_the_windows", "test_each_epoch_cuts_every_shard_at_one_offset_that_changes_per_epoch")],
    "jaxgpt/serving/scheduler.py": [f"tests/test_scheduler.py::{t}" for t in (
        "test_the_counters_and_stats_say_what_ran", "test_admits_in_arrival_order_whatever_fits_in_one_prefill",
        "test_running_rows_stay_first_and_a_finished_row_takes_the_last",
        "test_end_of_text_stops_unseen_and_max_tokens_ends_with_length",
        "test_slides_from_the_last_half_block_once_the_context_is_full",
        "test_cancel_ends_running_and_waiting_sequences_and_frees_their_rows",
        "test_a_full_queue_refuses_and_a_failure_takes_every_sequence", "test_the_scheduler_imports_no_jax")],
    "jaxgpt/resume.py": [f"tests/test_resume.py::{t}" for t in (
        "test_the_layout_line_names_what_changed_and_nothing_when_nothing_did",
        "test_compute_only_fields_may_change_and_the_shape_may_not",
        "test_tokens_per_step_may_be_split_otherwise_but_not_changed",
        "test_the_optimizer_and_the_loss_scale_may_not_change", "test_the_data_stream_may_move_but_not_change",
        "test_the_layout_record_is_what_describe_reads", "test_the_shard_diff_names_at_most_three",
        "test_plan_resumes_from_the_latest_step_or_resume_step_on_another_split_of_the_batch",
        "test_plan_refuses_what_may_not_change_and_a_position_off_the_steps",
        "test_an_unreadable_step_names_the_latest_earlier_one_that_reads")],
    "jaxgpt/sharding.py": ["tests/test_sharding.py"],
    "torch_bridge/mapping.py": ["tests/test_bridge.py"],
    "torch_bridge/convert.py": ["tests/test_bridge.py"],
    "torch_bridge/tf_checkpoint.py": ["tests/test_openai.py"],
    "jaxgpt/ops/__init__.py": ["tests/test_loss.py"],
    "jaxgpt/ops/reference.py": ["tests/test_loss.py"],
    "jaxgpt/ops/xla_cpu.py": ["tests/test_loss.py"],
}

COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
               ast.Mod: ast.Mult, ast.Pow: ast.Mult}
REMOVABLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.Raise)


@dataclasses.dataclass
class Mutant:
    index: int
    path: str  # relative to the repository root
    line: int
    col: int
    op: str  # what was changed, e.g. "Lt -> LtE"
    start: int  # character offsets of the replaced source in the file
    end: int
    replacement: str

    @property
    def key(self) -> str:  # what tests/mutants_equivalent.md names a mutant by
        return f"{self.path}:{self.line}:{self.col} {self.op}"

    def apply(self, source: str) -> str:
        return source[:self.start] + self.replacement + source[self.end:]

    def diff(self, source: str) -> str:
        return "".join(difflib.unified_diff(source.splitlines(True), self.apply(source).splitlines(True),
                                            f"a/{self.path}", f"b/{self.path}", n=0))


def _offsets(source: str) -> list[int]:
    starts, pos = [], 0
    for line in source.splitlines(True):
        starts.append(pos)
        pos += len(line)
    starts.append(pos)
    return starts


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes not to mutate: docstrings, annotations, f-strings, imports, `__future__`, and everything
    under them."""
    skip = set()

    def under(node):
        skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                under(first)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.returns:
                under(node.returns)
            for arg in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                if arg.annotation:
                    under(arg.annotation)
        if isinstance(node, ast.AnnAssign):
            under(node.annotation)
        if isinstance(node, (ast.JoinedStr, ast.Import, ast.ImportFrom)):
            under(node)
    return skip


def _const_mutations(value):
    if isinstance(value, bool):
        return [(repr(not value), f"{value} -> {not value}")]
    if isinstance(value, int):
        return [("1", "0 -> 1")] if value == 0 else [("0", "1 -> 0")] if value == 1 else [
            (repr(value + 1), f"{value} -> {value + 1}")]
    if isinstance(value, float):
        return [("1.0", "0.0 -> 1.0")] if value == 0 else [(repr(value * 2), f"{value!r} -> {value * 2!r}")]
    return []


def mutants(source: str, path: str, lines: tuple[int, int] | None = None) -> list[Mutant]:
    """Every mutant of `source` (the text of `path`), numbered in source order; `lines`: only those on A..B."""
    tree = ast.parse(source)
    skip = _skipped_nodes(tree)
    offsets = _offsets(source)
    found = []

    def span(node):
        return offsets[node.lineno - 1] + node.col_offset, offsets[node.end_lineno - 1] + node.end_col_offset

    def add(node, op, replacement, paren=True):
        start, end = span(node)
        found.append((node.lineno, node.col_offset, op, start, end, f"({replacement})" if paren else replacement))

    def swapped(node, **changes):
        new = ast.copy_location(type(node)(**{**{f: getattr(node, f) for f in node._fields}, **changes}), node)
        return ast.unparse(ast.fix_missing_locations(new))

    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in COMPARE_SWAPS:
                    ops = list(node.ops)
                    ops[i] = COMPARE_SWAPS[type(op)]()
                    add(node, f"{type(op).__name__} -> {type(ops[i]).__name__}", swapped(node, ops=ops))
        elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
            new = BINOP_SWAPS[type(node.op)]()
            add(node, f"{type(node.op).__name__} -> {type(new).__name__}", swapped(node, op=new))
        elif isinstance(node, ast.BoolOp):
            new = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            add(node, f"{type(node.op).__name__} -> {type(new).__name__}", swapped(node, op=new))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            add(node, f"drop {'not' if isinstance(node.op, ast.Not) else 'unary -'}", ast.unparse(node.operand))
        elif isinstance(node, ast.Constant):
            for replacement, op in _const_mutations(node.value):
                add(node, op, replacement, paren=False)
        elif isinstance(node, ast.Call):
            for i, kw in enumerate(node.keywords):
                if kw.arg is not None:
                    keywords = node.keywords[:i] + node.keywords[i + 1:]
                    add(node, f"drop keyword {kw.arg}=", swapped(node, keywords=keywords), paren=False)
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            add(node, "return None", "return None", paren=False)
        if isinstance(node, REMOVABLE) and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            add(node, f"remove {type(node).__name__.lower()}", "pass", paren=False)
    found.sort(key=lambda m: (m[3], m[4], m[2]))
    numbered = [Mutant(i, path, line, col, op, start, end, rep)
                for i, (line, col, op, start, end, rep) in enumerate(found)]
    return [m for m in numbered if not lines or lines[0] <= m.line <= lines[1]]  # numbered over the whole file


def equivalent_keys(root: Path) -> set[str]:
    """The mutant keys listed in tests/mutants_equivalent.md (`path:line:col op` in backticks)."""
    file = root / EQUIVALENT
    if not file.exists():
        return set()
    return set(re.findall(r"`([\w./]+\.py:\d+:\d+ [^`]+)`", file.read_text()))


def copy_repo(root: Path, dest: Path):
    """The files git tracks and the untracked ones it does not ignore, without bytecode."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = root / name
        if src.is_file() and "__pycache__" not in name:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(workdir: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, the output's tail) of one fresh pytest process."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # a mutant of the same size and second: no stale .pyc
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the pytest process and whatever it started
        out, _ = proc.communicate()
        status = "timeout"
    return status, time.monotonic() - start, out.decode(errors="replace")[-2000:]


def parse_lines(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    a, _, b = text.partition("-")
    return int(a), int(b or a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", help="the file to mutate, relative to the repository root, e.g. jaxgpt/optim.py")
    parser.add_argument("--tests", nargs="+", help="pytest node ids (default: the module's row of TESTS)")
    parser.add_argument("--lines", help="only mutants on lines A-B (or one line A)")
    parser.add_argument("--only", help="comma-separated mutant indices (as --list numbers them)")
    parser.add_argument("--max-mutants", type=int, help="at most this many mutants (in source order)")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: 3 x the unmutated run + 30)")
    parser.add_argument("--report", help="the JSON report (default: mutation-report/<module>.json, git-ignored)")
    parser.add_argument("--list", action="store_true", help="print the mutants and their diffs, run nothing")
    args = parser.parse_args(argv)

    path = Path(args.module).as_posix()
    source = (ROOT / path).read_text()
    found = mutants(source, path, parse_lines(args.lines))
    if args.only:
        wanted = {int(i) for i in args.only.split(",")}
        found = [m for m in found if m.index in wanted]
    if args.max_mutants is not None:
        found = found[:args.max_mutants]
    if args.list:
        for m in found:
            print(f"#{m.index} {m.key}\n{m.diff(source)}")
        print(f"{len(found)} mutants")
        return 0
    tests = args.tests or TESTS.get(path)
    if not tests:
        parser.error(f"no tests configured for {path}: pass --tests or add a row to TESTS in tools/mutate.py")
    equivalent = equivalent_keys(ROOT)

    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        work = Path(tmp)
        copy_repo(ROOT, work)
        target = work / path
        status, seconds, out = run_tests(work, tests, timeout=args.timeout or 1800)
        if status != "passed":
            print(f"the tests fail without a mutant ({status}, {seconds:.0f} s):\n{out}", file=sys.stderr)
            return 2
        timeout = args.timeout or 3 * seconds + 30
        print(f"{path}: {len(found)} mutants; unmutated tests {seconds:.1f} s; timeout {timeout:.0f} s", flush=True)
        results, began = [], time.monotonic()
        try:
            for m in found:
                target.write_text(m.apply(source))
                try:
                    status, seconds, out = run_tests(work, tests, timeout)
                finally:
                    target.write_text(source)
                outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status]
                if outcome == "survived" and m.key in equivalent:
                    outcome = "equivalent"
                results.append({"index": m.index, "key": m.key, "line": m.line, "op": m.op, "outcome": outcome,
                                "seconds": round(seconds, 1), "diff": m.diff(source),
                                **({"output": out[-600:]} if outcome == "survived" else {})})
                print(f"#{m.index:3d} {outcome:10s} {seconds:6.1f} s  {m.key}", flush=True)
        except KeyboardInterrupt:
            print("interrupted: reporting the mutants run so far", file=sys.stderr)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("killed", "timeout", "survived", "equivalent")}
    summary = {"module": path, "tests": tests, "mutants": len(results), **counts,
               "seconds": round(time.monotonic() - began), "results": results}
    report = Path(args.report or ROOT / "mutation-report" / (path.replace("/", "__") + ".json"))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(summary, indent=1))
    print(f"\n{path}: {counts['killed'] + counts['timeout']} killed ({counts['timeout']} by timeout), "
          f"{counts['survived']} survived, {counts['equivalent']} equivalent, of {len(results)}; "
          f"{summary['seconds']} s; report {report}")
    for r in results:
        if r["outcome"] == "survived":
            print(f"\nSURVIVED #{r['index']} {r['key']}\n{r['diff']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
