"""DeepSpeed: the method's own optimizer and tunelab's lr schedule run inside a DeepSpeed engine (ZeRO 1-3).

The engine owns gradient reduction, ZeRO partitioning, clipping, the optimizer step and the
schedule's step (at accumulation boundaries); checkpoints and resume go through the engine's own
files. Batch size, accumulation and clipping come from ``train.*`` (see ``config.deepspeed_settings``).
"""

from __future__ import annotations

import contextlib
from typing import Optional

from torch import nn

from tunelab.config import deepspeed_settings
from tunelab.train.parallel.base import Backend
from tunelab.train.parallel.fsdp import gather_into_copy
from tunelab.utils import log


def is_deepspeed_engine(model: nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    checkpoint_layout = "deepspeed"
    shared_staging = True
    description = "DeepSpeed"

    def __init__(self, procs, train_cfg, precision=None):
        super().__init__(procs, precision)
        self.train_cfg = train_cfg

    def autocast(self):
        return contextlib.nullcontext()  # the engine's bf16/fp16 mode casts the model itself

    def wrap(self, model, optimizer, scheduler, method):
        """The engine's bf16/fp16 sections follow train.precision (a file that disagrees is refused at parse time)."""
        import deepspeed

        ds = deepspeed_settings(self.train_cfg)
        for key, on in (("bf16", self.precision.name in ("bf16-mixed", "bf16-true")),
                        ("fp16", self.precision.name == "fp16-mixed")):
            section = ds.get(key) if isinstance(ds.get(key), dict) else {}
            if on or section:
                ds[key] = {**section, "enabled": on}
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        log.info(f"DeepSpeed {deepspeed.__version__}: ZeRO stage {engine.zero_optimization_stage()}, "
                 f"{type(optimizer).__name__}")
        return engine, optimizer, scheduler

    def unwrap(self, model):
        return model.module if is_deepspeed_engine(model) else model

    def decodes_in_lockstep(self, model) -> bool:
        # ZeRO-3 partitions the weights (gathered per forward, a collective); stages 1-2 keep them whole
        return is_deepspeed_engine(model) and model.zero_optimization_stage() == 3

    def plain_weights(self, model) -> bool:
        return is_deepspeed_engine(model) and model.zero_optimization_stage() < 3  # ZeRO-3: gathered per module

    def backward(self, model, loss, sync: bool) -> None:
        # the engine reduces (and ZeRO-partitions) gradients on the boundary micro-batch, which it
        # counts through step(): call it after every micro-batch but the last
        model.backward(loss, scale_wrt_gas=False)
        if not sync:
            model.step()

    def clip_gradients(self, model, optimizer, max_grad_norm: float) -> Optional[float]:
        return None  # the engine holds the (partitioned) gradients and clips inside step()

    def step(self, model, optimizer, scheduler, max_grad_norm: float, scaler=None) -> Optional[float]:
        model.step()  # boundary: clip (train.max_grad_norm), optimizer step, lr step, zero grads
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None and max_grad_norm > 0 else None

    def trainable_tensors(self, method, model):
        if model.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.module.parameters()), modifier_rank=None):
                return {k: v.detach().contiguous().cpu().clone() for k, v in method.trainable_state_dict(model.module).items()}
        return super().trainable_tensors(method, model)

    def checkpoint_state(self, method, model, optimizer, staging):
        # every rank writes its ZeRO partition into the shared staging folder
        model.save_checkpoint(str(staging / "deepspeed"), tag="state", save_latest=False)
        self.barrier()
        tensors = self.trainable_tensors(method, model)
        return (tensors, None) if self.procs.is_main else (None, None)

    def restore(self, ckpt, method, model, optimizer, scheduler) -> None:
        # the engine restores weights, optimizer (its ZeRO partitions) and lr schedule from its own files
        model.load_checkpoint(str(ckpt / "deepspeed"), tag="state", load_optimizer_states=True,
                              load_lr_scheduler_states=True)

    def final_model(self, method, model, rebuild):
        return gather_into_copy(self, method, model, rebuild)
