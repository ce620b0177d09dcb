"""Launchers: submit runs, evaluations and sweeps to SLURM, and follow them.

``tunelab submit train|eval|sweep ... [--slurm.KEY=VALUE ...] [--dry-run]`` renders one sbatch
script (``templates/sbatch.sh.j2``) from the run's config and the SLURM settings of
:class:`SlurmConfig`, writes it with the resolved run config into the run directory and submits it
with ``sbatch --parsable``. The job runs the same ``tunelab`` CLI on that config file
(``tunelab train --config RUN/config.yaml``, or ``--resume RUN`` when a checkpoint exists), so a
job is reproducible by hand and hyperparameters never travel through environment variables.

What a submission writes (nothing with ``--dry-run``):

- ``RUN/config.yaml``: the resolved, validated config (``out`` is absolute);
- ``RUN/slurm/<kind>.sbatch``: the rendered script (``sbatch`` it again to resubmit);
- ``RUN/slurm/<kind>-<jobid>.out``: the job's log (stdout and stderr; a requeued job appends);
- ``RUN/slurm.json``: every job submitted for the run: id, kind, dependency, log, script text.

A sweep (:mod:`tunelab.sweep`) becomes one array job over its pending points
(``tunelab sweep FILE --point $SLURM_ARRAY_TASK_ID``, at most ``slurm.array_parallelism`` at once)
and a report job that runs after the array (``--dependency=afterany``); its records go to
``<sweep out_dir>/slurm.json``.

Preemption: jobs request ``--signal=B:USR1@<slurm.signal_seconds>`` and ``--requeue``. The batch
shell forwards USR1 to tunelab (through srun and torchrun for multi-process jobs), the trainer
checkpoints after the current optimizer step and exits with 143, and the script calls
``scontrol requeue``; the requeued job starts with ``tunelab train --resume RUN``.

Multi-process: ``slurm.nodes`` x ``slurm.nproc_per_node`` processes (``nproc_per_node`` defaults
to ``slurm.gpus_per_node``) are started by ``srun`` (one task per node) running
``torchrun --nnodes $SLURM_NNODES --rdzv_backend c10d``; the trainer picks up the torchrun
environment (DDP, NCCL on GPUs, gloo on CPU).

``tunelab status RUN`` shows the run's progress and the SLURM state of its recorded jobs
(``scontrol``/``squeue`` while SLURM remembers the job, then ``sacct``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from tunelab.config import ConfigError, RunConfig, field_help, load_config, opt, save_config
from tunelab.utils import atomic_write_json, atomic_write_text

__all__ = [
    "SlurmConfig",
    "SlurmError",
    "JobState",
    "parse_time",
    "load_slurm_config",
    "validate_slurm",
    "render_script",
    "submit_train",
    "submit_eval",
    "submit_sweep",
    "job_states",
    "run_status",
    "add_cli",
]

PREEMPT_EXIT_CODE = 143  # tunelab.train's exit code after a checkpoint on SIGTERM/SIGUSR1
RECORD_FILE = "slurm.json"
#: Job states after which SLURM will not run the job again by itself.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED",
})


class SlurmError(RuntimeError):
    """A SLURM command failed or is missing; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class SlurmConfig:
    """SLURM settings of a submission (``--slurm.KEY=VALUE`` or a ``--slurm-config`` YAML file)."""

    account: Optional[str] = opt(None, "Account to charge (#SBATCH --account; the original scripts' -A).")
    partition: Optional[str] = opt(None, "Partition(s), comma-separated (#SBATCH --partition; -p).")
    qos: Optional[str] = opt(None, "Quality of service (#SBATCH --qos).")
    time: str = opt(
        "01:00:00",
        "Time limit (#SBATCH --time): MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS. A training job "
        "checkpoints and requeues itself shortly before it (slurm.signal_seconds), so a limit shorter than "
        "the run is fine.",
    )
    nodes: int = opt(1, "Nodes (#SBATCH --nodes); >1 starts one torchrun per node through srun.")
    gpus_per_node: int = opt(0, "GPUs per node (#SBATCH --gpus-per-node=[TYPE:]N); 0 = CPU job.")
    gpu_type: Optional[str] = opt(None, "GPU type for --gpus-per-node=TYPE:N (e.g. A100, A40); null = any.")
    nproc_per_node: Optional[int] = opt(
        None, "Training processes per node (DDP ranks); default gpus_per_node, or 1 on a CPU job. "
        "Several on a CPU job run DDP over gloo."
    )
    cpus_per_task: Optional[int] = opt(
        None, "CPU cores for the job on each node (#SBATCH --cpus-per-task; one task per node runs all "
        "processes of that node)."
    )
    mem: Optional[str] = opt(None, "Memory per node (#SBATCH --mem): a number with an optional K, M, G or T suffix.")
    constraint: Optional[str] = opt(None, "Node features (#SBATCH --constraint), e.g. 'a100&ib'.")
    job_name: Optional[str] = opt(None, "Job name (#SBATCH --job-name); default tl-<kind>-<run directory name>.")
    extra: list[str] = opt(
        factory=list,
        help="More #SBATCH options, one per item, as sbatch spells them (e.g. ['--mail-type=END', "
        "'--exclusive']). Options tunelab sets itself (output, job-name, array, signal, ...) are refused: "
        "use the slurm.* key instead.",
    )
    setup: list[str] = opt(
        factory=list,
        help="Shell lines run before tunelab, e.g. ['module load Python/3.11', 'source ~/venvs/tl/bin/activate']. "
        "They are shell code by design and are written as given.",
    )
    python: Optional[str] = opt(
        None, "Python interpreter that runs `-m tunelab` in the job; default the one running `tunelab submit` "
        "(right on a shared file system). Set 'python' when slurm.setup activates the environment."
    )
    log_dir: Optional[str] = opt(None, "Folder of the job logs; default RUN/slurm (a sweep: <out_dir>/slurm).")
    signal_seconds: int = opt(
        120, "Send USR1 this many seconds before the time limit (#SBATCH --signal=B:USR1@N): tunelab "
        "checkpoints and the job requeues. 0 = no warning signal."
    )
    requeue: bool = opt(True, "Allow the job to be requeued (#SBATCH --requeue) after preemption.")
    max_requeues: int = opt(5, "A preempted job requeues itself at most this many times (SLURM_RESTART_COUNT).")
    array_parallelism: Optional[int] = opt(None, "Sweep arrays: at most this many points run at once (--array=...%N).")
    master_addr: Optional[str] = opt(
        None, "Rendezvous host of multi-process jobs; default the first node of the allocation "
        "(set 127.0.0.1 on a one-machine test cluster whose node names do not resolve)."
    )
    master_port: int = opt(29500, "Rendezvous TCP port of multi-process jobs.")


#: sbatch options tunelab writes itself; `extra` must not repeat them.
MANAGED_OPTIONS = {
    "--job-name": "job_name", "-J": "job_name", "--output": "log_dir", "-o": "log_dir", "--error": "log_dir",
    "-e": "log_dir", "--account": "account", "-A": "account", "--partition": "partition", "-p": "partition",
    "--qos": "qos", "-q": "qos", "--time": "time", "-t": "time", "--nodes": "nodes", "-N": "nodes",
    "--gpus-per-node": "gpus_per_node", "--cpus-per-task": "cpus_per_task", "-c": "cpus_per_task",
    "--mem": "mem", "--constraint": "constraint", "-C": "constraint", "--signal": "signal_seconds",
    "--requeue": "requeue", "--no-requeue": "requeue", "--array": "(set by `tunelab submit sweep`)",
    "-a": "(set by `tunelab submit sweep`)", "--dependency": "(set by --then-eval / the sweep report)",
    "-d": "(set by --then-eval / the sweep report)", "--chdir": "(the directory you submit from)",
    "-D": "(the directory you submit from)", "--open-mode": "(always append: a requeued job continues its log)",
    "--ntasks-per-node": "nproc_per_node", "--parsable": "(tunelab passes it)", "--wrap": "(not a script option)",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9_.+@=:/-]+$")  # account, qos, job name, gpu type
_PARTITION_RE = re.compile(r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$")
_CONSTRAINT_RE = re.compile(r"^[A-Za-z0-9_.&|*\[\]():,!-]+$")
_MEM_RE = re.compile(r"^[0-9]+[KMGT]?$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 03:00:00 or 1-12:00:00)"


def parse_time(text: str) -> int:
    """SLURM's --time formats to seconds; raises ValueError naming the formats."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ValueError(f"slurm.time '{text}' is not a SLURM time: use {_TIME_FORMATS}")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, s = int(a), int(b or 0), int(c or 0)
        d = int(days)
    elif c is not None:  # HH:MM:SS
        d, h, mi, s = 0, int(a), int(b), int(c)
    elif b is not None:  # MM:SS
        d, h, mi, s = 0, 0, int(a), int(b)
    else:  # MM
        d, h, mi, s = 0, 0, int(a), 0
    if (days is not None or c is not None) and (mi > 59 or s > 59) or (days is None and c is None and b is not None and s > 59):
        raise ValueError(f"slurm.time '{text}' has minutes or seconds above 59: use {_TIME_FORMATS}")
    if days is not None and h > 23:
        raise ValueError(f"slurm.time '{text}' has {h} hours after the day count: use D-HH:MM:SS with HH < 24")
    total = ((d * 24 + h) * 60 + mi) * 60 + s
    if total <= 0:
        raise ValueError(f"slurm.time '{text}' is zero: give the job a positive time limit ({_TIME_FORMATS})")
    return total


def _clean_path_problem(key: str, value: str) -> Optional[str]:
    """sbatch directives take paths in double quotes: refuse what cannot be written there."""
    bad = [c for c in ('"', "\n", "\r", "\0", "%", "\\") if c in value]
    if bad:
        return (f"{key} '{value}' contains {', '.join(repr(c) for c in bad)}, which cannot appear in an #SBATCH "
                f"path (SLURM expands % patterns): choose a folder without them")
    return None


def validate_slurm(s: SlurmConfig, kind: str = "train") -> list[str]:
    """Every problem of the SLURM settings, each with its fix (empty when fine)."""
    p: list[str] = []
    checks = [("account", _NAME_RE), ("qos", _NAME_RE), ("job_name", _NAME_RE), ("gpu_type", _NAME_RE),
              ("partition", _PARTITION_RE), ("constraint", _CONSTRAINT_RE), ("master_addr", _HOST_RE)]
    for key, rx in checks:
        value = getattr(s, key)
        if value is not None and not rx.fullmatch(value):
            p.append(
                f"slurm.{key} '{value}' contains characters SLURM does not allow there (spaces, quotes, shell "
                f"metacharacters or newlines): use the plain name as `sinfo`/`sacctmgr` show it"
            )
    try:
        limit = parse_time(s.time)
    except ValueError as exc:
        p.append(str(exc))
        limit = None
    if s.nodes < 1:
        p.append(f"slurm.nodes must be >= 1, got {s.nodes}")
    if s.gpus_per_node < 0:
        p.append(f"slurm.gpus_per_node must be >= 0, got {s.gpus_per_node}")
    if s.gpu_type is not None and s.gpus_per_node == 0:
        p.append(f"slurm.gpu_type={s.gpu_type} needs slurm.gpus_per_node >= 1")
    if s.nproc_per_node is not None and s.nproc_per_node < 1:
        p.append(f"slurm.nproc_per_node must be >= 1, got {s.nproc_per_node}")
    elif s.nproc_per_node is not None and 0 < s.gpus_per_node < s.nproc_per_node:
        p.append(
            f"slurm.nproc_per_node={s.nproc_per_node} is more than slurm.gpus_per_node={s.gpus_per_node}: two ranks "
            f"would share a GPU (NCCL refuses that); use at most one process per GPU"
        )
    if s.cpus_per_task is not None and s.cpus_per_task < 1:
        p.append(f"slurm.cpus_per_task must be >= 1, got {s.cpus_per_task}")
    if s.mem is not None and not _MEM_RE.fullmatch(str(s.mem)):
        p.append(f"slurm.mem '{s.mem}' must be a number with an optional K, M, G or T suffix (e.g. 32G)")
    if s.signal_seconds < 0:
        p.append(f"slurm.signal_seconds must be >= 0, got {s.signal_seconds}")
    elif limit is not None and s.signal_seconds and s.signal_seconds >= limit:
        p.append(
            f"slurm.signal_seconds={s.signal_seconds} is not shorter than slurm.time={s.time} ({limit} s): the "
            f"checkpoint signal would come at the start; lower slurm.signal_seconds or raise slurm.time"
        )
    if s.max_requeues < 0:
        p.append(f"slurm.max_requeues must be >= 0, got {s.max_requeues}")
    if s.array_parallelism is not None and s.array_parallelism < 1:
        p.append(f"slurm.array_parallelism must be >= 1, got {s.array_parallelism}")
    if not 1 <= s.master_port <= 65535:
        p.append(f"slurm.master_port must be a TCP port (1-65535), got {s.master_port}")
    if s.log_dir is not None:
        problem = _clean_path_problem("slurm.log_dir", s.log_dir)
        if problem:
            p.append(problem)
    for item in s.extra:
        text = str(item)
        if not text.startswith("-") or any(ch.isspace() for ch in text) or '"' in text or "'" in text:
            p.append(
                f"slurm.extra item {text!r} must be one sbatch option without spaces or quotes, e.g. "
                f"'--mail-type=END' (one list item per option)"
            )
            continue
        name = text.split("=", 1)[0]
        if name in MANAGED_OPTIONS:
            p.append(f"slurm.extra {text!r}: tunelab sets {name} itself; use slurm.{MANAGED_OPTIONS[name]}"
                     if not MANAGED_OPTIONS[name].startswith("(") else
                     f"slurm.extra {text!r}: tunelab sets {name} itself {MANAGED_OPTIONS[name]}")
    for line in s.setup:
        if "\0" in str(line):
            p.append("slurm.setup lines must not contain NUL characters")
    if s.python is not None and ("\n" in s.python or not s.python.strip()):
        p.append(f"slurm.python must be one interpreter path or name, got {s.python!r}")
    if kind == "eval" and s.nodes > 1:
        p.append("evaluation runs in one process: use slurm.nodes=1 for `tunelab submit eval`")
    if kind == "sweep" and (s.nodes > 1 or (s.nproc_per_node or 1) > 1 or s.gpus_per_node > 1):
        p.append(
            "sweep points run one process each (tunelab sweep --point I): use slurm.nodes=1 and at most one GPU "
            "per array task (slurm.gpus_per_node<=1, slurm.nproc_per_node=1); submit multi-GPU runs with "
            "`tunelab submit train`"
        )
    return p


class _SlurmYamlLoader(yaml.SafeLoader):
    """YAML without sexagesimal numbers: ``time: 03:00:00`` stays the string SLURM expects (not 10800)."""


_SlurmYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SlurmYamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))


def _slurm_value(text: str) -> Any:
    """A command-line value read like the YAML file (8 -> int, true -> bool, [a, b] -> list)."""
    try:
        return yaml.load(text, Loader=_SlurmYamlLoader) if text != "" else ""
    except yaml.YAMLError:
        return text


def load_slurm_config(file: str | Path | None, items: dict[str, Any], kind: str = "train") -> SlurmConfig:
    """Defaults <- YAML file (a mapping of SlurmConfig keys, or one under ``slurm:``) <- ``--slurm.KEY`` items.

    Raises ConfigError with every problem: unknown keys, wrong types and invalid values together.
    """
    from tunelab.config import build_dataclass  # the run config's typed builder: same coercion and messages

    raw: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError([f"--slurm-config '{path}' does not exist"])
        try:
            loaded = yaml.load(path.read_text(), Loader=_SlurmYamlLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"--slurm-config '{path}' is not valid YAML: {exc}"]) from None
        if isinstance(loaded, dict) and set(loaded) == {"slurm"}:
            loaded = loaded["slurm"]
        if not isinstance(loaded, dict):
            raise ConfigError([f"--slurm-config '{path}' must hold a mapping of slurm keys (account: ..., time: ...)"])
        raw.update(loaded)
    raw.update(items)
    # Names that look like numbers (an account "12345", a qos "1") are still names.
    hints = typing.get_type_hints(SlurmConfig)
    for key, value in list(raw.items()):
        if key in hints and str in typing.get_args(hints[key]) + (hints[key],) and isinstance(value, int) \
                and not isinstance(value, bool):
            raw[key] = str(value)
    problems: list[str] = []
    cfg = build_dataclass(SlurmConfig, raw, "slurm", problems)
    problems.extend(validate_slurm(cfg, kind))
    if problems:
        raise ConfigError(problems)
    return cfg


def world_size(s: SlurmConfig) -> int:
    return s.nodes * nproc_per_node(s)


def nproc_per_node(s: SlurmConfig) -> int:
    if s.nproc_per_node is not None:
        return s.nproc_per_node
    return max(1, s.gpus_per_node)


def apply_global_batch(cfg: RunConfig, world: int, global_batch: Optional[int]) -> list[str]:
    """Keep the global batch (batch_size x grad_accum x world) fixed by choosing grad_accum.

    The config's ``train.batch_size`` is per device, so the global batch grows with the number of
    processes; ``--global-batch-size N`` holds it at N (the same optimisation as on one device).
    """
    if global_batch is None:
        return []
    b = cfg.train.batch_size
    if global_batch < 1:
        return [f"--global-batch-size must be >= 1, got {global_batch}"]
    if global_batch % (b * world):
        ok = [n * b * world for n in range(1, 4)]
        return [
            f"--global-batch-size {global_batch} is not divisible by train.batch_size {b} x world size {world} "
            f"= {b * world} (global batch = per-device batch x grad_accum x processes): choose a multiple of "
            f"{b * world} (e.g. {', '.join(map(str, ok))}), or change train.batch_size or the number of processes"
        ]
    cfg.train.grad_accum = global_batch // (b * world)
    return []


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass
class JobSpec:
    """Everything one sbatch script needs (built by the submit functions, rendered by the template)."""

    kind: str  # train | eval | sweep | report
    title: str
    job_name: str
    log: Path  # path pattern with %j (or %A_%a)
    workdir: Path
    slurm: SlurmConfig
    args: list[str] = dataclasses.field(default_factory=list)  # tunelab argv (not train)
    run_dir: Optional[Path] = None  # train
    array: Optional[str] = None  # e.g. "0-2%2"
    multiprocess: bool = False
    gpus: int = 0
    preemptible: bool = False
    script_path: Optional[Path] = None


def _python(s: SlurmConfig) -> str:
    return s.python or sys.executable


def _torchrun_supports(option: str) -> bool:
    try:
        from torch.distributed.run import get_args_parser

        return any(option in a.option_strings for a in get_args_parser()._actions)
    except Exception:  # noqa: BLE001 - an old torch without the parser: leave the option out
        return False


def _directives(spec: JobSpec) -> list[str]:
    s = spec.slurm
    d = [f"--job-name={spec.job_name}", f'--output="{spec.log}"', "--open-mode=append", f'--chdir="{spec.workdir}"']
    for key, flag in (("account", "--account"), ("partition", "--partition"), ("qos", "--qos")):
        if getattr(s, key):
            d.append(f"{flag}={getattr(s, key)}")
    d.append(f"--time={s.time}")
    d.append(f"--nodes={s.nodes if spec.multiprocess else 1}")
    d.append("--ntasks-per-node=1")
    if s.cpus_per_task:
        d.append(f"--cpus-per-task={s.cpus_per_task}")
    if spec.gpus:
        d.append(f"--gpus-per-node={s.gpu_type + ':' if s.gpu_type else ''}{spec.gpus}")
    if s.mem:
        d.append(f"--mem={s.mem}")
    if s.constraint:
        d.append(f"--constraint={s.constraint}")
    if spec.preemptible and s.signal_seconds:
        d.append(f"--signal=B:USR1@{s.signal_seconds}")
    d.append("--requeue" if s.requeue else "--no-requeue")
    if spec.array:
        d.append(f"--array={spec.array}")
    d.extend(str(x) for x in s.extra)
    return d


def render_script(spec: JobSpec) -> str:
    """The sbatch script of ``spec`` (Jinja2 template ``templates/sbatch.sh.j2``)."""
    import jinja2

    from tunelab import __version__

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tunelab", "templates"), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False,
    )
    s = spec.slurm
    master = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'  # first node of the allocation
    shutdown = None
    if spec.multiprocess and _torchrun_supports("--shutdown_timeout"):
        # Workers get this long to finish the step and write the checkpoint before torchrun kills them.
        shutdown = max(30, s.signal_seconds - 20) if s.signal_seconds else 60
    text = env.get_template("sbatch.sh.j2").render(
        title=spec.title,
        kind=spec.kind,
        created=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        version=__version__,
        resubmit_note=(f"Resubmit with: sbatch {shlex.quote(str(spec.script_path))}" if spec.script_path and spec.kind == "train" else ""),
        directives=_directives(spec),
        setup=[str(line) for line in s.setup],
        python=shlex.quote(_python(s)),
        multiprocess=spec.multiprocess,
        nodes=s.nodes,
        nproc=nproc_per_node(s),
        cpus=s.cpus_per_task,
        master_addr=shlex.quote(s.master_addr) if s.master_addr else master,
        master_port=s.master_port,
        shutdown_timeout=shutdown,
        run_dir=shlex.quote(str(spec.run_dir)) if spec.run_dir else "",
        args=shlex.join(spec.args) if spec.args else "",
        preemptible=spec.preemptible,
        signal_seconds=s.signal_seconds,
        max_requeues=s.max_requeues,
    )
    # The array index must expand in the job: it is the only unquoted word tunelab writes.
    return text.replace("'$SLURM_ARRAY_TASK_ID'", '"$SLURM_ARRAY_TASK_ID"')


# --------------------------------------------------------------------------------------------
# Submitting
# --------------------------------------------------------------------------------------------


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


def _read_records(record_dir: Path) -> dict:
    path = record_dir / RECORD_FILE
    if not path.is_file():
        return {"jobs": []}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); move it away to submit again") from None
    data.setdefault("jobs", [])
    return data


def _log_path(pattern: Path, job_id: str, task: Optional[str] = None) -> str:
    text = str(pattern).replace("%A", job_id).replace("%j", job_id)
    return text.replace("%a", task if task is not None else "*")


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
        records = _read_records(sub.record_dir)
        records["jobs"].append({
            "job_id": job_id,
            "cluster": cluster,
            "kind": sub.spec.kind,
            "job_name": sub.spec.job_name,
            "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sbatch": argv,
            "dependency": dep,
            "array": sub.spec.array,
            "log": _log_path(sub.spec.log, job_id) if not sub.spec.array else str(sub.spec.log).replace("%A", job_id),
            "script_path": str(sub.spec.script_path),
            "script": sub.script,
            **sub.extra_record,
        })
        atomic_write_json(sub.record_dir / RECORD_FILE, records)
        log_shown = _log_path(sub.spec.log, job_id, "<index>" if sub.spec.array else None)
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


def _workdir() -> Path:
    """The job's working directory (--chdir): where `tunelab submit` runs, so relative paths mean the same."""
    cwd = Path.cwd().absolute()
    problem = _clean_path_problem("the current directory", str(cwd))
    if problem:
        raise ConfigError([problem + " (or submit from another directory)"])
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
    log_dir = Path(s.log_dir).absolute() if s.log_dir else run_dir / "slurm"
    spec = JobSpec(
        kind="eval", title=f"tunelab: evaluate {run_dir}", job_name=_job_name("eval", run_dir, s),
        log=log_dir / "eval-%j.out", workdir=workdir, slurm=es, args=["eval", str(run_dir), *overrides],
        gpus=es.gpus_per_node, script_path=run_dir / "slurm" / "eval.sbatch",
    )
    return Submission(spec, render_script(spec), run_dir, dependency)


def _active_jobs(record_dir: Path, kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    """(job id, state) of recorded jobs of these kinds that SLURM still runs or queues."""
    if shutil.which("scontrol") is None and shutil.which("squeue") is None:
        return []
    active = []
    for job in _read_records(record_dir)["jobs"]:
        if job.get("kind") not in kinds:
            continue
        for st in job_states(job["job_id"]):
            if st.state not in TERMINAL_STATES and st.state != "UNKNOWN":
                active.append((st.job_id, st.state))
    return active


def submit_train(cfg: RunConfig, s: SlurmConfig, *, then_eval: bool = False, eval_overrides: list[str] | None = None,
                 resume: bool = False, dry_run: bool = False, say=print) -> list[Submission]:
    """Submit one training run (and optionally its evaluation after it succeeds)."""
    from tunelab.train import checkpoint_dirs, default_run_dir

    problems = validate_slurm(s, "train")
    world = world_size(s)
    if problems:
        raise ConfigError(problems)
    run_dir = (Path(cfg.out) if cfg.out else default_run_dir(cfg)).absolute()
    problem = _clean_path_problem("out", str(run_dir))
    if problem:
        raise ConfigError([problem])
    cfg.out = str(run_dir)
    model = cfg.model.name
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        raise ConfigError([f"model.name '{model}' does not exist on this machine; the job reads the same path, so "
                           f"it must exist on a file system the compute nodes share"])
    if (run_dir / "results.json").is_file():
        raise FileExistsError(f"{run_dir} already holds a finished run: choose another out=")
    if checkpoint_dirs(run_dir) and not resume:
        raise FileExistsError(
            f"{run_dir} holds checkpoints of an unfinished run: `tunelab submit train --resume {run_dir}` continues it"
        )
    workdir = _workdir()
    log_dir = Path(s.log_dir).absolute() if s.log_dir else run_dir / "slurm"
    multiprocess = world > 1
    spec = JobSpec(
        kind="train", title=f"tunelab: train {cfg.method.name} on {cfg.task.name} -> {run_dir}",
        job_name=_job_name("train", run_dir, s), log=log_dir / "train-%j.out", workdir=workdir, slurm=s,
        run_dir=run_dir, multiprocess=multiprocess, gpus=s.gpus_per_node, preemptible=True,
        script_path=run_dir / "slurm" / "train.sbatch",
    )
    subs = [Submission(spec, render_script(spec), run_dir, None,
                       {"world_size": world, "global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world})]
    if then_eval:
        subs.append(_eval_submission(run_dir, s, eval_overrides or [], "afterok:{train}", workdir))
    say(f"global batch = {cfg.train.batch_size} per device x {cfg.train.grad_accum} accumulation x {world} "
        f"process(es) = {cfg.train.batch_size * cfg.train.grad_accum * world} examples per optimizer step")
    if dry_run:
        say(f"# resolved config (would be written to {run_dir / 'config.yaml'}):")
        say(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).rstrip())
        print_dry_run(subs, say)
        return subs
    _require_sbatch()
    busy = _active_jobs(run_dir, ("train",))
    if busy:
        jobs = ", ".join(f"{j} ({st})" for j, st in busy)
        raise FileExistsError(f"{run_dir} already has a training job in SLURM: {jobs}; `scancel` it or choose another out=")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    submit_all(subs, say)
    _say_follow(run_dir, subs, say)
    return subs


def submit_eval(target: Path, s: SlurmConfig, overrides: list[str], *, dry_run: bool = False,
                say=print) -> list[Submission]:
    """Submit ``tunelab eval RUN overrides`` (the overrides are validated now)."""
    from tunelab.evaluate import run_config

    problems = validate_slurm(s, "eval")
    if problems:
        raise ConfigError(problems)
    run_dir = target.absolute()
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError([f"'{target}' is not a run directory (no config.yaml): submit its training first, or "
                           f"`tunelab submit train ... --then-eval`"])
    run_config(run_dir, overrides)  # every problem of the overrides now, not in the job
    subs = [_eval_submission(run_dir, s, overrides, None, _workdir())]
    if dry_run:
        print_dry_run(subs, say)
        return subs
    submit_all(subs, say)
    _say_follow(run_dir, subs, say)
    return subs


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


def submit_sweep(file: Path, s: SlurmConfig, *, out_dir: Optional[str] = None, report: bool = True,
                 dry_run: bool = False, say=print) -> list[Submission]:
    """One array task per pending sweep point, then the report after the array."""
    from tunelab import sweep as sweep_mod

    problems = validate_slurm(s, "sweep")
    if problems:
        raise ConfigError(problems)
    file = file.absolute()
    sw = sweep_mod.load_sweep(file, out_dir=out_dir)
    out = Path(sw.out_dir).absolute()
    problem = _clean_path_problem("the sweep's out_dir", str(out))
    if problem:
        raise ConfigError([problem])
    pending = sweep_mod.pending_indices(sw)
    if not pending:
        say(f"sweep '{sw.name}': every point is done ({len(sw.points)} points in {out}); nothing to submit")
        return []
    array = _compress(pending) + (f"%{s.array_parallelism}" if s.array_parallelism else "")
    workdir = _workdir()
    log_dir = Path(s.log_dir).absolute() if s.log_dir else out / "slurm"
    point_argv = sweep_mod.point_command(sw, pending[0])[1:]  # ["sweep", FILE, "--point", "I", "--out-dir", D]
    i = point_argv.index("--point")
    point_argv[i + 1] = "$SLURM_ARRAY_TASK_ID"
    point_argv = [str(file) if a == str(sw.path) else a for a in point_argv]
    if "--out-dir" in point_argv:
        point_argv[point_argv.index("--out-dir") + 1] = str(out)
    spec = JobSpec(
        kind="sweep", title=f"tunelab: sweep {sw.name} ({len(pending)} of {len(sw.points)} points) -> {out}",
        job_name=_job_name("sweep", out, s), log=log_dir / "point-%A_%a.out", workdir=workdir, slurm=s,
        args=point_argv, array=array, gpus=min(1, s.gpus_per_node), preemptible=True,
        script_path=out / "slurm" / "sweep.sbatch",
    )
    names = {str(p.index): p.name for p in sw.points}
    subs = [Submission(spec, render_script(spec), out, None,
                       {"sweep_file": str(file), "points": {str(i): names[str(i)] for i in pending}})]
    if report:
        try:
            import tunelab.report  # noqa: F401
        except ModuleNotFoundError:
            say("note: tunelab.report is not installed; no report job")
        else:
            rs = dataclasses.replace(_eval_slurm(s), gpus_per_node=0, gpu_type=None)
            rspec = JobSpec(
                kind="report", title=f"tunelab: report of sweep {sw.name}", job_name=_job_name("report", out, s),
                log=log_dir / "report-%j.out", workdir=workdir, slurm=rs,
                args=["report", str(out), "--out", str(out / "report")], script_path=out / "slurm" / "report.sbatch",
            )
            # afterany: the report also shows which points failed.
            subs.append(Submission(rspec, render_script(rspec), out, "afterany:{sweep}"))
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


def _say_follow(record_dir: Path, subs: list[Submission], say) -> None:
    first = subs[0]
    log_file = _log_path(first.spec.log, first.job_id or "JOBID", "0" if first.spec.array else None)
    say(f"follow: tail -F {shlex.quote(log_file)}   |   tunelab status {shlex.quote(str(record_dir))}   |   "
        f"squeue -j {','.join(s.job_id for s in subs if s.job_id)}")


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


@dataclass
class JobState:
    """SLURM's view of one job or array task."""

    job_id: str  # "123" or "123_4"
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, ... or UNKNOWN
    exit_code: Optional[str] = None  # "rc:signal"
    reason: Optional[str] = None
    array_task: Optional[str] = None
    log: Optional[str] = None
    restarts: Optional[int] = None
    source: str = ""  # which command said so

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


_KV = re.compile(r"(\S+?)=(.*?)(?= \S+?=|$)")


def _scontrol_jobs(job_id: str) -> Optional[list[dict]]:
    if shutil.which("scontrol") is None:
        return None
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        return None  # "Invalid job id specified": SLURM forgot it (MinJobAge); ask sacct
    return [dict(_KV.findall(line.strip())) for line in proc.stdout.splitlines() if line.strip()]


def _sacct_jobs(job_id: str) -> list[JobState]:
    if shutil.which("sacct") is None:
        return []
    fields = "JobID,State,ExitCode"
    proc = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", fields], capture_output=True, text=True)
    source = "sacct"
    if proc.returncode != 0 or "accounting storage is disabled" in (proc.stderr + proc.stdout).lower():
        # No accounting database: the job-completion log (sacct -c) still knows finished plain jobs.
        proc = subprocess.run(["sacct", "-c", "-n", "-P", "-j", job_id, "-o", fields], capture_output=True, text=True)
        source = "sacct -c"
    rows: dict[str, JobState] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0]:
            continue
        jid, state, code = parts[0], parts[1].split()[0], parts[2]
        task = jid.split("_", 1)[1] if "_" in jid else None
        rows[jid] = JobState(jid, state, code, None, task, None, None, source)  # later lines win (requeues)
    return list(rows.values())


def job_states(job_id: str) -> list[JobState]:
    """Current state of a job (every task of an array), from scontrol, else sacct; [] when SLURM is absent."""
    recs = _scontrol_jobs(job_id)
    if recs:
        out = []
        for r in recs:
            task = r.get("ArrayTaskId")
            jid = f"{r.get('ArrayJobId')}_{task}" if task and r.get("ArrayJobId") else r.get("JobId", job_id)
            restarts = r.get("Restarts")
            out.append(JobState(jid, r.get("JobState", "UNKNOWN"), r.get("ExitCode"), r.get("Reason"), task,
                                r.get("StdOut"), int(restarts) if restarts and restarts.isdigit() else None, "scontrol"))
        return sorted(out, key=lambda j: (len(j.job_id), j.job_id))
    rows = _sacct_jobs(job_id)
    if rows:
        return rows
    if shutil.which("scontrol") is None and shutil.which("sacct") is None:
        return []
    return [JobState(job_id, "UNKNOWN", reason="neither scontrol nor sacct knows this job (accounting off and "
                     "the job finished a while ago)", source="none")]


def _tail_lines(path: str | None, n: int = 12) -> list[str]:
    if not path:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-n:]


def run_status(target: Path) -> dict:
    """A run's (or a sweep folder's) progress and the SLURM state of its recorded jobs."""
    target = target.absolute()
    info: dict[str, Any] = {"path": str(target), "jobs": []}
    if (target / "config.yaml").is_file():
        info["run"] = _run_progress(target)
    for job in _read_records(target)["jobs"]:
        states = job_states(job["job_id"])
        tasks = []
        for st in states:
            task = dataclasses.asdict(st)
            if not task["log"] and job.get("log"):  # sacct does not know the log: use the recorded pattern
                task["log"] = _log_path(Path(job["log"]), job["job_id"], st.array_task)
            tasks.append(task)
        finished = bool(states) and all(st.finished for st in states)
        failed = [t for t, st in zip(tasks, states) if st.finished and st.state != "COMPLETED"]
        if not states:
            state = "UNKNOWN"
        elif len(states) == 1:
            state = states[0].state
        elif finished:
            state = "FAILED" if failed else "COMPLETED"
        else:
            state = "RUNNING" if any(st.state == "RUNNING" for st in states) else "PENDING"
        entry = {k: job.get(k) for k in ("job_id", "kind", "dependency", "array", "log", "submitted_at", "script_path")}
        entry.update(
            state=state, finished=finished, tasks=tasks, points=job.get("points"),
            failed_tasks=[{"job_id": t["job_id"], "state": t["state"], "exit_code": t["exit_code"], "log": t["log"],
                           "log_tail": _tail_lines(t["log"])} for t in failed],
        )
        info["jobs"].append(entry)
    return info


def _run_progress(run: Path) -> dict:
    from tunelab.train import checkpoint_dirs

    out: dict[str, Any] = {"trained": (run / "results.json").is_file(), "evaluated": (run / "eval" / "results.json").is_file()}
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        if lines:
            try:
                last = json.loads(lines[-1])
                out["step"], out["loss"] = last.get("step"), last.get("loss")
            except ValueError:
                pass
    ckpts = checkpoint_dirs(run)
    if ckpts:
        out["checkpoint"] = ckpts[-1].name
    if out["trained"]:
        try:
            res = json.loads((run / "results.json").read_text())
            out["steps"], out["final_loss"] = res.get("steps"), res.get("final_loss")
        except ValueError:
            pass
    if out["evaluated"]:
        try:
            ev = json.loads((run / "eval" / "results.json").read_text())
            out["eval_metrics"] = ev.get("metrics")
        except ValueError:
            pass
    return out


def format_status(info: dict) -> str:
    lines = [f"{info['path']}"]
    run = info.get("run")
    if run:
        bits = []
        if run.get("step") is not None:
            bits.append(f"step {run['step']}" + (f", loss {run['loss']:.4f}" if isinstance(run.get("loss"), float) else ""))
        if run.get("checkpoint"):
            bits.append(f"checkpoint {run['checkpoint']}")
        bits.append("trained" if run["trained"] else "not trained yet")
        bits.append("evaluated" if run["evaluated"] else "not evaluated")
        lines.append("  run: " + "; ".join(bits))
        if run.get("eval_metrics"):
            lines.append("  eval: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in run["eval_metrics"].items()))
    if not info["jobs"]:
        lines.append(f"  no SLURM jobs recorded ({RECORD_FILE} is absent): not submitted with `tunelab submit`")
    for job in info["jobs"]:
        head = f"  job {job['job_id']} {job['kind']}: {job['state']}"
        if job.get("dependency"):
            head += f" (after {job['dependency']})"
        lines.append(head)
        tasks = job["tasks"]
        if not tasks:
            lines.append("    state unknown: no SLURM commands (scontrol/sacct) on this machine")
        for t in tasks:
            label = t["job_id"]
            if job.get("points") and t.get("array_task") in job["points"]:
                label += f" point {t['array_task']} {job['points'][t['array_task']]}"
            detail = t["state"]
            if t.get("exit_code") and t["state"] not in ("PENDING", "RUNNING"):
                detail += f" exit {t['exit_code']}"
            if t.get("reason") and t["reason"] not in ("None", "(null)") and t["state"] in ("PENDING", "FAILED", "REQUEUED"):
                detail += f" ({t['reason']})"
            if t.get("restarts"):
                detail += f", restarted {t['restarts']}x"
            lines.append(f"    {label}: {detail}   log {t.get('log') or job.get('log')}")
        for f in job["failed_tasks"]:
            lines.append(f"    {f['job_id']} {f['state']}: last lines of {f['log']}:")
            lines.extend(f"      | {ln}" for ln in f["log_tail"]) if f["log_tail"] else lines.append("      (log is empty or missing)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _slurm_reference() -> str:
    rows = field_help(SlurmConfig, "slurm.")
    import textwrap

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
            parsed = value if key in ("setup", "python", "log_dir") else _slurm_value(value)
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
        description={
            "train": "Submit a training run to SLURM: writes RUN/config.yaml and RUN/slurm/train.sbatch, submits it, "
                     "records the job in RUN/slurm.json. The job runs `tunelab train --config RUN/config.yaml` "
                     "(`--resume RUN` once a checkpoint exists: a requeued job resumes).",
            "eval": "Submit `tunelab eval RUN [overrides]` to SLURM (one process, at most one GPU).",
            "sweep": "Submit a sweep: one array task per pending point (`tunelab sweep FILE --point I`) and a "
                     "report job after the array.",
        }[kind],
        epilog=_SUBMIT_EXAMPLES + "\n\n" + _slurm_reference(),
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
        from tunelab.evaluate import run_config

        try:
            if ns.resume:
                run_dir = Path(ns.resume)
                if not (run_dir / "config.yaml").is_file():
                    raise ConfigError([f"--resume {run_dir}: no config.yaml there"])
                cfg = run_config(run_dir, [o for o in ns.overrides if not o.startswith("out=")], check_env=False)
            else:
                # check_env=False: the login node that submits usually has no GPU; the job checks again
                cfg = load_config(ns.config, ns.overrides, check_env=False)
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
        "submit", help="submit a train / eval / sweep job to SLURM (--dry-run prints the script)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render an sbatch script from the run config and --slurm.* settings, write it into the run "
        "directory and submit it. `tunelab submit KIND --help` lists the options of each kind.",
        epilog=_SUBMIT_EXAMPLES + "\n\n" + _slurm_reference(),
    )
    p.add_argument("kind", choices=("train", "eval", "sweep"), help="what to submit")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options and key=value overrides of that kind")
    p.set_defaults(handler=cmd_submit)

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
