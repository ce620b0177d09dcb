"""The saved RoSA adapter: ``adapter_model.safetensors`` + ``rosa_config.json`` (format ``tunelab-rosa``).

Our own format because PEFT has no RoSA type to save it as. The safetensors file holds the LoRA
factors, the sparse values, the mask indices (once built) and any other trained tensor (biases,
modules_to_save) under their module names; the JSON holds the config (no absolute paths) and each
layer's shape, r, alpha and nnz, so the adapter is re-applied to a fresh base model without the run's
config. The masks alone are also saved as ``masks.safetensors`` (:mod:`tunelab.methods.rosa.masks`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from tunelab.methods.rosa.adapters import adapter_tensors, rosa_layers, trainable_counts, wrap_layers
from tunelab.methods.rosa.config import RosaConfig

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "rosa_config.json"
FORMAT = "tunelab-rosa"
FORMAT_VERSION = 1


def adapter_config_json(model: nn.Module, c: RosaConfig) -> dict:
    """The content of rosa_config.json for this model and config."""
    cfg = asdict(c)
    if cfg.get("mask_from"):
        cfg["mask_from"] = Path(str(cfg["mask_from"])).name  # provenance only, never an absolute path
    layers = rosa_layers(model)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if base_name and (Path(str(base_name)).is_absolute() or Path(str(base_name)).exists()):
        base_name = Path(str(base_name)).name
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": "rosa",
        "base_model": base_name,
        "config": cfg,
        "mask_ready": bool(layers) and all(m.mask_ready for m in layers if m.nnz),
        "trainable": trainable_counts(model),
        "layers": {
            m.rosa_name: {
                "shape": [m.out_features, m.in_features], "r": m.r, "alpha": m.alpha,
                "use_rslora": m.use_rslora, "nnz": m.nnz,
            }
            for m in layers
        },
    }


def save_adapter(model: nn.Module, out_dir: Path, c: RosaConfig) -> None:
    """Write adapter_model.safetensors (atomically) and rosa_config.json into ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_tensors(model).items()}
    layers = rosa_layers(model)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps({m.rosa_name: [m.out_features, m.in_features] for m in layers}),
    }
    tmp = out_dir / f".{ADAPTER_FILE}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out_dir / ADAPTER_FILE)
    (out_dir / CONFIG_FILE).write_text(json.dumps(adapter_config_json(model, c), indent=2) + "\n")


def _saved_plan(base_model: nn.Module, artifact_dir: Path, info: dict) -> dict[str, dict]:
    """The layer plan recorded in rosa_config.json, checked against the base model's shapes."""
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
    return plan


def load_adapter(base_model: nn.Module, artifact_dir: Path) -> nn.Module:
    """Apply a saved adapter to a freshly loaded base model, unmerged, in eval mode."""
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
    plan = _saved_plan(base_model, artifact_dir, info)
    for p in base_model.parameters():
        p.requires_grad_(False)
    c.use_rslora = bool(next(iter(info["layers"].values()), {}).get("use_rslora", c.use_rslora))
    wrap_layers(base_model, plan, c)
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
