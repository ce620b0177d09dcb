"""RoSA — Robust Adaptation: LoRA plus a sparse adapter on a gradient-chosen mask (arXiv 2401.04679).

W' = W + (alpha/r)·B·A + S for every adapted linear layer, W frozen. S has exactly
int(density·m·n) trainable values on a per-layer mask: the top-k entries of the dense weight gradient
(|mean G|, or mean G² — an empirical diagonal Fisher) accumulated over ``spa_num_grads`` optimizer
steps. Pure PyTorch (CPU and CUDA, float or bitsandbytes 4-bit bases); the math lives in
:mod:`tunelab.methods.rosa_ops`. See the RoSA section of README.md for the recipe and the numbers.

What the trainer must do for RoSA
---------------------------------
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
  forward only costs bandwidth. ``torch.distributed`` must be initialised before the mask is built.
* Every rank must run the same number of micro-batches per step (the usual DDP rule).
* Checkpoints: :meth:`trainable_state_dict` holds LoRA factors, sparse values and — once built — the
  mask indices; loading it restores the mask, so a resume after the mask phase never rebuilds it.
  The callback's ``state_dict`` is small and JSON-friendly (mask built, at which step, timings).
  The accumulated gradients of an unfinished collection window are not checkpointed (they are the
  size of the model): resuming inside the window restarts it at the resume step (logged).

Design choices are measured and explained in :mod:`tunelab.methods.rosa_ops` and the RoSA section of README.md.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import torch
from torch import nn

from tunelab.config import MethodConfig, RunConfig, TrainConfig, opt
from tunelab.methods.base import Callback, Method, TrainState
from tunelab.methods.rosa_ops import RosaLinear, is_4bit, topk_indices
from tunelab.utils import log
from tunelab.registry import METHODS

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "rosa_config.json"
MASKS_FILE = "masks.safetensors"
FORMAT = "tunelab-rosa"
MASKS_FORMAT = "tunelab-rosa-masks"
FORMAT_VERSION = 1

SCHEDULE_FORMS = (
    "default (= wl0), wlN with N >= 0 (e.g. wl64: LoRA alone for N steps, then collect, then LoRA + sparse), "
    "spa_only, lora_only"
)


@dataclass
class RosaConfig(MethodConfig):
    """RoSA: LoRA + a sparse adapter on a gradient-chosen mask (Nikdan et al., arXiv 2401.04679)."""

    name: str = opt("rosa", "Robust Adaptation: low-rank + sparse adapters.")
    rank: int = opt(8, "LoRA rank r (0 only with schedule=spa_only).")
    alpha: float = opt(16.0, "LoRA alpha; the low-rank update is scaled by alpha/r (alpha/sqrt(r) with use_rslora).")
    dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_modules: Union[str, list[str]] = opt(
        "all-linear",
        "Modules to adapt: 'all-linear' (every linear layer but the output head), a list of module-name "
        "suffixes (q_proj, v_proj, ...) or one regular expression matched against full module names.",
    )
    density: float = opt(
        0.006, "Sparse density d: each adapted m×n layer trains int(d·m·n) values (0 only with schedule=lora_only)."
    )
    rank_pattern: dict = opt(factory=dict, help="Per-module rank overrides {regex: rank}; first match wins.")
    alpha_pattern: dict = opt(factory=dict, help="Per-module alpha overrides {regex: alpha}; first match wins.")
    density_pattern: dict = opt(factory=dict, help="Per-module density overrides {regex: density}; first match wins.")
    schedule: str = opt("default", f"When each part trains: {SCHEDULE_FORMS}.")
    spa_num_grads: int = opt(1, "Optimizer steps whose gradients (all their micro-batches) are accumulated to choose the mask.")
    grad_acc_mode: Literal["mean", "mean_squared"] = opt(
        "mean_squared", "Mask score: |mean of G| (mean) or mean of G² (mean_squared, an empirical diagonal Fisher)."
    )
    lora_lr: Optional[float] = opt(None, "Learning rate of the LoRA factors (null = train.lr; the paper uses 7e-4).")
    sparse_lr: float = opt(2e-4, "Learning rate of the sparse values (the paper uses 2e-4).")
    mask_from: Optional[str] = opt(
        None, "Masks saved by an earlier run (RUN/adapter/masks.safetensors, or its folder): skips gradient collection."
    )
    mask_only: bool = opt(
        False, "Stop as soon as the masks are built and saved (phase 1 of the paper's recipe; pair with schedule=wl64)."
    )
    use_rslora: bool = opt(False, "Rank-stabilised scaling alpha/sqrt(r) for the LoRA part.")
    bias: Literal["none", "all", "rosa_only"] = opt(
        "none", "Also train biases: none, all, or only those of adapted layers (saved with the adapter)."
    )
    modules_to_save: Optional[list[str]] = opt(
        None, "Module-name suffixes trained in full and saved with the adapter (e.g. lm_head)."
    )
    sddmm: Literal["auto", "sampled", "gather", "dense"] = opt(
        "auto",
        "How the sparse gradient dOᵀ·X is sampled on the mask: sampled (torch.sparse.sampled_addmm, fastest "
        "on CPU), gather (pure indexing), dense (one transient m×n GEMM per layer; try on GPUs), auto = sampled "
        "with a gather fallback.",
    )
    collect_device: Literal["auto", "cpu"] = opt(
        "auto",
        "Where the fp32 gradient accumulators of the mask phase live: auto (the weights' device; 4 bytes per "
        "adapted weight) or cpu (saves GPU memory, slower collection steps).",
    )


# ------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------


def parse_schedule(schedule: str) -> Optional[tuple[str, int]]:
    """('wl', N) | ('spa_only', 0) | ('lora_only', 0), or None when unknown."""
    s = str(schedule).strip()
    if s in ("default", "df"):
        return ("wl", 0)
    if s in ("spa_only", "lora_only"):
        return (s, 0)
    m = re.fullmatch(r"wl(\d+)", s)
    if m:
        return ("wl", int(m.group(1)))
    return None


def _resolve_mask_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p / MASKS_FILE if p.is_dir() else p


def _first_match(patterns: dict, name: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.fullmatch(str(key), name) or re.search(rf"(^|\.){key}$", name):
            return value
    return default


# ------------------------------------------------------------------------------------------
# Model helpers
# ------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) if model.__class__.__name__ in (
            "DistributedDataParallel", "DataParallel"
        ) else getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def rosa_layers(model: nn.Module) -> list[RosaLinear]:
    return [m for m in unwrap(model).modules() if isinstance(m, RosaLinear)]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, RosaLinear)


def find_targets(model: nn.Module, target_modules: Union[str, list[str]]) -> list[str]:
    """Names of the linear modules to adapt ('all-linear' excludes the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        if target_modules == "all-linear":
            if module is head or name.split(".")[-1] == "lm_head":
                continue
            names.append(name)
        elif isinstance(target_modules, str):
            if re.fullmatch(target_modules, name):
                names.append(name)
        elif any(name == t or name.endswith("." + t) for t in target_modules):
            names.append(name)
    return names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def layer_plan(model: nn.Module, c: RosaConfig) -> dict[str, dict]:
    """Per adapted layer: shape, r, alpha, density, nnz (what the config gives for this model)."""
    plan: dict[str, dict] = {}
    kind, _ = parse_schedule(c.schedule) or ("wl", 0)
    for name in find_targets(model, c.target_modules):
        module = model.get_submodule(name)
        m, n = int(module.out_features), int(module.in_features)
        r = int(_first_match(c.rank_pattern, name, c.rank))
        alpha = float(_first_match(c.alpha_pattern, name, c.alpha))
        d = float(_first_match(c.density_pattern, name, c.density))
        if kind == "lora_only":
            d = 0.0
        if kind == "spa_only":
            r = 0
        nnz = int(d * m * n)
        if r == 0 and nnz == 0:
            continue
        plan[name] = {"shape": [m, n], "r": r, "alpha": alpha, "density": d, "nnz": nnz}
    return plan


def _wrap(model: nn.Module, plan: dict[str, dict], c: RosaConfig) -> None:
    for name, p in plan.items():
        base = model.get_submodule(name)
        if isinstance(base, RosaLinear):
            raise ValueError(f"{name} is already a RoSA layer (prepare was called twice?)")
        layer = RosaLinear(
            base,
            name=name,
            r=p["r"],
            alpha=p["alpha"],
            dropout=c.dropout,
            nnz=p["nnz"],
            use_rslora=c.use_rslora,
            sddmm_impl=c.sddmm,
        )
        _set_module(model, name, layer)


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


# ------------------------------------------------------------------------------------------
# Masks: build, save, load
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def build_masks(layers: Iterable[RosaLinear]) -> dict[str, int]:
    """Turn the accumulated gradients into masks (all-reduced under DDP, rank 0's mask broadcast).

    Returns {layer name: micro-batches accumulated (over all ranks)}.
    """
    layers = [m for m in layers if m.nnz > 0]
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    backend = dist.get_backend() if distributed else None
    comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    counts = torch.tensor([float(m._acc_count) for m in layers], dtype=torch.float64)
    if distributed:
        counts = counts.to(comm_device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    seen = {}
    for layer, count in zip(layers, counts.tolist()):
        acc = layer._acc
        if acc is None:  # no backward reached this layer on this rank: contribute zeros
            acc = torch.zeros(
                layer.out_features, layer.in_features,
                dtype=torch.promote_types(layer.weight.dtype, torch.float32),
                device=layer.collect_device or layer.rosa_indices.device,
            )
        if distributed:
            if backend == "nccl" and acc.device.type != "cuda":
                buf = acc.to(comm_device)
                dist.all_reduce(buf)
                acc = buf
            else:
                dist.all_reduce(acc)
        if count == 0:
            raise RuntimeError(
                f"RoSA: no gradient reached {layer.rosa_name} during the collection window, so no mask can be "
                f"chosen; does the loss depend on this layer?"
            )
        if layer.grad_acc_mode == "mean":
            score = acc.div_(count).abs_()
        else:
            score = acc.div_(count)
        idx = topk_indices(score, layer.nnz)
        del score, acc
        layer.reset_collection()
        if distributed:  # identical on every rank even if topk broke ties differently somewhere
            idx = idx.to(comm_device)
            dist.broadcast(idx, src=0)
        layer.set_mask(idx)
        seen[layer.rosa_name] = int(count)
    return seen


def masks_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {m.rosa_name: m.rosa_indices.detach().cpu().clone() for m in rosa_layers(model) if m.nnz and m.mask_ready}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (whether or not it requires grad now) + other trainable parameters."""
    inner = unwrap(model)
    adapter_ids = set()
    out: dict[str, torch.Tensor] = {}
    for m in rosa_layers(inner):
        for attr in ("lora_A", "lora_B", "rosa_values"):
            p = getattr(m, attr)
            if p is not None:
                out[f"{m.rosa_name}.{attr}"] = p.detach()
                adapter_ids.add(id(p))
        if m.nnz and m.mask_ready:
            out[f"{m.rosa_name}.rosa_indices"] = m.rosa_indices.detach()
    for n, p in inner.named_parameters():
        if p.requires_grad and id(p) not in adapter_ids:
            out[n] = p.detach()
    return out


def save_masks(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    layers = [m for m in rosa_layers(model) if m.nnz]
    if not all(m.mask_ready for m in layers):
        raise RuntimeError("RoSA masks are not built yet; nothing to save")
    tensors = {m.rosa_name: m.rosa_indices.detach().cpu().contiguous() for m in layers}
    meta = {
        "format": MASKS_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps({m.rosa_name: [m.out_features, m.in_features] for m in layers}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_masks(model: nn.Module, path: str | Path) -> int:
    """Install masks from a masks.safetensors (or an adapter_model.safetensors); errors name the layer."""
    from safetensors import safe_open

    path = _resolve_mask_path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"RoSA mask file '{path}' does not exist (expected RUN/adapter/{MASKS_FILE} of a mask_only run)"
        )
    layers = {m.rosa_name: m for m in rosa_layers(model) if m.nnz}
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        keys = list(fh.keys())
        if meta.get("format") == MASKS_FORMAT:
            key_of = {k: k for k in keys}
            shapes = json.loads(meta.get("layers", "{}"))
        elif meta.get("format") == FORMAT:
            key_of = {k[: -len(".rosa_indices")]: k for k in keys if k.endswith(".rosa_indices")}
            shapes = json.loads(meta.get("layers", "{}"))
        else:
            raise ValueError(f"{path} is not a RoSA mask file (no '{MASKS_FORMAT}' metadata)")
        missing = [n for n in layers if n not in key_of]
        extra = [n for n in key_of if n not in layers]
        for name, layer in layers.items():
            if name in shapes and list(shapes[name]) != [layer.out_features, layer.in_features]:
                m, n = shapes[name]
                raise ValueError(
                    f"RoSA mask file {path}: layer '{name}' is {m}x{n} in the file but "
                    f"{layer.out_features}x{layer.in_features} in this model (masks from a different model?)"
                )
        if missing:
            raise ValueError(
                f"RoSA mask file {path} has no mask for {len(missing)} adapted layer(s), e.g. '{missing[0]}' "
                f"(made for another model or other method.target_modules?)"
            )
        if extra:
            raise ValueError(
                f"RoSA mask file {path} has masks for layers this model does not adapt, e.g. '{extra[0]}' "
                f"(made for another model or other method.target_modules?)"
            )
        for name, layer in layers.items():
            try:
                layer.set_mask(fh.get_tensor(key_of[name]))
            except ValueError as exc:
                raise ValueError(f"RoSA mask file {path}: {exc}") from None
    return len(layers)


# ------------------------------------------------------------------------------------------
# The schedule callback
# ------------------------------------------------------------------------------------------


class RosaScheduler(Callback):
    """Switches gradient collection and the sparse part by optimizer step; builds the masks."""

    def __init__(self, config: RosaConfig):
        self.config = config
        kind, warmup = parse_schedule(config.schedule) or ("wl", 0)
        self.kind = kind
        self.spa_start = warmup  # first optimizer step the sparse part may train / collection may start
        self.mask_ready = False
        self.mask_source: Optional[str] = None  # collected | mask_from | checkpoint
        self.mask_built_at_step: Optional[int] = None
        self.collected_steps = 0
        self.collect_start_step: Optional[int] = None
        self.collect_time_s = 0.0
        self.build_time_s = 0.0
        self.collected_micro_batches: dict[str, int] = {}
        self._collect_t0: Optional[float] = None
        self._collecting = False

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def has_sparse(self) -> bool:
        return self.kind != "lora_only"

    def _layers(self, model: nn.Module) -> list[RosaLinear]:
        return [m for m in rosa_layers(model) if m.nnz > 0]

    def _set_collecting(self, layers: list[RosaLinear], on: bool) -> None:
        dev = torch.device("cpu") if self.config.collect_device == "cpu" else None
        for m in layers:
            m.collecting = on
            m.grad_acc_mode = self.config.grad_acc_mode
            m.collect_device = dev
        self._collecting = on

    # ---- hooks -------------------------------------------------------------------------------
    def on_train_begin(self, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        layers = self._layers(model)
        model_has_masks = bool(layers) and all(m.mask_ready for m in layers)
        if self.mask_ready and not model_has_masks:
            raise RuntimeError(
                "RoSA: the checkpoint says the masks were built, but the model holds none: load the "
                "checkpoint's trainable state (it carries the mask indices) before training resumes"
            )
        if model_has_masks and not self.mask_ready:
            self.mask_ready = True
            self.mask_source = self.mask_source or ("mask_from" if self.config.mask_from else "checkpoint")
        if not self.mask_ready and self.has_sparse and state.step > self.spa_start and self.collected_steps == 0:
            if state.is_main:
                log.info(
                    f"RoSA: resuming at step {state.step} inside/after the collection window without masks; "
                    f"collecting gradients again for {self.config.spa_num_grads} step(s) from now"
                )

    def on_step_begin(self, state: TrainState, model: nn.Module) -> None:
        layers = self._layers(model)
        if not self.has_sparse or not layers:
            return
        if self.mask_ready:
            active = state.step >= self.spa_start
            for m in layers:
                m.spa_active = active
            if self._collecting:
                self._set_collecting(layers, False)
            return
        if state.step >= self.spa_start:
            if not self._collecting:
                for m in layers:
                    m.reset_collection()
                self._set_collecting(layers, True)
                self.collect_start_step = state.step
                self.collected_steps = 0
                if state.is_main:
                    log.info(
                        f"RoSA: collecting gradients ({self.config.grad_acc_mode}) for the masks over "
                        f"{self.config.spa_num_grads} step(s) from step {state.step}"
                    )
            if self._collect_t0 is None:
                self._collect_t0 = time.perf_counter()

    def on_step_end(self, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self._collecting:
            return
        self.collected_steps += 1
        if self.collected_steps < self.config.spa_num_grads:
            return
        layers = self._layers(model)
        self._set_collecting(layers, False)
        if any(m.weight.is_cuda for m in layers):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.collect_time_s += t0 - (self._collect_t0 or t0)
        self._collect_t0 = None
        self.collected_micro_batches = build_masks(layers)
        self.build_time_s = time.perf_counter() - t0
        self.mask_ready = True
        self.mask_source = "collected"
        self.mask_built_at_step = state.step  # the masks train from this step on
        for m in layers:
            m.spa_active = state.step >= self.spa_start
        if state.is_main:
            nnz = sum(m.nnz for m in layers)
            log.info(
                f"RoSA: masks built after step {state.step - 1} ({nnz:,} sparse values over {len(layers)} layers; "
                f"collection {self.collect_time_s:.1f}s, top-k {self.build_time_s:.1f}s)"
            )

    def on_train_end(self, state: TrainState, model: nn.Module) -> None:
        if self.config.mask_only and not self.mask_ready and state.is_main:
            log.warning(
                f"RoSA mask_only run ended at step {state.step} before the masks were built (at the end of step "
                f"{self.spa_start + self.config.spa_num_grads - 1}); raise train.max_steps"
            )

    def should_stop(self, state: TrainState) -> bool:
        return bool(self.config.mask_only and self.mask_ready)

    def state_dict(self) -> dict:
        return {
            "mask_ready": self.mask_ready,
            "mask_source": self.mask_source,
            "mask_built_at_step": self.mask_built_at_step,
            "collect_time_s": self.collect_time_s,
            "build_time_s": self.build_time_s,
            "collected_micro_batches": dict(self.collected_micro_batches),
        }

    def load_state_dict(self, state: dict) -> None:
        self.mask_ready = bool(state.get("mask_ready", False))
        self.mask_source = state.get("mask_source")
        self.mask_built_at_step = state.get("mask_built_at_step")
        self.collect_time_s = float(state.get("collect_time_s", 0.0))
        self.build_time_s = float(state.get("build_time_s", 0.0))
        self.collected_micro_batches = dict(state.get("collected_micro_batches", {}))
        # gradients of an unfinished window are not checkpointed: a resume restarts the window
        self.collected_steps = 0
        self._collecting = False
        self._collect_t0 = None


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
        kind = sched[0] if sched else None
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
        for key, lo, hi, what in (
            ("rank_pattern", 0, None, "a rank >= 0"),
            ("alpha_pattern", 0, None, "an alpha > 0"),
            ("density_pattern", 0, 1, "a density in [0, 1)"),
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
        if c.mask_from is not None:
            mp = _resolve_mask_path(c.mask_from)
            if not mp.is_file():
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
                if run_cfg.train.max_steps != -1 and run_cfg.train.max_steps < need:
                    p.append(
                        f"method.mask_only: the masks are built after {need} optimizer steps (schedule {c.schedule}, "
                        f"spa_num_grads {c.spa_num_grads}) but train.max_steps={run_cfg.train.max_steps}: "
                        f"raise train.max_steps to >= {need} or shorten the schedule"
                    )
        if isinstance(c.target_modules, str) and c.target_modules != "all-linear":
            try:
                re.compile(c.target_modules)
            except re.error as exc:
                p.append(
                    f"method.target_modules '{c.target_modules}' is neither 'all-linear' nor a valid regular "
                    f"expression ({exc})"
                )
        return p

    # ---- training ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module, run_cfg: RunConfig) -> nn.Module:
        c: RosaConfig = self.config  # type: ignore[assignment]
        if getattr(run_cfg.model, "load_in_4bit", False):
            import peft

            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=run_cfg.model.gradient_checkpointing
            )
        plan = layer_plan(model, c)
        if not plan:
            examples = [n for n, m in model.named_modules() if _is_linear(m)][:6]
            raise ValueError(
                f"RoSA matched no linear layer with method.target_modules={c.target_modules!r} "
                f"(linear layers of this model include {examples}); 'all-linear' adapts all but the output head"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        _wrap(model, plan, c)
        self._set_extra_trainable(model)
        if c.mask_from is not None:
            n = load_masks(model, c.mask_from)
            log.info(f"RoSA: loaded masks for {n} layers from {c.mask_from}; gradient collection is skipped")
        counts = self.trainable_counts(model)
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

    @staticmethod
    def trainable_counts(model: nn.Module) -> dict[str, int]:
        lora = sparse = 0
        ids = set()
        for m in rosa_layers(model):
            for p in (m.lora_A, m.lora_B):
                if p is not None:
                    lora += p.numel()
                    ids.add(id(p))
            if m.rosa_values is not None:
                sparse += m.rosa_values.numel()
                ids.add(id(m.rosa_values))
        other = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad and id(p) not in ids)
        return {"lora": lora, "sparse": sparse, "other": other}

    def param_groups(self, model: nn.Module, train_cfg: TrainConfig) -> list[dict[str, Any]]:
        c: RosaConfig = self.config  # type: ignore[assignment]
        sparse_ids = {id(m.rosa_values) for m in rosa_layers(model) if m.rosa_values is not None}
        sparse, rest, seen = [], [], set()
        for p in unwrap(model).parameters():
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
        parameter (biases, modules_to_save), by their names in the unwrapped model."""
        return adapter_tensors(model)

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        inner = unwrap(model)
        named = dict(inner.named_parameters())
        layers = {m.rosa_name: m for m in rosa_layers(inner)}
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
        counts = self.trainable_counts(model)
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
    def _config_json(self, model: nn.Module) -> dict:
        c: RosaConfig = self.config  # type: ignore[assignment]
        cfg = asdict(c)
        if cfg.get("mask_from"):
            cfg["mask_from"] = Path(str(cfg["mask_from"])).name  # provenance only, never an absolute path
        layers = rosa_layers(model)
        base_name = getattr(getattr(unwrap(model), "config", None), "_name_or_path", None)
        if base_name and (Path(str(base_name)).is_absolute() or Path(str(base_name)).exists()):
            base_name = Path(str(base_name)).name
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": "rosa",
            "base_model": base_name,
            "config": cfg,
            "mask_ready": bool(layers) and all(m.mask_ready for m in layers if m.nnz),
            "trainable": self.trainable_counts(model),
            "layers": {
                m.rosa_name: {
                    "shape": [m.out_features, m.in_features], "r": m.r, "alpha": m.alpha,
                    "use_rslora": m.use_rslora, "nnz": m.nnz,
                }
                for m in layers
            },
        }

    def save_artifact(self, model: nn.Module, out_dir: Path) -> None:
        from safetensors.torch import save_file

        inner = unwrap(model)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_tensors(inner).items()}
        layers = rosa_layers(inner)
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "layers": json.dumps({m.rosa_name: [m.out_features, m.in_features] for m in layers}),
        }
        tmp = out_dir / f".{ADAPTER_FILE}.tmp"
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(out_dir / ADAPTER_FILE)
        (out_dir / CONFIG_FILE).write_text(json.dumps(self._config_json(inner), indent=2) + "\n")
        if any(m.nnz for m in layers) and all(m.mask_ready for m in layers if m.nnz):
            save_masks(inner, out_dir / MASKS_FILE)

    def load_for_inference(self, base_model: nn.Module, artifact_dir: Path) -> nn.Module:
        from safetensors.torch import load_file

        artifact_dir = Path(artifact_dir)
        cfg_path = artifact_dir / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{artifact_dir} has no {CONFIG_FILE}: not a RoSA adapter folder")
        info = json.loads(cfg_path.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{cfg_path} is not a tunelab RoSA adapter (format {info.get('format')!r})")
        saved = info["config"]
        c = RosaConfig(**{k: v for k, v in saved.items() if k in RosaConfig.__dataclass_fields__})
        c.mask_from = None
        plan = {}
        for name, spec in info["layers"].items():
            try:
                module = base_model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"RoSA adapter {artifact_dir}: the base model has no layer '{name}' (another model?)"
                ) from None
            shape = [int(module.out_features), int(module.in_features)]
            if shape != list(spec["shape"]):
                raise ValueError(
                    f"RoSA adapter {artifact_dir}: layer '{name}' is {spec['shape'][0]}x{spec['shape'][1]} in the "
                    f"adapter but {shape[0]}x{shape[1]} in the base model (another model?)"
                )
            plan[name] = {"shape": shape, "r": spec["r"], "alpha": spec["alpha"], "nnz": spec["nnz"], "density": None}
        for p in base_model.parameters():
            p.requires_grad_(False)
        c.use_rslora = bool(next(iter(info["layers"].values()), {}).get("use_rslora", c.use_rslora))
        _wrap(base_model, plan, c)
        state = load_file(str(artifact_dir / ADAPTER_FILE))
        # the adapter's tensors define what was trained (incl. biases / modules_to_save)
        named = dict(base_model.named_parameters())
        layers = {m.rosa_name: m for m in rosa_layers(base_model)}
        with torch.no_grad():
            for k, t in state.items():
                if k.endswith(".rosa_indices") and k[: -len(".rosa_indices")] in layers:
                    layers[k[: -len(".rosa_indices")]].set_mask(t)
                elif k in named:
                    if named[k].shape != t.shape:
                        raise ValueError(
                            f"RoSA adapter {artifact_dir}: '{k}' has shape {tuple(t.shape)}, "
                            f"model has {tuple(named[k].shape)}"
                        )
                    named[k].copy_(t.to(named[k].dtype))
                else:
                    raise ValueError(f"RoSA adapter {artifact_dir}: tensor '{k}' matches nothing in the base model")
        for m in layers.values():
            m.spa_active = m.nnz > 0 and m.mask_ready
            m.lora_dropout.eval()
        base_model.eval()
        return base_model

    def merge(self, model: nn.Module) -> nn.Module:
        inner = unwrap(model)
        layers = rosa_layers(inner)
        if any(is_4bit(m.base_layer) for m in layers):
            import warnings

            warnings.warn(
                "RoSA merge into a 4-bit base: the weights are dequantized, the deltas added and the result "
                "requantized to 4-bit, which is lossy; evaluate the unmerged adapter for exact numbers",
                UserWarning,
                stacklevel=2,
            )
        for m in layers:
            _set_module(inner, m.rosa_name, m.merged_base())
        return inner


