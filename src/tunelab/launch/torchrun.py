"""``tunelab train --nproc N``: the same command re-run under torchrun, one process per rank.

torchrun itself starts and watches the ranks; what is hand-written here is the signal handling
around it, which torchrun alone gets wrong for preemption (it dies on SIGUSR1 unless told to
forward it, and a launcher that dies leaves its ranks running).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

from tunelab.train.signals import PREEMPT_EXIT_CODE
from tunelab.utils import log

#: torchrun's --signals_to_handle (env PET_...; older torch reads TORCHELASTIC_...): forward USR1 too.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """`tunelab ARGV` in ``nproc`` processes = `torchrun --standalone --nproc_per_node N -m tunelab ARGV`.

    ``argv`` is the ``tunelab`` command line each rank runs (e.g. ``["train", "--config", FILE, ...]``),
    rebuilt by the caller from the parsed arguments (``sys.argv`` is not this command's when
    ``main(argv)`` is called from Python). SIGTERM/SIGUSR1/SIGHUP sent to this process (SLURM's
    preemption warning, ``kill``) are forwarded to torchrun, which forwards them to every rank
    (``PET_SIGNALS_TO_HANDLE`` adds USR1; without it torchrun dies on USR1 and leaves its workers
    running); the ranks checkpoint and exit, and this returns PREEMPT_EXIT_CODE (143) like a 1-process run.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tunelab", *argv]
    env = dict(os.environ)
    env.setdefault("PET_SIGNALS_TO_HANDLE", FORWARDED_SIGNALS)
    env.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", env["PET_SIGNALS_TO_HANDLE"])
    log.info("launching: " + shlex.join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    received: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread
            pass
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reaches torchrun too (same process group): wait for it
                received.append(signal.SIGINT)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return PREEMPT_EXIT_CODE if received and rc != 0 else rc
