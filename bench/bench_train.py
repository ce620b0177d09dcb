"""Training throughput and memory: tunelab vs the original recipe vs HF Trainer with dynamic padding.

Side by side in one run, on the same GSM8K examples, the default model (SmolLM2-135M), LoRA r 8,
alpha 16, all-linear, batch size B, S optimizer steps, one process per variant (so peak RSS is
per variant):

  (a) original recipe: HF Trainer + PEFT, every example padded to 720 tokens
  (b) HF Trainer + PEFT with dynamic padding (pad to the batch's longest, random order)
  (c) tunelab train (dynamic padding + length grouping + logits only at target positions)

Throughput is *real* (non-padding) training tokens per second of the training loop. Usage:
    python bench/bench_train.py [--batch-size 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUNELAB_DATA_DIR", str(HERE.parent.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _examples(n: int, seed: int):
    from tunelab.config import load_config
    from tunelab.data import build_train_dataset
    from tunelab.models import load_tokenizer, materialize
    from tunelab.tasks import get_task

    cfg = load_config(overrides=[f"data.limit={n}", "data.max_length=720", f"seed={seed}"])
    tok = load_tokenizer(cfg.model, materialize(cfg.model.name))
    data, _ = build_train_dataset(get_task("gsm8k")(cfg.task), tok, cfg.data, seed)
    return cfg, tok, data


def run_hf(variant: str, batch_size: int, steps: int, seed: int) -> dict:
    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunelab.models import load_model, materialize
    from tunelab.utils import peak_rss_bytes

    cfg, tok, data = _examples(batch_size * steps, seed)
    rows = []
    for t in data:
        ids, labels = list(t.input_ids), list(t.labels)
        if variant == "padded720":  # the original: tokenizer(..., padding="max_length", max_length=720)
            pad = 720 - len(ids)
            rows.append({"input_ids": ids + [tok.pad_token_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad,
                         "labels": labels + [-100] * pad})
        else:
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    real_tokens = sum(len(t) for t in data)
    model = load_model(cfg.model, materialize(cfg.model.name), torch.device("cpu"))
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=f"/tmp/bench-hf-{variant}", per_device_train_batch_size=batch_size, max_steps=steps,
        learning_rate=7e-4, logging_steps=1, save_strategy="no", report_to=[], seed=seed,
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    return {"variant": variant, "real_tokens": real_tokens, "train_time_s": elapsed,
            "tokens_per_s": real_tokens / elapsed, "peak_rss_bytes": peak_rss_bytes()}


def run_tunelab(batch_size: int, steps: int, seed: int) -> dict:
    import tempfile

    from tunelab.config import load_config
    from tunelab.train import train

    out = Path(tempfile.mkdtemp(prefix="bench-tunelab-")) / "run"
    cfg = load_config(overrides=[
        "task=gsm8k", "method=lora", "method.rank=8", "method.alpha=16", "method.target_modules=all-linear",
        f"data.limit={batch_size * steps}", "data.max_length=720", f"train.batch_size={batch_size}",
        f"train.max_steps={steps}", "train.lr=7e-4", "train.report_to=[]", "train.progress_bar=false",
        f"seed={seed}", f"out={out}",
    ])
    res = train(cfg)
    return {"variant": "tunelab", "real_tokens": res["train_tokens"], "train_time_s": res["train_time_s"],
            "tokens_per_s": res["train_tokens_per_s"], "peak_rss_bytes": res["peak_rss_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        res = run_tunelab(args.batch_size, args.steps, args.seed) if args.variant == "tunelab" else \
            run_hf(args.variant, args.batch_size, args.steps, args.seed)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for variant in ("padded720", "dynamic", "tunelab"):
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch-size", str(args.batch_size),
                               "--steps", str(args.steps), "--seed", str(args.seed)], capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(line[0][7:])
        print(f"{variant}: {results[variant]['tokens_per_s']:.1f} real tokens/s", file=sys.stderr)
    ours = results["tunelab"]
    names = {"padded720": "(a) HF Trainer + PEFT, padded to 720 (original)",
             "dynamic": "(b) HF Trainer + PEFT, dynamic padding", "tunelab": "(c) tunelab train"}
    print(f"\nLoRA r8 all-linear, SmolLM2-135M, GSM8K, batch {args.batch_size}, {args.steps} steps, CPU threads {os.cpu_count()}\n")
    print("| variant | real tokens/s | peak RSS (GiB) | tunelab speed-up |")
    print("|---|---|---|---|")
    for key, r in results.items():
        print(f"| {names[key]} | {r['tokens_per_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
              f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
