#!/usr/bin/env bash
# GPT-2 124M training throughput and MFU on a GPU: a short run of configs/124m.py (bf16, 524,288 tokens per step
# as 64 x 1024 x 8 micro-batches) on tinyshakespeare tokenized with GPT-2 BPE (the text only feeds the step; no
# download; the learning-rate schedule stays the full run's). Prints the trainer's tokens/s and MFU lines (MFU
# against the datasheet bf16 peak of known GPUs, see jaxgpt/metrics.py; set PEAK_FLOPS for others; on a CPU it
# runs too, without MFU: `bash bench/gpu.sh 2 1 1` gave 84 tok/s here).
#
#   bash bench/gpu.sh [STEPS (default 30)] [BATCH (default 64)] [GRAD_ACCUM (default 8)]
#
# The first logged interval includes compilation; read the later lines. Run from anywhere; writes only under a
# temporary directory, which it removes.
set -euo pipefail
STEPS=${1:-30}
BATCH=${2:-64}
ACCUM=${3:-8}
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INPUT="${INPUT:-$REPO/../shared/data/tinyshakespeare.txt}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$REPO"
python -c "import jax; d = jax.devices()[0]; print(f'{jax.device_count()} x {d.device_kind} ({d.platform}), jax {jax.__version__}')"
python -m jaxgpt.train --config=configs/124m.py --workdir="$WORK/run" \
  --config.data.dir="$WORK/data" --config.data.dataset=text --config.data.input="$INPUT" \
  --config.data.tokenizer=gpt2 --config.batch_size="$BATCH" --config.grad_accum_steps="$ACCUM" \
  --config.max_steps="$STEPS" --config.optim.decay_steps=19073 --config.log_every=5 --config.eval_every=1000000 --config.eval_iters=2 \
  --config.sample_tokens=0 --config.progress_bar=False --config.peak_flops="${PEAK_FLOPS:-0}" 2>&1 \
  | grep -E "tok/s|parameters|mesh:|Error|error" | grep -v "^I"
