"""Training throughput and memory: tunelab vs its peers, side by side in one run.

On the same training examples (GSM8K, or news summarization with ``--task news_summary``), the
default model (SmolLM2-135M), LoRA r 8, alpha 16, dropout 0.05, all-linear, batch size B, S optimizer
steps, one process per variant (so peak RSS is per variant):

  padded720  original recipe: HF Trainer + PEFT, every example padded to the task's max_length
  dynamic    HF Trainer + PEFT with dynamic padding (pad to the batch's longest, random order)
  grouped    HF Trainer + PEFT with length grouping (train_sampling_strategy="group_by_length"),
             the like-for-like peer of tunelab's batching
  flatten    HF DataCollatorWithFlattening (padding-free)        -- reference only, see below
  trl        TRL SFTTrainer(padding_free=True)                    -- reference only, see below
  tunelab    tunelab train (dynamic padding + length grouping + logits only at target positions)
  packed     tunelab train data.packing=true: 1 packed row per step of max(longest example,
             B x mean length rounded up to 64) tokens, so a step holds about B examples' tokens
             (and never more than the B longest examples padded, the unpacked peak)
  tunelab-mkl, packed-mkl   the same with train.onednn_linear=false: torch's own CPU matmul (MKL),
             to show what the oneDNN kernels add
  tunelab-bf16, grouped-bf16   tunelab train.precision=bf16-mixed and HF Trainer bf16=True (both bf16
             autocast over fp32 weights; on a CPU for information only, CPU bf16 is slow)

``flatten`` and ``trl`` are timed for reference only: on CPU (sdpa/eager) their padding-free
batches let packed examples attend to each other (transformers 5.24), so they train on wrong
attention. The speed-up column is against the best *correct* peer (padded720/dynamic/grouped).

Throughput is *real* (non-padding) training tokens per second of the training loop, all of it
(the first step included, for every variant alike). On a shared CPU the numbers are noisy: run the
variants alternately (``--repeat``) and compare medians. Usage:
    python bench/bench_train.py [--batch-size 4] [--steps 3] [--variants grouped,tunelab,packed] [--repeat 2]
                                [--task news_summary]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUNELAB_DATA_DIR", str(HERE.parent.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: the tasks benched, with the data.max_length each trains at (the shipped configs' values)
TASKS = {"gsm8k": 720, "news_summary": 1024}
TASK = "gsm8k"  # set from --task (every variant process gets it)


def _examples(n: int, seed: int):
    from tunelab.config import load_config
    from tunelab.data import build_train_dataset
    from tunelab.models import load_tokenizer, materialize
    from tunelab.tasks import get_task

    cfg = load_config(overrides=[f"task={TASK}", f"data.limit={n}", f"data.max_length={TASKS[TASK]}", f"seed={seed}"])
    tok = load_tokenizer(cfg.model, materialize(cfg.model.name))
    data, _ = build_train_dataset(get_task(TASK)(cfg.task), tok, cfg.data, seed)
    return cfg, tok, data


def _hf_rows(tok, data, variant: str) -> list[dict]:
    rows = []
    for t in data:
        ids, labels = list(t.input_ids), list(t.labels)
        if variant == "padded720":  # the original: tokenizer(..., padding="max_length", max_length=720)
            pad = TASKS[TASK] - len(ids)
            rows.append({"input_ids": ids + [tok.pad_token_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad,
                         "labels": labels + [-100] * pad})
        elif variant == "trl":  # TRL's pre-tokenized format: the loss on the completion only
            rows.append({"input_ids": ids, "completion_mask": [int(l != -100) for l in labels]})
        else:
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def run_hf(variant: str, batch_size: int, steps: int, seed: int) -> dict:
    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments

    from tunelab.models import load_model, materialize
    from tunelab.utils import peak_rss_bytes

    cfg, tok, data = _examples(batch_size * steps, seed)
    rows = _hf_rows(tok, data, variant)
    real_tokens = sum(len(t) for t in data)
    model = load_model(cfg.model, materialize(cfg.model.name), torch.device("cpu"))
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(output_dir=f"/tmp/bench-hf-{variant}", per_device_train_batch_size=batch_size, max_steps=steps,
                  learning_rate=7e-4, logging_steps=1, save_strategy="no", report_to=[], seed=seed,
                  dataloader_num_workers=0, use_cpu=True, disable_tqdm=True)
    if variant == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, padding_free=True, completion_only_loss=True, max_length=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), peft_config=lora)
    else:
        model = peft.get_peft_model(model, lora)
        sampling = {"train_sampling_strategy": "group_by_length"} if variant.startswith("grouped") else {}
        args = TrainingArguments(**common, **sampling, bf16=variant.endswith("-bf16"))
        collator = DataCollatorWithFlattening() if variant == "flatten" else \
            DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    clock = _loop_clock()
    trainer.add_callback(clock)
    trainer.train()
    elapsed, cpu = clock.wall_s, clock.cpu_s
    return {"variant": variant, "real_tokens": real_tokens, "train_time_s": elapsed, "cpu_s": cpu,
            "tokens_per_s": real_tokens / elapsed, "tokens_per_cpu_s": real_tokens / cpu,
            "peak_rss_bytes": peak_rss_bytes()}


def _loop_clock():
    """An HF TrainerCallback timing the training loop only (on_train_begin to on_train_end), wall and
    process CPU seconds, as tunelab's own loop is timed."""
    from transformers import TrainerCallback

    class LoopClock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_end(self, *args, **kwargs):
            self.wall_s, self.cpu_s = time.perf_counter() - self.t0, time.process_time() - self.c0

    return LoopClock()


def pack_length(data, batch_size: int) -> int:
    """Row length of the packed variant: about batch_size examples' tokens, and every example whole."""
    mean = sum(len(t) for t in data) / len(data)
    return max(max(len(t) for t in data), 64 * math.ceil(batch_size * mean / 64))


def run_tunelab(batch_size: int, steps: int, seed: int, packed: bool = False, onednn: bool = True,
                precision: str = "auto") -> dict:
    import tempfile

    from tunelab.config import load_config
    from tunelab.train.trainer import Trainer

    out = Path(tempfile.mkdtemp(prefix="bench-tunelab-")) / "run"
    shape = [f"train.batch_size={batch_size}", f"train.max_steps={steps}", f"data.max_length={TASKS[TASK]}"]
    if packed:  # the same examples, one packed row per step, until they are used up
        _, _, data = _examples(batch_size * steps, seed)
        shape = ["train.batch_size=1", "train.max_steps=-1", "train.epochs=1", "data.packing=true",
                 f"data.max_length={pack_length(data, batch_size)}"]
    cfg = load_config(overrides=[
        f"task={TASK}", "method=lora", "method.rank=8", "method.alpha=16", "method.dropout=0.05",
        "method.target_modules=all-linear", f"data.limit={batch_size * steps}", *shape, "train.lr=7e-4",
        "train.report_to=[]", "train.progress_bar=false", f"seed={seed}", f"out={out}",
        f"train.onednn_linear={str(onednn).lower()}", f"train.precision={precision}",
    ])
    trainer = Trainer(cfg)
    trainer.setup()
    cpu, step = 0.0, trainer.train_step

    def timed_step():  # CPU seconds of the loop's steps (train_time_s is their wall time), not of saving
        nonlocal cpu
        c0 = time.process_time()
        try:
            return step()
        finally:
            cpu += time.process_time() - c0

    trainer.train_step = timed_step
    res = trainer.fit()
    suffix = ("" if onednn else "-mkl") + ("-bf16" if precision == "bf16-mixed" else "")
    return {"variant": ("packed" if packed else "tunelab") + suffix, "real_tokens": res["train_tokens"],
            "train_time_s": res["train_time_s"], "cpu_s": cpu, "tokens_per_s": res["train_tokens_per_s"],
            "tokens_per_cpu_s": res["train_tokens"] / cpu, "peak_rss_bytes": res["peak_rss_bytes"],
            "steps": res["steps"]}


VARIANTS = ("padded720", "dynamic", "grouped", "flatten", "trl", "tunelab", "packed", "tunelab-mkl", "packed-mkl",
            "tunelab-bf16", "grouped-bf16")
NAMES = {"padded720": "HF Trainer + PEFT, padded to max_length (original)", "dynamic": "HF Trainer + PEFT, dynamic padding",
         "grouped": "HF Trainer + PEFT, group_by_length", "flatten": "HF DataCollatorWithFlattening (reference only)",
         "trl": "TRL SFTTrainer padding_free (reference only)", "tunelab": "tunelab train",
         "packed": "tunelab train data.packing=true", "tunelab-mkl": "tunelab train, train.onednn_linear=false",
         "packed-mkl": "tunelab train data.packing=true, train.onednn_linear=false",
         "tunelab-bf16": "tunelab train train.precision=bf16-mixed", "grouped-bf16": "HF Trainer + PEFT, group_by_length, bf16=True"}
CORRECT_PEERS = ("padded720", "dynamic", "grouped")


def _run_variant(variant: str, args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch-size", str(args.batch_size),
                           "--steps", str(args.steps), "--seed", str(args.seed), "--threads", str(args.threads),
                           "--task", args.task],
                          capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all variants, run alternately; medians reported")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per variant (0 = torch's default); on a shared CPU use 1 and compare "
                         "real tokens per CPU-second, which depend less on the other processes than wall time")
    ap.add_argument("--task", default="gsm8k", choices=sorted(TASKS),
                    help="training examples from this task, at its shipped data.max_length")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global TASK
    TASK = args.task
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.variant:
        if args.variant.startswith(("tunelab", "packed")):
            res = run_tunelab(args.batch_size, args.steps, args.seed, packed=args.variant.startswith("packed"),
                              onednn=not args.variant.endswith("-mkl"),
                              precision="bf16-mixed" if args.variant.endswith("-bf16") else "auto")
        else:
            res = run_hf(args.variant, args.batch_size, args.steps, args.seed)
        print("RESULT " + json.dumps(res))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.repeat):
        for variant in variants:
            runs[variant].append(_run_variant(variant, args))
            print(f"round {round_ + 1} {variant}: {runs[variant][-1]['tokens_per_s']:.1f} real tokens/s", file=sys.stderr)
    results = {v: {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "tokens_per_cpu_s")}
               | {"peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs), "all": [r["tokens_per_s"] for r in rs]}
               for v, rs in runs.items()}
    print(json.dumps(runs), file=sys.stderr)
    best = {key: max([results[v][key] for v in CORRECT_PEERS if v in results], default=None)
            for key in ("tokens_per_s", "tokens_per_cpu_s")}
    print(f"\nLoRA r8 dropout 0.05 all-linear, SmolLM2-135M, {args.task} (max_length {TASKS[args.task]}), batch {args.batch_size}, {args.steps} steps, "
          f"{args.repeat} alternating round(s), torch threads {args.threads or 'default'}, {os.cpu_count()} CPUs\n")
    print("| variant | real tokens/s (median; runs) | vs best correct peer | real tokens per CPU-s | vs best correct peer "
          "| peak RSS (GiB) |")
    print("|---|---|---|---|---|---|")
    for key, r in results.items():
        ratios = [f"{r[k] / best[k]:.2f}x" if best[k] else "-" for k in ("tokens_per_s", "tokens_per_cpu_s")]
        runs_s = " / ".join(f"{x:.1f}" for x in r["all"])
        print(f"| {NAMES[key]} | {r['tokens_per_s']:.1f} ({runs_s}) | {ratios[0]} | {r['tokens_per_cpu_s']:.1f} | "
              f"{ratios[1]} | {r['peak_rss_bytes'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
