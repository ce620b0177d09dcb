"""Side-by-side benchmark: our GaLore vs galore-torch's GaLoreAdamW vs plain AdamW (full fine-tuning).

All variants train their own copy of the default model (SmolLM2-135M, fp32 on this machine) on the
*same* batches (random token ids, batch × seq tokens per step, fixed seed), one variant after the
other (``--interleave``: all models in memory, one step of each in turn, so background
load hits all of them alike). Times are reported as CPU time of the process (robust to other jobs on
a shared machine) and as wall clock. Per step: forward, backward,
clip_grad_norm_(1.0), optimizer.step(), zero_grad. Reported:

* optimizer-state bytes (every tensor the optimizer holds, projection matrices included) and its
  ratio to AdamW's, for the whole model and for the projected parameters alone;
* step 0 time (includes the first SVD of every projected weight) vs the median later step;
* the optimizer.step() time alone and tokens/s vs AdamW (steps 1.. only).

Usage::

    OMP_NUM_THREADS=2 python bench/bench_galore.py                 # defaults: batch 4 × 200 tokens, 6 steps
    python bench/bench_galore.py --steps 4 --variants adamw,galore --json out.json
    python bench/bench_galore.py --optimizer-only --threads 1      # optimizer.step() alone, real shapes
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

VARIANTS = ("adamw", "galore", "galore_exact", "galore_torch", "galore_layerwise", "galore_8bit")


@dataclass
class Variant:
    name: str
    label: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state_bytes: Callable[[], tuple[int, int]]  # (whole model, projected parameters only)
    projected_ids: set[int]
    clip: bool = True
    times: list[float] = field(default_factory=list)  # wall clock
    opt_times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # CPU time of this process (robust to other load)
    opt_cpu_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    state_snapshot: tuple[int, int] | None = None


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "ortho_matrix"):  # galore-torch keeps a projector object in the state
        return tensor_bytes(obj.ortho_matrix)
    return 0


def state_bytes_fn(opt: torch.optim.Optimizer, projected_ids: set[int]) -> Callable[[], tuple[int, int]]:
    def fn() -> tuple[int, int]:
        whole = proj = 0
        for p, st in opt.state.items():
            b = tensor_bytes(st)
            whole += b
            if id(p) in projected_ids:
                proj += b
        return whole, proj

    return fn


def build(name: str, args, load) -> Variant:
    from tunelab.config import RunConfig, TrainConfig
    from tunelab.methods import get_method

    model = load()
    train_cfg = TrainConfig(lr=args.lr, max_grad_norm=1.0)
    cls = get_method("galore")
    cfg = cls.config_cls(rank=args.rank, update_proj_gap=200)
    if name == "galore_exact":
        cfg.svd = "exact"
    if name == "galore_8bit":  # bitsandbytes blockwise 8-bit moments (runs on CPU too; meant for CUDA)
        cfg.optim_8bit = True
    if name == "galore_layerwise":
        cfg.layerwise = True
        train_cfg.max_grad_norm = 0.0
    method = cls(cfg)
    run_cfg = RunConfig()
    run_cfg.method, run_cfg.train = cfg, train_cfg
    model = method.prepare(model, run_cfg)
    projected_ids = {id(p) for p in method._check_targets(model).values()}
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        label = "AdamW (full fine-tuning)"
    elif name == "galore_torch":
        from galore_torch import GaLoreAdamW

        proj = [p for p in model.parameters() if id(p) in projected_ids]
        plain = [p for p in model.parameters() if id(p) not in projected_ids]
        opt = GaLoreAdamW(
            [{"params": proj, "rank": args.rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
             {"params": plain}],
            lr=args.lr, eps=1e-8, weight_decay=0.0, no_deprecation_warning=True,
        )
        label = "galore-torch GaLoreAdamW (exact SVD)"
    else:
        opt = method.build_optimizer(model, train_cfg)
        label = {
            "galore": "tunelab GaLore (randomized SVD)",
            "galore_exact": "tunelab GaLore (svd=exact)",
            "galore_layerwise": "tunelab GaLore layer-wise (no clipping)",
            "galore_8bit": "tunelab GaLore 8-bit states",
        }[name]
    return Variant(name, label, model, opt, state_bytes_fn(opt, projected_ids), projected_ids,
                   clip=name != "galore_layerwise")


def make_batches(args, vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(args.steps)]


def count_params(v: Variant) -> dict[str, int]:
    ps = list(v.model.parameters())
    return {"params": sum(p.numel() for p in ps), "projected": sum(p.numel() for p in ps if id(p) in v.projected_ids)}


def one_step(v: Variant, ids: torch.Tensor) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    loss = v.model(input_ids=ids, labels=ids).loss
    loss.backward()
    if v.clip:
        torch.nn.utils.clip_grad_norm_(v.model.parameters(), 1.0)
    t1, c1 = time.perf_counter(), time.process_time()
    v.optimizer.step()
    v.optimizer.zero_grad(set_to_none=True)
    t2, c2 = time.perf_counter(), time.process_time()
    v.times.append(t2 - t0)
    v.opt_times.append(t2 - t1)
    v.cpu_times.append(c2 - c0)
    v.opt_cpu_times.append(c2 - c1)
    v.losses.append(float(loss.detach()))


def optimizer_only(args, load, names: list[str]) -> dict[str, float]:
    """Median optimizer.step() CPU time on the model's real parameter shapes with random gradients."""
    v0 = build("galore", args, load)
    shapes = [(p.shape, id(p) in v0.projected_ids) for p in v0.model.parameters()]
    del v0
    gc.collect()
    out = {}
    for name in names:
        if name == "galore_layerwise":
            continue
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape, _ in shapes]
        proj = [p for p, (_, is_proj) in zip(params, shapes) if is_proj]
        plain = [p for p, (_, is_proj) in zip(params, shapes) if not is_proj]
        if name == "adamw":
            opt = torch.optim.AdamW(params, lr=args.lr, eps=1e-8)
        elif name == "galore_torch":
            from galore_torch import GaLoreAdamW as Ref

            opt = Ref([{"params": proj, "rank": args.rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
                       {"params": plain}], lr=args.lr, eps=1e-8, no_deprecation_warning=True)
        else:
            from tunelab.methods.galore.optim import GaLoreAdamW

            opt = GaLoreAdamW([{"params": proj, "galore": True}, {"params": plain}], lr=args.lr, eps=1e-8,
                              rank=args.rank, svd="exact" if name == "galore_exact" else "randomized",
                              optim_8bit=name == "galore_8bit")
        times = []
        for i in range(6):
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            c0 = time.process_time()
            opt.step()
            times.append(time.process_time() - c0)
        out[name] = statistics.median(times[1:]) * 1000
        print(f"optimizer.step() alone, {name}: {out[name]:.0f} ms CPU (median of steps 1-5; "
              f"step 0 {times[0] * 1000:.0f} ms)", flush=True)
        del opt, params, proj, plain
        gc.collect()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=200)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--variants", default="adamw,galore,galore_exact,galore_torch",
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--model", default=None, help="model name (default: tunelab's default model)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--optimizer-only", action="store_true",
                    help="time optimizer.step() alone on the model's parameter shapes with random gradients")
    ap.add_argument("--interleave", action="store_true",
                    help="keep all models in memory and run one step of each in turn (fairer wall clock, ~4x memory)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad} (known: {', '.join(VARIANTS)})")
    if "galore_torch" in names:
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            print("galore-torch is not installed: skipping that variant", file=sys.stderr)
            names.remove("galore_torch")

    from tunelab.config import ModelConfig
    from tunelab.models import load_model, materialize

    mcfg = ModelConfig(device="cpu", dtype="float32") if args.model is None else ModelConfig(
        name=args.model, device="cpu", dtype="float32")
    source = materialize(mcfg.name)

    def load():
        torch.manual_seed(0)
        m = load_model(mcfg, source, torch.device("cpu"))
        m.config.use_cache = False
        m.train()
        return m

    if args.optimizer_only:
        return {"optimizer_step_cpu_ms": optimizer_only(args, load, names)}
    tokens = args.batch * args.seq
    print(f"{len(names)} variants, {args.steps} steps of {args.batch}×{args.seq} tokens, "
          f"{torch.get_num_threads()} threads, {'interleaved' if args.interleave else 'one after the other'}",
          file=sys.stderr)

    def report(i: int, v: Variant) -> None:
        print(f"step {i} {v.name}: {v.times[-1]:.2f}s wall, {v.cpu_times[-1]:.2f}s CPU "
              f"(optimizer {v.opt_times[-1] * 1000:.0f} ms wall, {v.opt_cpu_times[-1] * 1000:.0f} ms CPU)",
              file=sys.stderr, flush=True)

    batches: list[torch.Tensor] = []
    variants: list[Variant] = []
    stats: dict[str, Any] = {}
    if args.interleave:  # every model in memory at once (≈ 1.6 GB each incl. AdamW states)
        variants = [build(n, args, load) for n in names]
        batches = make_batches(args, variants[0].model.config.vocab_size)
        for i, ids in enumerate(batches):
            for v in variants:
                one_step(v, ids)
                report(i, v)
                gc.collect()
        stats = count_params(variants[0])
    else:  # one model at a time: lower peak memory, CPU time stays comparable
        for n in names:
            v = build(n, args, load)
            batches = batches or make_batches(args, v.model.config.vocab_size)
            for i, ids in enumerate(batches):
                one_step(v, ids)
                report(i, v)
            stats = stats or count_params(v)
            v.state_snapshot = v.state_bytes()
            v.model, v.optimizer = None, v.optimizer if n != "adamw" else None  # keep svd_time_s
            if isinstance(v.optimizer, torch.optim.Optimizer):
                v.optimizer.state.clear()
            variants.append(v)
            gc.collect()
    n_params, n_proj = stats["params"], stats["projected"]
    adamw_whole = 2 * 4 * n_params  # fp32 exp_avg + exp_avg_sq
    adamw_proj = 2 * 4 * n_proj
    base = next((v for v in variants if v.name == "adamw"), None)

    def med(xs: list[float]) -> float:
        return statistics.median(xs[1:]) if len(xs) > 1 else float("nan")

    rows = []
    for v in variants:
        whole, proj = v.state_snapshot or v.state_bytes()
        svd = getattr(v.optimizer, "svd_time_s", None)
        row = {
            "variant": v.name, "label": v.label,
            "state_mib": whole / 2**20,
            "state_ratio_whole": whole / adamw_whole,
            "state_ratio_projected": proj / adamw_proj if v.name != "adamw" else 1.0,
            "svd_time_s": svd, "final_loss": v.losses[-1],
        }
        for kind, times, opt_times in (("cpu", v.cpu_times, v.opt_cpu_times), ("wall", v.times, v.opt_times)):
            normal = med(times)
            row.update({
                f"step0_{kind}_s": times[0], f"step_{kind}_s": normal, f"first_vs_normal_{kind}": times[0] / normal,
                f"opt_step0_{kind}_ms": opt_times[0] * 1000, f"opt_step_{kind}_ms": med(opt_times) * 1000,
                f"tokens_per_s_{kind}": tokens / normal,
                f"tokens_per_s_vs_adamw_{kind}": (med(base.cpu_times if kind == "cpu" else base.times) / normal)
                if base else None,
            })
        rows.append(row)
    out = {
        "model": mcfg.name, "params": n_params, "params_projected": n_proj, "rank": args.rank,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "interleaved": args.interleave, "rows": rows,
    }
    print()
    print(f"Model {mcfg.name}: {n_params / 1e6:.1f}M parameters, {n_proj / 1e6:.1f}M projected "
          f"(rank {args.rank}); {args.batch}×{args.seq} tokens/step, {args.steps} steps, "
          f"{torch.get_num_threads()} CPU threads, fp32.")
    print()
    for kind, what in (("cpu", "CPU time of the benchmark process"), ("wall", "wall clock")):
        print(f"\nTimes as {what}:\n")
        print("| optimizer | state MiB | state vs AdamW (whole model) | (projected params) | step 0 s | step s "
              "| step 0 / step | opt.step 0 ms | opt.step ms | tokens/s | vs AdamW | loss @last |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            vs = r[f"tokens_per_s_vs_adamw_{kind}"]
            print(f"| {r['label']} | {r['state_mib']:.0f} | {r['state_ratio_whole']:.3f}× | "
                  f"{r['state_ratio_projected']:.3f}× | {r[f'step0_{kind}_s']:.2f} | {r[f'step_{kind}_s']:.2f} | "
                  f"{r[f'first_vs_normal_{kind}']:.2f}× | {r[f'opt_step0_{kind}_ms']:.0f} | "
                  f"{r[f'opt_step_{kind}_ms']:.0f} | {r[f'tokens_per_s_{kind}']:.0f} | "
                  f"{f'{vs:.2f}×' if vs else '-'} | {r['final_loss']:.4f} |")
    svd = [f"{r['label']}: {r['svd_time_s']:.2f} s" for r in rows if r["svd_time_s"] is not None]
    if svd:
        print("\nSVD time (ours, wall): " + "; ".join(svd))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
