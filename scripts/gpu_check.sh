#!/usr/bin/env bash
# The prepared GPU device check (issue 24): ./scripts/gpu_check.sh [OUT_DIR]
#
# For a machine with CUDA torch and no Ray, no network and no project virtualenv: it uses the
# machine's python3 (override with PYTHON=...) and installs nothing. What it needs besides torch
# is pure Python or already there on such images (safetensors, tokenizers, numpy, tqdm, pytest,
# transformers for the peer); the repository itself goes on PYTHONPATH.
#
# 1. the `cuda` tests (tests/runtime/test_cuda.py): CUDA vs CPU logits, the KV pool on the GPU,
#    greedy alone == batched, seeded sampling, in float32 and bfloat16;
# 2. python -m runtime.gpu_check: decode latency / tokens/s per step count x batch 1/16/64 x
#    dtype, N_max/4 vs N_max, bf16 vs float32, HF GPT-2 generate() peer, bf16 training tokens/s
#    and MFU.
# Writes OUT_DIR/pytest.txt, OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (OUT_DIR defaults
# to $OUT, the device tool's output folder, else ./gpu-check). Sized to finish in under 8 minutes
# on an H100/H200-class GPU: each part has its own time limit below.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/gpu-check}}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONFAULTHANDLER=1

"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())' \
    || { echo "[gpu_check] error: no CUDA device visible to $PYTHON" >&2; exit 2; }

rc=0
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/runtime/test_cuda.py \
    >"$OUT_DIR/pytest.txt" 2>&1 || rc=$?
tail -5 "$OUT_DIR/pytest.txt"
timeout 330 "$PYTHON" -m runtime.gpu_check --out "$OUT_DIR" "${@:2}" || rc=$((rc ? rc : $?))
echo "[gpu_check] wrote $OUT_DIR/gpu_check.json, $OUT_DIR/gpu_check.md, $OUT_DIR/pytest.txt (rc $rc)" >&2
exit "$rc"
