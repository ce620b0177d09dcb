#!/usr/bin/env bash
# make demo: base vs LoRA-tuned SmolLM2-135M on a fixed GSM8K subset, on CPU, and what moved.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh  # TUNELAB_DATA_DIR, offline Hub, PY
CFG=configs/gsm8k_lora_cpu_demo.yaml
OUT=${OUT:-demo}
# A rerun replaces the previous demo's output, and only that: a folder the demo did not make is left alone.
if [ -e "$OUT" ]; then
  if [ ! -f "$OUT/.tunelab-demo" ]; then
    echo "demo: '$OUT' exists and was not made by 'make demo'; move it away or run with OUT=another-folder" >&2
    exit 2
  fi
  rm -rf "$OUT/base" "$OUT/lora"
fi
mkdir -p "$OUT" && touch "$OUT/.tunelab-demo"
"$PY" -m tunelab eval --base --config "$CFG" out="$OUT/base"
"$PY" -m tunelab train --config "$CFG" out="$OUT/lora"
"$PY" -m tunelab eval "$OUT/lora"
echo
echo "## base (A) vs LoRA-tuned (B), the same questions, paired"
"$PY" -m tunelab compare "$OUT/base" "$OUT/lora"
"$PY" - "$OUT" <<'PYEOF'
import json, math, sys
out = sys.argv[1]
t = json.load(open(f"{out}/lora/results.json"))
m = json.load(open(f"{out}/lora/eval/results.json"))["metrics"]
n = m["n"]
print(f"\nLoRA: {t['steps']} steps, {t['train_time_s']:.0f} s, {t['train_tokens_per_s']:.0f} tokens/s, "
      f"final loss {t['final_loss']:.3f}, peak RSS {t['peak_rss_bytes']/2**30:.1f} GiB")
# One question is 1/n of accuracy; a 135M model solves a few percent of GSM8K, so on n questions
# accuracy moves by a handful of answers: read ref_nll and the answer-format rate first.
half = 1.96 * math.sqrt(0.05 * 0.95 / n)
print(f"How sure: one question is {1/n:.3f} of accuracy; at the ~5% a 135M model reaches, the 95% interval of one "
      f"accuracy on {n} questions is about ±{half:.3f}, so accuracy at this size is noise. The held-out loss "
      f"(ref_nll, every reference token counts) and the answer-format rate are what tuning visibly moves; "
      f"trust a difference whose paired 95% CI above excludes 0.")
PYEOF
