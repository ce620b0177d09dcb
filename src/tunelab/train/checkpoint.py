"""Resumable checkpoints: written to a staging folder and renamed into place, so a crash never leaves half a checkpoint.

A checkpoint ``RUN/checkpoints/step-N/`` holds the trainable tensors (safetensors), the optimizer
state (or DeepSpeed's own files), the lr schedule, the method callbacks' state and the RNG states;
``state.json`` is written last and marks it complete. ``--resume`` continues with the same data
order (a pure function of seed and epoch), the same lr step and the same dropout RNG.
"""

from __future__ import annotations

import errno
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from tunelab.rundir import RunDir
from tunelab.train.parallel import Backend
from tunelab.utils import atomic_replace_dir, atomic_write_text, log, make_temp_dir


class Checkpointer:
    """Saves and restores the training state of one run through the backend."""

    def __init__(self, run: RunDir, backend: Backend, keep: int):
        self.run, self.backend, self.keep = run, backend, keep
        #: a checkpoint rotation never removes (early stopping's best step), on top of the ``keep`` newest
        self.pinned: Path | None = None

    def save(self, state, method, model, optimizer, scheduler, callbacks, totals: dict | None = None) -> Path:
        """Write step ``state.step`` (a collective under sharding: every process calls it).

        ``totals`` (tokens, train time so far) go into state.json, so a resumed run reports the whole run.
        A failed write (disk full, ...) removes its staging folder and leaves the older checkpoints intact.
        """
        final = self.run.checkpoint_path(state.step)
        with saving(final, self.run.checkpoints()):
            staging = self._staging(state.step)
            try:
                tensors, optim_state = self.backend.checkpoint_state(method, model, optimizer, staging)
                if self.backend.procs.is_main:
                    self._write(staging, final, tensors, optim_state, scheduler, callbacks, state, totals or {})
            finally:  # renamed into place on success; only the main process owns a shared staging folder
                if staging is not None and self.backend.procs.is_main:
                    shutil.rmtree(staging, ignore_errors=True)
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
        return make_temp_dir(root, ".tmp-")

    def _write(self, staging: Path, final: Path, tensors, optim_state, scheduler, callbacks, state, totals) -> None:
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
        info = {"step": state.step, "epoch": state.epoch, "parallelism": self.backend.checkpoint_layout, **totals}
        (staging / "state.json").write_text(json.dumps(info, indent=2))
        atomic_replace_dir(staging, final)
        for old in [c for c in self.run.checkpoints() if c != self.pinned][:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def restore_latest(self, method, model, optimizer, scheduler, callbacks) -> dict | None:
        """Load the newest intact checkpoint; returns its state.json (None when there is none).

        A checkpoint that cannot be read (truncated, corrupt) is named in a warning and the one
        before it is tried: everything is read before anything is loaded into the model.
        """
        for ckpt in reversed(self.run.checkpoints()):
            info = json.loads((ckpt / "state.json").read_text())
            saved_by, layout = info.get("parallelism", "ddp"), self.backend.checkpoint_layout
            if saved_by != layout:
                raise ValueError(
                    f"{ckpt} was written with train.parallelism={saved_by} and this run uses {layout}: their optimizer "
                    f"states are laid out differently. Resume with train.parallelism={saved_by}."
                )
            try:
                trainer_state = read_file(ckpt / "trainer_state.pt", torch.load, map_location="cpu", weights_only=True)
                self.backend.restore(ckpt, method, model, optimizer, scheduler)  # reads everything, then loads
            except UnreadableCheckpoint as exc:
                log.warning(f"{exc}: falling back to the checkpoint before it")
                continue
            scheduler.load_state_dict(trainer_state["scheduler"])
            for cb, sd in zip(callbacks, trainer_state["callbacks"]):
                cb.load_state_dict(sd)
            torch.set_rng_state(trainer_state["rng_cpu"])
            if trainer_state["rng_cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(trainer_state["rng_cuda"])
            info["path"] = str(ckpt)
            return info
        return None


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read back (truncated, corrupt); the message names it."""


def read_file(path: Path, reader, *args, **kwargs):
    """``reader(path, ...)``, with any failure to read it raised as UnreadableCheckpoint naming the file."""
    try:
        return reader(path, *args, **kwargs)
    except Exception as exc:  # a truncated zip, a bad header, a pickle error: all mean "this file is damaged"
        raise UnreadableCheckpoint(f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from exc


class SaveFailed(RuntimeError):
    """Writing a checkpoint or the final artifact failed (disk full, permissions); earlier checkpoints are intact."""


@contextmanager
def saving(target: Path, intact: list[Path]):
    """Turn an OS error while writing ``target`` into one message that names the fix and what is still intact."""
    try:
        yield
    except OSError as exc:
        where = Path(exc.filename).parent if getattr(exc, "filename", None) else target.parent
        last = f"the last checkpoint {intact[-1]} is intact" if intact else "no earlier checkpoint exists"
        run_path = target.parent.parent if target.parent.name == RunDir.CHECKPOINTS_DIR else target.parent
        if exc.errno == errno.ENOSPC:
            raise SaveFailed(f"no space left on {where} while writing {target}: free space (or set out= to another "
                             f"disk), then `tunelab train --resume {run_path}`; {last}") from exc
        raise SaveFailed(f"could not write {target} ({exc.strerror or exc}): fix the folder's permissions or space; {last}") from exc


def remove_stale_staging(run: RunDir) -> None:
    """Staging folders a killed process left behind (tunelab's own prefixes inside its run folder)."""
    for pattern in (".artifact-*", f"{RunDir.CHECKPOINTS_DIR}/.tmp-*"):
        for stale in run.path.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
                log.info(f"removed {stale}, left by an interrupted save")


def drop_metrics_after(path: Path, step: int) -> None:
    """A run that died after its last checkpoint logged steps it will now redo: forget those lines."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        log.info(f"metrics.jsonl: dropped {len(lines) - len(kept)} lines logged after step {step} (they are redone)")
