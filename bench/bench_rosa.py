"""RoSA step time and memory vs LoRA on the default model (SmolLM2-135M, fp32, CPU unless CUDA).

Both variants train their own copy of the default model on the *same* batches of GSM8K text
(train.jsonl rows "Question: …\\nAnswer: …" packed into batch × seq tokens; random ids when the
data folder is missing). One step of each in turn (interleaved, so background load hits both alike).
A step is what the trainer does: forward with labels, backward, AdamW step, zero_grad, and RoSA's
callbacks around it.

* LoRA: PEFT r=8, alpha 16, dropout 0.05, all linear layers (tunelab's ``method=lora``).
* RoSA: r=8, alpha 16, dropout 0.05, d=0.006, all linear layers, schedule ``wl{N}`` so one run
  passes through its three phases: LoRA only (our own LoRA inside the RoSA layer), gradient
  collection for the mask, then LoRA + sparse with the mask built (the phase that matters).

Reported: median step time per phase with the median of the LoRA steps interleaved with that
phase, their ratio, and peak RSS of a separate process per variant. ``--micro`` adds the per-layer
measurements behind the design choices (forward: W+S copy vs CSR; SDDMM: sampled_addmm vs gather vs
dense dOᵀ·X) at the default model's shapes.

Usage::

    OMP_NUM_THREADS=2 python bench/bench_rosa.py                  # batch 8 × 200 tokens, 6 timed sparse steps
    python bench/bench_rosa.py --steps 3 --batch 4 --seq 128 --micro --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------


def device_of(args) -> torch.device:
    return torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def load_base(device: torch.device):
    from tunelab.config import ModelConfig
    from tunelab.models import load_model, load_tokenizer, materialize

    mc = ModelConfig()
    source = materialize(mc.name)
    model = load_model(mc, source, device)
    model.config.use_cache = False
    return model, load_tokenizer(mc, source)


def gsm8k_batch(tokenizer, batch: int, seq: int) -> torch.Tensor:
    """batch × seq token ids of real GSM8K training text (consecutive examples packed per row)."""
    data_dir = Path(os.environ.get("TUNELAB_DATA_DIR", REPO.parent / "shared" / "data"))
    path = data_dir / "gsm8k" / "train.jsonl"
    if not path.is_file():
        print(f"[bench] {path} not found: random token ids", file=sys.stderr)
        return torch.randint(0, len(tokenizer), (batch, seq), generator=torch.Generator().manual_seed(0))
    rows, current = [], []
    with open(path) as fh:
        for line in fh:
            ex = json.loads(line)
            text = f"Question: {ex['question']}\nAnswer: {ex['answer']}{tokenizer.eos_token}"
            current += tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(current) >= seq:
                rows.append(current[:seq])
                current = []
                if len(rows) == batch:
                    break
    return torch.tensor(rows)


def run_cfg(**method):
    from tunelab.config import RunConfig, TrainConfig
    from tunelab.methods.lora import LoraConfig
    from tunelab.methods.rosa import RosaConfig

    is_rosa = method.pop("_rosa", True)
    cfg = RosaConfig(**method) if is_rosa else LoraConfig(**method)
    return RunConfig(method=cfg, train=TrainConfig(lr=1e-4, max_grad_norm=0.0))


class Variant:
    def __init__(self, label, method, model, cfg):
        self.label = label
        self.method = method
        self.model = model
        self.optimizer = method.build_optimizer(model, cfg.train)
        self.callbacks = method.callbacks()
        from tunelab.methods.base import TrainState

        self.state = TrainState()
        for cb in self.callbacks:
            cb.on_train_begin(self.state, model, self.optimizer)
        self.times: dict[str, list[float]] = {}

    def phase(self) -> str:
        from tunelab.methods.rosa import RosaScheduler

        sched = [cb for cb in self.callbacks if isinstance(cb, RosaScheduler)]
        if not sched:
            return "lora"
        s = sched[0]
        if s.mask_ready and self.state.step >= s.spa_start:
            return "sparse"
        if self.state.step >= s.spa_start:
            return "collect"
        return "lora_phase"

    def step(self, ids: torch.Tensor, sync) -> tuple[str, float, float, float]:
        """One optimizer step; returns (phase, wall s, process CPU s, loss)."""
        phase = self.phase()
        sync()
        t0 = time.perf_counter()
        c0 = time.process_time()
        for cb in self.callbacks:
            cb.on_step_begin(self.state, self.model)
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self.state, self.model, self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        for cb in self.callbacks:
            cb.on_step_end(self.state, self.model, self.optimizer)
        sync()
        return phase, time.perf_counter() - t0, time.process_time() - c0, float(loss.detach())


def build(kind: str, device: torch.device, warm_lora: int, collect: int, rank: int, density: float):
    from tunelab.methods.lora import LoraMethod
    from tunelab.methods.rosa import RosaMethod

    torch.manual_seed(0)
    model, tok = load_base(device)
    if kind == "lora":
        cfg = run_cfg(_rosa=False, rank=rank)
        method = LoraMethod(cfg.method)
        label = f"LoRA r{rank} (PEFT)"
    else:
        cfg = run_cfg(rank=rank, density=density, schedule=f"wl{warm_lora}", spa_num_grads=collect)
        method = RosaMethod(cfg.method)
        label = f"RoSA r{rank} d{density}"
    model = method.prepare(model, cfg)
    model.train()
    return Variant(label, method, model, cfg), tok


def sync_fn(device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# ------------------------------------------------------------------------------------------
# modes
# ------------------------------------------------------------------------------------------


def interleaved(args) -> dict:
    device = device_of(args)
    sync = sync_fn(device)
    warm_lora = 1 + args.lora_phase_steps  # step 0 of every variant is a warm-up
    lora, tok = build("lora", device, 0, 1, args.rank, args.density)
    rosa, _ = build("rosa", device, warm_lora, args.collect_steps, args.rank, args.density)
    ids = gsm8k_batch(tok, args.batch, args.seq).to(device)
    total = warm_lora + args.collect_steps + 1 + args.steps
    # (rosa phase, rosa wall, lora wall, rosa cpu, lora cpu)
    pairs: list[tuple[str, float, float, float, float]] = []
    first_sparse_seen = False
    for i in range(total):
        # alternate which goes first, so neither always runs right after the other
        if i % 2 == 0:
            _, tl, cl, _ = lora.step(ids, sync)
            phase, tr, cr, loss = rosa.step(ids, sync)
        else:
            phase, tr, cr, loss = rosa.step(ids, sync)
            _, tl, cl, _ = lora.step(ids, sync)
        print(f"[bench] step {i}: RoSA {phase:<10} {tr:6.2f}s (cpu {cr:6.2f}s) | LoRA {tl:6.2f}s (cpu {cl:6.2f}s) "
              f"| RoSA loss {loss:.3f}", file=sys.stderr)
        if i == 0:
            continue  # warm-up
        if phase == "sparse" and not first_sparse_seen:
            first_sparse_seen = True  # first step after the mask: one more warm-up
            continue
        pairs.append((phase, tr, tl, cr, cl))
    rows = {}
    for phase in ("sparse", "lora_phase", "collect"):
        sel = [row[1:] for row in pairs if row[0] == phase]
        if not sel:
            continue
        med = [statistics.median(col) for col in zip(*sel)]
        rows[phase] = {"rosa_s": med[0], "lora_s": med[1], "ratio": med[0] / med[1],
                       "rosa_cpu_s": med[2], "lora_cpu_s": med[3], "cpu_ratio": med[2] / med[3], "n": len(sel)}
    from tunelab.methods.rosa import trainable_counts

    extra = rosa.method.extra_results(rosa.model, rosa.optimizer)
    counts = trainable_counts(rosa.model)
    lora_trainable = sum(p.numel() for p in lora.model.parameters() if p.requires_grad)
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "seq": args.seq,
        "phases": rows,
        "trainable": {"lora_peft": lora_trainable, "rosa_lora": counts["lora"], "rosa_sparse": counts["sparse"]},
        "mask_topk_s": extra["rosa_mask_topk_s"],
        "mask_collection_window_s": extra["rosa_mask_collection_s"],
    }


def peak_rss_bytes() -> int:
    """VmHWM: the peak RSS of this address space. (ru_maxrss would carry the parent's peak across
    fork + exec, so a child started by a big parent reports the parent's number.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_only(args) -> dict:
    """Peak RSS of one variant alone: load, prepare, (collect, build mask,) train a few steps."""
    device = device_of(args)
    sync = sync_fn(device)
    before = peak_rss_bytes()
    if args.rss_only == "rosa_given_mask":
        var, tok = build("rosa", device, 0, 1, args.rank, args.density)
        from tunelab.methods.rosa import rosa_layers

        g = torch.Generator().manual_seed(0)
        for m in rosa_layers(var.model):
            m.set_mask(torch.randperm(m.in_features * m.out_features, generator=g)[: m.nnz])
        for cb in var.callbacks:
            cb.on_train_begin(var.state, var.model, var.optimizer)
    else:
        var, tok = build("lora" if args.rss_only == "lora" else "rosa", device, 0, 1, args.rank, args.density)
    ids = gsm8k_batch(tok, args.batch, args.seq).to(device)
    phases = [var.step(ids, sync)[0] for _ in range(3)]
    out = {"variant": args.rss_only, "phases": phases, "peak_rss_bytes": peak_rss_bytes(), "rss_before_load_bytes": before}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def micro(args) -> list[dict]:
    """Per-layer costs of the formulations at the default model's shapes (fp32, T = batch × seq)."""
    import torch.nn.functional as F

    from tunelab.methods.rosa.sparse_ops import sddmm

    device = device_of(args)
    sync = sync_fn(device)
    t = args.batch * args.seq

    clock = time.perf_counter if device.type == "cuda" else time.process_time  # CPU time: robust to load

    def tm(fn, it=5):
        fn()
        sync()
        ts = []
        for _ in range(it):
            t0 = clock()
            fn()
            sync()
            ts.append(clock() - t0)
        return statistics.median(ts) * 1e3

    rows = []
    g = torch.Generator().manual_seed(0)
    shapes = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
              "down 576x1536": (576, 1536)}
    for name, (m, n) in shapes.items():
        w = torch.randn(m, n, generator=g).to(device)
        x = torch.randn(t, n, generator=g).to(device)
        d_out = torch.randn(t, m, generator=g).to(device)
        nnz = int(args.density * m * n)
        flat = torch.randperm(m * n, generator=g)[:nnz].sort().values.to(device)
        v = torch.randn(nnz, generator=g).to(device)
        rows_ = flat // n
        cols = flat % n
        crow = torch.zeros(m + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.bincount(rows_, minlength=m).cumsum(0)
        meta = {"flat": flat, "rows": rows_, "cols": cols, "crow": crow, "shape": (m, n)}
        s_csr = torch.sparse_csr_tensor(crow, cols, v, (m, n), check_invariants=False)

        def weff():
            we = w.clone()
            we.view(-1).index_add_(0, flat, v)
            return we

        rows.append({
            "layer": name,
            "nnz": nnz,
            "gemm_fwd_ms": tm(lambda: F.linear(x, w)),
            "weff_copy_ms": tm(weff),
            "csr_extra_fwd_ms": tm(lambda: (s_csr @ x.t()).t()),
            "gemm_dx_ms": tm(lambda: d_out @ w),
            "sddmm_sampled_ms": tm(lambda: sddmm(d_out, x, meta, "sampled")),
            "sddmm_gather_ms": tm(lambda: sddmm(d_out, x, meta, "gather")),
            "dense_dW_ms": tm(lambda: sddmm(d_out, x, meta, "dense")),
        })
    return rows


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def fmt_mib(b: int) -> str:
    return f"{b / 2**20:,.0f} MiB"


def print_timing(r: dict) -> None:
    print(f"\nRoSA vs LoRA on SmolLM2-135M ({r['device']}, {r['threads']} threads, batch {r['batch']} x {r['seq']} tokens; "
          f"median s/step, each RoSA phase against the LoRA steps interleaved with it)\n")
    print("| RoSA phase | RoSA s/step | LoRA s/step | ratio | RoSA CPU s | LoRA CPU s | CPU ratio | steps |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    names = {"sparse": "LoRA + sparse (mask built)", "lora_phase": "LoRA only (before collection)",
             "collect": "gradient collection"}
    for phase, row in r["phases"].items():
        print(f"| {names[phase]} | {row['rosa_s']:.2f} | {row['lora_s']:.2f} | {row['ratio']:.2f}x "
              f"| {row['rosa_cpu_s']:.2f} | {row['lora_cpu_s']:.2f} | {row['cpu_ratio']:.2f}x | {row['n']} |")
    tr = r["trainable"]
    print(f"\ntrainable: LoRA (PEFT) {tr['lora_peft']:,}; RoSA {tr['rosa_lora']:,} LoRA + {tr['rosa_sparse']:,} sparse; "
          f"mask top-k {r['mask_topk_s']}s")
    if "sparse" in r["phases"]:
        sp = r["phases"]["sparse"]
        print(f"RoSA / LoRA step time after the mask: {sp['ratio']:.2f}x wall, {sp['cpu_ratio']:.2f}x CPU (target <= 1.25x)")


def print_rest(result: dict, args) -> None:
    if result.get("rss"):
        print("\n| variant | peak RSS |")
        print("|---|---:|")
        labels = {"lora": "LoRA r8 (PEFT)", "rosa": "RoSA (collection + training)",
                  "rosa_given_mask": "RoSA (mask given, mask_from)"}
        for k, v in result["rss"].items():
            print(f"| {labels[k]} | {fmt_mib(v['peak_rss_bytes'])} |")
    if result.get("micro"):
        print(f"\nper layer, T = {args.batch * args.seq} tokens, ms (CPU time on CPU; median of 5):\n")
        keys = ["gemm_fwd_ms", "weff_copy_ms", "csr_extra_fwd_ms", "gemm_dx_ms", "sddmm_sampled_ms",
                "sddmm_gather_ms", "dense_dW_ms"]
        print("| layer | nnz | " + " | ".join(k[:-3] for k in keys) + " |")
        print("|---|---:|" + "---:|" * len(keys))
        for row in result["micro"]:
            print(f"| {row['layer']} | {row['nnz']} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=200)
    ap.add_argument("--steps", type=int, default=6, help="timed LoRA+sparse steps after the mask")
    ap.add_argument("--lora-phase-steps", type=int, default=2, help="timed RoSA steps before collection")
    ap.add_argument("--collect-steps", type=int, default=2, help="spa_num_grads (timed collection steps)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.006)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--micro", action="store_true", help="also time the per-layer formulations")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    ap.add_argument("--no-timing", action="store_true", help="skip the interleaved step timing")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--rss-only", choices=["lora", "rosa", "rosa_given_mask"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.rss_only:
        print(json.dumps(rss_only(args)))
        return 0

    result = {} if args.no_timing else {"interleaved": interleaved(args)}
    if not args.no_rss:
        result["rss"] = {}
        for variant in ("lora", "rosa", "rosa_given_mask"):
            cmd = [sys.executable, __file__, "--rss-only", variant, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--rank", str(args.rank), "--density", str(args.density), "--device", args.device,
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            result["rss"][variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    if args.micro:
        result["micro"] = micro(args)

    r = result.get("interleaved")
    if r is not None:
        print_timing(r)
    print_rest(result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
