#!/usr/bin/env bash
# Evidence for the default prompt format of instruct models (issue: plain vs chat).
# Base and LoRA-tuned SmolLM2-135M-Instruct on GSM8K with the demo's steps and questions
# (configs/gsm8k_lora_cpu_demo.yaml), once with task.prompt_format=plain (the task's own
# "Question: ...\nAnswer:" template) and once with =chat (the tokenizer's ChatML template);
# then the paired comparisons (strict/flexible accuracy, answer-format rate, ref_nll).
# Usage: bash bench/prompt_format_evidence.sh [OUT]   (default OUT=runs/prompt-format)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh  # TUNELAB_DATA_DIR, offline Hub, PY
CFG=configs/gsm8k_lora_cpu_demo.yaml
OUT=${1:-runs/prompt-format}
for fmt in plain chat; do
  [ -f "$OUT/base-$fmt/eval/results.json" ] || "$PY" -m tunelab eval --base --config "$CFG" task.prompt_format=$fmt out="$OUT/base-$fmt"
  [ -f "$OUT/lora-$fmt/results.json" ] || "$PY" -m tunelab train --config "$CFG" task.prompt_format=$fmt out="$OUT/lora-$fmt"
  [ -f "$OUT/lora-$fmt/eval/results.json" ] || "$PY" -m tunelab eval "$OUT/lora-$fmt"
done
for pair in "base-plain base-chat" "lora-plain lora-chat" "base-plain lora-plain" "base-chat lora-chat"; do
  set -- $pair
  echo; echo "## A = $1, B = $2"
  "$PY" -m tunelab compare "$OUT/$1" "$OUT/$2"
done
