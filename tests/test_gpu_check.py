"""bench/gpu_check.sh --cpu: every path the GPU check runs also runs here, on a tiny model (the CUDA-only ones skip)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_runs_every_path(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--steps", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["path"]: r for r in json.loads(out.read_text())}
    assert {p for p, r in rows.items() if r["status"] == "skip"} == {"lora fp16-mixed", "lora paged_adamw_8bit"}
    ok = {p for p, r in rows.items() if r["status"] == "ok"}
    assert {"full bf16-mixed", "lora bf16-mixed", "qlora (4-bit base)", "qrosa (4-bit base)", "galore 8-bit",
            "full adamw_8bit", "eval (lora run)", "merge (lora run)", "ddp 1 process (torchrun)"} <= ok
    assert all(rows[p]["tokens_per_s"] > 0 for p in ok if "tokens_per_s" in rows[p])
    assert "| path | status | tokens/s | peak memory |" in proc.stdout
