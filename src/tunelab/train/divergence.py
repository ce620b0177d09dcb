"""A run that diverged (non-finite loss, gradients or weights): save the last good state, say how to go on.

The trainer calls :func:`stop_diverged` when a step's loss or gradient norm is not finite (the
update was not applied), and raises :func:`diverged_in_backward` when a method that steps inside
backward (GaLore's layer-wise optimizer) met a non-finite gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tunelab.train.trainer import Trainer


class TrainingDiverged(RuntimeError):
    """Loss became NaN/inf; the last good state was saved."""


def _fix(trainer: "Trainer") -> str:
    return (f"Lower train.lr, raise train.warmup_steps or set train.max_grad_norm, then resume with "
            f"`tunelab train --resume {trainer.run.path}`.")


def _last_checkpoint(trainer: "Trainer") -> str:
    ckpts = trainer.run.checkpoints()
    return str(ckpts[-1]) if ckpts else "none (set train.save_steps)"


def stop_diverged(trainer: "Trainer") -> None:
    """Save the last good state (the weights before the bad update) and raise TrainingDiverged.

    Every rank reaches this together (the non-finite loss or norm is a global value), so the check
    of the weights, a collective under sharding, runs on all of them.
    """
    step = trainer.state.step
    tensors = trainer.backend.trainable_tensors(trainer.method, trainer.model)
    if tensors is not None and not all(bool(torch.isfinite(v).all()) for v in tensors.values()):
        # the update before this step already broke the weights: never save that over a good checkpoint
        trainer.loggers.close()
        raise TrainingDiverged(
            f"{trainer.diverged_what} at optimizer step {step + 1}, and the weights after step {step} are not "
            f"finite, so they are not saved; the last good checkpoint is {_last_checkpoint(trainer)}. " + _fix(trainer))
    ckpt = trainer.save_checkpoint()
    trainer.loggers.close()
    raise TrainingDiverged(
        f"{trainer.diverged_what} at optimizer step {step + 1}: training stopped before that update. "
        f"The last good state (step {step}) is saved in {ckpt}. " + _fix(trainer))


def diverged_in_backward(trainer: "Trainer", exc: Exception) -> TrainingDiverged:
    """The error for a non-finite gradient met by a method that updates weights during backward."""
    return TrainingDiverged(
        f"{exc} at optimizer step {trainer.state.step + 1}. Weights were being updated during backward "
        f"(layer-wise optimizer), so the current state is not saved; the last good checkpoint is "
        f"{_last_checkpoint(trainer)}. Lower train.lr, then `tunelab train --resume {trainer.run.path}`."
    )
