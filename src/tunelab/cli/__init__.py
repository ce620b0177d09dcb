"""The ``tunelab`` command: one table of subcommands, one small module of this package each.

Each module (``tunelab.cli.train``, ``.eval``, ...) adds its parser with ``add_cli(sub)`` and
handles its arguments by calling library functions that run without argv (the trainer, the
evaluator, the sweep runner), so Python users and the sweep runner call the same code. Every
command takes ``key=value`` overrides of the typed config (``tunelab train --help`` lists every key
with its documentation); ``method=``, ``task=`` and ``model=`` are shorthands.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from pathlib import Path

from tunelab.cli.common import Formatter
from tunelab.config import ConfigError
from tunelab.utils import setup_logging

#: the subcommands in pipeline order; ``tunelab.cli.<name>`` defines each one's ``add_cli(sub)``
SUBCOMMANDS = ("train", "eval", "merge", "generate", "sweep", "compare", "report", "submit", "status")

EXAMPLES = """\
examples:
  tunelab train task=gsm8k method=lora train.max_steps=2 data.limit=16 out=RUN
  tunelab eval RUN eval.limit=8
  tunelab eval --base task=gsm8k eval.limit=8 out=BASE
  tunelab merge RUN
  tunelab generate RUN --prompt "..."
  tunelab sweep configs/sweeps/cpu-smollm2-gsm8k.yaml --list
  tunelab report runs/cpu-smollm2-gsm8k --out REPORT
  tunelab submit train task=gsm8k method=lora out=RUN --slurm.partition=debug --dry-run
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab", formatter_class=Formatter, epilog=textwrap.dedent(EXAMPLES),
        description="Fine-tune LLMs and compare fine-tuning methods (LoRA, RoSA, GaLore, full) on real tasks.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: TUNELAB_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"tunelab.cli.{name}").add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides placed after a flag (`RUN --prompt x eval.batch_size=4`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    import logging

    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or bool(os.environ.get("TUNELAB_DEBUG"))
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"tunelab {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a word, not a traceback (commands that can resume say how)
        print(f"\ntunelab {args.command}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        if debug:
            raise
        print(f"tunelab {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug or an unforeseen fault: a short message, the traceback in a file
        if debug:
            raise
        where = _write_traceback(args.command)
        print(f"tunelab {args.command}: unexpected error: {type(exc).__name__}: {_one_line(exc)}\n"
              f"  the full traceback is in {where} (or rerun with --debug); please include it in a bug report",
              file=sys.stderr)
        return 1


#: faults whose message already names the fix (tunelab raises them so): printed as one line
EXPECTED_ERRORS = (OSError, KeyError, ValueError, RuntimeError)


def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return str(msg)


def _write_traceback(command: str) -> Path:
    """The current exception's traceback in $TUNELAB_CACHE/errors/ (a temp folder when that is not writable)."""
    import tempfile
    import time
    import traceback

    from tunelab.models import cache_root

    text = f"tunelab {command} ({time.strftime('%Y-%m-%d %H:%M:%S')}): {' '.join(sys.argv)}\n\n{traceback.format_exc()}"
    for folder in (cache_root() / "errors", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"tunelab-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
            path.write_text(text)
            return path
        except OSError:
            continue
    return Path("(nowhere: no writable folder)")


if __name__ == "__main__":
    sys.exit(main())
