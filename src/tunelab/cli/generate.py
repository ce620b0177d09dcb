"""``tunelab generate``: the argparse side (flags, their checks) calling :mod:`tunelab.evaluation.generate`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tunelab.cli.common import split_target
from tunelab.config import ConfigError
from tunelab.evaluation.engine import DecodeOptions, Generator
from tunelab.evaluation.generate import interactive, prepare_batch, run_batch
from tunelab.rundir import resolve_target

_FIELD_HELP = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(DecodeOptions)}


def add_cli(sub) -> None:
    """Add the ``generate`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "generate",
        help="use a run (or the base model): one prompt, a JSONL file, or interactively",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate with a run directory (adapter or full checkpoint applied as eval applies it), a "
        "merged/plain HF folder, or --base. The prompt is formatted with the run's task template unless --raw; "
        "decoding is greedy with the task's stopping rule unless told otherwise, so completions equal eval's.",
        epilog="examples:\n"
        "  tunelab generate RUN --prompt \"Natalia sold clips to 48 of her friends in April, ...\"\n"
        "  tunelab generate RUN --input questions.jsonl --output answers.jsonl\n"
        "  tunelab generate RUN --interactive\n"
        "  tunelab generate --base task=gsm8k --prompt \"...\"\n"
        "key=value overrides (eval.batch_size=8, model.device=cpu) go right after RUN.",
    )
    p.add_argument("target", nargs="?", metavar="RUN", help="run directory, merged/HF model folder (omit with --base)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", "-p", help="one prompt; the answer is streamed to stdout ('-' reads it from stdin)")
    mode.add_argument("--input", "-i", type=Path, metavar="IN.jsonl", help="JSONL file of inputs (batch mode, resumable)")
    mode.add_argument("--interactive", action="store_true", help="prompt loop: end a prompt with an empty line, Ctrl-D quits")
    p.add_argument("--output", "-o", type=Path, metavar="OUT.jsonl", help="batch mode output (lines: id, prompt, completion, extracted)")
    p.add_argument("--field", help="--input field holding the user's text (formatted with the task template); "
                   "default: the task's own fields (gsm8k: question; with --raw: prompt)")
    p.add_argument("--id-field", help="--input field holding the row id (default: the task's task.id_field, else 'id'; "
                   "rows without it are numbered by row index, as eval numbers them)")
    p.add_argument("--overwrite", action="store_true", help="start --output afresh instead of resuming it "
                   "(also replaces a file that tunelab generate did not write)")
    p.add_argument("--base", action="store_true", help="the untrained base model of the config (task=NAME model=...)")
    p.add_argument("--config", "-c", help="YAML experiment file (with --base)")
    p.add_argument("--raw", action="store_true", help="use the text as the whole prompt (no task template, no task stopping rule)")
    p.add_argument("--chat", action="store_true", help="chat format for this call: the task prompt as the user turn of the "
                   "tokenizer's chat template (task.chat_template, task.system_prompt apply); a run trained with "
                   "task.prompt_format=chat needs no flag")
    p.add_argument("--max-new-tokens", type=int, help=_FIELD_HELP["max_new_tokens"])
    p.add_argument("--temperature", "-t", type=float, default=0.0, help=_FIELD_HELP["temperature"])
    p.add_argument("--top-p", type=float, help=_FIELD_HELP["top_p"])
    p.add_argument("--top-k", type=int, help=_FIELD_HELP["top_k"])
    p.add_argument("--stop", action="append", default=[], metavar="STR", help=_FIELD_HELP["stop"])
    p.add_argument("--seed", type=int, help=_FIELD_HELP["seed"])
    p.add_argument("--task-stop", action=argparse.BooleanOptionalAction, default=None, help=_FIELD_HELP["task_stop"])
    p.add_argument("--batch-size", type=int, help=_FIELD_HELP["batch_size"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar in batch mode")
    p.add_argument("overrides", nargs="*", help="key=value overrides (eval.batch_size=8, model.device=cpu, ...)")
    p.set_defaults(handler=cmd_generate)


def cmd_generate(args) -> int:
    target, overrides = split_target(args.target, args.overrides)
    options = DecodeOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        stop=list(args.stop), seed=args.seed, task_stop=args.task_stop, batch_size=args.batch_size,
    )
    problems = options.problems()
    if args.input is not None and args.output is None:
        problems.append("--input needs --output OUT.jsonl (where the completions go; rerunning resumes it)")
    if args.input is None and (args.output is not None or args.field or args.overwrite):
        problems.append("--output/--field/--overwrite only apply with --input")
    if args.input is not None and args.output is not None and args.input.resolve() == args.output.resolve():
        problems.append("--output must differ from --input")
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        problems.append("--prompt is empty: pass the text to complete (e.g. --prompt \"What is 7*6?\")")
    if problems:
        raise ConfigError(problems)
    resolved = resolve_target(target, base=args.base, config=args.config, overrides=overrides, command="generate")
    gen = Generator(resolved, options, raw=args.raw, chat=args.chat)
    if args.input is not None:
        # input and earlier output are checked before the (slow) model load
        job = prepare_batch(gen, args.input, args.output, field=args.field, id_field=args.id_field,
                            overwrite=args.overwrite)
        try:
            run_batch(gen, job, progress=not args.no_progress)
        except KeyboardInterrupt:
            print(f"\ninterrupted: completed lines are in {args.output}; run the same command again to resume",
                  file=sys.stderr)
            return 130
        return 0
    if args.interactive:
        return _interactive(gen)
    gen.load()
    try:
        gen.complete(gen.prompt_for_text(prompt), stream=True)
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def _interactive(gen: Generator) -> int:
    """The prompt loop; Ctrl-C at any point, the model's loading included, ends it cleanly."""
    try:
        gen.load()
        return interactive(gen)
    except KeyboardInterrupt:
        print("", file=sys.stderr, flush=True)
        return 0
