"""Process-group set-up: who this process is (rank, world, device) and the group's lifetime.

torchrun/srun set ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; they never carry hyperparameters.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tunelab.models import resolve_device


@dataclass(frozen=True)
class Processes:
    """This process's place in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_spec: str) -> Processes:
    """Join the process group torchrun/srun set up (NCCL on CUDA, gloo on CPU); one process needs none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(0, 1, resolve_device(device_spec))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return Processes(rank, world, torch.device("cuda", local_rank))
    return Processes(rank, world, torch.device("cpu"))


@contextlib.contextmanager
def one_process_group(needed: bool, device_spec: str = "auto"):
    """A process group of one on loopback for the length of a run, when ``needed`` and none exists.

    DeepSpeed's engine needs a process group even on one device (ZeRO-Offload on one GPU is a
    common use); torchrun/srun-launched runs already have one. Afterwards the group is destroyed and
    the environment restored, so a later run in the same process (a test, a notebook) starts clean.
    """
    if not needed or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port())})
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() and device_spec != "cpu" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_sum(value: float, procs: Processes) -> float:
    """The sum of ``value`` over every process (itself when alone)."""
    if procs.world <= 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=procs.device)
    dist.all_reduce(t)
    return float(t.item())


def all_gather_objects(value, procs: Processes) -> list:
    """``value`` of every process, in rank order (``[value]`` when alone); picklable values."""
    if procs.world <= 1 or not dist.is_initialized():
        return [value]
    out: list = [None] * procs.world
    dist.all_gather_object(out, value)
    return out


def any_process(flag: bool, procs: Processes) -> bool:
    return all_reduce_sum(1.0 if flag else 0.0, procs) > 0


def barrier(procs: Processes) -> None:
    if procs.world > 1 or dist.is_initialized():
        dist.barrier()
