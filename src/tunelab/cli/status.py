"""``tunelab status RUN [--wait]``: the command line of :mod:`tunelab.launch.status`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tunelab.config import ConfigError
from tunelab.launch.records import RECORD_FILE
from tunelab.launch.status import format_status, run_status


def cmd_status(args) -> int:
    target = Path(args.target)
    if not target.exists():
        raise ConfigError([f"'{target}' does not exist: pass a run directory or a sweep's out_dir"])
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
        info = run_status(target)
        done = all(j["finished"] for j in info["jobs"])
        if not args.wait or done or not info["jobs"]:
            break
        if deadline is not None and time.monotonic() > deadline:
            print(format_status(info) if not args.json else json.dumps(info, indent=2, default=str))
            print(f"tunelab status: still not finished after {args.timeout} s", file=sys.stderr)
            return 3
        time.sleep(args.interval)
    print(json.dumps(info, indent=2, default=str) if args.json else format_status(info))
    if args.wait:
        return 0 if all(j["state"] == "COMPLETED" for j in info["jobs"]) else 1
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "status", help="a run's progress and the SLURM state of its jobs",
        description="Show a run directory's (or a sweep out_dir's) progress and the state of the SLURM jobs "
        f"recorded in its {RECORD_FILE}; a failed job is shown with its log path and the end of its log.",
    )
    p.add_argument("target", help="run directory or sweep out_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--wait", action="store_true", help="wait until every recorded job has finished; exit 0 if all completed, else 1")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds (exit 3)")
    p.add_argument("--interval", type=float, default=5.0, help="with --wait: seconds between polls")
    p.set_defaults(handler=cmd_status)
