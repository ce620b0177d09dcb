"""LoRA's input dropout without a dropped-out copy of every adapted layer's input kept for backward.

PEFT computes ``lora_B(lora_A(dropout(x)))``. Autograd then keeps, per adapted layer, the dropped-out
input that ``lora_A`` needs for its weight gradient (4 bytes per element) and dropout's own mask (on
CPU the fp32 noise tensor, 4 bytes more; a byte on CUDA), on top of ``x`` itself, which the layers
that read it (q/k/v, gate/up) save once between them when dropout is 0. Measured on the default
model at filing: 5.18 GiB peak with dropout 0.05 against 4.16 GiB with 0.

:class:`BitMaskDropoutLinear` is PEFT's own ``lora.Linear`` (same parameters, names, merge and
adapter format), registered through ``LoraConfig._register_custom_module`` (PEFT's hook for custom
LoRA layers). In training with dropout it computes ``dropout(x) @ A^T`` in one autograd function,
:class:`_DropoutDownProjection`, that saves ``x`` (alive anyway), ``A`` and the mask packed to one
bit per element; backward unpacks the mask, re-applies it to ``x`` (one elementwise pass, no random
numbers drawn again) and computes the two products autograd would. Hand-written because torch has no
dropout-plus-linear op that saves its mask compactly; activation checkpointing (``torch.utils.
checkpoint``) would save as little but draws every mask twice: on CPU that cost 19% of the default
model's forward+backward against PEFT's, this costs 4% (2 threads, batch 2 x 200 tokens).

The mask and values are the layer's dropout module's: the same ATen calls in the same order as
``nn.Dropout`` (``native_dropout`` on CUDA-like devices, ``bernoulli_`` noise elsewhere, as
``torch.nn.functional.dropout`` picks) or as :class:`FastDropout` (tunelab's LoRA uses it on CPU:
15-bit uniforms, four per random word), so the RNG stream, logits and, on CPU, gradients are bit for
bit those of PEFT's layer with the same dropout module, and resume stays exact. In training (dropout
0 too) the update ``lora_B(...) * scaling`` is scaled and added into the base layer's output in place
where that computes the same bits (see :func:`_add_update`), instead of PEFT's two output-sized
temporaries per layer. Everything else (eval, merged or disabled adapters, mixed-adapter batches,
DoRA and other variants, ``torch.no_grad``) is PEFT's forward unchanged. A 4-bit base (QLoRA) gets
the same through a subclass of PEFT's bitsandbytes ``Linear4bit`` layer; the dispatch keys match ``torch.nn.Linear`` and
``bnb.nn.Linear4bit`` themselves, so other subclasses (8-bit) keep PEFT's layers.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, Optional

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from torch import nn

from tunelab import cpu_kernels
from tunelab.methods.dropout import FUSED_DROPOUT_DEVICES, FastDropout, Take, apply_fast_mask, fast_dropout


class _ExactTypeMeta(type):
    """``isinstance(obj, K)`` is ``type(obj) is K.exact``: a dispatch key that ignores subclasses."""

    exact: type

    def __instancecheck__(cls, obj: Any) -> bool:
        return type(obj) is cls.exact


class PlainLinear(metaclass=_ExactTypeMeta):
    """PEFT dispatch key for ``torch.nn.Linear`` itself (bitsandbytes' Linear4bit/Linear8bitLt are
    subclasses of it and need PEFT's quantized LoRA layers)."""

    exact = nn.Linear


#: multiplying eight 0/1 bytes (one int64) by this gathers byte i's bit into bit 56 + i
_GATHER_BITS = 0x0102040810204080
#: a byte copied into all eight bytes, ANDed with this, keeps bit i in byte i (as a signed int64)
_SELECT_BITS = 0x8040201008040201 - (1 << 64)


def pack_bits(mask: torch.Tensor, take: Optional[Take] = None) -> torch.Tensor:
    """A bool tensor as uint8, eight elements per byte (row-major order, zero-padded): each group of
    eight bools is read as one int64 and its bits gathered by one multiplication (three passes over
    an eighth of the data, where shifting and summing bytes took six over all of it). ``take``
    supplies the temporaries' memory (see :class:`DropoutScratch`); the result is a fresh tensor."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.contiguous().view(torch.uint8).view(torch.int64)
    if take is None:
        return ((words * _GATHER_BITS) >> 56).to(torch.uint8)  # the int64 -> uint8 cast keeps the low byte
    gathered = torch.mul(words, _GATHER_BITS, out=take("gathered", words.numel(), torch.int64))
    return gathered.bitwise_right_shift_(56).to(torch.uint8)


class DropoutScratch:
    """Memory the CPU dropout's temporaries are written into, one buffer per role and dtype (grown to
    the largest request), shared by every adapted layer of a model while it trains.

    Per adapted layer the dropout allocates, uses and frees at once the random words, the mask, the
    dropped-out input and the bit-gathering product (twice the input's fp32 size), and nothing
    but that layer reads them. Fresh each time, their holes, between the activations that stay, are
    what glibc keeps: from these buffers, the default model's LoRA peaks 0.05 GiB lower in RSS at
    batch 2 and 0.11 GiB at batch 4 (bench/bench_memory.py), with the same bits (the same ops, into
    other memory). Used on the thread that made it only (backward and checkpoint recompute run there
    on CPU); :meth:`release` (the method's ``on_train_end``) frees it all.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._thread = threading.get_ident()

    def take_for(self, device: torch.device) -> Optional[Take]:
        """The ``take`` for a dropout on ``device``: None (fresh tensors) on another thread."""
        if threading.get_ident() != self._thread:
            return None
        return functools.partial(self._take, device)

    def _take(self, device: torch.device, role: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        key = (role, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(key, None)  # the smaller buffer goes before the larger one is made
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def release(self) -> None:
        self._buffers.clear()


def unpack_bits(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    spread = (bits.to(torch.int64) * 0x0101010101010101).bitwise_and_(_SELECT_BITS)
    return spread.view(torch.uint8).ne(0)[: math.prod(shape)].view(shape)


#: how a mask is drawn: "fused" (``native_dropout``, CUDA-like devices), "bernoulli" (F.dropout's CPU
#: noise tensor: ``nn.Dropout``'s own draws), "uniform15" (:class:`FastDropout` on CPU)
MASK_KINDS = ("fused", "bernoulli", "uniform15")


def mask_kind(dropout: nn.Module, device: torch.device) -> str:
    """How ``dropout`` (an ``nn.Dropout`` or :class:`FastDropout`) draws its mask on ``device``."""
    if device.type in FUSED_DROPOUT_DEVICES:
        return "fused"
    return "uniform15" if isinstance(dropout, FastDropout) and dropout.uses_fast_path(device) else "bernoulli"


def dropout_with_mask(x: torch.Tensor, p: float, kind: str,
                      take: Optional[Take] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropout(x, p), keep-mask)`` with the draws and values of the ``kind`` (:data:`MASK_KINDS`);
    ``take`` (CPU's uniform15 kind only) supplies the temporaries' memory."""
    if kind == "fused":
        return torch.native_dropout(x, p, True)
    if kind == "bernoulli":
        noise = torch.empty_like(x).bernoulli_(1 - p)
        noise.div_(1 - p)
        return x.mul(noise), noise != 0
    return fast_dropout(x, p, take)


def apply_mask(t: torch.Tensor, mask: torch.Tensor, p: float, kind: str) -> torch.Tensor:
    """``t`` masked and scaled as dropout's backward does (so ``apply_mask(x)`` is the forward's output)."""
    if kind == "fused":
        return torch.ops.aten.native_dropout_backward(t, mask, 1.0 / (1.0 - p))
    if kind == "bernoulli":
        return t.mul(mask.to(t.dtype).div_(1 - p))
    return apply_fast_mask(t, mask, p)


def use_fast_dropout(model: nn.Module) -> int:
    """Replace the plain ``nn.Dropout`` of every LoRA layer's ``lora_dropout`` with :class:`FastDropout`
    (dropout has no parameters: the adapter and its format are unchanged); returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                dropouts[name] = FastDropout(dropout.p)
                replaced += 1
    return replaced


class _DropoutDownProjection(torch.autograd.Function):
    """``h = linear(dropout(x.to(dtype), p), A)`` saving ``x``, ``A`` and a 1-bit mask.

    Autocast applies to the product as it would to ``lora_A``; backward does its products in the
    forward's compute dtype (``grad_h``'s), as autograd would for the autocast copies.
    """

    @staticmethod
    def forward(ctx, x, weight, p: float, dtype: torch.dtype, kind: str, scratch: Optional[DropoutScratch] = None):
        take = scratch.take_for(x.device) if scratch is not None and kind == "uniform15" else None
        dropped, mask = dropout_with_mask(x.to(dtype), p, kind, take)
        # train.onednn_linear: the products on oneDNN, as PEFT's own lora_A then computes them
        ctx.products = cpu_kernels.products_for(dropped, weight)
        h = ctx.products.linear(dropped, weight)
        ctx.p, ctx.dtype, ctx.kind, ctx.shape = p, dtype, kind, x.shape
        ctx.save_for_backward(x, weight, pack_bits(mask, take))
        return h

    @staticmethod
    def backward(ctx, grad_h):
        x, weight, bits = ctx.saved_tensors
        mask = unpack_bits(bits, ctx.shape)
        g = grad_h.reshape(-1, grad_h.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gx = ctx.products.input_grad(g, weight.to(grad_h.dtype))
            gx = gx.view(*ctx.shape[:-1], weight.shape[1]).to(ctx.dtype)
            grad_x = apply_mask(gx, mask, ctx.p, ctx.kind).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = apply_mask(x.to(ctx.dtype), mask, ctx.p, ctx.kind).to(grad_h.dtype)
            grad_w = ctx.products.weight_grad(g, dropped).to(weight.dtype)
        return grad_x, grad_w, None, None, None, None


def _is_active_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.Dropout) and module.training and module.p > 0


class _BitMaskDropout:
    """What both layer classes share: when the bit-mask path applies, and the down projection."""

    def _uses_own_forward(self, kwargs: dict) -> bool:
        """Training with plain LoRA adapters (the bit-mask dropout where dropout is active, the
        in-place sum); anything else goes to PEFT's forward."""
        if self.disable_adapters or self.merged or not torch.is_grad_enabled():
            return False
        if kwargs.get("adapter_names") is not None or any(kwargs.get(k) is not None for k in VARIANT_KWARG_KEYS):
            return False
        return not any(a in self.lora_variant for a in self.active_adapters if a in self.lora_A)

    def _pop_forward_kwargs(self, x: torch.Tensor, args: tuple, kwargs: dict) -> None:
        self._check_forward_args(x, *args, **kwargs)
        for k in ("adapter_names", *VARIANT_KWARG_KEYS):
            kwargs.pop(k, None)

    def _down(self, x: torch.Tensor, adapter: str, cast: bool) -> torch.Tensor:
        """``lora_A(dropout(x))``, x cast to A's dtype first where PEFT casts it (``cast``)."""
        lora_A, dropout = self.lora_A[adapter], self.lora_dropout[adapter]
        if not (_is_active_dropout(dropout) and lora_A.bias is None):
            return lora_A(dropout(self._cast_input_dtype(x, lora_A.weight.dtype) if cast else x))
        dtype = self._cast_input_dtype(x[:0], lora_A.weight.dtype).dtype if cast else x.dtype
        return _DropoutDownProjection.apply(x, lora_A.weight, dropout.p, dtype, mask_kind(dropout, x.device),
                                            getattr(self, "dropout_scratch", None))


def _in_place_ok(t: torch.Tensor, other: Optional[torch.Tensor] = None) -> bool:
    """Whether an in-place op on ``t`` computes, bit for bit, what its out-of-place form would: ``t``
    is not a view (autograd may refuse, or another tensor would change) and the other operand has
    its dtype and shape (no promotion or broadcast, which an in-place op would turn into a cast)."""
    return not t._is_view() and (other is None or (other.dtype == t.dtype and other.shape == t.shape))


def _scale(update: torch.Tensor, scaling: float) -> torch.Tensor:
    """``update * scaling``, in place where that is the same (the lora_B output is a fresh tensor)."""
    return update.mul_(scaling) if _in_place_ok(update) and isinstance(scaling, (int, float)) else update * scaling


def _add_update(result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``result + update``, added into the base layer's output where that is the same. PEFT's
    out-of-place sum (and ``* scaling``) allocate two more output-sized tensors per adapted layer,
    freed at once; between the activations that stay, their holes are what glibc then keeps: in place,
    the default model's LoRA peaks 0.15 GiB lower in RSS at batch 2 (bench/bench_memory.py). Neither
    the base linear's nor lora_B's backward reads its output, so autograd allows it."""
    return result.add_(update) if _in_place_ok(result, update) else result + update


class BitMaskDropoutLinear(_BitMaskDropout, PeftLoraLinear):
    """PEFT's ``lora.Linear`` whose training-time dropout keeps a 1-bit mask instead of a dropped copy."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._uses_own_forward(kwargs):
            return super().forward(x, *args, **kwargs)
        self._pop_forward_kwargs(x, args, kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                update = _scale(self.lora_B[adapter](self._down(x, adapter, cast=True)), self.scaling[adapter])
                result = _add_update(result, update)
        return result.to(result_dtype)


@functools.cache
def bnb_layers() -> dict:
    """PEFT's 4-bit LoRA layer with the bit-mask dropout, keyed for dispatch (none without bitsandbytes)."""
    from peft.import_utils import is_bnb_4bit_available

    if not is_bnb_4bit_available():
        return {}
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit

    class PlainLinear4bit(metaclass=_ExactTypeMeta):
        exact = bnb.nn.Linear4bit

    class BitMaskDropoutLinear4bit(_BitMaskDropout, PeftLoraLinear4bit):
        """PEFT's 4-bit (QLoRA) ``Linear4bit`` with the bit-mask dropout; its forward mirrors PEFT's."""

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not self._uses_own_forward(kwargs):
                return super().forward(x, *args, **kwargs)
            self._pop_forward_kwargs(x, args, kwargs)
            result = self.base_layer(x, *args, **kwargs).clone()  # PEFT clones the 4-bit output too
            for adapter in self.active_adapters:
                if adapter not in self.lora_A:
                    continue
                convert = not torch.is_autocast_enabled()  # PEFT's test, as written there
                out = _scale(self.lora_B[adapter](self._down(x, adapter, cast=convert)), self.scaling[adapter])
                result = _add_update(result, out.to(result.dtype) if convert else out)
            return result

    return {PlainLinear4bit: BitMaskDropoutLinear4bit}


def register(peft_config) -> None:
    """Make ``peft.get_peft_model(model, peft_config)`` build the bit-mask layers for plain
    ``nn.Linear`` and bitsandbytes ``Linear4bit`` targets. Not serialized: the saved
    adapter_config.json is PEFT's own."""
    peft_config._register_custom_module({PlainLinear: BitMaskDropoutLinear, **bnb_layers()})


def share_dropout_scratch(model: nn.Module) -> DropoutScratch:
    """One :class:`DropoutScratch` for all of ``model``'s bit-mask LoRA layers (a plain attribute:
    no parameter, buffer or state-dict entry)."""
    scratch = DropoutScratch()
    for module in model.modules():
        if isinstance(module, _BitMaskDropout):
            module.dropout_scratch = scratch
    return scratch
