"""Parallelism backends: one process, DDP, FSDP2, DeepSpeed (see :mod:`tunelab.train.parallel.base`)."""

from __future__ import annotations

from tunelab.train.parallel.base import Backend, full_tensor
from tunelab.train.parallel.distributed import (
    Processes,
    all_gather_objects,
    all_reduce_sum,
    any_process,
    init_distributed,
    one_process_group,
)


def make_backend(train_cfg, procs: Processes, precision=None) -> Backend:
    """The backend for ``train.parallelism`` in this launch (one process runs FSDP/DDP as plain training)."""
    if train_cfg.parallelism == "deepspeed":
        from tunelab.train.parallel.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(procs, train_cfg, precision)
    if procs.world > 1 and train_cfg.parallelism == "fsdp":
        from tunelab.train.parallel.fsdp import FsdpBackend

        return FsdpBackend(procs, precision)
    if procs.world > 1:
        from tunelab.train.parallel.ddp import DdpBackend

        return DdpBackend(procs, precision)
    return Backend(procs, precision)


__all__ = ["Backend", "Processes", "all_gather_objects", "all_reduce_sum", "any_process", "full_tensor", "init_distributed",
           "make_backend", "one_process_group"]
