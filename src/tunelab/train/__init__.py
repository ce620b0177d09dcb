"""Training: one :class:`~tunelab.train.trainer.Trainer` for every method and every parallelism mode.

Rooms: ``trainer`` (set-up, the step, the loop, the end), ``evaluator`` (the held-out loss during
training, early stopping), ``divergence`` (a non-finite step), ``checkpoint`` (atomic, resumable),
``loggers``, ``schedule`` (lr), ``signals`` (preemption), ``precision``, ``results``, ``parallel/`` (the Backend of one
process, DDP, FSDP2 and DeepSpeed). ``train``, ``Trainer`` and ``TrainingDiverged`` are loaded on
first use, so ``tunelab.train.signals`` stays importable without torch (launchers, sweeps).
"""

from __future__ import annotations

from tunelab.train.signals import PREEMPT_EXIT_CODE, Preempted

#: name -> the module that defines it (imported on first use: they import torch)
_LAZY = {"train": "trainer", "Trainer": "trainer", "TrainingDiverged": "divergence"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"tunelab.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'tunelab.train' has no attribute '{name}'")


__all__ = ["PREEMPT_EXIT_CODE", "Preempted", "Trainer", "TrainingDiverged", "train"]
