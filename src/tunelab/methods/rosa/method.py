"""RoSA's method class: the contract hooks (validate, prepare, optimizer groups, state, artifact, merge).

W' = W + (alpha/r)·B·A + S for every adapted linear layer, W frozen. S has exactly
int(density·m·n) trainable values on a per-layer mask: the top-k entries of the dense weight gradient
(|mean G|, or mean G² — an empirical diagonal Fisher) accumulated over ``spa_num_grads`` optimizer
steps. Pure PyTorch (CPU and CUDA, float or bitsandbytes 4-bit bases); the math lives in
:mod:`tunelab.methods.rosa.layer`. See the RoSA section of README.md for the recipe and the numbers.

What the trainer must do for RoSA
---------------------------------
* Hand every hook the plain model (never a DDP wrapper): the methods find their layers by module type
  and save tensors under the model's own parameter names.
* Build the optimizer once from :meth:`RosaMethod.param_groups`, before step 0. The sparse values
  exist (zero) from :meth:`prepare` on, but get no gradient (``grad is None``) until the mask is
  built; AdamW and ``clip_grad_norm_`` skip them, so their Adam state starts fresh at the mask.
* Call the callbacks in the documented order; ``on_step_begin`` before the first micro-batch of a
  step (it switches gradient collection and the sparse part on and off), ``on_step_end`` after
  ``optimizer.step()`` (the masks are built there, at the end of the last collection step).
  ``should_stop`` is True once the masks exist in a ``mask_only`` run.
* Under DistributedDataParallel pass ``find_unused_parameters=True`` (see
  :attr:`RosaMethod.ddp_find_unused_parameters`): the sparse values are parameters that receive no
  gradient before the mask exists (and during the LoRA warm-up of ``wlN`` with a loaded mask); DDP
  without it raises "parameters that were not used in producing loss". ``broadcast_buffers=False``
  is recommended (not required): the mask-index buffers are identical on every rank by construction
  (collected gradients are all-reduced, rank 0's mask is broadcast), and broadcasting them every
  forward only costs bandwidth. ``torch.distributed`` must be initialised before the mask is built,
  and every rank must call ``on_step_end`` (building the masks is a collective).
* Every rank must run the same number of micro-batches per step (the usual DDP rule).
* Checkpoints: :meth:`trainable_state_dict` holds LoRA factors, sparse values and — once built — the
  mask indices; loading it restores the mask, so a resume after the mask phase never rebuilds it.
  The callback's ``state_dict`` is small and JSON-friendly (mask built, at which step, timings).
  The accumulated gradients of an unfinished collection window are not checkpointed (they are the
  size of the model): resuming inside the window restarts it at the resume step (logged).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tunelab.config import RunConfig, TrainConfig
from tunelab.methods.base import Callback, Method
from tunelab.methods.rosa.adapters import (
    adapter_tensors,
    is_plain_linear,
    layer_plan,
    rosa_layers,
    set_module,
    trainable_counts,
    wrap_layers,
)
from tunelab.methods.rosa.artifact import load_adapter, save_adapter
from tunelab.methods.rosa.config import SCHEDULE_FORMS, RosaConfig, parse_schedule
from tunelab.methods.rosa.masks import MASKS_FILE, load_masks, resolve_mask_path, save_masks
from tunelab.methods.rosa.schedule import RosaScheduler
from tunelab.methods.rosa.sparse_ops import is_4bit
from tunelab.registry import METHODS
from tunelab.utils import log


# ------------------------------------------------------------------------------------------
# Validation, one concern per function (RosaMethod.validate keeps their order)
# ------------------------------------------------------------------------------------------


def _rank_and_density_problems(c: RosaConfig, kind: Optional[str]) -> list[str]:
    """rank and density against the parts the schedule trains."""
    p: list[str] = []
    if c.rank < 0:
        p.append(f"method.rank must be >= 0, got {c.rank}")
    elif kind == "spa_only" and c.rank > 0:
        p.append(f"method.schedule=spa_only trains only the sparse part: set method.rank=0 (got {c.rank})")
    elif kind in ("wl", "lora_only") and c.rank == 0:
        p.append(
            f"method.rank=0 leaves no LoRA part, but schedule '{c.schedule}' trains one: set method.rank >= 1 "
            f"or use method.schedule=spa_only"
        )
    if kind == "lora_only":
        if c.density != 0:
            p.append(
                f"method.schedule=lora_only trains no sparse part: set method.density=0 (got {c.density}), "
                f"or use method.schedule=default for RoSA"
            )
    elif not 0.0 < c.density < 1.0:
        p.append(
            f"method.density must be in (0, 1), got {c.density} (e.g. 0.006 = 0.6% of each layer; "
            f"density 0 needs method.schedule=lora_only)"
        )
    return p


def _hyperparameter_problems(c: RosaConfig) -> list[str]:
    p: list[str] = []
    if c.alpha <= 0:
        p.append(f"method.alpha must be > 0, got {c.alpha}")
    if not 0.0 <= c.dropout < 1.0:
        p.append(f"method.dropout must be in [0, 1), got {c.dropout}")
    if c.spa_num_grads < 1:
        p.append(f"method.spa_num_grads must be >= 1 optimizer step, got {c.spa_num_grads}")
    if c.lora_lr is not None and c.lora_lr <= 0:
        p.append(f"method.lora_lr must be > 0 or null (= train.lr), got {c.lora_lr}")
    if c.sparse_lr <= 0:
        p.append(f"method.sparse_lr must be > 0, got {c.sparse_lr}")
    if isinstance(c.target_modules, list) and not c.target_modules:
        p.append("method.target_modules is an empty list: use 'all-linear' or name modules (q_proj, v_proj, ...)")
    return p


def _pattern_problems(c: RosaConfig) -> list[str]:
    """rank_pattern / alpha_pattern / density_pattern: valid regexes with values in range."""
    p: list[str] = []
    for key, what in (
        ("rank_pattern", "a rank >= 0"),
        ("alpha_pattern", "an alpha > 0"),
        ("density_pattern", "a density in [0, 1)"),
    ):
        for pat, val in getattr(c, key).items():
            try:
                re.compile(str(pat))
            except re.error as exc:
                p.append(f"method.{key}: '{pat}' is not a valid regular expression ({exc})")
            ok = isinstance(val, (int, float)) and not isinstance(val, bool)
            if ok and key == "rank_pattern":
                ok = isinstance(val, int) and val >= 0
            elif ok and key == "alpha_pattern":
                ok = val > 0
            elif ok:
                ok = 0 <= val < 1
            if not ok:
                p.append(f"method.{key}['{pat}'] must be {what}, got {val!r}")
    return p


def _mask_problems(c: RosaConfig, sched: Optional[tuple[str, int]], max_steps: int) -> list[str]:
    """mask_from / mask_only: the file exists, they are not combined, mask_only has steps to build."""
    p: list[str] = []
    kind = sched[0] if sched else None
    if c.mask_from is not None:
        if not resolve_mask_path(c.mask_from).is_file():
            p.append(
                f"method.mask_from: '{c.mask_from}' does not exist; point it at RUN/adapter/{MASKS_FILE} "
                f"written by a method.mask_only=true run"
            )
        if kind == "lora_only":
            p.append("method.mask_from has no use with schedule=lora_only (no sparse part): drop one of them")
    if c.mask_only:
        if c.mask_from is not None:
            p.append("method.mask_only builds masks but method.mask_from loads them: set only one")
        if kind == "lora_only":
            p.append("method.mask_only needs a sparse part: schedule=lora_only builds no masks")
        elif sched is not None:
            need = sched[1] + c.spa_num_grads
            if max_steps != -1 and max_steps < need:
                p.append(
                    f"method.mask_only: the masks are built after {need} optimizer steps (schedule {c.schedule}, "
                    f"spa_num_grads {c.spa_num_grads}) but train.max_steps={max_steps}: "
                    f"raise train.max_steps to >= {need} or shorten the schedule"
                )
    return p


def _target_regex_problems(c: RosaConfig) -> list[str]:
    if isinstance(c.target_modules, str) and c.target_modules != "all-linear":
        try:
            re.compile(c.target_modules)
        except re.error as exc:
            return [
                f"method.target_modules '{c.target_modules}' is neither 'all-linear' nor a valid regular "
                f"expression ({exc})"
            ]
    return []


# ------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------


@METHODS.register
class RosaMethod(Method):
    name = "rosa"
    display_order = 30
    rank_key = "rank"
    config_cls = RosaConfig
    artifact_dir = "adapter"
    training_only_keys = ("mask_from",)
    #: DistributedDataParallel must be built with find_unused_parameters=True (see the module docstring)
    ddp_find_unused_parameters = True
    fsdp_unsupported_reason = (
        "its masks are chosen from each layer's whole dense gradient and its sparse values are indexed "
        "into whole weights, while FSDP keeps only a row shard of each per process"
    )

    def __init__(self, config: RosaConfig):
        super().__init__(config)
        self._scheduler: Optional[RosaScheduler] = None

    # ---- configuration -----------------------------------------------------------------------
    @classmethod
    def validate(cls, run_cfg: RunConfig) -> list[str]:
        c: RosaConfig = run_cfg.method  # type: ignore[assignment]
        p: list[str] = []
        sched = parse_schedule(c.schedule)
        if sched is None:
            p.append(f"method.schedule '{c.schedule}' is unknown; valid forms: {SCHEDULE_FORMS}")
        p += _rank_and_density_problems(c, sched[0] if sched else None)
        p += _hyperparameter_problems(c)
        p += _pattern_problems(c)
        p += _mask_problems(c, sched, run_cfg.train.max_steps)
        p += _target_regex_problems(c)
        return p

    # ---- training ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, run_cfg: RunConfig) -> nn.Module:
        c: RosaConfig = self.config  # type: ignore[assignment]
        if getattr(run_cfg.model, "load_in_4bit", False):
            import peft

            # upcasts the non-quantized fp16/bf16 weights to fp32 and sets up gradient checkpointing;
            # it returns the same model object, not a wrapper
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=run_cfg.model.gradient_checkpointing
            )
        plan = layer_plan(model, c)
        if not plan:
            examples = [n for n, m in model.named_modules() if is_plain_linear(m)][:6]
            raise ValueError(
                f"RoSA matched no linear layer with method.target_modules={c.target_modules!r} "
                f"(linear layers of this model include {examples}); 'all-linear' adapts all but the output head"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        wrap_layers(model, plan, c)
        self._set_extra_trainable(model)
        if c.mask_from is not None:
            n = load_masks(model, c.mask_from)
            log.info(f"RoSA: loaded masks for {n} layers from {c.mask_from}; gradient collection is skipped")
        counts = trainable_counts(model)
        log.info(
            f"RoSA: {len(plan)} layers adapted; trainable LoRA {counts['lora']:,} + sparse {counts['sparse']:,} "
            f"(+ other {counts['other']:,}); schedule {c.schedule}"
        )
        return model

    def _set_extra_trainable(self, model: nn.Module) -> None:
        c: RosaConfig = self.config  # type: ignore[assignment]
        if c.bias == "all":
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.requires_grad_(True)
        elif c.bias == "rosa_only":
            for m in rosa_layers(model):
                if m.base_layer.bias is not None:
                    m.base_layer.bias.requires_grad_(True)
        for suffix in c.modules_to_save or []:
            hits = [(n, m) for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix)]
            if not hits:
                raise ValueError(f"method.modules_to_save: no module named '{suffix}' in the model")
            for _, m in hits:
                for p in m.parameters():
                    if p.is_floating_point():
                        p.requires_grad_(True)
        for m in rosa_layers(model):
            for p in (m.lora_A, m.lora_B, m.rosa_values):
                if p is not None:
                    p.requires_grad_(True)

    def param_groups(self, model: nn.Module, train_cfg: TrainConfig) -> list[dict[str, Any]]:
        c: RosaConfig = self.config  # type: ignore[assignment]
        sparse_ids = {id(m.rosa_values) for m in rosa_layers(model) if m.rosa_values is not None}
        sparse, rest, seen = [], [], set()
        for p in model.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (sparse if id(p) in sparse_ids else rest).append(p)
        groups = [
            {"params": rest, "lr": c.lora_lr if c.lora_lr is not None else train_cfg.lr,
             "weight_decay": train_cfg.weight_decay, "name": "rosa_lora"},
            {"params": sparse, "lr": c.sparse_lr, "weight_decay": train_cfg.weight_decay, "name": "rosa_sparse"},
        ]
        return [g for g in groups if g["params"]]

    def callbacks(self) -> list[Callback]:
        if self._scheduler is None:
            self._scheduler = RosaScheduler(self.config)  # type: ignore[arg-type]
            if self.config.mask_from is not None:  # type: ignore[attr-defined]
                self._scheduler.mask_source = "mask_from"
        return [self._scheduler]

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Adapter parameters (LoRA, sparse values), mask indices once built, and any other trainable
        parameter (biases, modules_to_save), by their names in the model."""
        return adapter_tensors(model)

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        named = dict(model.named_parameters())
        layers = {m.rosa_name: m for m in rosa_layers(model)}
        mask_keys = {k for k in state if k.endswith(".rosa_indices")}
        missing = [n for n, p in named.items() if p.requires_grad and n not in state]
        unexpected = [
            k for k in state
            if k not in named and not (k in mask_keys and k[: -len(".rosa_indices")] in layers)
        ]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match the RoSA model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                f"(same method.target_modules / rank / density as the run that saved it?)"
            )
        with torch.no_grad():
            for k in mask_keys:
                layers[k[: -len(".rosa_indices")]].set_mask(state[k])
            for n, t in state.items():
                if n in named:
                    if named[n].shape != t.shape:
                        raise ValueError(
                            f"checkpoint tensor '{n}' has shape {tuple(t.shape)}, model has {tuple(named[n].shape)}"
                        )
                    named[n].copy_(t)

    def extra_results(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict[str, Any]:
        layers = rosa_layers(model)
        counts = trainable_counts(model)
        sched = self._scheduler
        return {
            "rosa_trainable_lora": counts["lora"],
            "rosa_trainable_sparse": counts["sparse"],
            "rosa_trainable_other": counts["other"],
            "rosa_layers": len(layers),
            "rosa_nnz_total": sum(m.nnz for m in layers),
            "rosa_nnz_per_layer": {m.rosa_name: m.nnz for m in layers if m.nnz},
            "rosa_mask_ready": bool(layers) and all(m.mask_ready for m in layers if m.nnz),
            "rosa_mask_source": sched.mask_source if sched else None,
            "rosa_mask_built_at_step": sched.mask_built_at_step if sched else None,
            "rosa_mask_collection_s": round(sched.collect_time_s, 3) if sched else None,
            "rosa_mask_topk_s": round(sched.build_time_s, 3) if sched else None,
            "rosa_sparse_index_bytes": sum(m.rosa_indices.numel() * m.rosa_indices.element_size() for m in layers if m.nnz),
        }

    # ---- artifacts ---------------------------------------------------------------------------
    def save_artifact(self, model: nn.Module, out_dir: Path) -> None:
        save_adapter(model, out_dir, self.config)  # type: ignore[arg-type]
        layers = rosa_layers(model)
        if any(m.nnz for m in layers) and all(m.mask_ready for m in layers if m.nnz):
            save_masks(model, Path(out_dir) / MASKS_FILE)

    def load_for_inference(self, base_model: nn.Module, artifact_dir: Path) -> nn.Module:
        return load_adapter(base_model, artifact_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        layers = rosa_layers(model)
        if any(is_4bit(m.base_layer) for m in layers):
            warnings.warn(
                "RoSA merge into a 4-bit base: the weights are dequantized, the deltas added and the result "
                "requantized to 4-bit, which is lossy; evaluate the unmerged adapter for exact numbers",
                UserWarning,
                stacklevel=2,
            )
        for m in layers:
            set_module(model, m.rosa_name, m.merged_base())
        return model
