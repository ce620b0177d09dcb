"""DDP: every process holds the whole model; gradients are all-reduced (averaged) on the last micro-batch."""

from __future__ import annotations

from torch import nn

from tunelab.train.parallel.base import Backend


class DdpBackend(Backend):
    name = "ddp"
    description = "DDP (replicated)"

    def wrap(self, model, optimizer, scheduler, method):
        device = self.procs.device
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.ddp_find_unused_parameters,
        )
        return ddp, optimizer, scheduler

    def unwrap(self, model):
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def accumulating(self, model, sync: bool):
        # no all-reduce until the step's last micro-batch: its backward reduces the accumulated sum
        return super().accumulating(model, sync) if sync else model.no_sync()
