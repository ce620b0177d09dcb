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
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"tunelab {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a word, not a traceback (commands that can resume say how)
        print(f"\ntunelab {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, RuntimeError) as exc:
        if os.environ.get("TUNELAB_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"tunelab {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
