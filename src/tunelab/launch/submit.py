"""Submitting: training runs, evaluations and sweeps as sbatch jobs, each recorded in ``slurm.json``.

A submission is checked whole before anything is queued (the SLURM settings, the run config, the
run directory's state, jobs of it SLURM still runs), then its scripts are written into the run
directory and submitted in order with ``sbatch --parsable`` (a dependent job gets the id of the
one it waits for; sbatch is run as a command, as there is no SLURM Python API to count on on a
login node). ``dry_run`` prints the scripts and the sbatch commands instead, writing nothing.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from tunelab.config import ConfigError, RunConfig, load_config
from tunelab.launch.quoting import ARRAY_TASK_ID, path_problem, refuse, text_problem
from tunelab.launch.records import JOBS_DIR, RECORD_FILE, log_path, read_records
from tunelab.launch.script import JobSpec, render_script
from tunelab.launch.slurm_config import SlurmConfig, validate_slurm, world_size
from tunelab.launch.status import TERMINAL_STATES, job_states
from tunelab.rundir import RunDir
from tunelab.utils import atomic_write_json, atomic_write_text


class SlurmError(RuntimeError):
    """A SLURM command failed or is missing; the message says what to do."""


@dataclass
class Submission:
    """One job to submit: its script, where it goes and what it waits for."""

    spec: JobSpec
    script: str
    record_dir: Path  # where slurm.json lives
    dependency: Optional[str] = None  # e.g. "afterok:{train}" (a placeholder filled at submit time)
    extra_record: dict = dataclasses.field(default_factory=dict)
    job_id: Optional[str] = None

    def sbatch_argv(self, resolved_dependency: Optional[str] = None) -> list[str]:
        argv = ["sbatch", "--parsable"]
        dep = resolved_dependency or self.dependency
        if dep:
            argv.append(f"--dependency={dep}")
        return argv + [str(self.spec.script_path)]


# --------------------------------------------------------------------------------------------
# sbatch and the records
# --------------------------------------------------------------------------------------------


def _require_sbatch() -> str:
    path = shutil.which("sbatch")
    if path is None:
        raise SlurmError(
            "sbatch was not found on PATH, so this machine cannot submit SLURM jobs. Run the same command with "
            "--dry-run to print the job script, or submit from a cluster login node; on your own Debian/Ubuntu "
            "machine install the client with `apt-get install slurm-client` and point SLURM_CONF at the "
            "cluster's slurm.conf (a local test cluster: ../shared/tools/slurm-local/start.sh)."
        )
    return path


def _sbatch(argv: list[str]) -> tuple[str, Optional[str]]:
    """Run sbatch --parsable; returns (job id, cluster) or raises SlurmError with sbatch's own words."""
    _require_sbatch()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        hint = ""
        err = proc.stderr.strip()
        if "partition" in err.lower():
            hint = "\n(`sinfo -s` lists the partitions you can use)"
        elif "account" in err.lower():
            hint = "\n(`sacctmgr show assoc user=$USER format=account,partition,qos` lists your accounts)"
        raise SlurmError(f"sbatch failed (exit {proc.returncode}): {shlex.join(argv)}\n{err or proc.stdout.strip()}{hint}")
    out = proc.stdout.strip().splitlines()
    m = re.fullmatch(r"(\d+)(?:;(\S+))?", out[-1].strip() if out else "")
    if not m:
        raise SlurmError(f"could not read a job id from sbatch's output {proc.stdout!r} ({shlex.join(argv)})")
    return m.group(1), m.group(2)


def _record(sub: Submission, job_id: str, cluster: Optional[str], argv: list[str], dep: Optional[str]) -> dict:
    """The slurm.json entry of a submitted job (the script text too: it can be resubmitted as it was)."""
    return {
        "job_id": job_id,
        "cluster": cluster,
        "kind": sub.spec.kind,
        "job_name": sub.spec.job_name,
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sbatch": argv,
        "dependency": dep,
        "array": sub.spec.array,
        "log": log_path(sub.spec.log, job_id) if not sub.spec.array else str(sub.spec.log.with_name(
            sub.spec.log.name.replace("%A", job_id))),
        "script_path": str(sub.spec.script_path),
        "script": sub.script,
        **sub.extra_record,
    }


def submit_all(subs: list[Submission], say=print) -> list[Submission]:
    """Write scripts and log folders, submit in order (filling ``{name}`` dependencies), record each job."""
    _require_sbatch()
    ids: dict[str, str] = {}
    for sub in subs:
        sub.spec.log.parent.mkdir(parents=True, exist_ok=True)  # sbatch fails the job if it is missing
        assert sub.spec.script_path is not None
        atomic_write_text(sub.spec.script_path, sub.script)
        os.chmod(sub.spec.script_path, 0o755)
        dep = sub.dependency.format(**ids) if sub.dependency else None
        argv = sub.sbatch_argv(dep)
        try:
            job_id, cluster = _sbatch(argv)
        except SlurmError as exc:
            if ids:  # say what is already queued: it was recorded and runs regardless
                done = ", ".join(f"{kind} job {jid}" for kind, jid in ids.items())
                raise SlurmError(f"{exc}\n(already submitted: {done}; see {sub.record_dir / RECORD_FILE})") from None
            raise
        sub.job_id = job_id
        ids[sub.spec.kind] = job_id
        records = read_records(sub.record_dir)
        records["jobs"].append(_record(sub, job_id, cluster, argv, dep))
        atomic_write_json(sub.record_dir / RECORD_FILE, records)
        log_shown = log_path(sub.spec.log, job_id, "<index>" if sub.spec.array else None)
        say(f"submitted {sub.spec.kind} job {job_id}{f' (array {sub.spec.array})' if sub.spec.array else ''}"
            f"{f' after {dep}' if dep else ''}: log {log_shown}")
    return subs


def print_dry_run(subs: list[Submission], say=print) -> None:
    for sub in subs:
        say(f"# ---- {sub.spec.script_path} (not written: --dry-run) ----")
        say(sub.script.rstrip("\n"))
        dep = sub.dependency.replace("{", "<").replace("}", " job id>") if sub.dependency else None
        say(f"# would run: {shlex.join(sub.sbatch_argv(dep))}")
        say("")


def _active_jobs(record_dir: Path, kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    """(job id, state) of recorded jobs of these kinds that SLURM still runs or queues."""
    if shutil.which("scontrol") is None and shutil.which("squeue") is None:
        return []
    active = []
    for job in read_records(record_dir)["jobs"]:
        if job.get("kind") not in kinds:
            continue
        for st in job_states(job["job_id"]):
            if st.state not in TERMINAL_STATES and st.state != "UNKNOWN":
                active.append((st.job_id, st.state))
    return active


def _say_follow(record_dir: Path, subs: list[Submission], say) -> None:
    first = subs[0]
    log_file = log_path(first.spec.log, first.job_id or "JOBID", "0" if first.spec.array else None)
    say(f"follow: tail -F {shlex.quote(log_file)}   |   tunelab status {shlex.quote(str(record_dir))}   |   "
        f"squeue -j {','.join(s.job_id for s in subs if s.job_id)}")


# --------------------------------------------------------------------------------------------
# The jobs
# --------------------------------------------------------------------------------------------


def _workdir() -> Path:
    """The job's working directory (--chdir): where `tunelab submit` runs, so relative paths mean the same."""
    cwd = Path.cwd().absolute()
    refuse(path_problem("the current directory", str(cwd), "submit from another directory", pattern=False))
    return cwd


def _job_name(kind: str, run_dir: Path, s: SlurmConfig) -> str:
    if s.job_name:
        return s.job_name if kind in ("train", "sweep") else f"{s.job_name}-{kind}"
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", run_dir.name) or "run"
    return f"tl-{kind}-{name}"[:120]


def _eval_slurm(s: SlurmConfig) -> SlurmConfig:
    """Evaluation runs in one process: one node, at most one GPU, nothing to checkpoint."""
    return dataclasses.replace(s, nodes=1, nproc_per_node=1, gpus_per_node=min(1, s.gpus_per_node),
                               gpu_type=s.gpu_type if s.gpus_per_node else None)


def _eval_submission(run_dir: Path, s: SlurmConfig, overrides: list[str], dependency: Optional[str],
                     workdir: Path) -> Submission:
    es = _eval_slurm(s)
    log_dir = Path(s.log_dir).absolute() if s.log_dir else run_dir / JOBS_DIR
    spec = JobSpec(
        kind="eval", title=f"tunelab: evaluate {run_dir}", job_name=_job_name("eval", run_dir, s),
        log=log_dir / "eval-%j.out", workdir=workdir, slurm=es, args=["eval", str(run_dir), *overrides],
        gpus=es.gpus_per_node, script_path=run_dir / JOBS_DIR / "eval.sbatch",
    )
    return Submission(spec, render_script(spec), run_dir, dependency)


def load_train_config(config_file: Optional[str], overrides: list[str], resume: Optional[str]) -> RunConfig:
    """The config of a training submission: ``--resume RUN``'s saved one, else the file and overrides.

    The machine-dependent checks are skipped (``check_env=False``): the login node that submits
    usually has no GPU; the job checks again.
    """
    if resume:
        run = RunDir(resume)
        if not run.is_run:
            raise ConfigError([f"--resume {run.path}: no {RunDir.CONFIG_FILE} there"])
        return run.config([o for o in overrides if not o.startswith("out=")], check_env=False)
    return load_config(config_file, overrides, check_env=False)


def submit_train(cfg: RunConfig, s: SlurmConfig, *, then_eval: bool = False, eval_overrides: list[str] | None = None,
                 resume: bool = False, dry_run: bool = False, say=print) -> list[Submission]:
    """Submit one training run (and optionally its evaluation after it succeeds)."""
    problems = validate_slurm(s, "train")
    world = world_size(s)
    if problems:
        raise ConfigError(problems)
    run = RunDir((Path(cfg.out) if cfg.out else RunDir.default_for(cfg).path).absolute())
    run_dir = run.path
    # The paths and texts are checked as the script renderer checks them (:mod:`.quoting`), before writing.
    refuse(path_problem("out (the run directory)", str(run_dir), "choose an out= folder without them"))
    cfg.out = str(run_dir)
    model = cfg.model.name
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise ConfigError([f"model.name '{model}' does not exist on this machine; the job reads the same path, so "
                           f"it must exist on a file system the compute nodes share"])
    if run.is_trained:
        raise FileExistsError(f"{run_dir} already holds a finished run: choose another out=")
    if run.checkpoints() and not resume:
        raise FileExistsError(
            f"{run_dir} holds checkpoints of an unfinished run: `tunelab submit train --resume {run_dir}` continues it"
        )
    workdir = _workdir()
    log_dir = Path(s.log_dir).absolute() if s.log_dir else run_dir / JOBS_DIR
    spec = JobSpec(
        kind="train", title=f"tunelab: train {cfg.method.name} on {cfg.task.name} -> {run_dir}",
        job_name=_job_name("train", run_dir, s), log=log_dir / "train-%j.out", workdir=workdir, slurm=s,
        run_dir=run_dir, multiprocess=world > 1, gpus=s.gpus_per_node, preemptible=True,
        script_path=run_dir / JOBS_DIR / "train.sbatch",
    )
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world
    subs = [Submission(spec, render_script(spec), run_dir, None, {"world_size": world, "global_batch_size": global_batch})]
    if then_eval:
        subs.append(_eval_submission(run_dir, s, eval_overrides or [], "afterok:{train}", workdir))
    say(f"global batch = {cfg.train.batch_size} per device x {cfg.train.grad_accum} accumulation x {world} "
        f"process(es) = {global_batch} examples per optimizer step")
    if dry_run:
        say(f"# resolved config (would be written to {run.config_file}):")
        say(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).rstrip())
        print_dry_run(subs, say)
        return subs
    _require_sbatch()
    busy = _active_jobs(run_dir, ("train",))
    if busy:
        jobs = ", ".join(f"{j} ({st})" for j, st in busy)
        raise FileExistsError(f"{run_dir} already has a training job in SLURM: {jobs}; `scancel` it or choose another out=")
    run.write_config(cfg)
    submit_all(subs, say)
    _say_follow(run_dir, subs, say)
    return subs


def submit_eval(target: Path, s: SlurmConfig, overrides: list[str], *, dry_run: bool = False,
                say=print) -> list[Submission]:
    """Submit ``tunelab eval RUN overrides`` (the overrides are validated now)."""
    problems = validate_slurm(s, "eval")
    if problems:
        raise ConfigError(problems)
    run = RunDir(target.absolute())
    refuse(path_problem("RUN (the run directory to evaluate)", str(run.path),
                        "rename the run directory without them (mv), then submit its evaluation"),
           *[text_problem(f"override {o!r}", o, "write one key=value per override, on one line") for o in overrides])
    if not run.is_run:
        raise ConfigError([f"'{target}' is not a run directory (no {RunDir.CONFIG_FILE}): submit its training first, "
                           f"or `tunelab submit train ... --then-eval`"])
    run.config(overrides)  # every problem of the overrides now, not in the job
    subs = [_eval_submission(run.path, s, overrides, None, _workdir())]
    if dry_run:
        print_dry_run(subs, say)
        return subs
    submit_all(subs, say)
    _say_follow(run.path, subs, say)
    return subs


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------


def _compress(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8' (sbatch --array syntax)."""
    parts, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)


def _array_point_argv(sw, file: Path, out: Path, first: int) -> list[str]:
    """The point command with the array index for the point: ``sweep FILE --point $SLURM_ARRAY_TASK_ID ...``."""
    from tunelab.experiments import point_command

    point_argv = point_command(sw, first)[1:]  # ["sweep", FILE, "--point", "I", "--out-dir", D]
    i = point_argv.index("--point")
    point_argv[i + 1] = ARRAY_TASK_ID
    point_argv = [str(file) if a == str(sw.path) else a for a in point_argv]
    if "--out-dir" in point_argv:
        point_argv[point_argv.index("--out-dir") + 1] = str(out)
    return point_argv


def _report_submission(sw, out: Path, log_dir: Path, workdir: Path, s: SlurmConfig, say) -> Optional[Submission]:
    """`tunelab report` of the sweep after the whole array (afterany: the report also shows which points failed)."""
    try:
        import tunelab.experiments.report  # noqa: F401
    except ModuleNotFoundError:
        say("note: tunelab.experiments.report is not installed; no report job")
        return None
    rs = dataclasses.replace(_eval_slurm(s), gpus_per_node=0, gpu_type=None)
    rspec = JobSpec(
        kind="report", title=f"tunelab: report of sweep {sw.name}", job_name=_job_name("report", out, s),
        log=log_dir / "report-%j.out", workdir=workdir, slurm=rs,
        args=["report", str(out), "--out", str(out / "report")], script_path=out / JOBS_DIR / "report.sbatch",
    )
    return Submission(rspec, render_script(rspec), out, "afterany:{sweep}")


def submit_sweep(file: Path, s: SlurmConfig, *, out_dir: Optional[str] = None, report: bool = True,
                 dry_run: bool = False, say=print) -> list[Submission]:
    """One array task per pending sweep point, then the report after the array."""
    from tunelab.experiments import load_sweep, pending_indices

    problems = validate_slurm(s, "sweep")
    if problems:
        raise ConfigError(problems)
    file = file.absolute()
    sw = load_sweep(file, out_dir=out_dir)
    out = Path(sw.out_dir).absolute()
    refuse(path_problem("the sweep's out_dir", str(out), "choose an out_dir (or --out-dir) without them"),
           text_problem("the sweep file's path", str(file), "move or rename the sweep file"))
    pending = pending_indices(sw)
    if not pending:
        say(f"sweep '{sw.name}': every point is done ({len(sw.points)} points in {out}); nothing to submit")
        return []
    array = _compress(pending) + (f"%{s.array_parallelism}" if s.array_parallelism else "")
    workdir = _workdir()
    log_dir = Path(s.log_dir).absolute() if s.log_dir else out / JOBS_DIR
    spec = JobSpec(
        kind="sweep", title=f"tunelab: sweep {sw.name} ({len(pending)} of {len(sw.points)} points) -> {out}",
        job_name=_job_name("sweep", out, s), log=log_dir / "point-%A_%a.out", workdir=workdir, slurm=s,
        args=_array_point_argv(sw, file, out, pending[0]), array=array, gpus=min(1, s.gpus_per_node),
        preemptible=True, script_path=out / JOBS_DIR / "sweep.sbatch",
    )
    names = {str(p.index): p.name for p in sw.points}
    subs = [Submission(spec, render_script(spec), out, None,
                       {"sweep_file": str(file), "points": {str(i): names[str(i)] for i in pending}})]
    report_sub = _report_submission(sw, out, log_dir, workdir, s, say) if report else None
    if report_sub is not None:
        subs.append(report_sub)
    say(f"sweep '{sw.name}': {len(pending)} pending point(s) of {len(sw.points)}: array {array}")
    if dry_run:
        print_dry_run(subs, say)
        return subs
    _require_sbatch()
    busy = _active_jobs(out, ("sweep",))
    if busy:
        jobs = ", ".join(f"{j} ({st})" for j, st in busy)
        raise FileExistsError(f"sweep '{sw.name}' already has array tasks in SLURM: {jobs}; wait for them "
                              f"(tunelab status {out}) or `scancel` them before submitting again")
    out.mkdir(parents=True, exist_ok=True)
    submit_all(subs, say)
    _say_follow(out, subs, say)
    say(f"points: tunelab sweep {shlex.quote(str(file))} --list --out-dir {shlex.quote(str(out))}")
    return subs
