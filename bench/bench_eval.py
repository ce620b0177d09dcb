"""GSM8K evaluation throughput: tunelab eval vs the original eval, side by side in one run.

Same model (the default SmolLM2-135M, or a run's adapter with --run), same first N test questions:
  original: HF generate, batch 8, max_length 500 (prompt included), greedy, no stopping rule
  tunelab:  length-sorted batches of 32, left padding, greedy, each row stops at EOS or once its
            "#### <number>" answer line is complete

Both are scored the same way. Throughput = useful generated tokens (up to each row's EOS / stop
point) per second, and questions per second. Usage: python bench/bench_eval.py [--n 32] [--run RUN]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUNELAB_DATA_DIR", str(HERE.parent.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from tunelab.config import load_config
    from tunelab.evaluation.engine import _generated_length, generate
    from tunelab.evaluation.evaluate import load_model_for_eval
    from tunelab.rundir import RunDir
    from tunelab.tasks import get_task

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="test questions")
    ap.add_argument("--run", help="evaluate this run's adapter instead of the base model")
    args = ap.parse_args()
    cfg = RunDir(args.run).config() if args.run else load_config(overrides=["task=gsm8k"])
    model, tok = load_model_for_eval(cfg, Path(args.run) if args.run else None)
    task = get_task("gsm8k")(cfg.task)
    examples = task.examples("test")[: args.n]
    prompts = [e.prompt for e in examples]

    # --- the original eval: batch 8, max_length 500, no stop rule, input order ---
    tok.padding_side = "left"
    t0 = time.perf_counter()
    orig_completions, orig_tokens = [], 0
    with torch.inference_mode():
        for i in range(0, len(prompts), 8):
            enc = tok(prompts[i:i + 8], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_length=500, do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[:, enc.input_ids.shape[1]:]
            for row in new:
                orig_tokens += _generated_length(row, tok.eos_token_id, tok.pad_token_id)
                orig_completions.append(tok.decode(row, skip_special_tokens=True))
    orig_time = time.perf_counter() - t0
    orig_score = task.score(examples, [task.trim_completion(c) for c in orig_completions]).metrics

    # --- tunelab eval ---
    t0 = time.perf_counter()
    raw, ours_tokens = generate(model, tok, prompts, cfg.eval, task.stop_checker(), progress=False)
    ours_time = time.perf_counter() - t0
    ours_score = task.score(examples, [task.trim_completion(c) for c in raw]).metrics

    print(f"\nGSM8K eval, {'run ' + args.run if args.run else 'base SmolLM2-135M'}, {len(prompts)} questions, CPU\n")
    print("| eval | questions/s | useful generated tokens/s | generated tokens | accuracy strict / flexible |")
    print("|---|---|---|---|---|")
    for name, t, n_tok, sc in (("original (HF generate, batch 8, max_length 500)", orig_time, orig_tokens, orig_score),
                               (f"tunelab (batch {cfg.eval.batch_size}, stop at answer line)", ours_time, ours_tokens, ours_score)):
        print(f"| {name} | {len(prompts) / t:.3f} | {n_tok / t:.1f} | {n_tok} | "
              f"{sc['accuracy_strict']:.3f} / {sc['accuracy_flexible']:.3f} |")
    print(f"\nspeed-up: {orig_time / ours_time:.2f}x questions/s, "
          f"{(ours_tokens / ours_time) / (orig_tokens / orig_time):.2f}x useful generated tokens/s")


if __name__ == "__main__":
    main()
