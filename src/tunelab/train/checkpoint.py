"""Resumable checkpoints: written to a staging folder and renamed into place, so a crash never leaves half a checkpoint.

A checkpoint ``RUN/checkpoints/step-N/`` holds the trainable tensors (safetensors), the optimizer
state (or DeepSpeed's own files), the lr schedule, the method callbacks' state and the RNG states;
``state.json`` is written last and marks it complete. ``--resume`` continues with the same data
order (a pure function of seed and epoch), the same lr step and the same dropout RNG.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from tunelab.rundir import RunDir
from tunelab.train.parallel import Backend
from tunelab.utils import atomic_replace_dir, atomic_write_text, log


class Checkpointer:
    """Saves and restores the training state of one run through the backend."""

    def __init__(self, run: RunDir, backend: Backend, keep: int):
        self.run, self.backend, self.keep = run, backend, keep

    def save(self, state, method, model, optimizer, scheduler, callbacks) -> Path:
        """Write step ``state.step`` (a collective under sharding: every process calls it)."""
        final = self.run.checkpoint_path(state.step)
        staging = self._staging(state.step)
        try:
            tensors, optim_state = self.backend.checkpoint_state(method, model, optimizer, staging)
            if self.backend.procs.is_main:
                self._write(staging, final, tensors, optim_state, scheduler, callbacks, state)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.backend.procs.world > 1:
            self.backend.barrier()
        return final

    def _staging(self, step: int) -> Path | None:
        root = self.run.checkpoints_root
        if self.backend.shared_staging:
            # every process writes its part into one folder: its name must be known to all
            staging = root / f".tmp-step-{step:06d}"
            if self.backend.procs.is_main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            self.backend.barrier()
            return staging
        if not self.backend.procs.is_main:
            return None
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))

    def _write(self, staging: Path, final: Path, tensors, optim_state, scheduler, callbacks, state) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(staging / "trainable.safetensors"))
        if optim_state is not None:
            torch.save(optim_state, staging / "optimizer.pt")
        torch.save(
            {
                "scheduler": scheduler.state_dict(),
                "callbacks": [cb.state_dict() for cb in callbacks],
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            staging / "trainer_state.pt",
        )
        info = {"step": state.step, "epoch": state.epoch, "parallelism": self.backend.checkpoint_layout}
        (staging / "state.json").write_text(json.dumps(info, indent=2))
        atomic_replace_dir(staging, final)
        for old in self.run.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def restore_latest(self, method, model, optimizer, scheduler, callbacks) -> dict | None:
        """Load the newest complete checkpoint; returns its state.json (None when there is none)."""
        ckpts = self.run.checkpoints()
        if not ckpts:
            return None
        ckpt = ckpts[-1]
        info = json.loads((ckpt / "state.json").read_text())
        saved_by, layout = info.get("parallelism", "ddp"), self.backend.checkpoint_layout
        if saved_by != layout:
            raise ValueError(
                f"{ckpt} was written with train.parallelism={saved_by} and this run uses {layout}: their optimizer "
                f"states are laid out differently. Resume with train.parallelism={saved_by}."
            )
        self.backend.restore(ckpt, method, model, optimizer, scheduler)
        trainer_state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        scheduler.load_state_dict(trainer_state["scheduler"])
        for cb, sd in zip(callbacks, trainer_state["callbacks"]):
            cb.load_state_dict(sd)
        torch.set_rng_state(trainer_state["rng_cpu"])
        if trainer_state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer_state["rng_cuda"])
        info["path"] = str(ckpt)
        return info


def drop_metrics_after(path: Path, step: int) -> None:
    """A run that died after its last checkpoint logged steps it will now redo: forget those lines."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        log.info(f"metrics.jsonl: dropped {len(lines) - len(kept)} lines logged after step {step} (they are redone)")
