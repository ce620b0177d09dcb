"""The ``tunelab`` command: train, eval, merge (and the commands that build on them).

Every command takes ``key=value`` overrides of the typed config (see ``tunelab train --help`` for
every key with its documentation); ``method=``, ``task=`` and ``model=`` are shorthands.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from tunelab.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    field_help,
    load_config,
    method_config_classes,
    task_config_classes,
)
from tunelab.utils import log, setup_logging


def _config_reference(sections: tuple[str, ...] = ("model", "task", "data", "method", "train", "eval")) -> str:
    """Every config key with its type, default and documentation, for --help."""
    lines = ["configuration keys (key=value overrides; also valid in a --config YAML file):", ""]
    lines.append("  out=DIR             run directory;  seed=INT  seed for data order, init and dropout")
    plain = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
    for section in sections:
        if section in plain:
            lines.append(f"\n  [{section}]")
            for key, tp, help_ in field_help(plain[section], f"{section}."):
                lines.append(f"  {key} ({tp})")
                lines.extend(textwrap.wrap(help_, 90, initial_indent="      ", subsequent_indent="      "))
        else:
            registry = method_config_classes() if section == "method" else task_config_classes()
            lines.append(f"\n  [{section}]  {section}=NAME selects one of: {', '.join(sorted(registry))}")
            for name, cls in sorted(registry.items()):
                rows = [r for r in field_help(cls, f"{section}.") if r[0] != f"{section}.name"]
                lines.append(f"    {section}={name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
                for key, tp, help_ in rows:
                    lines.append(f"      {key} ({tp})")
                    lines.extend(textwrap.wrap(help_, 88, initial_indent="          ", subsequent_indent="          "))
    return "\n".join(lines)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune LLMs and compare fine-tuning methods (LoRA, RoSA, GaLore, full) on real tasks.",
        formatter_class=_Formatter,
        epilog=textwrap.dedent(
            """\
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
        ),
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train", help="fine-tune a model (writes a run directory)", formatter_class=_Formatter,
        description="Fine-tune the configured model on the task with the method; writes RUN/ "
        "(config.yaml, metrics.jsonl, results.json, the adapter or model, tokenizer, checkpoints).",
        epilog=_config_reference(),
    )
    p.add_argument("--config", "-c", help="YAML experiment file (overrides apply on top)")
    p.add_argument("--resume", metavar="RUN", nargs="?", const=True, default=False,
                   help="continue RUN (or out=) from its latest checkpoint with its saved config")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (DDP via torchrun)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")

    p = sub.add_parser(
        "eval", help="evaluate a run, a merged folder or the base model", formatter_class=_Formatter,
        description="Generate on the task's test split and score it; writes <RUN|out>/eval/results.json "
        "and predictions.jsonl. TARGET is a run directory (adapter applied unmerged) or a HF model folder; "
        "--base evaluates the untrained base model of the config.",
        epilog=_config_reference(("model", "task", "eval")),
    )
    p.add_argument("target", nargs="?", help="run directory or model folder")
    p.add_argument("--base", action="store_true", help="evaluate the untrained base model (set out= for where results go)")
    p.add_argument("--config", "-c", help="YAML experiment file (with --base)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (eval.limit=8, eval.batch_size=16, ...)")

    p = sub.add_parser(
        "merge", help="fold the trained adapter into the base weights -> RUN/merged/",
        description="Write a plain Hugging Face checkpoint (safetensors + tokenizer) after checking that the "
        "merged model's logits equal the adapter model's (refuses otherwise).",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="output folder (default RUN/merged)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (e.g. model.device=cpu)")

    _add_later_commands(sub)
    return parser


def _add_later_commands(sub) -> None:
    """Commands of the later modules register here when present."""
    import importlib

    for name in ("sweep", "report", "launch", "generate"):
        try:
            mod = importlib.import_module(f"tunelab.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tunelab.{name}":
                raise
            continue
        if hasattr(mod, "add_cli"):
            mod.add_cli(sub)


def _split_target(target: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    if target is not None and "=" in target:
        return None, [target, *overrides]
    return target, overrides


def cmd_train(args) -> int:
    from tunelab.evaluate import run_config
    from tunelab.train import train

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_torchrun(args)
    if args.resume:
        run = args.resume if isinstance(args.resume, str) else None
        if run is None:
            outs = [o.split("=", 1)[1] for o in args.overrides if o.startswith("out=")]
            if not outs:
                raise ConfigError(["--resume needs the run: `tunelab train --resume RUN` or out=RUN"])
            run = outs[-1]
        run_dir = Path(run)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError([f"--resume {run_dir}: no config.yaml there (it has: {', '.join(sorted(p.name for p in run_dir.iterdir())) if run_dir.is_dir() else 'does not exist'})"])
        cfg = run_config(run_dir, [o for o in args.overrides if not o.startswith("out=")])
        train(cfg, resume=True)
    else:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    return 0


def _relaunch_torchrun(args) -> int:
    """`tunelab train --nproc N ...` = `torchrun --standalone --nproc_per_node N -m tunelab train ...`.

    The command line is rebuilt from the parsed arguments (``sys.argv`` is not this command's when
    ``main(argv)`` is called from Python). SIGTERM/SIGUSR1/SIGHUP sent to this process (SLURM's
    preemption warning, ``kill``) are forwarded to torchrun, which forwards them to every rank
    (``PET_SIGNALS_TO_HANDLE`` adds USR1; without it torchrun dies on USR1 and leaves its workers
    running); the ranks checkpoint and exit, and this returns 143 like a 1-process run.
    """
    import shlex
    import signal
    import subprocess

    from tunelab.train import PREEMPT_EXIT_CODE

    argv = ["-q"] if getattr(args, "quiet", False) else []
    argv.append("train")
    if args.config:
        argv += ["--config", args.config]
    if isinstance(args.resume, str):
        argv += ["--resume", args.resume]
    argv += list(args.overrides)
    if args.resume is True:
        argv.append("--resume")  # last: a bare --resume must not swallow an override as its RUN
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "tunelab", *argv]
    env = dict(os.environ)
    # torchrun's --signals_to_handle (env PET_...; older torch reads TORCHELASTIC_...): forward USR1 too.
    signals = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    env.setdefault("PET_SIGNALS_TO_HANDLE", signals)
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


def cmd_eval(args) -> int:
    from tunelab.evaluate import evaluate, is_run_dir, run_config, write_base_run

    target, overrides = _split_target(args.target, args.overrides)
    if args.base:
        if target is not None:
            raise ConfigError([f"--base evaluates the untrained model: drop '{target}' or drop --base"])
        cfg = load_config(args.config, overrides)
        out = Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.task.name}-base"
        cfg.out = str(out)
        write_base_run(cfg, out)
        evaluate(cfg, None, out)
        return 0
    if target is None:
        raise ConfigError(["tunelab eval needs a run directory (tunelab eval RUN) or --base"])
    path = Path(target)
    if not path.exists():
        raise ConfigError([f"'{target}' does not exist: pass a run directory, a model folder, or --base"])
    if is_run_dir(path):
        cfg = run_config(path, overrides)
        if (path / "BASE").is_file():
            evaluate(cfg, None, path)
        else:
            evaluate(cfg, path, path)
        return 0
    if (path / "config.json").is_file():  # a merged or plain HF folder
        # RUN/merged keeps its run's task and eval settings; any other folder uses the defaults.
        parent = path.parent
        base_overrides = [f"model={path}", *overrides]
        label = None
        if (parent / "config.yaml").is_file() and not (parent / "BASE").is_file():
            cfg = run_config(parent, base_overrides)
            label = f"{cfg.method.name}-merged"
        else:
            cfg = load_config(overrides=base_overrides)
            label = "model-folder"
        cfg.out = str(path)
        evaluate(cfg, None, path, method_label=label)
        return 0
    raise ConfigError([f"'{target}' is neither a run directory (config.yaml) nor a model folder (config.json)"])


def cmd_merge(args) -> int:
    from tunelab.evaluate import run_config
    from tunelab.merge import merge_run

    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError([f"'{run_dir}' is not a run directory (no config.yaml)"])
    cfg = run_config(run_dir, args.overrides)
    merge_run(cfg, run_dir, Path(args.out) if args.out else None)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "merge": cmd_merge}


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
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"tunelab {args.command}: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, RuntimeError) as exc:
        if os.environ.get("TUNELAB_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"tunelab {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
