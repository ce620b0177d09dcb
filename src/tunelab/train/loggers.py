"""Metric loggers: ``metrics.jsonl`` always; TensorBoard / W&B / MLflow when listed in ``train.report_to``.

Only the main process logs; the logged numbers are already global (summed over processes). A line is
either a training step's (loss, lr, ...) or an evaluation's (``eval/ref_nll``, ``eval/<metric>``, same step).
"""

from __future__ import annotations

from dataclasses import asdict
from tunelab.config import RunConfig
from tunelab.rundir import RunDir
from tunelab.utils import append_jsonl


class MetricLoggers:
    """metrics.jsonl always; TensorBoard / W&B / MLflow when listed in train.report_to."""

    def __init__(self, run: RunDir, cfg: RunConfig, enabled: bool):
        self.enabled = enabled
        self.path = run.metrics_file
        run_dir = run.path
        self.tb = self.wandb = self.mlflow = None
        if not enabled:
            return
        if "tensorboard" in cfg.train.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if "wandb" in cfg.train.report_to:
            import wandb

            self.wandb = wandb.init(dir=str(run_dir), config=asdict(cfg), name=run_dir.name)
        if "mlflow" in cfg.train.report_to:
            import mlflow

            mlflow.start_run(run_name=run_dir.name)
            self.mlflow = mlflow

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb:
            for k, v in scalars.items():
                # a key that names its group ("eval/ref_nll") keeps it; the training line's go under train/
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if self.mlflow:
            self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            self.mlflow.end_run()
