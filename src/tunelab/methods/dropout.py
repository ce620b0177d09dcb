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


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, True with probability ``1 - rounded_p(p)`` independently per element, drawn from the
    default generator as 15-bit uniform integers, four per 64-bit random word (``random_()`` fills an
    int64 with 63 random bits; the top bit of each 16-bit quarter is masked off)."""
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_()
    uniform = words.view(torch.int16)[:n].bitwise_and_(_UNIFORM_LEVELS - 1)
    return uniform.ge(round(p * _UNIFORM_LEVELS)).view(shape)


def apply_fast_mask(t: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``t * mask / (1 - rounded_p(p))``: the forward's values, and dropout's backward on a gradient."""
    return t.mul(mask).mul_(1.0 / (1.0 - rounded_p(p)))


def fast_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropped x, keep-mask)`` with a :func:`keep_mask` (``rounded_p(p)`` must be below 1)."""
    mask = keep_mask(x.shape, p, x.device)
    return apply_fast_mask(x, mask, p), mask


class FastDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU path draws its mask with :func:`keep_mask` (see the module docstring);
    on fused devices, in eval, at p = 0 or where p rounds to 1 it is ``nn.Dropout`` itself."""

    def uses_fast_path(self, device: torch.device) -> bool:
        return device.type not in FUSED_DROPOUT_DEVICES and 0 < rounded_p(self.p) < 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.uses_fast_path(x.device)):
            return super().forward(x)
        return fast_dropout(x, self.p)[0]
