"""Launchers: submit runs, evaluations and sweeps to SLURM, follow them, and relaunch under torchrun.

``tunelab submit train|eval|sweep ... [--slurm.KEY=VALUE ...] [--dry-run]`` renders one sbatch
script (``templates/sbatch.sh.j2``, :mod:`.script`) from the run's config and the SLURM settings of
:class:`SlurmConfig` (:mod:`.slurm_config`), writes it with the resolved run config into the run
directory and submits it with ``sbatch --parsable`` (:mod:`.submit`). The job runs the same
``tunelab`` CLI on that config file (``tunelab train --config RUN/config.yaml``, or ``--resume RUN``
when a checkpoint exists), so a job is reproducible by hand and hyperparameters never travel
through environment variables.

What a submission writes (nothing with ``--dry-run``):

- ``RUN/config.yaml``: the resolved, validated config (``out`` is absolute);
- ``RUN/slurm/<kind>.sbatch``: the rendered script (``sbatch`` it again to resubmit);
- ``RUN/slurm/<kind>-<jobid>.out``: the job's log (stdout and stderr; a requeued job appends);
- ``RUN/slurm.json``: every job submitted for the run: id, kind, dependency, log, script text
  (:mod:`.records`).

A sweep (:mod:`tunelab.experiments`) becomes one array job over its pending points
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
environment (DDP, NCCL on GPUs, gloo on CPU). Without SLURM, ``tunelab train --nproc N`` relaunches
itself under torchrun on this machine (:mod:`.torchrun`).

``tunelab status RUN`` shows the run's progress and the SLURM state of its recorded jobs
(``scontrol``/``squeue`` while SLURM remembers the job, then ``sacct``; :mod:`.status`).

The command lines are in :mod:`tunelab.cli.submit` and :mod:`tunelab.cli.status`.
"""

from tunelab.launch.records import RECORD_FILE
from tunelab.launch.script import JobSpec, render_script
from tunelab.launch.slurm_config import (
    SlurmConfig,
    apply_global_batch,
    load_slurm_config,
    nproc_per_node,
    parse_time,
    validate_slurm,
    world_size,
)
from tunelab.launch.status import TERMINAL_STATES, JobState, format_status, job_states, run_status
from tunelab.launch.submit import (
    SlurmError,
    Submission,
    load_train_config,
    print_dry_run,
    submit_all,
    submit_eval,
    submit_sweep,
    submit_train,
)
from tunelab.launch.torchrun import relaunch_under_torchrun

__all__ = [
    "SlurmConfig", "SlurmError", "JobSpec", "JobState", "Submission", "RECORD_FILE", "TERMINAL_STATES",
    "parse_time", "load_slurm_config", "validate_slurm", "world_size", "nproc_per_node", "apply_global_batch",
    "render_script", "load_train_config", "submit_train", "submit_eval", "submit_sweep", "submit_all",
    "print_dry_run", "job_states", "run_status", "format_status", "relaunch_under_torchrun",
]
