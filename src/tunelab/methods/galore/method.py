"""GaLore: full-parameter training with the Adam state in a low-rank gradient subspace.

Every targeted linear weight trains in full, but its Adam moments live in the top-``rank`` singular
subspace of its gradient, recomputed every ``update_proj_gap`` steps (Zhao et al., arXiv
2403.03507). Embeddings, lm_head, norms and biases take plain AdamW in a separate parameter group.
The optimizer is our own :class:`~tunelab.methods.galore.optim.GaLoreAdamW` (same update as the
reference ``galore_torch.GaLoreAdamW``; see that module for the deliberate differences). The final
artifact is the full model (``RUN/model``), exactly like ``method=full``.

The effective step of a projected weight is ``train.lr × method.scale``. Settings: :mod:`~tunelab.methods.galore.config`.
"""

from __future__ import annotations

import os
from typing import Any, Union

import torch
from torch import nn

from tunelab.config import MethodConfig, RunConfig, TrainConfig
from tunelab.methods.base import Callback, TrainState
from tunelab.methods.full import FullMethod
from tunelab.methods.galore.config import GaloreConfig
from tunelab.methods.galore.optim import GaLoreAdamW
from tunelab.methods.galore.projection import PROJ_TYPES, SVD_MODES
from tunelab.registry import METHODS
from tunelab.utils import log


def _is_output_head(model: nn.Module, module: nn.Module) -> bool:
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out = None
    return out is not None and module is out


def _linear_types() -> tuple[type, ...]:
    try:  # GPT-2 style models use transformers' Conv1D (a linear layer with a transposed weight)
        from transformers.pytorch_utils import Conv1D

        return (nn.Linear, Conv1D)
    except ImportError:
        return (nn.Linear,)


def find_targets(model: nn.Module, target_modules: Union[str, list[str]]) -> dict[str, nn.Parameter]:
    """Weights to project: {parameter name: weight} of the matched linear layers (2-D weights)."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    linear = _linear_types()
    out: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if not isinstance(module, linear) or _is_output_head(model, module) or name.split(".")[-1] == "lm_head":
            continue
        if target_modules != "all-linear":
            if not any(name == t or name.endswith("." + t) for t in target_modules):
                continue
        w = module.weight
        if w.dim() == 2 and w.is_floating_point():
            out[f"{name}.weight" if name else "weight"] = w
    return out


def _probe_8bit_moments(device_spec: str) -> str | None:
    """Why the 8-bit moments cannot be stored on the run's device (None when they can): a blockwise
    8-bit round trip of a moment-sized tensor, as :class:`BlockwiseQuantizer8bit` does every step."""
    from tunelab.methods.galore.quant8bit import BlockwiseQuantizer8bit
    from tunelab.models import resolve_device

    try:
        device = resolve_device(device_spec)
    except RuntimeError:  # model.device=cuda without CUDA: reported when the run starts
        return None
    try:
        quant = BlockwiseQuantizer8bit()
        x = torch.linspace(-1, 1, 1024, device=device)
        back = quant.dequantize(*quant.quantize(x, signed=True), signed=True)
        if not torch.allclose(back, x, atol=2e-2):
            return f"bitsandbytes blockwise 8-bit is wrong on {device} (max error {float((back - x).abs().max()):.3g})"
    except Exception as exc:  # ImportError, or a device without the native kernels
        return f"bitsandbytes blockwise 8-bit does not run on {device} ({type(exc).__name__}: {str(exc)[:200]})"
    return None


class GaloreCallback(Callback):
    """Drives layer-wise mode (start of each step) and checks what cannot work at run time."""

    def __init__(self, method: "GaloreMethod"):
        self.method = method
        self.optimizer: GaLoreAdamW | None = None

    def on_train_begin(self, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer if isinstance(optimizer, GaLoreAdamW) else None
        cfg: GaloreConfig = self.method.config  # type: ignore[assignment]
        if cfg.layerwise:
            if state.world_size > 1:
                raise RuntimeError(
                    "method.layerwise=true cannot run under DDP: its hooks fire before DDP has all-reduced "
                    "the gradients, so ranks would drift apart. Set method.layerwise=false or run one process."
                )
            if self.optimizer is not None:
                self.optimizer.set_grad_accum(max(1, state.grad_accum))
        if self.optimizer is not None and state.step == 0 and state.is_main:
            n = sum(len(g["params"]) for g in self.optimizer.param_groups if g["galore"])
            log.info(
                f"GaLore computes the first projection of {n} weights at step 0 (svd={cfg.svd}); "
                f"the first step is slower than the others"
            )

    def on_step_begin(self, state: TrainState, model: nn.Module) -> None:
        if self.optimizer is not None and self.optimizer.layerwise:
            self.optimizer.begin_accumulation()


@METHODS.register
class GaloreMethod(FullMethod):
    name = "galore"
    display_order = 40
    config_cls = GaloreConfig
    artifact_dir = "model"
    fsdp_unsupported_reason = (
        "each projection is an SVD of a layer's whole gradient matrix, and FSDP keeps only a row shard "
        "of it per process (gathering it would undo the sharding)"
    )

    def __init__(self, config: MethodConfig):
        super().__init__(config)
        self._seed = 0
        self._grad_accum = 1

    # ---- configuration ----------------------------------------------------------------------------
    @classmethod
    def validate(cls, run_cfg: RunConfig) -> list[str]:
        c: GaloreConfig = run_cfg.method  # type: ignore[assignment]
        p: list[str] = []
        if run_cfg.model.load_in_4bit:
            p.append("method=galore trains the full weights and cannot train a 4-bit base: "
                     "set model.load_in_4bit=false (or use method=lora for QLoRA)")
        if c.rank < 1:
            p.append(f"method.rank must be >= 1, got {c.rank} (the paper fine-tunes with 4-8)")
        if c.update_proj_gap < 1:
            p.append(f"method.update_proj_gap must be >= 1 optimizer steps, got {c.update_proj_gap}")
        if not c.scale > 0:
            p.append(f"method.scale must be > 0, got {c.scale} (default 0.25; the step is train.lr × scale)")
        if c.proj_type not in PROJ_TYPES:
            p.append(f"method.proj_type '{c.proj_type}' is unknown (known: {', '.join(PROJ_TYPES)})")
        if c.svd not in SVD_MODES:
            p.append(f"method.svd '{c.svd}' is unknown (known: {', '.join(SVD_MODES)})")
        if c.svd_oversample < 0 or c.svd_niter < 0:
            p.append("method.svd_oversample and method.svd_niter must be >= 0")
        if isinstance(c.target_modules, list) and not c.target_modules:
            p.append("method.target_modules is empty: use 'all-linear' or a list such as [q_proj, v_proj]")
        elif isinstance(c.target_modules, str) and not c.target_modules.strip():
            p.append("method.target_modules is empty: use 'all-linear' or a list such as [q_proj, v_proj]")
        if run_cfg.train.optim != "adamw":
            p.append(f"method=galore builds its own optimizer (GaLoreAdamW), so train.optim={run_cfg.train.optim} "
                     "cannot apply: set train.optim=adamw, and method.optim_8bit=true for 8-bit Adam moments")
        if c.optim_8bit:
            why = _probe_8bit_moments(run_cfg.model.device)
            if why:
                p.append(f"method.optim_8bit=true: {why}. Install bitsandbytes (pip install 'bitsandbytes>=0.48', "
                         "whose blockwise 8-bit runs on CPU and CUDA), or set method.optim_8bit=false")
        if c.layerwise:
            if run_cfg.train.max_grad_norm > 0:
                p.append(
                    "method.layerwise=true updates each weight during backward, before the global gradient "
                    f"norm exists, so train.max_grad_norm={run_cfg.train.max_grad_norm} cannot be applied: "
                    "set train.max_grad_norm=0 (or method.layerwise=false)"
                )
            world = int(os.environ.get("WORLD_SIZE", "1") or 1)
            if world > 1:
                p.append(
                    f"method.layerwise=true cannot run under DDP (WORLD_SIZE={world}): its hooks fire before "
                    "DDP all-reduces the gradients, so ranks would drift apart: set method.layerwise=false "
                    "or run a single process"
                )
        return p

    # ---- training ---------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, run_cfg: RunConfig) -> nn.Module:
        self._seed = int(run_cfg.seed)
        self._grad_accum = int(run_cfg.train.grad_accum)
        for p in model.parameters():
            p.requires_grad_(True)
        self._check_targets(model)
        return model

    def _check_targets(self, model: nn.Module) -> dict[str, nn.Parameter]:
        c: GaloreConfig = self.config  # type: ignore[assignment]
        targets = {n: w for n, w in find_targets(model, c.target_modules).items() if w.requires_grad}
        if not targets:
            linears = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, _linear_types())})
            raise ValueError(
                f"method.target_modules={c.target_modules!r} matched no linear layer of the model: "
                f"use 'all-linear' or names among {', '.join(linears) or '(the model has no nn.Linear)'}"
            )
        if c.rank < 1:
            raise ValueError(f"method.rank must be >= 1, got {c.rank}")
        too_small = [(n, tuple(w.shape)) for n, w in targets.items() if c.rank > min(w.shape)]
        if too_small and not c.clamp_rank:
            smallest = min(min(s) for _, s in too_small)
            listed = ", ".join(f"{n} {s}" for n, s in too_small[:3])
            more = f" and {len(too_small) - 3} more" if len(too_small) > 3 else ""
            raise ValueError(
                f"method.rank={c.rank} is larger than the smaller dimension of {listed}{more}: "
                f"set method.rank <= {smallest}, or method.clamp_rank=true to lower it on those layers"
            )
        if too_small:
            log.info(f"GaLore: rank clamped to the smaller dimension on {len(too_small)} weights (clamp_rank)")
        return targets

    def build_optimizer(self, model: nn.Module, train_cfg: TrainConfig) -> GaLoreAdamW:
        c: GaloreConfig = self.config  # type: ignore[assignment]
        if getattr(train_cfg, "optim", "adamw") != "adamw":
            raise ValueError(f"method=galore builds its own optimizer: train.optim={train_cfg.optim} cannot apply "
                             "(set train.optim=adamw, and method.optim_8bit=true for 8-bit Adam moments)")
        targets = self._check_targets(model)
        target_ids = {id(w) for w in targets.values()}
        projected, plain = [], []
        seen: set[int] = set()
        for _, p in model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (projected if id(p) in target_ids else plain).append(p)
        n_proj = sum(p.numel() for p in projected)
        n_plain = sum(p.numel() for p in plain)
        log.info(
            f"GaLore: {len(projected)} weights ({n_proj:,} parameters) projected at rank {c.rank}; "
            f"{len(plain)} tensors ({n_plain:,} parameters: embeddings, lm_head, norms, biases) in plain AdamW"
        )
        groups: list[dict[str, Any]] = [
            {"params": projected, "galore": True},
            {"params": plain, "galore": False},
        ]
        groups = [g for g in groups if g["params"]]
        opt_ = GaLoreAdamW(
            groups,
            lr=train_cfg.lr,
            betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
            eps=train_cfg.adam_eps,
            weight_decay=train_cfg.weight_decay,
            rank=c.rank,
            update_proj_gap=c.update_proj_gap,
            scale=c.scale,
            proj_type=c.proj_type,
            svd=c.svd,
            svd_oversample=c.svd_oversample,
            svd_niter=c.svd_niter,
            clamp_rank=c.clamp_rank,
            seed=self._seed,
            optim_8bit=c.optim_8bit,
        )
        if c.layerwise:
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                raise RuntimeError(
                    "method.layerwise=true cannot run under DDP: its hooks fire before DDP has all-reduced "
                    "the gradients. Set method.layerwise=false or run one process."
                )
            if train_cfg.max_grad_norm > 0:
                raise ValueError(
                    "method.layerwise=true cannot clip the global gradient norm: set train.max_grad_norm=0"
                )
            opt_.enable_layerwise(getattr(train_cfg, "grad_accum", self._grad_accum))
        return opt_

    def callbacks(self) -> list[Callback]:
        return [GaloreCallback(self)]

    def extra_results(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        if isinstance(optimizer, GaLoreAdamW):
            report = optimizer.memory_report()
        else:
            targets = find_targets(model, self.config.target_modules)  # type: ignore[attr-defined]
            ids = {id(w) for w in targets.values()}
            params = {id(p): p for p in model.parameters() if p.requires_grad}
            report = {
                "params_projected": sum(p.numel() for i, p in params.items() if i in ids),
                "params_plain": sum(p.numel() for i, p in params.items() if i not in ids),
            }
        return report


