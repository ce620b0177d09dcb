"""Running multi-process launches (torchrun and its ranks) from tests, and always cleaning up after them."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def run_group(cmd: list[str], log: Path, timeout: float, marker: str) -> int:
    """Run cmd in its own process group, output appended to ``log``; its return code.

    On timeout (an AssertionError with the log's tail) and in any case afterwards, what is left of
    the launch is killed (:func:`kill_group`).
    """
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s:\n{log.read_text()[-3000:]}") from None
        finally:
            kill_group(proc, marker)


def kill_group(proc: subprocess.Popen, marker: str) -> None:
    """Kill what is left of a launch: its process group, and ranks (own sessions under torchrun) whose
    command line holds ``marker`` (the test's unique run directory) once a dead launcher orphaned them."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
            try:
                p.kill()
            except psutil.Error:
                pass
