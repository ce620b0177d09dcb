"""``tunelab train``: fine-tune a model; writes a run directory (see :mod:`tunelab.rundir`)."""

from __future__ import annotations

import os

from tunelab.cli.common import Formatter, config_reference
from tunelab.config import ConfigError, load_config
from tunelab.rundir import RunDir


def add_cli(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model (writes a run directory)", formatter_class=Formatter,
        description="Fine-tune the configured model on the task with the method; writes RUN/ "
        "(config.yaml, metrics.jsonl, results.json, the adapter or model, tokenizer, checkpoints).",
        epilog=config_reference(),
    )
    p.add_argument("--config", "-c", help="YAML experiment file (overrides apply on top)")
    p.add_argument("--resume", metavar="RUN", nargs="?", const=True, default=False,
                   help="continue RUN (or out=) from its latest checkpoint with its saved config")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (DDP via torchrun)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an out= folder that holds files tunelab did not make (it replaces only its own)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(handler=cmd_train)


def cmd_train(args) -> int:
    from tunelab.train import train

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from tunelab.launch.torchrun import relaunch_under_torchrun

        return relaunch_under_torchrun(args.nproc, _rank_argv(args))
    if not args.resume:
        train(load_config(args.config, args.overrides), overwrite=args.overwrite)
        return 0
    run = RunDir(args.resume if isinstance(args.resume, str) else _out_override(args.overrides))
    if not run.is_run:
        has = run.describe() if run.path.is_dir() else "does not exist"
        raise ConfigError([f"--resume {run.path}: no {RunDir.CONFIG_FILE} there (it has: {has})"])
    train(run.config([o for o in args.overrides if not o.startswith("out=")]), resume=True)
    return 0


def _out_override(overrides: list[str]) -> str:
    outs = [o.split("=", 1)[1] for o in overrides if o.startswith("out=")]
    if not outs:
        raise ConfigError(["--resume needs the run: `tunelab train --resume RUN` or out=RUN"])
    return outs[-1]


def _rank_argv(args) -> list[str]:
    """The command each torchrun rank runs, rebuilt from the parsed arguments (``sys.argv`` is not
    this command's when ``main(argv)`` is called from Python)."""
    argv = ["-q"] if getattr(args, "quiet", False) else []
    argv.append("train")
    if args.config:
        argv += ["--config", args.config]
    if isinstance(args.resume, str):
        argv += ["--resume", args.resume]
    argv += list(args.overrides)
    if args.overwrite:
        argv.append("--overwrite")
    if args.resume is True:
        argv.append("--resume")  # last: a bare --resume must not swallow an override as its RUN
    return argv
