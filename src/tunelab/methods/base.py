"""The method contract: everything the trainer, evaluator and merger need from a method.

A method is one module with a typed config (a :class:`~tunelab.config.MethodConfig` subclass) and
a :class:`Method` subclass. The trainer never branches on a method's name; it only calls these
hooks, in this order::

    method = get_method(cfg.method.name)(cfg.method)
    problems = Method.validate(run_cfg)          # at config parse time, before any loading
    model = method.prepare(model, run_cfg)       # add adapters, set requires_grad
    optimizer = method.build_optimizer(model, run_cfg.train)   # train.optim over param_groups() by default
    for cb in method.callbacks(): ...            # step hooks (RoSA masks, GaLore bookkeeping)
    method.trainable_state_dict(model)           # what a resumable checkpoint must hold
    method.save_artifact(model, run_dir / method.artifact_dir)  # final adapter or full model
    model = method.load_for_inference(base, run_dir / method.artifact_dir)   # eval / generate
    model = method.merge(model)                  # plain HF model with the deltas folded in

Each method registers itself next to its class with ``@METHODS.register`` (:mod:`tunelab.registry`);
``tunelab.methods`` imports every method module by name.

:func:`make_optimizer` turns ``train.optim`` into torch's AdamW or a bitsandbytes 8-bit AdamW for
every method's parameter groups (GaLore, which builds its own optimizer, refuses the 8-bit ones).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from tunelab.config import MethodConfig, RunConfig, TrainConfig


@dataclass
class TrainState:
    """What callbacks may read about the run (mutated by the trainer)."""

    step: int = 0  # optimizer steps completed
    max_steps: int = 0
    micro_step: int = 0  # micro-batches seen in the current optimizer step (0-based)
    grad_accum: int = 1
    epoch: int = 0
    world_size: int = 1
    rank: int = 0
    run_dir: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Callback:
    """Hooks around optimizer steps. All optional; state_dict() is saved in checkpoints."""

    def on_train_begin(self, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer exists and a checkpoint (if any) was loaded."""

    def on_step_begin(self, state: TrainState, model: nn.Module) -> None:
        """Before the first micro-batch of optimizer step ``state.step``."""

    def on_before_optimizer_step(
        self, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> None:
        """Gradients of the whole step are accumulated (and all-reduced under DDP), before clipping."""

    def on_step_end(self, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After optimizer.step() and zero_grad(); ``state.step`` is already incremented."""

    def on_train_end(self, state: TrainState, model: nn.Module) -> None:
        """After the last step, before the final artifact is saved."""

    def should_stop(self, state: TrainState) -> bool:
        """Return True to end training after the current step (e.g. a mask-only RoSA run)."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Method:
    """Base class of a fine-tuning method. Subclasses set ``name``, ``config_cls``, ``artifact_dir``."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    #: folder inside the run directory that holds the final trained artifact (None: trains nothing)
    artifact_dir: ClassVar[str | None] = "adapter"
    #: False for the untrained base model (``method=base``): `tunelab train` refuses it
    trains: ClassVar[bool] = True
    #: position of the method in reports' tables and legends (lower first; ties by name)
    display_order: ClassVar[int] = 50
    #: the method's config key that is its size knob on a "quality vs rank" figure, or None
    rank_key: ClassVar[str | None] = None
    #: True when the base model's own weights train (full fine-tuning, GaLore): train.precision=bf16-true,
    #: which would update them in bf16, is then refused
    updates_base_weights: ClassVar[bool] = False
    #: passed to DistributedDataParallel: True when some trainable parameters get no gradient on
    #: some steps (e.g. RoSA's sparse values before the mask exists)
    ddp_find_unused_parameters: ClassVar[bool] = False
    #: why the method cannot train under FSDP (train.parallelism=fsdp), or None when it can
    fsdp_unsupported_reason: ClassVar[str | None] = None
    #: config keys that only matter while training (e.g. RoSA's mask_from path): a finished run
    #: is still evaluated/merged when the file they name is gone, since the artifact holds it
    training_only_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: "MethodConfig"):
        self.config = config

    # ---- configuration -----------------------------------------------------------------------
    @classmethod
    def validate(cls, run_cfg: "RunConfig") -> list[str]:
        """Problems with this method's settings in the context of the whole run (each with its fix)."""
        return []

    # ---- training ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, run_cfg: "RunConfig") -> nn.Module:
        """Turn the loaded base model into the trainable model (adapters, requires_grad)."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, train_cfg: "TrainConfig") -> list[dict[str, Any]]:
        """Optimizer parameter groups; default: every trainable parameter, one group."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": train_cfg.lr, "weight_decay": train_cfg.weight_decay}]

    def build_optimizer(self, model: nn.Module, train_cfg: "TrainConfig") -> torch.optim.Optimizer:
        """``train.optim`` over :meth:`param_groups` (each group keeps its own lr and weight decay)."""
        groups = [g for g in self.param_groups(model, train_cfg) if g["params"]]
        if not groups:
            raise ValueError(f"method '{self.name}' left no trainable parameters")
        return make_optimizer(groups, train_cfg)

    def callbacks(self) -> list[Callback]:
        return []

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors a resumable checkpoint must hold: trainable parameters (+ method buffers)."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        named = dict(model.named_parameters())
        missing = [n for n, p in named.items() if p.requires_grad and n not in state]
        unexpected = [n for n in state if n not in named]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for n, t in state.items():
                named[n].copy_(t)

    def extra_results(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Method-specific numbers for results.json (e.g. optimizer-state bytes, SVD time)."""
        return {}

    # ---- artifacts ---------------------------------------------------------------------------
    def save_artifact(self, model: nn.Module, out_dir: Path) -> None:
        raise NotImplementedError

    def load_for_inference(self, base_model: nn.Module, artifact_dir: Path) -> nn.Module:
        """Apply the trained artifact to a freshly loaded base model (unmerged where possible)."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """Return a plain transformers model with the method's deltas folded into the weights."""
        raise NotImplementedError


# ---- the optimizer of train.optim -------------------------------------------------------------
#: train.optim -> bitsandbytes optimizer class (adamw is torch's own)
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def make_optimizer(groups: list[dict[str, Any]], train_cfg: "TrainConfig") -> torch.optim.Optimizer:
    """The one place ``train.optim`` becomes an optimizer, for every method's parameter groups.

    ``adamw``: torch AdamW, fused when every parameter is on CUDA (torch's foreach default elsewhere).
    ``adamw_8bit`` / ``paged_adamw_8bit``: bitsandbytes' AdamW8bit / PagedAdamW8bit: both moments in
    blockwise 8-bit (tensors under 4096 elements keep fp32 moments, bitsandbytes' ``min_8bit_size``),
    the same lr / betas / eps / decoupled weight decay; their state is plain tensors, so checkpoints
    load with ``weights_only=True`` and a resume continues bit for bit.
    """
    common = dict(lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                  eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay)
    optim = getattr(train_cfg, "optim", "adamw")
    if optim == "adamw":
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, fused=fused or None, **common)
    if optim not in BNB_OPTIMIZERS:
        raise ValueError(f"train.optim={optim!r} is unknown (known: adamw, {', '.join(BNB_OPTIMIZERS)})")
    try:
        import bitsandbytes as bnb
    except Exception as exc:
        raise RuntimeError(f"train.optim={optim} needs bitsandbytes ({exc}): pip install 'bitsandbytes>=0.48', "
                           "or set train.optim=adamw") from exc
    if optim.startswith("paged_") and not all(p.is_cuda for g in groups for p in g["params"]):
        raise RuntimeError(f"train.optim={optim} needs the parameters on a CUDA GPU: use train.optim=adamw_8bit")
    return getattr(bnb.optim, BNB_OPTIMIZERS[optim])(groups, **common)


def probe_8bit_optimizer(optim: str, device: torch.device) -> str | None:
    """Why ``train.optim`` (a bitsandbytes optimizer) cannot step on ``device`` (None when it can):
    one step on a tensor large enough for 8-bit state, checked to be finite and to move the weight."""
    return _probe_8bit_optimizer(optim, str(device))


@functools.lru_cache(maxsize=None)
def _probe_8bit_optimizer(optim: str, device: str) -> str | None:
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a native library that does not load
        return f"bitsandbytes does not import ({type(exc).__name__}: {str(exc)[:200]})"
    try:
        w = nn.Parameter(torch.ones(4096, device=device))
        w.grad = torch.full_like(w, 0.5)
        opt = getattr(bnb.optim, BNB_OPTIMIZERS[optim])([w], lr=0.1)
        opt.step()
        if opt.state[w]["state1"].dtype != torch.uint8 or not torch.isfinite(w).all() or bool((w >= 1).any()):
            return f"bitsandbytes {bnb.__version__} {BNB_OPTIMIZERS[optim]} does not step correctly on {device}"
    except Exception as exc:  # a device without the 8-bit kernels raises from the native library
        return f"bitsandbytes {BNB_OPTIMIZERS[optim]} does not run on {device} ({type(exc).__name__}: {str(exc)[:200]})"
    return None
