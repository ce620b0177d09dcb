"""RoSA's masks: choosing them from the collected gradients, and saving / loading them.

Per layer (not global) the mask is the top-k of the accumulated score with k = nnz, as in the paper.
Unlike the reference, the collected gradients are all-reduced under DDP (every rank gets the mask of
all ranks' data, rank 0's choice broadcast) and a mask is saved as sorted flat indices (int32 where they fit)
(``masks.safetensors``, format ``tunelab-rosa-masks``) rather than a dense bool tensor of ≈1 byte
per weight, with the layer shapes to check it against the model that loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from tunelab.methods.rosa.adapters import rosa_layers
from tunelab.methods.rosa.artifact import FORMAT, FORMAT_VERSION
from tunelab.methods.rosa.layer import RosaLinear

MASKS_FILE = "masks.safetensors"
MASKS_FORMAT = "tunelab-rosa-masks"


def resolve_mask_path(path: str | Path) -> Path:
    """The mask file that ``method.mask_from`` names: the file itself, or masks.safetensors in a folder."""
    p = Path(path).expanduser()
    return p / MASKS_FILE if p.is_dir() else p


def topk_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k largest entries of ``score`` (per layer, not global)."""
    flat = score.reshape(-1)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device)
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    idx = torch.topk(flat, k, sorted=False).indices
    return idx.sort().values


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

    path = resolve_mask_path(path)
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
