"""``tunelab sweep FILE``: list, dry-run or run the points of a sweep file (:mod:`tunelab.experiments`)."""

from __future__ import annotations

import argparse
import json
import shlex

from tunelab.experiments import Interrupted, Sweep, load_sweep, point_rows, point_status, run_sweep, stage_commands
from tunelab.experiments.spec import describe_overrides
from tunelab.train.signals import PREEMPT_EXIT_CODE
from tunelab.utils import log


def _print_list(sweep: Sweep, indices: list[int] | None, as_json: bool) -> None:
    rows = point_rows(sweep, indices)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    width = max([len(r["name"]) for r in rows] + [4])
    print(f"sweep '{sweep.name}' ({sweep.path}): {len(sweep.points)} points in {sweep.out_dir}")
    print(f"{'#':>4}  {'name':<{width}}  {'status':<8}  detail")
    for r in rows:
        print(f"{r['index']:>4}  {r['name']:<{width}}  {r['status']:<8}  {r['detail']}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("  " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


def _print_dry_run(sweep: Sweep, indices: list[int] | None) -> None:
    selected = [sweep.point(i) for i in indices] if indices else sweep.points
    print(f"sweep '{sweep.name}': would run in {sweep.out_dir} (nothing is written by --dry-run)")
    for p in selected:
        st = point_status(sweep, p)
        if st.state == "done":
            print(f"[{p.index}] {p.name}: done, skipped")
            continue
        print(f"[{p.index}] {p.name}: {st.state}{': ' + st.detail if st.detail else ''}")
        print(f"    overrides: {describe_overrides(p.overrides)}")
        for stage in stage_commands(p):
            print(f"    {stage.name}: {shlex.join(['tunelab', *stage.argv])}")


def cmd_sweep(args) -> int:
    sweep = load_sweep(args.file, out_dir=args.out_dir)
    indices = sorted(set(args.point)) if args.point else None
    if indices:
        for i in indices:
            sweep.point(i)  # range check with a clear message
    if args.list:
        _print_list(sweep, indices, args.json)
        return 0
    if args.dry_run:
        _print_dry_run(sweep, indices)
        return 0
    try:
        summary = run_sweep(sweep, indices, in_process=args.in_process, echo=args.verbose, say=log.info)
    except Interrupted as exc:
        log.warning(f"sweep stopped: {exc}; run the same command again to resume")
        return PREEMPT_EXIT_CODE
    except OSError as exc:  # the sweep's own files (locks, bookkeeping) under out_dir
        if exc.errno is None:
            raise  # tunelab's own message, which names its fix
        where = exc.filename or sweep.out_dir
        raise RuntimeError(f"cannot write {where}: {exc.strerror or exc}: give the sweep a writable folder "
                           f"with free space (--out-dir DIR, or out_dir: in {sweep.path}); finished points are kept"
                           ) from None
    if summary.counts["done"] or summary.counts["skipped"]:
        log.info(f"report: tunelab report {sweep.out_dir} --out {sweep.out_dir}/report")
    return 0 if summary.ok else 1


def add_cli(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of runs (train + eval each point), resumable",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every point of a sweep file that is not finished yet, one after another: train, then "
        "evaluate (baseline points evaluate the untrained model). Finished points are skipped; failed points "
        "are recorded in RUN/FAILED and retried next time. See 'Experiments' in README.md for the file format.",
        epilog="examples:\n"
        "  tunelab sweep configs/sweeps/cpu-smollm2-gsm8k.yaml --list\n"
        "  tunelab sweep configs/sweeps/cpu-smollm2-gsm8k.yaml\n"
        "  tunelab sweep configs/sweeps/cpu-smollm2-gsm8k.yaml --point 3     # one point (a job-array task)\n"
        "  tunelab report runs/cpu-smollm2-gsm8k --out runs/cpu-smollm2-gsm8k/report\n",
    )
    p.add_argument("file", help="sweep YAML file")
    p.add_argument("--list", action="store_true", help="show the points: index, run name, status (done/failed/pending)")
    p.add_argument("--json", action="store_true", help="with --list: machine-readable output")
    p.add_argument("--dry-run", action="store_true", help="print what would run (commands per point) and exit")
    p.add_argument("--point", type=int, action="append", metavar="I",
                   help="only point I (repeatable); for job arrays: --point $SLURM_ARRAY_TASK_ID")
    p.add_argument("--out-dir", help="folder of the run directories (overrides the file's out_dir)")
    p.add_argument("--in-process", action="store_true",
                   help="run each point inside this process instead of a fresh `python -m tunelab` (no isolation; "
                   "CPU peak memory then accumulates across points)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also stream each command's output here (it always goes to RUN/sweep.log)")
    p.set_defaults(handler=cmd_sweep)
