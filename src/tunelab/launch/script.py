"""The sbatch script of one job: :class:`JobSpec` and its rendering from ``templates/sbatch.sh.j2``.

The script is a Jinja2 template; every value put into it is validated (:mod:`.slurm_config`) and
shell-quoted here, except ``slurm.setup``, which is shell code by design.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tunelab.config import ConfigError
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


def _title_problem(title: str) -> Optional[str]:
    """The title is written unquoted into a ``#`` comment: a line break would end it and start shell code."""
    bad = sorted({c for c in title if ord(c) < 32 or ord(c) == 127})
    if bad:
        return (f"the job title {title!r} contains control characters ({', '.join(repr(c) for c in bad)}), which "
                f"cannot be written into the job script: rename the run directory (or sweep out_dir) without them")
    return None


def render_script(spec: JobSpec) -> str:
    """The sbatch script of ``spec`` (Jinja2 template ``templates/sbatch.sh.j2``)."""
    import jinja2

    from tunelab import __version__

    problem = _title_problem(spec.title)
    if problem:
        raise ConfigError([problem])
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tunelab.launch", "templates"), undefined=jinja2.StrictUndefined,
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
        config_file=RunDir.CONFIG_FILE,
        checkpoints_dir=RunDir.CHECKPOINTS_DIR,
        args=shlex.join(spec.args) if spec.args else "",
        preemptible=spec.preemptible,
        preempt_exit_code=PREEMPT_EXIT_CODE,
        signal_seconds=s.signal_seconds,
        max_requeues=s.max_requeues,
    )
    # The array index must expand in the job: it is the only unquoted word tunelab writes.
    return text.replace("'$SLURM_ARRAY_TASK_ID'", '"$SLURM_ARRAY_TASK_ID"')
