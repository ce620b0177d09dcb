"""oneDNN linear layers with packed weights, for decoding fp32 models on a CPU.

PyTorch's CPU builds compute ``nn.Linear`` through MKL's sgemm, which repacks the weight matrix on
every call. Decoding calls each layer once per token step with only a few rows, so the repacking
dominates: measured on the 2-core AMD EPYC of tunelab's CI (torch 2.13, fp32), MKL took 2.2-3.6x
as long as oneDNN's matmul on a weight packed once (``torch.ops.mkldnn._reorder_linear_weight``,
the op pair torch's inductor uses when it freezes a CPU model): SmolLM2's 576x1536 projection
289 us vs 93 us for 16 rows, its 49,152-token head 21.7 ms vs 6.6 ms, and still 2.1x at 1,024 rows.

:func:`packed_linears` packs every plain ``nn.Linear`` of a model for the duration of one
generation call (a packed copy of the weights lives that long; packing SmolLM2-135M takes well
under a second) and restores the modules afterwards. Only fp32 weights on a CPU with oneDNN are
packed; anything else (CUDA, bf16, bitsandbytes layers, which are not ``nn.Linear`` itself) runs
unchanged. The sums are the same products in another order, so logits move by float rounding
(~1e-6 relative); a greedy choice can flip only at a near tie (``tests/test_decode.py``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from tunelab.utils import log

#: batch-size hint for the packed layout (a layout chosen for 32 rows serves 1 to 1,024 rows within ~10%)
PACK_ROWS_HINT = 32


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear ops."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise"))


def _packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    # type(w.data) is a DTensor for FSDP-sharded weights: a shard must not be packed as the whole;
    # a forward already set on the instance is someone's hook (accelerate's offloading): left alone
    return (type(module) is nn.Linear and w is not None and type(w.data) is torch.Tensor
            and w.device.type == "cpu" and w.dtype == torch.float32 and "forward" not in vars(module))


@contextlib.contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the model's fp32 CPU ``nn.Linear`` layers compute through oneDNN on packed
    weights (inference only: no gradient flows through them); yields how many layers were packed."""
    layers = [m for m in model.modules() if _packable(m)] if enabled and available() else []
    if not layers:
        yield 0
        return
    patched = []
    try:
        with torch.no_grad():
            for layer in layers:
                packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), PACK_ROWS_HINT)
                layer.forward = _packed_forward(layer, packed)  # an instance attribute shadows nn.Linear.forward
                patched.append(layer)
        log.debug(f"oneDNN packed linears: {len(patched)} layers")
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward


def _packed_forward(layer: nn.Linear, packed: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32 or torch.is_autocast_enabled("cpu"):  # mixed precision: the usual path
            return nn.functional.linear(x, layer.weight, layer.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")

    return forward
