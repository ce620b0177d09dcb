"""Dropout for adapter inputs on CPU from a quarter of the random numbers (LoRA's and RoSA's layers).

torch's CPU ``bernoulli_`` (what ``nn.Dropout`` runs off CUDA) draws one Mersenne-Twister number
per element, serially on AMD CPUs: 5.4 ns per element on tunelab's CI machine, 16% of a LoRA r8
step at batch 2 once the matmuls ran on oneDNN. :class:`FastDropout` draws 15-bit uniform integers
instead, four per 64-bit random word (``random_()`` on an int64 tensor), so a 448x1536 mask takes
1.5-2.0 ms instead of 3.1-5.1 ms. The drop probability is realised to a multiple of 1/32768
(:func:`rounded_p`: 0.05 becomes 0.04999) and kept values are scaled by ``1 / (1 - p')``, so the
dropout stays unbiased. The draws come from torch's default generator: seeded runs and resume are
exact. On CUDA-like devices (the fused ``native_dropout``, already fast) it is ``nn.Dropout`` itself.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

#: devices where torch.nn.functional.dropout runs the fused ``native_dropout`` kernel (ATen's
#: ``is_fused_kernel_acceptable``); elsewhere it multiplies by a ``bernoulli_`` noise tensor
FUSED_DROPOUT_DEVICES = ("cuda", "xpu", "lazy", "privateuseone")
#: the CPU path's uniform integers have 15 bits: p is realised to a multiple of 1/32768
_UNIFORM_LEVELS = 1 << 15


def rounded_p(p: float) -> float:
    """The drop probability the CPU path realises: ``p`` to the nearest multiple of 1/32768."""
    return round(p * _UNIFORM_LEVELS) / _UNIFORM_LEVELS


#: ``take(role, numel, dtype)``: a 1D tensor to overwrite, for a temporary (see ``lora_dropout.DropoutScratch``)
Take = Callable[[str, int, torch.dtype], torch.Tensor]


def _fresh(device: torch.device) -> Take:
    return lambda role, numel, dtype: torch.empty(numel, dtype=dtype, device=device)


def keep_mask(shape: torch.Size, p: float, device: torch.device, take: Optional[Take] = None) -> torch.Tensor:
    """A bool mask, True with probability ``1 - rounded_p(p)`` independently per element, drawn from the
    default generator as 15-bit uniform integers, four per 64-bit random word (``random_()`` fills an
    int64 with 63 random bits; the top bit of each 16-bit quarter is masked off). ``take`` supplies
    the random words' and the mask's memory (fresh tensors by default): the same draws either way."""
    n = math.prod(shape)
    take = take or _fresh(device)
    words = take("words", -(-n // 4), torch.int64).random_()
    uniform = words.view(torch.int16)[:n].bitwise_and_(_UNIFORM_LEVELS - 1)
    return torch.ge(uniform, round(p * _UNIFORM_LEVELS), out=take("mask", n, torch.bool)).view(shape)


def apply_fast_mask(t: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``t * mask / (1 - rounded_p(p))``: the forward's values, and dropout's backward on a gradient."""
    return t.mul(mask).mul_(1.0 / (1.0 - rounded_p(p)))


def fast_dropout(x: torch.Tensor, p: float, take: Optional[Take] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropped x, keep-mask)`` with a :func:`keep_mask` (``rounded_p(p)`` must be below 1); ``take``
    as there, also for the dropped copy (then both results live in its memory)."""
    mask = keep_mask(x.shape, p, x.device, take)
    if take is None:
        return apply_fast_mask(x, mask, p), mask
    dropped = torch.mul(x, mask, out=take("dropped", x.numel(), x.dtype).view(x.shape))
    return dropped.mul_(1.0 / (1.0 - rounded_p(p))), mask


class FastDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU path draws its mask with :func:`keep_mask` (see the module docstring);
    on fused devices, in eval, at p = 0 or where p rounds to 1 it is ``nn.Dropout`` itself."""

    def uses_fast_path(self, device: torch.device) -> bool:
        return device.type not in FUSED_DROPOUT_DEVICES and 0 < rounded_p(self.p) < 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.uses_fast_path(x.device)):
            return super().forward(x)
        return fast_dropout(x, self.p)[0]
