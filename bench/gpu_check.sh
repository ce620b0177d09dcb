#!/usr/bin/env bash
# Every CUDA path of tunelab on a lent GPU in a few minutes, one table (see bench/gpu_check.py).
#
# The lent machine has torch + CUDA, transformers, PEFT and accelerate but no network and no
# bitsandbytes/gguf/tunelab install: carry the missing wheels in wheels/ (pip download --no-deps
# bitsandbytes gguf ... -d wheels) and they are installed here first; tunelab runs from src/.
# Usage: bash bench/gpu_check.sh [--cpu] [--steps N] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps wheels/*.whl
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_check.py "$@"
