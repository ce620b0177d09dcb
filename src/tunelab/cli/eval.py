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
        "--base evaluates the untrained base model of the config. "
        "With harness=TASK (or harness=[gsm8k,arc_easy]) lm-evaluation-harness runs INSTEAD of tunelab's own "
        "evaluation, on the same loaded model (adapter applied, RoSA merged in memory), and writes "
        "<RUN|out>/eval/harness/<task>/ (the harness's results JSON, its per-sample log samples.jsonl, and "
        "results.json with the protocol); RUN/eval/results.json is left as it was. harness=gsm8k runs offline "
        "from the local GSM8K folder (the harness's own task config, only the data files differ); other tasks "
        "need the Hugging Face Hub. Example: tunelab eval RUN harness=gsm8k harness.num_fewshot=5 harness.limit=100",
        epilog=config_reference(("model", "task", "eval")) + harness_reference(),
    )
    p.add_argument("target", nargs="?", help="run directory or model folder")
    p.add_argument("--base", action="store_true", help="evaluate the untrained base model (set out= for where results go)")
    p.add_argument("--config", "-c", help="YAML experiment file (with --base)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --base: write the evaluation into an out= folder that holds other files "
                   "(never into a training run); with a model folder: write FOLDER/eval/ although it holds "
                   "files tunelab did not write (tunelab replaces only its own files)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (eval.limit=8, eval.batch_size=16, harness=gsm8k, harness.limit=100, ...)")
    p.set_defaults(handler=cmd_eval)


def harness_reference() -> str:
    """The harness.* keys for --help (config_reference lays out the other sections)."""
    import textwrap

    from tunelab.config import field_help
    from tunelab.config.schema import HarnessConfig

    lines = ["", "", "  [harness]  lm-evaluation-harness (needs tunelab[harness]); set: only the harness runs"]
    for key, tp, help_ in field_help(HarnessConfig, "harness."):
        lines.append(f"  {key} ({tp})")
        lines.extend(textwrap.wrap(help_, 90, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from tunelab.evaluation.evaluate import evaluate_target
    from tunelab.rundir import resolve_target

    from tunelab.config import ConfigError

    target, overrides = split_target(args.target, args.overrides)
    resolved = resolve_target(target, base=args.base, config=args.config, overrides=overrides, command="eval")
    if args.overwrite and resolved.kind not in ("base-model", "model"):
        raise ConfigError(["--overwrite only applies with --base or a model folder (a run's own evaluation "
                           "replaces RUN/eval/)"])
    evaluate_target(resolved, overwrite=args.overwrite)
    return 0
