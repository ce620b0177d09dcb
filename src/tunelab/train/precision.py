"""Numeric precision of training (``train.precision``): the weights' dtype, autocast, and fp16 loss scaling.

- ``fp32``: everything in float32 (the default on CPU).
- ``bf16-mixed`` (the default on CUDA): weights, gradients and optimizer state stay float32 (the
  master copy), the forward and backward matmuls run in bfloat16 under ``torch.autocast``. Small
  updates that round to nothing in bf16 weights are kept, which is why every mainstream trainer
  does this rather than training bf16 weights directly.
- ``bf16-true``: weights in bfloat16 with no fp32 copy (least memory). Only where it is safe: the
  trainable adapters (LoRA, RoSA) are kept float32; a method that updates the base weights
  (full fine-tuning, GaLore) is refused at parse time.
- ``fp16-mixed``: float16 autocast with a gradient scaler (CUDA only); a step whose scaled
  gradients overflow is skipped and counted, not treated as divergence.

Hand-written glue over ``torch.autocast`` and ``torch.amp.GradScaler``: the choice must hold for one
process, DDP, FSDP2 (its ``MixedPrecisionPolicy``) and DeepSpeed (its bf16/fp16 sections) alike.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

#: the model.dtype each precision loads the weights in (mixed precision keeps fp32 masters)
WEIGHT_DTYPE = {"fp32": "float32", "bf16-mixed": "float32", "fp16-mixed": "float32", "bf16-true": "bfloat16"}
AUTOCAST_DTYPE = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16-mixed | bf16-true | fp16-mixed
    device_type: str

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return AUTOCAST_DTYPE.get(self.name)

    @property
    def is_mixed(self) -> bool:
        return self.name.endswith("-mixed")

    @property
    def uses_scaler(self) -> bool:
        return self.name == "fp16-mixed"

    def autocast(self):
        """The forward pass's context: autocast to the compute dtype, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def model_config(self, model_cfg):
        """``model_cfg`` with the dtype the weights load in (mixed: fp32 masters; bf16-true: bf16)."""
        return replace(model_cfg, dtype=WEIGHT_DTYPE[self.name])


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """``auto`` is bf16-mixed on CUDA and fp32 elsewhere."""
    if spec == "auto":
        spec = "bf16-mixed" if device.type == "cuda" else "fp32"
    return Precision(spec, device.type)


def keep_trainable_in_fp32(model: nn.Module) -> int:
    """bf16-true: trainable parameters (the adapters) become float32; returns how many were cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32 and p.is_floating_point():
            p.data = p.data.float()
            cast += 1
    return cast


class LossScaler:
    """fp16-mixed's torch GradScaler behind the trainer's calls; a no-op for every other precision."""

    def __init__(self, precision: Precision):
        self.scaler = torch.amp.GradScaler(precision.device_type) if precision.uses_scaler else None
        self.skipped_steps = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """optimizer.step() through the scaler; False when the scaler skipped it (overflow)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        skipped = self.scaler.get_scale() < scale_before  # the scale drops exactly when inf/nan were found
        self.skipped_steps += int(skipped)
        return not skipped

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
