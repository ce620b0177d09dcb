"""``tunelab submit train|eval|sweep ...``: the command line of :mod:`tunelab.launch.submit`.

``--slurm.KEY=VALUE`` items are pulled out of the arguments by hand before argparse sees them:
argparse cannot declare options for every key of a dataclass under a dotted prefix, and the
values are read like the ``--slurm-config`` YAML file.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from tunelab.config import ConfigError, field_help
from tunelab.launch.slurm_config import SlurmConfig, apply_global_batch, load_slurm_config, parse_slurm_value, world_size
from tunelab.launch.submit import load_train_config, submit_eval, submit_sweep, submit_train


def _slurm_reference() -> str:
    rows = field_help(SlurmConfig, "slurm.")
    lines = ["SLURM settings (--slurm.KEY=VALUE, or a YAML file of them with --slurm-config FILE):"]
    for key, tp, help_ in rows:
        lines.append(f"  --{key} ({tp})")
        lines.extend(textwrap.wrap(help_, 90, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


_SUBMIT_EXAMPLES = """\
examples:
  tunelab submit train task=gsm8k method=lora out=runs/r8 --slurm.account=PROJ --slurm.partition=alvis \\
      --slurm.time=03:00:00 --slurm.gpus_per_node=1 --slurm.gpu_type=A100 --then-eval --dry-run
  tunelab submit train --config exp.yaml --slurm-config configs/slurm/mycluster.yaml --slurm.gpus_per_node=4
  tunelab submit eval runs/r8 eval.limit=500 --slurm-config configs/slurm/mycluster.yaml
  tunelab submit sweep configs/sweeps/lora-rank.yaml --slurm.array_parallelism=4 --slurm-config ...
  tunelab status runs/r8"""

_DESCRIPTIONS = {
    "train": "Submit a training run to SLURM: writes RUN/config.yaml and RUN/slurm/train.sbatch, submits it, "
             "records the job in RUN/slurm.json. The job runs `tunelab train --config RUN/config.yaml` "
             "(`--resume RUN` once a checkpoint exists: a requeued job resumes).",
    "eval": "Submit `tunelab eval RUN [overrides]` to SLURM (one process, at most one GPU).",
    "sweep": "Submit a sweep: one array task per pending point (`tunelab sweep FILE --point I`) and a "
             "report job after the array.",
}


def _split_slurm_items(argv: list[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Pull ``--slurm.KEY=VALUE`` / ``--slurm.KEY VALUE`` out of argv; returns (items, rest, problems)."""
    items: dict[str, Any] = {}
    rest: list[str] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--slurm."):
            key, sep, value = a[len("--slurm."):].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    problems.append(f"{a} needs a value: {a}=VALUE")
                    break
                value = argv[i + 1]
                i += 1
            # Lists: YAML flow syntax ([a, b]) or repeat the option to append.
            parsed = value if key in ("setup", "python", "log_dir") else parse_slurm_value(value)
            if key in ("setup", "extra") and not isinstance(parsed, list):
                items.setdefault(key, []).append(value)
            else:
                items[key] = parsed
        else:
            rest.append(a)
        i += 1
    return items, rest, problems


def _submit_parser(kind: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"tunelab submit {kind}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTIONS[kind], epilog=_SUBMIT_EXAMPLES + "\n\n" + _slurm_reference(),
    )
    if kind == "train":
        p.add_argument("--config", "-c", help="YAML experiment file (overrides apply on top)")
        p.add_argument("--resume", metavar="RUN", help="continue RUN (its config.yaml, overrides on top) from its latest checkpoint")
        p.add_argument("--then-eval", action="store_true", help="also submit `tunelab eval RUN`, to start after training succeeds (afterok)")
        p.add_argument("--global-batch-size", type=int, metavar="N",
                       help="hold the global batch (per-device batch x grad_accum x processes) at N by setting "
                       "train.grad_accum; N must be divisible by train.batch_size x processes")
    elif kind == "eval":
        p.add_argument("target", help="run directory")
    else:
        p.add_argument("file", help="sweep YAML file")
        p.add_argument("--out-dir", help="folder of the run directories (overrides the file's out_dir)")
        p.add_argument("--no-report", action="store_true", help="do not submit the report job")
    p.add_argument("--slurm-config", metavar="FILE", help="YAML file of slurm settings (e.g. one per cluster)")
    p.add_argument("--dry-run", action="store_true", help="print the job script(s) and the sbatch command; write and submit nothing")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def cmd_submit(args) -> int:
    kind = args.kind
    parser = _submit_parser(kind)
    items, rest, problems = _split_slurm_items(args.rest)
    ns = parser.parse_intermixed_args(rest)
    # Every problem of the run config, the SLURM settings and the batch arithmetic in one report.
    s = cfg = None
    try:
        s = load_slurm_config(ns.slurm_config, items, kind)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if kind == "train":
        try:
            cfg = load_train_config(ns.config, ns.overrides, ns.resume)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if cfg is not None and s is not None:
            problems.extend(apply_global_batch(cfg, world_size(s), ns.global_batch_size))
    elif kind == "sweep" and ns.overrides:
        problems.append(f"`tunelab submit sweep` takes no config overrides (got {' '.join(ns.overrides)}): put them "
                        f"in the sweep file's base:")
    if problems:
        raise ConfigError(problems)
    assert s is not None
    if kind == "train":
        submit_train(cfg, s, then_eval=ns.then_eval, resume=bool(ns.resume), dry_run=ns.dry_run)
    elif kind == "eval":
        submit_eval(Path(ns.target), s, ns.overrides, dry_run=ns.dry_run)
    else:
        submit_sweep(Path(ns.file), s, out_dir=ns.out_dir, report=not ns.no_report, dry_run=ns.dry_run)
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "submit", help="submit a train / eval / sweep job to SLURM (--dry-run prints the script)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render an sbatch script from the run config and --slurm.* settings, write it into the run "
        "directory and submit it. `tunelab submit KIND --help` lists the options of each kind.",
        epilog=_SUBMIT_EXAMPLES + "\n\n" + _slurm_reference(),
    )
    p.add_argument("kind", choices=("train", "eval", "sweep"), help="what to submit")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options and key=value overrides of that kind")
    p.set_defaults(handler=cmd_submit)
