"""8-bit storage of GaLore's Adam moments: bitsandbytes blockwise dynamic quantization (block 256).

Only bitsandbytes' quantize / dequantize primitives are used (not its 8-bit Adam), so the update
stays :class:`~tunelab.methods.galore.optim.GaLoreAdamW`'s own, computed in fp32, and the state stays
plain tensors (uint8 codes + fp32 absmax) that ``torch.load(..., weights_only=True)`` reads.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 256


class BlockwiseQuantizer8bit:
    """Blockwise 8-bit storage of a moment: uint8 codes + per-block fp32 absmax."""

    def __init__(self) -> None:
        import bitsandbytes.functional as bnbf

        self._f = bnbf
        self._maps: dict[tuple[bool, torch.device], torch.Tensor] = {}

    def _code(self, signed: bool, device: torch.device) -> torch.Tensor:
        key = (signed, device)
        if key not in self._maps:
            self._maps[key] = self._f.create_dynamic_map(signed=signed).to(device)
        return self._maps[key]

    def quantize(self, x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        q, qs = self._f.quantize_blockwise(
            x.float().contiguous(), code=self._code(signed, x.device), blocksize=BLOCK_SIZE
        )
        return q, qs.absmax.float()

    def dequantize(self, q: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
        return self._f.dequantize_blockwise(
            q, absmax=absmax, code=self._code(signed, q.device), blocksize=BLOCK_SIZE
        ).float()
