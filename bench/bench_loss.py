"""Peak memory of the target loss: all logits at once (today's path) vs chunked (train.loss_chunk_tokens),
and chunked with train.lean_mlp (training's default: gated MLPs keep 2 of their 4 intermediates).

Side by side in one run, one process per variant (so peak RSS is per variant): the default model
(SmolLM2-135M, fp32, CPU), prepared by tunelab's own method (LoRA r8 all-linear by default, or
full fine-tuning), one forward + backward of a batch of B examples of exactly L tokens. The
examples are "GSM8K-like": consecutive tokenized GSM8K examples (prompt masked, answer as target,
as in training) packed into L tokens, so the target share is GSM8K's. Each variant reports:

  - peak RSS of the process, and its rise during forward + backward (above the RSS just before);
  - the loss (sum over target tokens, divided by their count) and the gradient norm;
  - forward + backward seconds (for information: the chunked backward recomputes the head).

Usage:
    python bench/bench_loss.py [--method lora|full] [--batch-size 8] [--length 720] [--chunk 1024]
                               [--gradient-checkpointing]

LoRA here has dropout 0 (the dropout copy is another cost, measured elsewhere). Without gradient
checkpointing the blocks' saved activations dominate the peak, so the loss's share is bounded by
the logits' few GiB; with it, the logits are the largest tensors of the step.

Peak RSS also counts what glibc malloc keeps after a free (tensors under its adaptive mmap
threshold, up to 32 MiB, come from the heap and are not returned); to have RSS follow the live
tensors, run with MALLOC_MMAP_THRESHOLD_=131072 in the environment (the variants inherit it).
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _packed_batch(tok, cfg, batch_size: int, length: int):
    """B rows of exactly ``length`` tokens, each consecutive GSM8K training examples end to end."""
    import torch

    from tunelab.data import build_train_dataset
    from tunelab.tasks import get_task

    data, _ = build_train_dataset(get_task("gsm8k")(cfg.task), tok, cfg.data, cfg.seed)
    stream = iter(data)
    ids, labels = [], []
    for _ in range(batch_size):
        row_ids, row_labels = [], []
        while len(row_ids) < length:
            t = next(stream)
            row_ids += list(t.input_ids)
            row_labels += list(t.labels)
        ids.append(row_ids[:length])
        labels.append(row_labels[:length])
    ids_t = torch.tensor(ids)
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "labels": torch.tensor(labels)}


def run_variant(method_name: str, batch_size: int, length: int, chunk: int, seed: int, checkpointing: bool,
                lean: bool = False) -> dict:
    import torch

    from tunelab.config import load_config
    from tunelab.loss import TargetPositionSelector, target_loss
    from tunelab.methods import get_method
    from tunelab.models import load_model, load_tokenizer, materialize
    from tunelab.train.lean_mlp import lean_mlps
    from tunelab.utils import peak_rss_bytes

    torch.manual_seed(seed)
    cfg = load_config(overrides=[f"method={method_name}", "task=gsm8k", "data.limit=200", "data.max_length=720",
                                 f"seed={seed}", f"model.gradient_checkpointing={str(checkpointing).lower()}"]
                     + (["method.dropout=0.0"] if method_name == "lora" else []))
    source = materialize(cfg.model.name)
    tok = load_tokenizer(cfg.model, source)
    batch = _packed_batch(tok, cfg, batch_size, length)
    method = get_method(cfg.method.name)(cfg.method)
    model = method.prepare(load_model(cfg.model, source, torch.device("cpu")), cfg)
    model.config.use_cache = False
    model.train()
    selector = TargetPositionSelector(model)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    with lean_mlps(model, lean):
        loss_sum = target_loss(model, selector, batch, chunk_tokens=chunk)
        loss_sum.backward()
    elapsed = time.perf_counter() - t0
    peak = peak_rss_bytes()
    grads = [p.grad.detach().double().norm() for p in model.parameters() if p.grad is not None]
    return {"chunk": chunk, "path": selector.last_path, "targets": n_targets, "tokens": batch_size * length,
            "loss": float(loss_sum) / n_targets, "grad_norm": float(torch.stack(grads).norm()),
            "rss_before_bytes": rss_before, "peak_rss_bytes": peak, "fwd_bwd_s": elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--length", type=int, default=720)
    ap.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_tokens of the chunked variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing=true")
    ap.add_argument("--variant-chunk", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--variant-lean", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant_chunk is not None:
        res = run_variant(args.method, args.batch_size, args.length, args.variant_chunk, args.seed,
                          args.gradient_checkpointing, args.variant_lean)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    common = ["--method", args.method, "--batch-size", str(args.batch_size), "--length", str(args.length),
              "--seed", str(args.seed)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    variants = (("all logits, stock MLP (today)", 0, False), (f"chunked ({args.chunk}), stock MLP", args.chunk, False),
                (f"chunked ({args.chunk}), train.lean_mlp (training's default)", args.chunk, True))
    for name, chunk, lean in variants:
        proc = subprocess.run([sys.executable, __file__, *common, "--variant-chunk", str(chunk)]
                              + (["--variant-lean"] if lean else []), capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[0][7:])
        print(f"{name}: peak {results[name]['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    _print_table(args, results)


def _print_table(args, results: dict) -> None:
    ref = next(iter(results.values()))
    gib = 2**30
    rise = lambda r: r["peak_rss_bytes"] - r["rss_before_bytes"]  # noqa: E731
    rel = lambda r, key: abs(r[key] - ref[key]) / abs(ref[key])  # noqa: E731
    ckpt = ", gradient checkpointing" if args.gradient_checkpointing else ""
    print(f"\n{args.method}{ckpt}, SmolLM2-135M fp32, CPU threads {os.cpu_count()}, batch {args.batch_size} x "
          f"{args.length} packed GSM8K tokens, {ref['targets']} target tokens, one forward + backward\n")
    print("| loss path | peak RSS (GiB) | vs today | rise in fwd+bwd (GiB) | loss | grad norm | fwd+bwd (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} ({r['path']}) | {r['peak_rss_bytes'] / gib:.2f} | {r['peak_rss_bytes'] / ref['peak_rss_bytes'] - 1:+.1%} "
              f"| {rise(r) / gib:.2f} | {r['loss']:.7f} | {r['grad_norm']:.6f} | {r['fwd_bwd_s']:.1f} |")
    for name, r in list(results.items())[1:]:
        print(f"{name}: loss relative difference {rel(r, 'loss'):.2e}, grad norm {rel(r, 'grad_norm'):.2e}")


if __name__ == "__main__":
    main()
