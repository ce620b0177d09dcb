"""The learning-rate schedule: linear warmup, then constant, linear or cosine decay to zero.

A plain function of the step (a ``LambdaLR`` factor), so a resumed run continues on the same curve.
"""

from __future__ import annotations

import math

from tunelab.config import TrainConfig


def lr_lambda(cfg: TrainConfig, max_steps: int):
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(math.ceil(cfg.warmup_ratio * max_steps))

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, max_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def count_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps): ``train.max_steps``, else ``train.epochs`` worth."""
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / cfg.grad_accum))
    max_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return steps_per_epoch, max_steps
