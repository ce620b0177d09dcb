"""A sweep point's stages: what each runs, and running one in a fresh process or in this one.

A training point is ``tunelab train`` then ``tunelab eval RUN``; a baseline point is
``tunelab eval --base``. By default each command runs in its own Python process (exactly the CLI a
user would type): a crash, an out-of-memory kill or leaked GPU memory stays inside one point, and
peak memory is measured per point (on CPU it is the process's peak RSS, which only a fresh process
measures correctly). In-process mode does the same work with the library calls behind those
commands, inside the sweep's process (faster start, no isolation), with the same exit codes (a
config problem 2, any other error 1, :data:`~tunelab.train.signals.PREEMPT_EXIT_CODE` after a
preemption checkpoint). Either way the output goes to ``RUN/sweep.log``.

SIGTERM / SIGUSR1 (preemption) are forwarded to the running command: the trainer checkpoints and
the stage ends with :class:`Interrupted`. The child is driven with :class:`subprocess.Popen` by hand
(not ``subprocess.run``) because its output is copied to the log and the terminal as it comes, and
signals reach it while it runs.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import signal
import subprocess
import sys
import traceback
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tunelab.experiments.spec import SweepPoint
from tunelab.experiments.state import CONFIG_FILE
from tunelab.rundir import RunDir, resolve_target
from tunelab.train.signals import PREEMPT_EXIT_CODE


class Interrupted(Exception):
    """The stage was stopped by a signal (preemption / Ctrl-C); the point stays pending."""


# --------------------------------------------------------------------------------------------
# Stages: the command of each, and the library call that does the same work
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One command of a point: its ``tunelab`` argv (subprocess mode, ``--dry-run``, the log) and
    ``call``, the same work as a library call (in-process mode)."""

    name: str  # "train" or "eval"
    argv: list[str]
    call: Callable[[], Any]


def _train_fresh(config_file: str, run: str) -> None:
    from tunelab.config import load_config
    from tunelab.train import train

    train(load_config(config_file, [f"out={run}"]))


def _train_resume(run: str) -> None:
    from tunelab.train import train

    train(RunDir(run).config(), resume=True)


def _evaluate(target: str | None, config_file: str | None, overrides: list[str]) -> None:
    from tunelab.evaluation.evaluate import evaluate_target

    evaluate_target(resolve_target(target, base=target is None, config=config_file, overrides=overrides))


def stage_commands(point: SweepPoint) -> list[Stage]:
    """The stages of a point from scratch."""
    run = str(point.run_dir)
    cfg = str(point.run_dir / CONFIG_FILE)
    if point.kind == "base":
        over = [f"out={run}", *point.eval_overrides()]
        return [Stage("eval", ["eval", "--base", "--config", cfg, *over], functools.partial(_evaluate, None, cfg, over))]
    over = point.eval_overrides()
    return [Stage("train", ["train", "--config", cfg, f"out={run}"], functools.partial(_train_fresh, cfg, run)),
            Stage("eval", ["eval", run, *over], functools.partial(_evaluate, run, None, over))]


def resume_stage(run: Path) -> Stage:
    return Stage("train", ["train", "--resume", str(run)], functools.partial(_train_resume, str(run)))


# --------------------------------------------------------------------------------------------
# Executing a stage
# --------------------------------------------------------------------------------------------


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


_CLI_MESSAGE = re.compile(r"^tunelab \w+: ")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Diverged|Interrupt)\b")
_TRACEBACK = "Traceback (most recent call last):"


def _one_line(head: str, more: list[str], limit: int = 12) -> str:
    """A message and its continuation lines (a config error's problems, a multi-line exception) on one line."""
    parts = [head.strip()] + [m.strip() for m in more[:limit]]
    return " ".join(parts) + (f" (+{len(more) - limit} more lines, see the log)" if len(more) > limit else "")


def error_line(text: str) -> str:
    """The error a stage's output ends with, on one line: the CLI's message with what follows it (a
    config error's problems), or the exception a traceback ends with (module path dropped)."""
    lines = [ln.rstrip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    if not lines:
        return "(no output)"
    cli = max((i for i, ln in enumerate(lines) if _CLI_MESSAGE.match(ln)), default=-1)
    trace = max((i for i, ln in enumerate(lines) if ln.strip() == _TRACEBACK), default=-1)
    if cli > trace:
        more = [ln for ln in lines[cli + 1:] if ln[:1].isspace()]
        return _one_line(lines[cli], more)
    if trace >= 0:
        rest = lines[trace + 1:]
        first = next((i for i, ln in enumerate(rest) if not ln[:1].isspace()), None)
        if first is not None:
            # the exception's class without its module: tunelab.rundir.NotOurs: ... -> NotOurs: ...
            head = re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*:)", "", rest[first])
            return _one_line(head, rest[first + 1:])
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line.strip()):
            return line.strip()
    return lines[-1].strip()


def failure_line(rc: int, text: str) -> str:
    """What a failed stage's FAILED file and the sweep's output say: its error, or the signal that killed it."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        hint = (" (often the out-of-memory killer: lower train.batch_size or data.max_length, or give the job "
                "more memory)") if -rc == signal.SIGKILL else ""
        return f"the command was killed by {name}{hint}; run the sweep again to retry the point"
    return error_line(text)


def _run_subprocess(argv: list[str], log_fh, echo: bool) -> tuple[int, str]:
    """Run ``python -m tunelab ARGV``; output goes to the log (and the terminal with echo)."""
    cmd = [sys.executable, "-m", "tunelab", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNELAB_DEBUG": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    got_signal: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        got_signal.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)  # the trainer checkpoints at the end of its step and exits 143

    old = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            old[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread
            pass
    recent = bytearray()
    try:
        assert proc.stdout is not None
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            log_fh.write(chunk)
            log_fh.flush()
            recent.extend(chunk)
            del recent[:-32768]
            if echo:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
        rc = proc.wait()
    except KeyboardInterrupt:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise Interrupted("interrupted by Ctrl-C") from None
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if got_signal or rc == PREEMPT_EXIT_CODE:
        raise Interrupted(f"stopped by signal {got_signal[0] if got_signal else 'SIGTERM'} (exit {rc})")
    return rc, recent.decode("utf-8", "replace")


class _Tee:
    """A text stream that writes to several (stderr: the terminal and the stage's buffer)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False

    @property
    def encoding(self):
        return "utf-8"


@contextmanager
def _captured_output(buf: io.StringIO) -> Iterator[None]:
    """stderr to the terminal and ``buf``; tunelab's log records to ``buf`` at INFO, as `tunelab CMD` logs."""
    from tunelab.utils import log

    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("[tunelab] %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # what `tunelab CMD` logs in a subprocess's sweep.log, whatever this process's level
    try:
        with redirect_stderr(_Tee(sys.stderr, buf)):
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _call_stage(stage: Stage, buf: io.StringIO) -> int:
    """The stage's library call with the exit code `tunelab CMD` would give (stage errors are caught)."""
    from tunelab.config import ConfigError

    try:
        stage.call()
        return 0
    except KeyboardInterrupt:
        raise Interrupted("interrupted by Ctrl-C") from None
    except SystemExit as exc:  # the trainer's preemption exit
        if exc.code == PREEMPT_EXIT_CODE:
            raise Interrupted("stopped by a signal after a checkpoint") from None
        return exc.code if isinstance(exc.code, int) else 1
    except ConfigError as exc:  # printed and answered as `tunelab CMD` does
        print(f"tunelab {stage.argv[0]}: {exc}", file=sys.stderr)
        return 2
    except Exception:  # a failing point must not stop the others
        traceback.print_exc(file=buf)
        return 1


def _run_in_process(stage: Stage, log_fh) -> tuple[int, str]:
    """Do the stage's work inside this process (exceptions are caught, not isolated)."""
    buf = io.StringIO()
    with _captured_output(buf):
        rc = _call_stage(stage, buf)
    text = buf.getvalue()
    log_fh.write(text.encode())
    log_fh.flush()
    return rc, text


def run_stage(stage: Stage, log_fh, *, in_process: bool, echo: bool) -> tuple[int, str]:
    """(exit code, its output: the last 32 KiB of a subprocess's) of one stage; all of it is appended to ``log_fh``."""
    if in_process:
        return _run_in_process(stage, log_fh)
    return _run_subprocess(stage.argv, log_fh, echo)
