"""``tunelab merge``: the argparse side; :func:`tunelab.merge.merge_run` does the work.

The library is imported in the handler: building the parser (any command's --help) loads no torch.
"""

from __future__ import annotations


def add_cli(sub) -> None:
    """Add the ``merge`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "merge", help="fold the trained adapter into the base weights -> RUN/merged/",
        description="Write a plain Hugging Face checkpoint (safetensors + tokenizer) after checking that the "
        "merged model's logits equal the adapter model's (refuses otherwise).",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="output folder (default RUN/merged): new, empty, or a merged folder tunelab made; "
                   "never the run itself or one of its own folders")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out folder that holds other files (only the merge's own files are replaced)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (e.g. model.device=cpu)")
    p.set_defaults(handler=cmd_merge)


def cmd_merge(args) -> int:
    from pathlib import Path

    from tunelab.config import ConfigError
    from tunelab.merge import merge_run
    from tunelab.rundir import RunDir

    run = RunDir(args.run)
    if not run.is_run:
        raise ConfigError([f"'{run.path}' is not a run directory (no {RunDir.CONFIG_FILE})"])
    merge_run(run.config(args.overrides), run.path, Path(args.out) if args.out else None, overwrite=args.overwrite)
    return 0
