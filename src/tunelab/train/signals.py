"""Preemption: SIGTERM/SIGUSR1 (SLURM's warning, `kill`) end training at a step boundary with a checkpoint.

A light module (no torch), so the launchers and the sweep runner share the exit code without
importing the training stack.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

#: exit code of a run that checkpointed and stopped on SIGTERM/SIGUSR1 (128 + SIGTERM): requeue and resume it
PREEMPT_EXIT_CODE = 143


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; the process exits with PREEMPT_EXIT_CODE."""

    def __init__(self) -> None:
        super().__init__(PREEMPT_EXIT_CODE)


class StopRequest:
    """Set by SIGTERM/SIGUSR1 while :func:`catch_stop_signals` is active; read at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def hit(self) -> bool:
        return self.signum is not None


@contextmanager
def catch_stop_signals(on_signal=None) -> Iterator[StopRequest]:
    """Turn SIGTERM/SIGUSR1 into a flag (the step in flight finishes); restore the handlers after."""
    request = StopRequest()

    def handler(signum, frame):  # noqa: ARG001
        request.signum = signum
        if on_signal is not None:
            on_signal(signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread: no handler, no preemption checkpoint
            pass
    try:
        yield request
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
