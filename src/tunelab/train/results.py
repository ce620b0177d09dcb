"""What a finished run reports in results.json: its numbers (schema 1: report and sweep read these names)
and what its training state held in memory. Functions of the :class:`~tunelab.train.trainer.Trainer`."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Optional

import torch

from tunelab.train.parallel import all_reduce_sum
from tunelab.utils import git_info, package_versions, peak_memory


def run_results(trainer, stopped: Optional[str], final_model, tokens_total: float, target_tokens_total: float) -> dict:
    """results.json of a finished ``trainer``, schema 1."""
    cfg, state, procs = trainer.cfg, trainer.state, trainer.procs
    return {
        "schema_version": 1,
        "kind": "train",
        "run_dir": str(trainer.run.path),
        "task": cfg.task.name,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "steps": state.step,
        "max_steps": trainer.max_steps,
        "stopped": stopped or "completed",
        "epochs_completed": state.step / trainer.steps_per_epoch,
        "world_size": procs.world,
        "parallelism": trainer.backend.name,
        "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * procs.world,
        **trainer.params,
        **peak_memory(procs.device),
        "train_time_s": trainer.train_time_s,
        "wall_time_s": time.time() - trainer.t_start,
        "train_tokens": tokens_total,
        "train_tokens_per_s": tokens_total / max(trainer.train_time_s, 1e-9),
        "target_tokens_per_s": target_tokens_total / max(trainer.train_time_s, 1e-9),
        "final_loss": trainer.last_loss,
        "data": asdict(trainer.data_stats),
        "method_results": trainer.method.extra_results(final_model, trainer.optimizer),
        "device": str(procs.device),
        **git_info(),
        "versions": package_versions(),
    }


def memory_accounting(trainer) -> dict:
    """What the training state holds, summed over processes (shards count once): the optimizer's state,
    the trainable weights and, under mixed precision, their fp32 master copies (the weights themselves)."""
    trainable = sum(_local(p).nbytes for p in trainer.plain_model.parameters() if p.requires_grad)
    trainable = int(all_reduce_sum(float(trainable), trainer.procs))
    return {
        "precision": trainer.precision.name,
        "onednn_linear_layers": trainer.onednn_layers,  # train.onednn_linear: layers on oneDNN
        "lean_mlp_layers": trainer.lean_mlps,  # train.lean_mlp: gated MLPs saving 2 activations, not 4
        "optimizer_state_bytes": int(all_reduce_sum(float(optimizer_state_bytes(trainer.optimizer)), trainer.procs)),
        "trainable_param_bytes": trainable,
        "master_weight_bytes": trainable if trainer.precision.is_mixed else 0,
        **({"fp16_skipped_steps": trainer.scaler.skipped_steps} if trainer.precision.uses_scaler else {}),
    }


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (possibly FSDP-sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state on this process (Adam moments, 8-bit states and
    their scales, GaLore's projected moments); an engine's wrapper is looked through."""
    inner = getattr(optimizer, "optimizer", None)
    state = getattr(optimizer, "state", None) or getattr(inner, "state", None) or {}
    total = 0
    for per_param in state.values():
        values = per_param.values() if isinstance(per_param, dict) else [per_param]
        total += sum(_local(v).nbytes for v in values if isinstance(v, torch.Tensor))
    return total
