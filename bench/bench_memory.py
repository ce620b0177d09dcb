"""Peak memory of the methods, side by side with HF Trainer + PEFT, on the same length-grouped batches.

One process per variant (peak RSS is per process), the default model (SmolLM2-135M), CPU, the
same GSM8K rows (``--rows``, max length 720) and the same batches in the same order: tunelab's own
length-grouped epoch (``tunelab.data.epoch_batches``), which the HF variant is fed in that order
(sequential sampler, padding to the batch's longest, like tunelab's collate):

  lora        tunelab LoRA r8 alpha16 all-linear, dropout 0.05 (its mask kept as 1 bit per element)
  lora-peft   the same with PEFT's stock LoRA layers (a dropped-out input copy per adapted layer)
  lora-d0     the same with dropout 0 (the floor the bit-mask dropout should reach)
  full        tunelab full fine-tuning
  rosa        tunelab RoSA r8 alpha16 all-linear, density 0.006, dropout 0.05 (mask from step 1's gradients)
  galore      tunelab GaLore (rank 128, its own AdamW)
  hf-peft     HF Trainer + PEFT LoRA r8 alpha16 all-linear dropout 0.05
  load        model + data loaded, no training (what every variant pays before its first step)
  X-before    a tunelab variant (lora, full, rosa, galore) with this issue's memory work switched off,
              as at filing: all target logits at once (train.loss_chunk_tokens=0), the stock gated MLP
              (train.lean_mlp=false), MKL linears (train.onednn_linear=false; so oneDNN's shape caches,
              which tunelab caps, play no part), a right-padded batch's 2D mask passed to the model (sdpa
              then repeats key and value to every head and saves a float mask per layer), and for
              LoRA PEFT's stock layers (their out-of-place sums)

Usage: python bench/bench_memory.py [--rows 64] [--batch-size 2] [--steps 4] [--variants lora,full,...]
    [--env MALLOC_MMAP_THRESHOLD_=65536]   (environment of every variant's process, e.g. glibc malloc tuning)
With 64 rows and seed 0 the longest batch (351 tokens) comes 4th at batch 2, so --steps 4 reaches
it with every method's optimizer state allocated; at batch 4 it comes 1st, before full fine-tuning
holds any AdamW state, so use --batch-size 4 --seed 1 --steps 8 there (its longest batch, 274
tokens, is the 8th). The issue's targets: lora <= 0.7x full and <= 0.7x hf-peft.

Two peaks per variant. Peak RSS counts the model's weights once (safetensors are memory-mapped) and
whatever the C allocator keeps from freed tensors (glibc keeps freed activations whose holes later,
larger tensors do not fit), so it is above the live-tensor peak. Peak heap in use is what malloc has
handed out and not got back (glibc's mallinfo2, polled every millisecond): live tensors and
buffers, not the mapped weights, the counterpart of CUDA's max allocated (with ``--heap``: polling
slows training about 2x, so train times of such a run are not comparable with one without).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUNELAB_DATA_DIR", str(HERE.parent.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("load", "lora-peft", "lora", "lora-d0", "full", "hf-peft")
NAMES = {
    "load": "model + data loaded, no training",
    "lora-peft": "tunelab LoRA r8, dropout 0.05, PEFT's stock layers",
    "lora": "tunelab LoRA r8, dropout 0.05",
    "lora-d0": "tunelab LoRA r8, dropout 0",
    "full": "tunelab full fine-tuning",
    "rosa": "tunelab RoSA r8, density 0.006, dropout 0.05",
    "galore": "tunelab GaLore rank 128",
    "hf-peft": "HF Trainer + PEFT LoRA r8, dropout 0.05",
}
_LORA = ["method=lora", "method.rank=8", "method.alpha=16", "method.target_modules=all-linear"]
METHOD_OVERRIDES = {
    "lora": _LORA + ["method.dropout=0.05"], "lora-peft": _LORA + ["method.dropout=0.05"],
    "lora-d0": _LORA + ["method.dropout=0.0"], "full": ["method=full"], "galore": ["method=galore"],
    "rosa": ["method=rosa", "method.rank=8", "method.alpha=16", "method.target_modules=all-linear",
             "method.density=0.006", "method.dropout=0.05"],
}
BEFORE = ["train.loss_chunk_tokens=0", "train.lean_mlp=false", "train.onednn_linear=false"]


def _known(variant: str) -> bool:
    base = variant.removesuffix("-before")
    return variant in NAMES or (variant.endswith("-before") and base in ("lora", "full", "rosa", "galore"))


def _name(variant: str) -> str:
    base = variant.removesuffix("-before")
    return NAMES[base] + (", before (memory work off)" if variant != base else "")


def _examples(rows: int, seed: int):
    from tunelab.config import load_config
    from tunelab.data import build_train_dataset
    from tunelab.models import load_tokenizer, materialize
    from tunelab.tasks import get_task

    cfg = load_config(overrides=[f"data.limit={rows}", "data.max_length=720", f"seed={seed}"])
    tok = load_tokenizer(cfg.model, materialize(cfg.model.name))
    data, _ = build_train_dataset(get_task("gsm8k")(cfg.task), tok, cfg.data, seed)
    return cfg, tok, data


def _batches(data, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The index batches tunelab's trainer takes for its first ``steps`` steps (epoch 0, one process)."""
    from tunelab.data import epoch_batches

    batches = epoch_batches([len(t) for t in data], batch_size, seed, 0, shuffle=True, group_by_length=True)
    if steps > len(batches):
        sys.exit(f"--steps {steps} exceeds the {len(batches)} batches of one epoch: raise --rows")
    return batches[:steps]


def run_load(a) -> dict:
    import torch

    from tunelab.models import load_model, materialize
    from tunelab.utils import peak_rss_bytes

    cfg, _, data = _examples(a.rows, a.seed)
    load_model(cfg.model, materialize(cfg.model.name), torch.device("cpu"))
    return {"peak_rss_bytes": peak_rss_bytes()}


def run_hf(a) -> dict:
    import tempfile

    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunelab.models import load_model, materialize
    from tunelab.utils import peak_rss_bytes

    cfg, tok, data = _examples(a.rows, a.seed)
    order = [i for b in _batches(data, a.batch_size, a.steps, a.seed) for i in b]
    rows = [{"input_ids": list(data[i].input_ids), "attention_mask": [1] * len(data[i]),
             "labels": list(data[i].labels)} for i in order]
    model = load_model(cfg.model, materialize(cfg.model.name), torch.device("cpu"))
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-memory-hf-"), per_device_train_batch_size=a.batch_size,
        max_steps=a.steps, learning_rate=7e-4, logging_steps=1, save_strategy="no", report_to=[], seed=a.seed,
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential",
    )
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return {"peak_rss_bytes": peak_rss_bytes(), "train_time_s": elapsed}


def run_tunelab(a) -> dict:
    import tempfile

    from tunelab.config import load_config
    from tunelab.methods.lora import LoraMethod
    from tunelab.train import train

    base = a.variant.removesuffix("-before")
    before = base != a.variant
    LoraMethod.bit_mask_dropout = base != "lora-peft" and not before
    if before:  # every padded batch's forward gets its 2D mask (no unmasked causal sdpa for right padding)
        import tunelab.loss

        tunelab.loss.padding_mask = lambda selector, mask: mask
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    cfg = load_config(overrides=[
        "task=gsm8k", *METHOD_OVERRIDES[base], f"data.limit={a.rows}", "data.max_length=720",
        f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}", "train.lr=7e-4", "train.report_to=[]",
        "train.progress_bar=false", f"seed={a.seed}", f"out={tmp / 'run'}", *(BEFORE if before else []), *a.override,
    ])
    try:
        res = train(cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a full fine-tuning run writes the whole model
    return {"peak_rss_bytes": res["peak_rss_bytes"], "train_time_s": res["train_time_s"],
            "optimizer_state_bytes": res.get("optimizer_state_bytes"),
            "loss_chunk_tokens": cfg.train.loss_chunk_tokens}


class _HeapSampler:
    """Peak bytes malloc has handed out and not got back (glibc's ``mallinfo2``: heap in use plus
    mmapped chunks), polled every millisecond in a thread: the CPU counterpart of CUDA's max allocated,
    which RSS is not (RSS also keeps what the allocator holds after a free, and the mapped weights)."""

    def __init__(self):
        import threading

        from tunelab.utils import heap_in_use_bytes

        self._read, self.peak_bytes = heap_in_use_bytes, heap_in_use_bytes()
        if self.peak_bytes is not None:
            threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self._read())
            time.sleep(0.001)


def _child(a) -> None:
    run = {"load": run_load, "hf-peft": run_hf}.get(a.variant, run_tunelab)
    sampler = _HeapSampler() if a.heap else None
    result = run(a)
    print("RESULT " + json.dumps({**result, "peak_heap_bytes": sampler.peak_bytes if sampler else None}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--override", action="append", default=[], help="extra tunelab key=value (tunelab variants)")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE in every variant's environment")
    ap.add_argument("--heap", action="store_true",
                    help="also the peak heap in use (glibc: polls mallinfo2 every ms, which slows training ~2x)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        return _child(a)
    _, _, data = _examples(a.rows, a.seed)
    batches = _batches(data, a.batch_size, a.steps, a.seed)
    longest = max(max(len(data[i]) for i in b) for b in batches)
    results = {}
    unknown = [v for v in a.variants.split(",") if not _known(v)]
    if unknown:
        sys.exit(f"unknown variants {unknown}: choose from {', '.join(NAMES)} (and lora/full/rosa/galore-before)")
    for variant in a.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant, "--rows", str(a.rows), "--batch-size",
               str(a.batch_size), "--steps", str(a.steps), "--seed", str(a.seed)] + (["--heap"] if a.heap else [])
        cmd += [f"--override={o}" for o in a.override]
        env = dict(os.environ, **dict(e.split("=", 1) for e in a.env))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(line[0][7:])
        print(f"{variant}: {results[variant]['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    print(f"\nSmolLM2-135M, CPU, GSM8K {a.rows} rows, batch {a.batch_size}, {a.steps} steps (longest batch "
          f"{longest} tokens), overrides {a.override or 'none'}, "
          f"environment {a.env or 'unchanged'}, CPU threads {os.cpu_count()}\n")
    print("| variant | peak RSS (GiB) | vs full | vs HF+PEFT | peak heap in use (GiB) | vs full | vs HF+PEFT "
          "| optimizer state (MiB) | train time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        ratios = [f"{r['peak_rss_bytes'] / results[k]['peak_rss_bytes']:.2f}x" if k in results else "-"
                  for k in ("full", "hf-peft")]
        heap = r.get("peak_heap_bytes")
        heap_ratios = [f"{heap / results[k]['peak_heap_bytes']:.2f}x" if heap and results.get(k, {}).get("peak_heap_bytes") else "-"
                       for k in ("full", "hf-peft")]
        heap_gib = f"{heap / 2**30:.2f}" if heap else "-"
        secs = f"{r['train_time_s']:.1f}" if "train_time_s" in r else "-"
        state = f"{r['optimizer_state_bytes'] / 2**20:.1f}" if r.get("optimizer_state_bytes") is not None else "-"
        print(f"| {_name(key)} | {r['peak_rss_bytes'] / 2**30:.2f} | {ratios[0]} | {ratios[1]} | {heap_gib} "
              f"| {heap_ratios[0]} | {heap_ratios[1]} | {state} | {secs} |")


if __name__ == "__main__":
    main()
