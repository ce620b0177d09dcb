"""FSDP2 (``fully_shard``): each process keeps 1/world of every parameter, gradient and optimizer moment.

Checkpoints gather the shards, storing the optimizer state as torch.distributed.checkpoint's full
state dict keyed by parameter name, so a run resumes onto any number of processes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tunelab.train.parallel.base import Backend
from tunelab.utils import log


class FsdpBackend(Backend):
    name = "fsdp"
    checkpoint_layout = "fsdp"
    description = "FSDP2 (sharded)"

    def decodes_in_lockstep(self, model) -> bool:
        return True  # a block's weights are all-gathered in its forward: every rank must run it

    def plain_weights(self, model) -> bool:
        return False  # DTensor shards, unsharded only around each block's own forward and backward

    def shard(self, model: nn.Module) -> nn.Module:
        """One shard group per transformer block, then the root (embeddings, final norm, head).

        The blocks are the classes the model lists in ``_no_split_modules`` (transformers' own marker
        of a block that must stay whole), so any HF causal LM, PEFT-wrapped or not, shards the way
        torchtune and accelerate shard it. A block's full weights exist only during its forward and
        backward. Gradients are reduce-scattered as a mean over ranks, as DDP all-reduces them, so
        the loss scaling is shared.
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        world = self.procs.world
        mesh = init_device_mesh(self.procs.device.type, (world,))
        block_names: set[str] = set()
        for module in model.modules():
            block_names.update(getattr(module, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in block_names]
        if not blocks:
            log.warning("train.parallelism=fsdp: the model names no transformer blocks (_no_split_modules); "
                        "sharding it as one unit, which gathers every weight at once")
        policy = self._mixed_precision_policy()
        for block in blocks:
            fully_shard(block, mesh=mesh, **policy)
        fully_shard(model, mesh=mesh, **policy)
        log.info(f"FSDP2: {len(blocks)} blocks ({', '.join(sorted(block_names))}) + root sharded over {world} processes")
        return model

    def _mixed_precision_policy(self) -> dict:
        """Mixed precision the FSDP2 way: fp32 shards (the masters), compute in the autocast dtype,
        gradients reduced in fp32. Autocast is then not needed (see autocast)."""
        if not self.precision.is_mixed:
            return {}
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return {"mp_policy": MixedPrecisionPolicy(param_dtype=self.precision.autocast_dtype, reduce_dtype=torch.float32)}

    def autocast(self):
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts the unsharded parameters

    def accumulating(self, model, sync: bool):
        model.set_requires_gradient_sync(sync)  # FSDP2's no_sync: reduce-scatter on the last micro-batch only
        return super().accumulating(model, sync)

    def optimizer_state(self, model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def checkpoint_state(self, method, model, optimizer, staging):
        # gathering the shards takes every rank; only the main one writes
        tensors, optim_state = self.trainable_tensors(method, model), self.optimizer_state(model, optimizer)
        return (tensors, optim_state) if self.procs.is_main else (None, None)

    def restore(self, ckpt, method, model, optimizer, scheduler) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.tensor import DTensor, distribute_tensor

        tensors, optim_state = self._read_state(ckpt)
        # every rank read the whole checkpoint; each keeps its own shard
        params = dict(model.named_parameters())
        tensors = {k: distribute_tensor(v, params[k].device_mesh, params[k].placements)
                   if isinstance(params.get(k), DTensor) else v for k, v in tensors.items()}
        method.load_trainable_state_dict(model, tensors)
        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))

    def final_model(self, method, model, rebuild):
        return gather_into_copy(self, method, model, rebuild)


def gather_into_copy(backend: Backend, method, model, rebuild):
    """Gather the trained tensors (every rank takes part), then load them on the main rank into an
    unsharded copy of the prepared model, so save_artifact and extra_results see a plain model."""
    tensors = backend.trainable_tensors(method, model)
    final = None
    if backend.procs.is_main:
        final = rebuild()
        method.load_trainable_state_dict(final, tensors)
    del tensors
    return final
