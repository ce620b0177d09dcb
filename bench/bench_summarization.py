"""Summarization eval throughput: tunelab's generation vs the original project's recipe.

Generates summaries for the same N test articles (same prompts, same model) three or more ways
and prints a markdown table of articles/s with the ratio to the original recipe:

* **original recipe** — plain ``model.generate`` one article at a time with 4 beams,
  ``no_repeat_ngram_size=3``, 150 new tokens (how the original project decoded);
* **tunelab greedy** — ``tunelab.evaluation.engine.generate`` as ``tunelab eval`` runs it by default
  (greedy, length-sorted batches with left padding, per-row stop at a blank line or EOS), with the
  ``greedy`` preset's 128 new tokens;
* **tunelab beam preset** — the same function with ``eval.preset=original`` (batch 1, 4 beams,
  no repeated trigrams, 150 new tokens): the original's output settings through our loop;
* optionally **tunelab beam, batched** (``--beam-batch 4``): the beam settings with batching.

ROUGE-L of each set of outputs is printed too, so a speed-up is never a quality change in
disguise. Usage (CPU; about 5-10 minutes with the defaults)::

    OMP_NUM_THREADS=1 python bench/bench_summarization.py --n 8
    python bench/bench_summarization.py --n 8 --run runs/news-lora     # a trained run's adapter
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import torch


def original_recipe(model, tokenizer, prompts: list[str], max_new_tokens: int = 150) -> tuple[list[str], int]:
    """The original project's decoding: one prompt at a time, HF generate, 4 beams, no repeated trigrams."""
    outs, n_tokens = [], 0
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            gen = model.generate(
                **enc, num_beams=4, no_repeat_ngram_size=3, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        new = gen[0, enc["input_ids"].shape[1]:]
        n_tokens += int(new.numel())
        outs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outs, n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="articles (the first N of the test split)")
    ap.add_argument("--max-length", type=int, default=1024, help="data.max_length: prompts get max_length - 150 tokens")
    ap.add_argument("--greedy-batch", type=int, default=8, help="batch size of tunelab's greedy eval")
    ap.add_argument("--beam-batch", type=int, default=0, help="also time the beam settings batched (0 = skip)")
    ap.add_argument("--run", help="a trained run directory (its adapter is applied); default: the base model")
    ap.add_argument("--model", default="smollm2-135m", help="model when --run is not given")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--skip-original", action="store_true", help="do not time the original recipe (slow on CPU)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TUNELAB_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    from tunelab.config import load_config
    from tunelab.evaluation.engine import generate, generation_settings
    from tunelab.evaluation.evaluate import load_model_for_eval
    from tunelab.evaluation.metrics import rouge
    from tunelab.models import resolve_device
    from tunelab.rundir import RunDir
    from tunelab.tasks import get_task
    from tunelab.utils import setup_logging

    setup_logging()
    over = [f"data.max_length={args.max_length}"]
    if args.run:
        cfg = RunDir(args.run).config(over)
    else:
        cfg = load_config(overrides=["task=news_summary", f"model={args.model}", *over])
    task = get_task(cfg.task.name)(cfg.task)
    device = resolve_device(cfg.model.device)
    model, tokenizer = load_model_for_eval(cfg, Path(args.run) if args.run else None, device)
    # Same prompts for every configuration: the article budget of the longest setting (150 new tokens).
    examples = task.examples("test", tokenizer=tokenizer, max_prompt_tokens=args.max_length - 150)[: args.n]
    prompts, refs = [e.prompt for e in examples], [e.reference for e in examples]
    n_prompt = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]

    presets = task.generation_presets()
    greedy = replace(generation_settings(task, replace(cfg.eval, preset="greedy")), batch_size=args.greedy_batch)
    beam = generation_settings(task, replace(cfg.eval, preset="original"))
    configs = [("tunelab greedy (default)", greedy), ("tunelab beam preset (original settings)", beam)]
    if args.beam_batch:
        configs.append((f"tunelab beam, batch {args.beam_batch}", replace(beam, batch_size=args.beam_batch)))

    rows = []
    # warm-up (first-call overheads are not part of any configuration's time)
    generate(model, tokenizer, prompts[:1], replace(greedy, max_new_tokens=4), None, progress=False)
    if not args.skip_original:
        t, c = time.perf_counter(), time.process_time()
        outs, n_tok = original_recipe(model, tokenizer, prompts)
        rows.append(("original recipe (HF generate, batch 1, 4 beams)", 1, 4, time.perf_counter() - t,
                     time.process_time() - c, n_tok, [task.trim_completion(o) for o in outs]))
    for name, settings in configs:
        t, c = time.perf_counter(), time.process_time()
        outs, n_tok = generate(model, tokenizer, prompts, settings, task.stop_checker(), progress=False)
        rows.append((name, settings.batch_size, settings.num_beams, time.perf_counter() - t,
                     time.process_time() - c, n_tok, [task.trim_completion(o) for o in outs]))

    base_rate = len(prompts) / rows[0][3] if not args.skip_original else None
    base_cpu = rows[0][4] if not args.skip_original else None
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"\n{len(prompts)} news_summary test articles, prompts {min(n_prompt)}-{max(n_prompt)} tokens "
          f"(mean {sum(n_prompt) / len(n_prompt):.0f}), model {cfg.model.name}"
          f"{' + ' + args.run if args.run else ' (base)'}, {dev}, torch {torch.__version__}\n")
    # On a shared machine the wall clock includes waiting for the CPU; the process's CPU time
    # (with one thread, about what the wall time would be on an idle machine) is printed too.
    print("| configuration | batch | beams | articles/s | vs original | CPU s | vs original (CPU) | new tokens | ROUGE-L |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, bs, beams, secs, cpu, n_tok, outs in rows:
        rate = len(prompts) / secs
        ratio = f"{rate / base_rate:.2f}x" if base_rate else "n/a"
        cpu_ratio = f"{base_cpu / cpu:.2f}x" if base_cpu else "n/a"
        rl = sum(rouge(outs, refs, types=("rougeL",))["rougeL"]) / len(refs)
        print(f"| {name} | {bs} | {beams} | {rate:.3f} | {ratio} | {cpu:.0f} | {cpu_ratio} | {n_tok} | {rl:.4f} |")
    print(f"\n(presets: {presets})")


if __name__ == "__main__":
    main()
