#!/usr/bin/env bash
# make demo: base vs LoRA-tuned SmolLM2-135M on a fixed GSM8K subset, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# the shared data folder beside the checkout, unless the caller points elsewhere
if [ -z "${TUNELAB_DATA_DIR:-}" ] && [ -d ../shared/data ]; then export TUNELAB_DATA_DIR=$(cd ../shared/data && pwd); fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
PY=${PY:-.venv/bin/python}
CFG=configs/gsm8k_lora_cpu_demo.yaml
OUT=${OUT:-demo}
rm -rf "$OUT"
"$PY" -m tunelab eval --base --config "$CFG" out="$OUT/base"
"$PY" -m tunelab train --config "$CFG" out="$OUT/lora"
"$PY" -m tunelab eval "$OUT/lora"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
rows = []
for name in ("base", "lora"):
    r = json.load(open(f"{out}/{name}/eval/results.json"))["metrics"]
    rows.append((name, r["n"], r["accuracy_strict"], r["accuracy_flexible"]))
print("\n| model | questions | accuracy (strict ####) | accuracy (flexible) |\n|---|---|---|---|")
for name, n, s, f in rows:
    print(f"| {name} | {n} | {s:.3f} | {f:.3f} |")
t = json.load(open(f"{out}/lora/results.json"))
print(f"\nLoRA: {t['steps']} steps, {t['train_time_s']:.0f} s, {t['train_tokens_per_s']:.0f} tokens/s, "
      f"final loss {t['final_loss']:.3f}, peak RSS {t['peak_rss_bytes']/2**30:.1f} GiB")
PYEOF
