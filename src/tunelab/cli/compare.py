"""``tunelab compare A B``: two evaluations of one task, example by example, with paired bootstrap intervals."""

from __future__ import annotations

from pathlib import Path

from tunelab.config import ConfigError
from tunelab.experiments.report import compare_evals, format_comparison


def cmd_compare(args) -> int:
    if args.resamples < 1:
        raise ConfigError([f"--resamples must be >= 1, got {args.resamples} (default 1000)"])
    if args.seed < 0:
        raise ConfigError([f"--seed must be >= 0, got {args.seed}"])
    if args.json and Path(args.json).is_dir():
        raise ConfigError([f"--json {args.json} is a folder: give a file name (e.g. {Path(args.json) / 'compare.json'})"])
    cmp = compare_evals(Path(args.a), Path(args.b), args.metric, args.resamples, args.seed)
    print(format_comparison(cmp))
    if args.json:
        from tunelab.utils import atomic_write_json

        atomic_write_json(Path(args.json), cmp)
    return 0


def add_cli(sub) -> None:
    c = sub.add_parser(
        "compare", help="B vs A example by example: each metric's difference with a paired bootstrap CI",
        description="Compare two evaluations of the same task (run directories with eval/, or eval folders) on "
        "the examples both evaluated: per metric, the means, B − A, its 95%% paired-bootstrap interval and the "
        "share of resamples where B does not beat A.",
    )
    c.add_argument("a", metavar="A", help="the reference run (e.g. the base model or LoRA)")
    c.add_argument("b", metavar="B", help="the run compared with it")
    c.add_argument("--metric", action="append", help="compare only this metric (repeatable); default: all")
    c.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    c.add_argument("--json", metavar="FILE", help="also write the comparison as JSON")
    c.set_defaults(handler=cmd_compare)
