"""oneDNN matmuls for fp32 models on a CPU: training's linear layers, and decoding on packed weights.

PyTorch's CPU builds compute ``nn.Linear`` (and ``torch.matmul``) through MKL's sgemm, which repacks
the weight matrix on every call. On the 2-core AMD EPYC of tunelab's CI (torch 2.13, fp32) MKL took
2.1-3.6x as long as oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op torch's inductor
uses for CPU linears), and not only for decoding's few rows: SmolLM2's 576x1536 projection with 512
rows takes 5.3-9.3 ms forward and 5.3 ms for the input gradient under MKL, 2.4 and 2.5 ms under
oneDNN on the same plain (unpacked, even transposed) weight. No env var fixes MKL here
(``MKL_ENABLE_INSTRUCTIONS``, ``MKL_DEBUG_CPU_TYPE`` measured), and torch offers no switch, so:

* :func:`onednn_linears` (training, ``train.onednn_linear``): every plain fp32 CPU ``nn.Linear`` of
  the model computes forward, input gradient and weight gradient through oneDNN, as one autograd
  function (:class:`OneDnnLinear`) that saves exactly what ``F.linear`` saves. The hand-written
  kernels (the chunked loss, RoSA's sparse layer, LoRA's dropout projection) take their products
  from :func:`products_for`. No weight is copied.
* :func:`packed_linears` (decoding, ``eval.onednn_linear``): layers are packed once per generation
  call (``torch.ops.mkldnn._reorder_linear_weight``; a packed copy of the weights lives that long),
  which is another 2-3x at decoding's 1-32 rows (576x1536, 16 rows: 289 us MKL vs 93 us packed; the
  49,152-token head 21.7 vs 6.6 ms).

Anything that is not fp32 on a CPU with oneDNN (CUDA, bf16, autocast, bitsandbytes layers, which are
not ``nn.Linear`` itself, FSDP's DTensor shards) runs unchanged. The sums are the same products in
another order, so results move by float rounding (~1e-6 relative); the tests compare with the torch
path to float tolerance (``tests/test_cpu_kernels.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from tunelab.utils import log

#: batch-size hint for the packed layout (a layout chosen for 32 rows serves 1 to 1,024 rows within ~10%)
PACK_ROWS_HINT = 32

#: Entries kept by oneDNN's primitive cache and by ideep's cache of op descriptors (torch's oneDNN
#: layer). Both are keyed by shape and default to 1,024 entries of ~0.4 MB (each primitive owns its
#: scratchpad), and training meets a new shape at nearly every step (the batch's token count): on
#: SmolLM2 LoRA that was +11.6 MB of heap per new batch length, 546 MB after 40 lengths and still
#: growing, against a flat 199 MB with 64 entries each at the same speed (108.0 vs 107.3 s). One step
#: uses ~30 entries, so 64 keeps a step's working set. Both libraries read these variables once, at
#: their first op, which in tunelab comes after this import; a value the user set is kept.
ONEDNN_CACHE_ENTRIES = 64
for _var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_var, str(ONEDNN_CACHE_ENTRIES))


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear ops."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise"))


def _plain_fp32_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (not a subclass: PEFT's and bitsandbytes' layers compute otherwise) with a
    whole fp32 weight on the CPU, whose forward nobody replaced but us."""
    w = getattr(module, "weight", None)
    # type(w.data) is a DTensor for FSDP-sharded weights: a shard must not be computed as the whole;
    # a forward already set on the instance is someone's hook (accelerate's offloading): left alone
    own = vars(module).get("forward")
    return (type(module) is nn.Linear and w is not None and type(w.data) is torch.Tensor
            and w.device.type == "cpu" and w.dtype == torch.float32
            and (own is None or getattr(own, "_tunelab_onednn", False)))


@contextlib.contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the model's fp32 CPU ``nn.Linear`` layers compute through oneDNN on packed
    weights (inference only: no gradient flows through them); yields how many layers were packed."""
    layers = [m for m in model.modules() if _plain_fp32_linear(m)] if enabled and available() else []
    if not layers:
        yield 0
        return
    patched = []  # (layer, the training forward it had, or None)
    try:
        with torch.no_grad():
            for layer in layers:
                packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), PACK_ROWS_HINT)
                patched.append((layer, vars(layer).get("forward")))
                layer.forward = _packed_forward(layer, packed)  # an instance attribute shadows nn.Linear.forward
        log.debug(f"oneDNN packed linears: {len(patched)} layers")
        yield len(patched)
    finally:
        for layer, before in patched:
            if before is None:
                del layer.forward
            else:  # generation inside training (train.eval_generate): back to the training kernels
                layer.forward = before


def _packed_forward(layer: nn.Linear, packed: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not torch.float32 or torch.is_autocast_enabled("cpu"):  # mixed precision: the usual path
            return nn.functional.linear(x, layer.weight, layer.bias)
        return linear(x, packed, layer.bias)

    return forward


# ---- training: forward and both gradients on oneDNN -------------------------------------------------
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("tunelab_onednn_training", default=False)


def active() -> bool:
    """Whether the hand-written kernels should compute their fp32 CPU products through oneDNN
    (:func:`products_for`): inside :func:`onednn_linears` with it enabled."""
    return _ACTIVE.get()


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` can run on oneDNN: both fp32 on the CPU, whole, not under autocast."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2 and x.dim() >= 2 and x.shape[0] > 0
            and type(weight.data) is torch.Tensor and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on oneDNN, no autograd (for use inside autograd functions); ``weight``
    may be a plain, a transposed or a packed (:func:`packed_linears`) matrix."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad_out @ weight`` (the input gradient of ``linear``) on oneDNN, through a transposed view:
    no copy of the weight is made (oneDNN reads the strides)."""
    return linear(grad_out.contiguous(), weight.t())


#: a weight gradient with a side this narrow (LoRA's A and B) stays on torch's matmul: oneDNN would
#: need the transposed gradient copied first, which costs more than the small product itself
SKINNY_WEIGHT = 64


def _torch_weight_grad(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return grad_out.reshape(-1, grad_out.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))


def weight_grad(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad_out.T @ x`` over all leading dimensions ([out, in], the weight gradient), on oneDNN
    unless a side is at most :data:`SKINNY_WEIGHT` wide."""
    if min(grad_out.shape[-1], x.shape[-1]) <= SKINNY_WEIGHT:
        return _torch_weight_grad(grad_out, x)
    return linear(grad_out.reshape(-1, grad_out.shape[-1]).t(), x.reshape(-1, x.shape[-1]).t())


@dataclass(frozen=True)
class Products:
    """The three products of a linear layer, on one set of kernels (what a hand-written autograd
    function picks once in forward and keeps in ``ctx`` for its backward)."""

    linear: Callable[..., torch.Tensor]  # (x, weight, bias=None) -> x @ weight.T + bias
    input_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (grad_out, weight) -> grad_out @ weight
    weight_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (grad_out, x) -> grad_out.T @ x
    onednn: bool


TORCH = Products(nn.functional.linear, torch.matmul, _torch_weight_grad, onednn=False)
ONEDNN = Products(linear, input_grad, weight_grad, onednn=True)


def products_for(x: torch.Tensor, weight: torch.Tensor) -> Products:
    """oneDNN's products inside :func:`onednn_linears` where :func:`usable`, else torch's."""
    return ONEDNN if active() and usable(x, weight) else TORCH


def _not_a_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own that shares its storage. oneDNN returns a batched (3D) product as
    a view of its 2D result; autograd forbids in-place ops on a custom function's view outputs, and
    LoRA adds its update into the base layer's output in place (:mod:`tunelab.methods.lora_dropout`)."""
    if t._base is None:
        return t
    own = torch.empty(0, dtype=t.dtype, device=t.device)
    return own.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


class OneDnnLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with forward, input and weight gradient on oneDNN. It saves what
    torch's own linear saves: the weight for the input gradient, the input only where the weight
    trains (a frozen base layer keeps no extra activation)."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        need_x, need_w, need_b = ctx.needs_input_grad
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        ctx.need_b = need_b and bias is not None
        return _not_a_view(linear(x, weight, bias))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = input_grad(grad_out, weight) if weight is not None else None
        grad_w = weight_grad(grad_out, x) if x is not None else None
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.need_b else None
        return grad_x, grad_w, grad_b


def _training_forward(layer: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = layer.weight  # read per call: a weight replaced or re-tied later is the one used
        if usable(x, weight):
            return OneDnnLinear.apply(x, weight, layer.bias)
        return nn.functional.linear(x, weight, layer.bias)

    forward._tunelab_onednn = True  # type: ignore[attr-defined]
    return forward


@contextlib.contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True, skip: tuple[nn.Module, ...] = ()) -> Iterator[int]:
    """Within the block, the model's plain fp32 CPU ``nn.Linear`` layers (but those in ``skip``: the
    output head, whose product the chunked loss computes itself) train through :class:`OneDnnLinear`,
    and :func:`active` is True; yields how many layers were switched (0 when disabled or unavailable)."""
    if not (enabled and available()):
        yield 0
        return
    layers = [m for m in model.modules()
              if _plain_fp32_linear(m) and "forward" not in vars(m) and not any(m is s for s in skip)]
    token = _ACTIVE.set(True)
    try:
        for layer in layers:
            layer.forward = _training_forward(layer)
        log.debug(f"oneDNN training linears: {len(layers)} layers")
        yield len(layers)
    finally:
        for layer in layers:
            if getattr(vars(layer).get("forward"), "_tunelab_onednn", False):
                del layer.forward
        _ACTIVE.reset(token)
