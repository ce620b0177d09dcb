"""SLURM settings of a submission: the typed :class:`SlurmConfig`, its YAML file, its validation.

Built like the run config (``--slurm.KEY=VALUE`` items over a ``--slurm-config`` YAML file over the
defaults, with the same typed builder and did-you-mean messages). The checks are hand-written:
sbatch only parses its options on the cluster, after the job is queued, and every value here is
written into a shell script, so each one is checked against what SLURM accepts (and what is safe to
write unquoted in an ``#SBATCH`` line) before anything is rendered, all problems reported at once.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from tunelab.config import ConfigError, RunConfig, opt
from tunelab.launch.quoting import option_problem, path_problem, text_problem


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


def validate_slurm(s: SlurmConfig, kind: str = "train") -> list[str]:
    """Every problem of the SLURM settings, each with its fix (empty when fine)."""
    p: list[str] = []
    checks = [("account", _NAME_RE), ("qos", _NAME_RE), ("job_name", _NAME_RE), ("gpu_type", _NAME_RE),
              ("partition", _PARTITION_RE), ("constraint", _CONSTRAINT_RE), ("master_addr", _HOST_RE)]
    for key, rx in checks:
        value = getattr(s, key)
        if value is not None and not rx.fullmatch(value):
            p.append(
                f"slurm.{key} {value!r} contains characters SLURM does not allow there (spaces, quotes, shell "
                f"metacharacters or newlines): use the plain name as `sinfo`/`sacctmgr` show it"
            )
    try:
        limit = parse_time(s.time)
        time_problem = option_problem("slurm.time", str(s.time), f"use {_TIME_FORMATS}")
        if time_problem:
            p.append(time_problem)
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
        p.append(f"slurm.mem {str(s.mem)!r} must be a number with an optional K, M, G or T suffix (e.g. 32G)")
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
    p.extend(_script_text_problems(s))
    p.extend(_kind_problems(s, kind))
    return p


def _script_text_problems(s: SlurmConfig) -> list[str]:
    """The settings written into the script as text (log folder, extra options, setup lines, python),
    through the same checks the script renderer applies (:mod:`.quoting`)."""
    p: list[str] = []
    if s.log_dir is not None:
        p.append(path_problem("slurm.log_dir", str(s.log_dir), "choose a log folder without them"))
    for i, item in enumerate(s.extra):
        text = str(item)
        if option_problem(f"slurm.extra[{i}]", text, "") or not text.startswith("-"):
            p.append(f"slurm.extra item {text!r} must be one sbatch option without spaces, quotes, backslashes, "
                     f"'#' or control characters, e.g. '--mail-type=END' (one list item per option)")
            continue
        name = text.split("=", 1)[0]
        if name in MANAGED_OPTIONS:
            p.append(f"slurm.extra {text!r}: tunelab sets {name} itself; use slurm.{MANAGED_OPTIONS[name]}"
                     if not MANAGED_OPTIONS[name].startswith("(") else
                     f"slurm.extra {text!r}: tunelab sets {name} itself {MANAGED_OPTIONS[name]}")
    for i, line in enumerate(s.setup):
        p.append(text_problem(f"slurm.setup[{i}]", str(line), "write one shell line per slurm.setup item"))
    if s.python is not None:
        p.append(text_problem("slurm.python", str(s.python), "give one interpreter path or name")
                 or (None if str(s.python).strip() else "slurm.python must be an interpreter path or name, got ''"))
    return [x for x in p if x]


def _kind_problems(s: SlurmConfig, kind: str) -> list[str]:
    """Evaluations and sweep points run one process each: refuse settings asking for more."""
    p: list[str] = []
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


def parse_slurm_value(text: str) -> Any:
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
