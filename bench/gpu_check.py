"""Every CUDA path of tunelab in one short run, one table: path, ok/fail, tokens/s, peak allocated memory.

On a lent GPU (``bash bench/gpu_check.sh``) the model is SmolLM2-135M's shape with random weights and
the real tokenizer (``bench/assets/smollm2-135m``: a few MB instead of the 98 MB GGUF), on a small
synthetic GSM8K-format data set written here, so nothing has to be downloaded. ``--cpu`` runs the
same paths on a 2-layer model of the same vocabulary (the tests run it); the CUDA-only paths
(fp16-mixed, paged 8-bit AdamW) then report "skip" with the reason.

Each path is a real ``train`` (a few steps) through the library, then eval and merge once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets" / "smollm2-135m"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: (path name, overrides, needs CUDA)
PATHS = [
    ("full bf16-mixed", ["method=full", "train.precision=bf16-mixed"], False),
    ("lora bf16-mixed", ["method=lora", "train.precision=bf16-mixed"], False),
    ("qlora (4-bit base)", ["method=lora", "model.load_in_4bit=true"], False),
    ("qrosa (4-bit base)", ["method=rosa", "model.load_in_4bit=true", "method.schedule=wl1"], False),
    ("galore 8-bit", ["method=galore", "method.optim_8bit=true", "method.rank=8"], False),
    ("full adamw_8bit", ["method=full", "train.optim=adamw_8bit"], False),
    ("lora fp16-mixed", ["method=lora", "train.precision=fp16-mixed"], True),
    ("lora paged_adamw_8bit", ["method=lora", "train.optim=paged_adamw_8bit"], True),
]


def build_model(out: Path, tiny: bool) -> Path:
    """Random weights in SmolLM2-135M's shape (or 2 layers of width 64 with ``tiny``), the real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(ASSETS)
    if tiny:
        config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(ASSETS).save_pretrained(out)
    return out


def write_data(folder: Path, n: int = 64) -> Path:
    """GSM8K-format rows (question, worked answer ending in '#### n')."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, start in (("train", 0), ("test", 1000)):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for i in range(start, start + n):
                a, b = i % 97, (i * 7) % 89
                fh.write(json.dumps({"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                                     "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}) + "\n")
    return folder


def run_path(name: str, overrides: list[str], common: list[str], work: Path) -> dict:
    from tunelab.config import load_config
    from tunelab.train import train

    out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
    t0 = time.time()
    res = train(load_config(overrides=[*common, *overrides, f"out={out}"]))
    return {"path": name, "status": "ok", "tokens_per_s": res["train_tokens_per_s"],
            "peak_mem_bytes": res["peak_mem_bytes"], "peak_mem_kind": res["peak_mem_kind"],
            "seconds": time.time() - t0, "run": str(out)}


def eval_and_merge(run: str, work: Path) -> list[dict]:
    from tunelab.evaluation.evaluate import evaluate
    from tunelab.merge import merge_run
    from tunelab.rundir import RunDir

    rows = []
    t0 = time.time()
    res = evaluate(RunDir(run).config(["eval.limit=8", "eval.max_new_tokens=16"]), Path(run), Path(run))
    rows.append({"path": "eval (lora run)", "status": "ok", "seconds": time.time() - t0,
                 "note": f"{len(res.get('metrics', {}))} metrics"})
    t0 = time.time()
    report = merge_run(RunDir(run).config(), Path(run), work / "merged")
    rows.append({"path": "merge (lora run)", "status": "ok", "seconds": time.time() - t0,
                 "note": f"max |logit diff| {report['max_abs_logit_diff']:.1e}"})
    return rows


def _why(exc: BaseException) -> str:
    """One table cell: the exception's type and message on one line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200].replace("|", "/")


def table(rows: list[dict]) -> str:
    lines = ["| path | status | tokens/s | peak memory | seconds | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f} MiB ({r['peak_mem_kind']})" if r.get("peak_mem_bytes") else ""
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else ""
        lines.append(f"| {r['path']} | {r['status']} | {tps} | {mem} | {r.get('seconds', 0):.1f} | {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the same paths on a tiny model on CPU (what the tests run)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    work = Path(tempfile.mkdtemp(prefix="tunelab-gpu-check-"))
    model = build_model(work / "model", tiny=args.cpu)
    data = write_data(work / "data")
    common = [f"model={model}", "task=gsm8k", f"task.data_dir={data}", f"train.max_steps={args.steps}",
              "train.batch_size=4", "data.max_length=128", "train.report_to=[]", "train.progress_bar=false",
              f"model.device={'cuda' if cuda else 'cpu'}"]
    rows: list[dict] = []
    for name, overrides, needs_cuda in PATHS:
        if needs_cuda and not cuda:
            rows.append({"path": name, "status": "skip", "note": "CUDA only"})
            continue
        try:
            rows.append(run_path(name, overrides, common, work))
        except Exception as exc:  # one failing path must not hide the others
            rows.append({"path": name, "status": "fail", "note": _why(exc)})
            traceback.print_exc()
    lora = next((r["run"] for r in rows if r["path"] == "lora bf16-mixed" and r["status"] == "ok"), None)
    if lora:
        try:
            rows.extend(eval_and_merge(lora, work))
        except Exception as exc:
            rows.append({"path": "eval + merge", "status": "fail", "note": _why(exc)})
            traceback.print_exc()
    rows.extend(ddp_one_process(common, work))
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"\ntunelab gpu_check on {device} (torch {torch.__version__}, {args.steps} steps per path)\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["status"] == "fail" for r in rows) else 0


def ddp_one_process(common: list[str], work: Path) -> list[dict]:
    """The distributed launch path with one process (torchrun), as a multi-GPU job starts."""
    import subprocess

    out = work / "ddp1"
    t0 = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "tunelab",
           "-q", "train", *common, "method=lora", f"out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    if proc.returncode != 0:
        return [{"path": "ddp 1 process (torchrun)", "status": "fail", "note": proc.stderr.strip().splitlines()[-1][:160]}]
    res = json.loads((out / "results.json").read_text())
    return [{"path": "ddp 1 process (torchrun)", "status": "ok", "tokens_per_s": res["train_tokens_per_s"],
             "peak_mem_bytes": res["peak_mem_bytes"], "peak_mem_kind": res["peak_mem_kind"], "seconds": time.time() - t0}]


if __name__ == "__main__":
    sys.exit(main())
