"""Where RoSA goes in a model: which linear layers, with which r / alpha / density, and its tensors.

The functions take the plain model (the trainer never hands a method a DDP wrapper): choosing the
target layers, the per-layer plan, swapping :class:`~tunelab.methods.rosa.layer.RosaLinear` in,
and listing the adapter tensors that checkpoints and the saved adapter hold.
"""

from __future__ import annotations

import re
from typing import Any, Union

import torch
from torch import nn

from tunelab.methods.rosa.config import RosaConfig, parse_schedule
from tunelab.methods.rosa.layer import RosaLinear


def rosa_layers(model: nn.Module) -> list[RosaLinear]:
    return [m for m in model.modules() if isinstance(m, RosaLinear)]


def is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, RosaLinear)


def find_targets(model: nn.Module, target_modules: Union[str, list[str]]) -> list[str]:
    """Names of the linear modules to adapt ('all-linear' excludes the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not is_plain_linear(module):
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


def first_match(patterns: dict, name: str, default: Any) -> Any:
    """The value of the first pattern (a full-name regex or a name suffix) that matches ``name``."""
    for key, value in patterns.items():
        if re.fullmatch(str(key), name) or re.search(rf"(^|\.){key}$", name):
            return value
    return default


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
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
        r = int(first_match(c.rank_pattern, name, c.rank))
        alpha = float(first_match(c.alpha_pattern, name, c.alpha))
        d = float(first_match(c.density_pattern, name, c.density))
        if kind == "lora_only":
            d = 0.0
        if kind == "spa_only":
            r = 0
        nnz = int(d * m * n)
        if r == 0 and nnz == 0:
            continue
        plan[name] = {"shape": [m, n], "r": r, "alpha": alpha, "density": d, "nnz": nnz}
    return plan


def wrap_layers(model: nn.Module, plan: dict[str, dict], c: RosaConfig) -> None:
    """Replace every planned linear layer by a RosaLinear around it."""
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
        set_module(model, name, layer)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (whether or not it requires grad now) + other trainable parameters."""
    adapter_ids = set()
    out: dict[str, torch.Tensor] = {}
    for m in rosa_layers(model):
        for attr in ("lora_A", "lora_B", "rosa_values"):
            p = getattr(m, attr)
            if p is not None:
                out[f"{m.rosa_name}.{attr}"] = p.detach()
                adapter_ids.add(id(p))
        if m.nnz and m.mask_ready:
            out[f"{m.rosa_name}.rosa_indices"] = m.rosa_indices.detach()
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in adapter_ids:
            out[n] = p.detach()
    return out


def trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts: LoRA factors, sparse values and other (biases, modules_to_save)."""
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
    other = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in ids)
    return {"lora": lora, "sparse": sparse, "other": other}
