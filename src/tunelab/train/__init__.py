"""Training: one :class:`~tunelab.train.trainer.Trainer` for every method and every parallelism mode.

Rooms: ``trainer`` (set-up, the step, the loop, the end), ``checkpoint`` (atomic, resumable),
``loggers``, ``schedule`` (lr), ``signals`` (preemption), ``parallel/`` (the Backend of one
process, DDP, FSDP2 and DeepSpeed). ``train``, ``Trainer`` and ``TrainingDiverged`` are loaded on
first use, so ``tunelab.train.signals`` stays importable without torch (launchers, sweeps).
"""

from __future__ import annotations

from tunelab.train.signals import PREEMPT_EXIT_CODE, Preempted

_LAZY = ("train", "Trainer", "TrainingDiverged")


def __getattr__(name: str):
    if name in _LAZY:
        from tunelab.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'tunelab.train' has no attribute '{name}'")


__all__ = ["PREEMPT_EXIT_CODE", "Preempted", "Trainer", "TrainingDiverged", "train"]
