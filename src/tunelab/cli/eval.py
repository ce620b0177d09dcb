"""``tunelab eval``: the argparse side; :func:`tunelab.evaluation.evaluate.evaluate_target` does the work.

The library is imported in the handler: building the parser (any command's --help) loads no torch.
"""

from __future__ import annotations

from tunelab.cli.common import Formatter, config_reference, split_target


def add_cli(sub) -> None:
    """Add the ``eval`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "eval", help="evaluate a run, a merged folder or the base model", formatter_class=Formatter,
        description="Generate on the task's test split and score it; writes <RUN|out>/eval/results.json "
        "and predictions.jsonl. TARGET is a run directory (adapter applied unmerged) or a HF model folder; "
        "--base evaluates the untrained base model of the config.",
        epilog=config_reference(("model", "task", "eval")),
    )
    p.add_argument("target", nargs="?", help="run directory or model folder")
    p.add_argument("--base", action="store_true", help="evaluate the untrained base model (set out= for where results go)")
    p.add_argument("--config", "-c", help="YAML experiment file (with --base)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --base: write the evaluation into an out= folder that holds other files "
                   "(never into a training run; tunelab replaces only its own files)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (eval.limit=8, eval.batch_size=16, ...)")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args) -> int:
    from tunelab.evaluation.evaluate import evaluate_target
    from tunelab.rundir import resolve_target

    from tunelab.config import ConfigError

    if args.overwrite and not args.base:
        raise ConfigError(["--overwrite only applies with --base (a run's own evaluation replaces RUN/eval/)"])
    target, overrides = split_target(args.target, args.overrides)
    evaluate_target(resolve_target(target, base=args.base, config=args.config, overrides=overrides, command="eval"),
                    overwrite=args.overwrite)
    return 0
