"""The sbatch script of one job: :class:`JobSpec` and its rendering from ``templates/sbatch.sh.j2``.

The script is a Jinja2 template; the SLURM settings are validated first (:mod:`.slurm_config`), and
every value put into the template passes the one gate of :mod:`.quoting` (a comment, a shell word,
an #SBATCH option or path; ``slurm.setup`` is shell code by design, one line per item).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tunelab.launch.quoting import ScriptValues, ShellExpansion
from tunelab.launch.slurm_config import SlurmConfig, nproc_per_node
from tunelab.rundir import RunDir
from tunelab.train.signals import PREEMPT_EXIT_CODE


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


_FIX_SLURM = "use the plain value sbatch documents for it"
_FIX_RUN = "choose a run directory (out=, or the sweep's out_dir) without them"
_FIX_LOG = "choose a run directory, or set slurm.log_dir to a folder, without them"


def _directives(spec: JobSpec, v: ScriptValues) -> list[str]:
    """The #SBATCH lines, every value through the one gate (:mod:`.quoting`)."""
    s = spec.slurm
    log = Path(spec.log)
    d = [v.option("--job-name", "slurm.job_name", spec.job_name, _FIX_SLURM),
         v.path("--output", "the log folder", str(log.parent), _FIX_LOG, own="/" + log.name),
         "--open-mode=append",
         v.path("--chdir", "the working directory", str(spec.workdir), "submit from a directory without them",
                pattern=False)]
    for key in ("account", "partition", "qos"):
        if getattr(s, key):
            d.append(v.option(f"--{key}", f"slurm.{key}", getattr(s, key), _FIX_SLURM))
    d.append(v.option("--time", "slurm.time", s.time, _FIX_SLURM))
    d.append(f"--nodes={v.number('slurm.nodes', s.nodes) if spec.multiprocess else 1}")
    d.append("--ntasks-per-node=1")
    if s.cpus_per_task:
        d.append(f"--cpus-per-task={v.number('slurm.cpus_per_task', s.cpus_per_task)}")
    if spec.gpus:
        gpus = f"{s.gpu_type + ':' if s.gpu_type else ''}{v.number('slurm.gpus_per_node', spec.gpus)}"
        d.append(v.option("--gpus-per-node", "slurm.gpu_type", gpus, _FIX_SLURM))
    if s.mem:
        d.append(v.option("--mem", "slurm.mem", s.mem, _FIX_SLURM))
    if s.constraint:
        d.append(v.option("--constraint", "slurm.constraint", s.constraint, _FIX_SLURM))
    if spec.preemptible and s.signal_seconds:
        d.append(f"--signal=B:USR1@{v.number('slurm.signal_seconds', s.signal_seconds)}")
    d.append("--requeue" if s.requeue else "--no-requeue")
    if spec.array:
        d.append(v.option("--array", "the array", spec.array, "slurm.array_parallelism must be a number"))
    for i, item in enumerate(s.extra):
        d.append(v.option(None, f"slurm.extra[{i}]", item, "one sbatch option per item, e.g. '--mail-type=END'"))
    return d


def render_script(spec: JobSpec) -> str:
    """The sbatch script of ``spec`` (Jinja2 template ``templates/sbatch.sh.j2``).

    Every value goes through :class:`ScriptValues` (comment, shell word, shell code, #SBATCH option
    or path); raises ConfigError with every value that cannot be written safely, naming its field.
    """
    import jinja2

    from tunelab import __version__

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tunelab.launch", "templates"), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False,
    )
    s = spec.slurm
    v = ScriptValues()
    shutdown = None
    if spec.multiprocess and _torchrun_supports("--shutdown_timeout"):
        # Workers get this long to finish the step and write the checkpoint before torchrun kills them.
        shutdown = max(30, s.signal_seconds - 20) if s.signal_seconds else 60
    resubmit = ""
    if spec.script_path and spec.kind == "train":
        resubmit = "Resubmit with: sbatch " + v.word("the script path", str(spec.script_path), _FIX_RUN)
    values = dict(
        title=v.comment("the job title", spec.title, _FIX_RUN),
        kind=spec.kind,
        created=time.strftime("%Y-%m-%d %H:%M:%S %z"),
        version=__version__,
        resubmit_note=resubmit,
        directives=_directives(spec, v),
        setup=[v.code(f"slurm.setup[{i}]", str(line), "write one shell line per slurm.setup item")
               for i, line in enumerate(s.setup)],
        python=v.word("slurm.python", _python(s), "give one interpreter path or name"),
        multiprocess=spec.multiprocess,
        nodes=v.number("slurm.nodes", s.nodes),
        nproc=v.number("slurm.nproc_per_node", nproc_per_node(s)),
        cpus=v.number("slurm.cpus_per_task", s.cpus_per_task) if s.cpus_per_task else None,
        # default: the first node of the allocation (tunelab's own command substitution)
        master_addr=(v.word("slurm.master_addr", s.master_addr, _FIX_SLURM) if s.master_addr
                     else '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'),
        master_port=v.number("slurm.master_port", s.master_port),
        shutdown_timeout=shutdown,
        run_dir=v.word("the run directory", str(spec.run_dir), _FIX_RUN) if spec.run_dir else "",
        config_file=RunDir.CONFIG_FILE,
        checkpoints_dir=RunDir.CHECKPOINTS_DIR,
        args=v.words("the tunelab argument", [a if isinstance(a, ShellExpansion) else str(a) for a in spec.args],
                     "remove them from the run directory, the sweep file's path and the overrides"),
        preemptible=spec.preemptible,
        preempt_exit_code=PREEMPT_EXIT_CODE,
        signal_seconds=v.number("slurm.signal_seconds", s.signal_seconds),
        max_requeues=v.number("slurm.max_requeues", s.max_requeues),
    )
    v.raise_problems()
    return env.get_template("sbatch.sh.j2").render(**values)
