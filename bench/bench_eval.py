"""GSM8K generation throughput, side by side in one run: plain HF generate vs tunelab's decoders.

The default model (SmolLM2-135M-Instruct, loaded as tunelab loads it), the first N GSM8K test
questions, the untrained model and a LoRA-tuned run (``--run RUN``, or one trained here with
``--train-steps`` steps of configs/gsm8k_lora_cpu_demo.yaml). Greedy everywhere:

  (a) original recipe: HF generate, batch 8, max_length 500 (prompt included), no stop rule, input order
  (b) HF generate, batch 16, max_new_tokens 256, no stop rule, input order
  (c) tunelab, eval.decoder=hf: length-sorted batches of eval.batch_size, stop at the answer line
  (d) tunelab, eval.decoder=continuous (the default): slots refilled as rows finish, same stop rule
  (e) as (b), on the merged model (what (b) gains from merging the adapter alone)

(a) and (b) run the model as a plain HF + PEFT user has it (a LoRA run: ``PeftModel``, unmerged);
(c), (d) and (e) the model as ``tunelab eval`` loads it (``eval.merge_adapter=true``: the adapter
folded into the weights in memory). On the untrained model all variants run the same model.

Throughput: questions/s and generated tokens/s (tokens up to each row's EOS / stop point).
"identical" counts questions whose scored completion (task trim) equals that of (a) / of (c).
The CPU may be shared: variants are timed alternately (a b c d, then d c b a, ...) and the
fastest round of each is reported beside the median.

Usage: python bench/bench_eval.py [--n 32] [--run RUN | --train-steps 16] [--rounds 2] [--only untrained|tuned]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUNELAB_DATA_DIR", str(HERE.parent.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {
    "a": "(a) original: HF generate, batch 8, max_length 500",
    "b": "(b) HF generate, batch 16, max_new_tokens 256",
    "c": "(c) tunelab eval.decoder=hf",
    "d": "(d) tunelab eval.decoder=continuous",
    "e": "(e) HF generate, batch 16, max_new_tokens 256, merged model",
}


def plain_generate(model, tok, prompts: list[str], batch: int, **limits) -> tuple[list[str], int]:
    """HF generate in input order, left padding, greedy, no stop rule (the original eval)."""
    import torch

    from tunelab.evaluation.hf_generate import generated_length

    tok.padding_side = "left"
    texts, n_tokens = [], 0
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, do_sample=False, pad_token_id=tok.pad_token_id, **limits)
            for row in out[:, enc.input_ids.shape[1]:]:
                n_tokens += generated_length(row, tok.eos_token_id, tok.pad_token_id)
                texts.append(tok.decode(row, skip_special_tokens=True))
    return texts, n_tokens


def run_variant(key: str, models: dict, tok, prompts: list[str], eval_cfg, stop_check) -> tuple[float, float, list[str], int]:
    """(wall seconds, CPU seconds of this process, raw completions, generated tokens) of one variant.

    ``models``: "peer" (as a plain HF + PEFT user has it) and "tunelab" (as tunelab eval loads it).
    """
    from tunelab.evaluation.engine import generate

    model = models["peer" if key in "ab" else "tunelab"]
    t0, c0 = time.perf_counter(), time.process_time()
    if key == "a":
        texts, n = plain_generate(model, tok, prompts, 8, max_length=500)
    elif key in "be":
        texts, n = plain_generate(model, tok, prompts, 16, max_new_tokens=256)
    else:
        cfg = replace(eval_cfg, decoder="hf" if key == "c" else "continuous")
        texts, n = generate(model, tok, prompts, cfg, stop_check, progress=False)
    return time.perf_counter() - t0, time.process_time() - c0, texts, n


def _ratio(times: dict[str, list[float]], base: str, key: str) -> str:
    return f"{min(times[base]) / min(times[key]):.2f}x" if times.get(base) else "-"


def bench_target(label: str, run: str | None, n: int, rounds: int, variants: str = "abcde") -> list[str]:
    """Time every variant ``rounds`` times, alternating the order; the table rows of this target."""
    import torch

    from tunelab.config import load_config
    from tunelab.evaluation.evaluate import load_model_for_eval
    from tunelab.rundir import RunDir
    from tunelab.tasks import get_task

    cfg = RunDir(run).config() if run else load_config(overrides=["task=gsm8k"])
    model, tok = load_model_for_eval(cfg, Path(run) if run else None)
    peer = load_model_for_eval(cfg, Path(run), merge=False)[0] if run else model
    models = {"peer": peer, "tunelab": model}
    task = get_task("gsm8k")(cfg.task)
    examples = task.examples("test")[:n]
    prompts = [e.prompt for e in examples]
    eval_cfg = replace(cfg.eval, max_new_tokens=256)
    chosen = [k for k in VARIANTS if k in variants and (run or k != "e")]  # untrained: (e) is (b)
    times: dict[str, list[float]] = {k: [] for k in chosen}
    cpu: dict[str, list[float]] = {k: [] for k in chosen}
    done: dict[str, tuple[list[str], int]] = {}
    for r in range(rounds):
        for key in (chosen if r % 2 == 0 else list(reversed(chosen))):
            seconds, cpu_s, texts, n_tok = run_variant(key, models, tok, prompts, eval_cfg, task.stop_checker())
            times[key].append(seconds)
            cpu[key].append(cpu_s)
            done[key] = (texts, n_tok)
            print(f"  [{label}] round {r + 1} {key}: {seconds:.1f} s wall, {cpu_s:.1f} s CPU, {n_tok} tokens",
                  file=sys.stderr, flush=True)
    threads = torch.get_num_threads()
    trimmed = {k: [task.trim_completion(t) for t in texts] for k, (texts, _) in done.items()}
    rows = []
    for key in chosen:
        name = VARIANTS[key]
        best, median = min(times[key]), statistics.median(times[key])
        n_tok = done[key][1]
        same = {b: f"{sum(x == y for x, y in zip(trimmed[key], trimmed[b]))}/{n}" if b in trimmed else "-" for b in "ac"}
        acc = task.score(examples, trimmed[key]).metrics
        # CPU seconds / threads: the wall time this work would take on otherwise idle cores
        alone = min(cpu[key]) / threads
        rows.append(f"| {label} | {name} | {n / best:.3f} ({n / median:.3f}) | {n / alone:.3f} | {n_tok / best:.1f} | "
                    f"{n_tok / alone:.1f} | {n_tok} | {_ratio(times, 'a', key)} ({_ratio(cpu, 'a', key)}) | "
                    f"{_ratio(times, 'b', key)} ({_ratio(cpu, 'b', key)}) | {same['a']} | {same['c']} | {acc['accuracy_strict']:.3f} / {acc['accuracy_flexible']:.3f} |")
    return rows


def train_tuned(steps: int, out: Path) -> str:
    """A small LoRA run of the demo recipe (reused when it is already there)."""
    if (out / "results.json").is_file():
        return str(out)
    cmd = [sys.executable, "-m", "tunelab", "train", "--config", str(HERE.parent / "configs" / "gsm8k_lora_cpu_demo.yaml"),
           f"out={out}", f"train.max_steps={steps}"]
    print("training:", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return str(out)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="test questions")
    ap.add_argument("--run", help="the tuned run to bench (default: train one with --train-steps)")
    ap.add_argument("--train-steps", type=int, default=16, help="LoRA steps of the tuned run trained here")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per variant (order alternates)")
    ap.add_argument("--variants", default="abcde", help="which of a, b, c, d, e to run (e.g. cd)")
    ap.add_argument("--only", choices=["untrained", "tuned"], help="bench one of the two models only")
    args = ap.parse_args()
    targets = [("untrained", None)] if args.only != "tuned" else []
    if args.only != "untrained":
        out = Path(tempfile.gettempdir()) / f"tunelab_bench_eval_lora_{args.train_steps}"
        targets.append(("tuned", args.run or train_tuned(args.train_steps, out)))
    rows = []
    for label, run in targets:
        rows += bench_target(label, run, args.n, args.rounds, args.variants)
    print(f"\nGSM8K generation, SmolLM2-135M-Instruct, first {args.n} test questions, CPU "
          f"({torch.get_num_threads()} threads), best of {args.rounds} alternating rounds (median)\n")
    print("questions/s: wall, best round (median); 'alone': from CPU seconds / threads, i.e. on idle cores.")
    print("vs (a), vs (b): speed-up in questions/s, wall (from CPU seconds).\n")
    print("| model | variant | questions/s | questions/s alone | generated tokens/s | tokens/s alone | generated tokens | "
          "vs (a) | vs (b) | same as (a) | same as (c) | accuracy strict / flexible |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
