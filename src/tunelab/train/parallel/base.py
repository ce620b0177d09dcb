"""The Backend: everything that differs between one process, DDP, FSDP and DeepSpeed.

The trainer's loop calls these methods and never tests a parallelism mode; methods never see a
wrapped or sharded model, because the trainer hands them :meth:`Backend.unwrap` of it. The
base class is the plain one-process backend; each mode overrides what it changes::

    model = backend.shard(model)                       # before the optimizer exists (FSDP)
    model, optimizer, scheduler = backend.wrap(model, optimizer, scheduler, method)
    with backend.accumulating(model, sync), backend.autocast():   # every micro-batch: forward + loss
        loss = ...
    backend.backward(model, loss, sync)
    norm = backend.clip_gradients(model, optimizer, max_grad_norm)    # None: the engine clips in step
    grad_norm = backend.step(model, optimizer, scheduler, max_grad_norm) or norm
    tensors, optim_state = backend.checkpoint_state(method, model, optimizer, staging)   # collective
    backend.restore(ckpt, method, model, optimizer, scheduler)
    final = backend.final_model(method, model, rebuild)        # a plain model on the main process
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from tunelab.train.parallel.distributed import Processes, barrier


class Backend:
    """One process on one device (also the base of the distributed backends)."""

    #: recorded in results.json ("parallelism"); None for a plain one-process run
    name: ClassVar[Optional[str]] = None
    #: recorded in each checkpoint: how its optimizer state is laid out (resume must match)
    checkpoint_layout: ClassVar[str] = "ddp"
    #: every process writes into one staging folder (DeepSpeed's ZeRO partitions): its name must be fixed
    shared_staging: ClassVar[bool] = False
    #: shown in the start-up log line
    description: ClassVar[str] = ""

    def __init__(self, procs: Processes, precision=None):
        from tunelab.train.precision import Precision

        self.procs = procs
        self.precision = precision or Precision("fp32", procs.device.type)

    # ---- set-up ---------------------------------------------------------------------------------
    def shard(self, model: nn.Module) -> nn.Module:
        """Shard the prepared model before the optimizer is built (the optimizer holds the shards)."""
        return model

    def wrap(self, model: nn.Module, optimizer, scheduler, method) -> tuple[nn.Module, Any, Any]:
        """Wrap the model (and possibly optimizer and schedule) for training."""
        return model, optimizer, scheduler

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain module that methods, callbacks and hooks see."""
        return model

    # ---- the step -------------------------------------------------------------------------------
    def accumulating(self, model: nn.Module, sync: bool):
        """Context of one micro-batch's forward and backward; ``sync`` is False until the last one."""
        return contextlib.nullcontext()

    def autocast(self):
        """Context of the forward pass and the loss: autocast under mixed precision, else nothing."""
        return self.precision.autocast()

    def decodes_in_lockstep(self, model: nn.Module) -> bool:
        """Whether every process must run the same forwards to generate (its weights are sharded, so a
        forward is a collective); otherwise each process can generate its own share of the prompts."""
        return False

    def plain_weights(self, model: nn.Module) -> bool:
        """Whether the weights are whole, plain tensors through forward and backward (no engine gathers
        or frees them around a module's own forward), so tunelab's own kernels may compute the layers
        (``train.onednn_linear``)."""
        return True

    def backward(self, model: nn.Module, loss: torch.Tensor, sync: bool) -> None:
        loss.backward()

    def clip_gradients(self, model: nn.Module, optimizer, max_grad_norm: float) -> Optional[float]:
        """The total gradient norm of the step, clipped to ``max_grad_norm`` when it is > 0.

        Computed even without clipping: a non-finite norm stops training *before* the update, so the
        state saved is the last good one. None where gradients live inside an engine (DeepSpeed).
        """
        with_grad = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not with_grad:
            return None
        norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
        if max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_grad_norm, norm)
        return float(full_tensor(norm))

    def step(self, model: nn.Module, optimizer, scheduler, max_grad_norm: float, scaler=None) -> Optional[float]:
        """Step the optimizer (through fp16's loss scaler when there is one) and the schedule, zero the
        gradients; returns the engine's norm (None here)."""
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return None

    # ---- state ----------------------------------------------------------------------------------
    def trainable_tensors(self, method, model: nn.Module) -> dict[str, torch.Tensor]:
        """The method's trainable tensors, whole and on CPU (a collective where the model is sharded)."""
        return {k: full_tensor(v).detach().contiguous().cpu() for k, v in method.trainable_state_dict(self.unwrap(model)).items()}

    def optimizer_state(self, model: nn.Module, optimizer) -> dict:
        return optimizer.state_dict()

    def checkpoint_state(self, method, model: nn.Module, optimizer, staging: Path) -> tuple[Optional[dict], Optional[dict]]:
        """(trainable tensors, optimizer state) to write on the main process; None elsewhere.

        An optimizer state of None on the main process means the backend wrote it into ``staging``.
        """
        if not self.procs.is_main:
            return None, None
        return self.trainable_tensors(method, model), self.optimizer_state(model, optimizer)

    def restore(self, ckpt: Path, method, model: nn.Module, optimizer, scheduler) -> None:
        """Load a checkpoint's trainable tensors and optimizer state (the trainer restores the rest)."""
        tensors, optim_state = self._read_state(ckpt)
        method.load_trainable_state_dict(self.unwrap(model), tensors)
        optimizer.load_state_dict(optim_state)

    def _read_state(self, ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
        """Both files read whole before anything is loaded: a damaged one raises UnreadableCheckpoint."""
        from safetensors.torch import load_file

        from tunelab.train.checkpoint import read_file

        device = self.procs.device
        tensors = {k: v.to(device) for k, v in read_file(ckpt / "trainable.safetensors", load_file).items()}
        optim_state = read_file(ckpt / "optimizer.pt", torch.load, map_location=device, weights_only=True)
        return tensors, optim_state

    def final_model(self, method, model: nn.Module, rebuild: Callable[[], nn.Module]) -> Optional[nn.Module]:
        """The trained model as a plain module on the main process (None elsewhere).

        ``rebuild`` returns a freshly prepared, unsharded model on CPU, for backends whose model is
        sharded: they gather the trained tensors (every process takes part) and load them into it.
        """
        return self.unwrap(model)

    def barrier(self) -> None:
        barrier(self.procs)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered whole (a collective: every rank must call it in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
