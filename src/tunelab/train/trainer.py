"""The Trainer: one loop for every method and every parallelism mode.

It talks to the method only through the method contract (:mod:`tunelab.methods.base`) and to
DDP/FSDP/DeepSpeed only through a :class:`~tunelab.train.parallel.Backend`; it never tests a method
name or a parallelism mode. Set-up reads in order (``_setup_run_dir`` → ``_setup_data`` →
``_setup_model`` → ``_setup_optimizer`` → ``_setup_parallel``), then :meth:`Trainer.fit` runs
:meth:`Trainer.train_step` until the last step and :meth:`Trainer.finish` writes the artifact and
``results.json``.

Per optimizer step: the method's ``on_step_begin`` callbacks; ``grad_accum`` micro-batches
(forward, loss, backward; gradients are reduced on the last one only); ``on_before_optimizer_step``;
clipping, the optimizer step and the lr schedule (the backend's ``step``); ``on_step_end``;
logging; the held-out evaluation (:mod:`tunelab.train.evaluator`, ``train.eval_steps``); checkpoints.
Details that matter for correct numbers:

- The loss is the mean over *all target tokens of the whole optimizer step* (every micro-batch and
  every rank), not a mean of per-micro-batch means, so gradient accumulation and data parallelism
  give the same update as one big batch (:mod:`tunelab.loss` computes logits at targets only).
- A NaN/inf loss stops training before the bad update, saves the last good state and says so.
- SIGTERM/SIGUSR1 (SLURM preemption) write a checkpoint at the end of the current step and exit
  with code 143 so a requeued job resumes from it (:mod:`tunelab.train.signals`).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from tunelab.config import ConfigError, RunConfig
from tunelab.data import IGNORE_INDEX, MicroBatchStream, build_train_dataset, collate, real_tokens
from tunelab.loss import TargetPositionSelector, target_loss
from tunelab.methods import Method, TrainState
from tunelab.models import load_model, load_tokenizer, materialize
from tunelab.registry import METHODS, TASKS
from tunelab.rundir import RunDir, claim_folder
from tunelab.train.divergence import diverged_in_backward, stop_diverged
from tunelab.train.checkpoint import Checkpointer, drop_metrics_after, remove_stale_staging, saving
from tunelab.train.evaluator import HeldOutEvaluator, evaluate_now, load_best
from tunelab.train.loggers import MetricLoggers
from tunelab.train.parallel import all_reduce_sum, any_process, init_distributed, make_backend, one_process_group
from tunelab.cpu_kernels import onednn_linears
from tunelab.train.lean_mlp import lean_mlps
from tunelab.train.precision import LossScaler, keep_trainable_in_fp32, resolve_precision
from tunelab.train.results import memory_accounting, run_results
from tunelab.train.schedule import count_steps, lr_lambda
from tunelab.train.signals import Preempted, catch_stop_signals
from tunelab.utils import (
    atomic_replace_dir,
    count_params,
    make_temp_dir,
    log,
    reset_peak_memory,
    seed_everything,
)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train one run; returns results.json's content. The run directory is ``cfg.out``.

    ``overwrite`` lets it write into a folder that holds files tunelab did not make (see
    :func:`tunelab.rundir.claim_folder`); tunelab then replaces only its own files there.
    """
    import torch.distributed as dist

    # a torchrun/srun rank whose group this call creates also destroys it: left to interpreter exit, the
    # group's threads were seen to abort a finished DeepSpeed rank ("terminate called without an active exception")
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        with one_process_group(cfg.train.parallelism == "deepspeed", cfg.model.device):
            trainer = Trainer(cfg, resume, overwrite)
            trainer.setup()
            return trainer.fit()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """Trains ``cfg``'s method on its task; ``resume`` continues the run's newest checkpoint."""

    def __init__(self, cfg: RunConfig, resume: bool = False, overwrite: bool = False):
        self.cfg, self.resume, self.overwrite = cfg, resume, overwrite
        self.t_start = time.time()
        self.train_time_s = 0.0
        self.tokens_seen = self.target_tokens_seen = 0
        self.window_loss = self.window_tokens = 0.0
        self.last_loss = float("nan")
        self.onednn_layers = 0  # linear layers trained through oneDNN (train.onednn_linear), set by fit
        self.lean_mlps = 0  # gated MLPs that recompute their activation in backward (train.lean_mlp), set by fit
        self.diverged_what: Optional[str] = None  # what stopped a diverged run, for its message
        self.evaluator: Optional[HeldOutEvaluator] = None  # train.eval_steps: the held-out loss during training
        self.checkpointed_step: Optional[int] = None  # the step of the last checkpoint this process wrote

    # ---- set-up -----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        method_cls = METHODS.get(cfg.method.name)
        if not method_cls.trains:
            raise ConfigError([f"method={cfg.method.name} trains nothing: choose a method to train "
                               f"({', '.join(n for n, c in METHODS.items() if c.trains)}), or evaluate the "
                               f"untrained model with `tunelab eval --base`"])
        self.procs = init_distributed(cfg.model.device)
        self.precision = resolve_precision(cfg.train.precision, self.procs.device)
        self.model_cfg = self.precision.model_config(cfg.model)  # mixed precision: fp32 master weights
        self.scaler = LossScaler(self.precision)
        self.backend = make_backend(cfg.train, self.procs, self.precision)
        self._setup_run_dir()
        seed_everything(cfg.seed)
        self.method: Method = method_cls(cfg.method)
        self.task = TASKS.get(cfg.task.name)(cfg.task)
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_parallel()

    def _setup_run_dir(self) -> None:
        cfg = self.cfg
        self.run = RunDir(cfg.out) if cfg.out else RunDir.default_for(cfg)
        cfg.out = str(self.run.path)
        if not self.procs.is_main:
            return
        if not self.resume:
            if self.run.is_trained:
                raise FileExistsError(
                    f"{self.run.path} already holds a finished run: choose another out=, or continue it with "
                    f"`tunelab train --resume {self.run.path} train.max_steps=N` (N above its {self._steps_done()} steps)"
                )
            if self.run.checkpoints():
                raise FileExistsError(f"{self.run.path} holds checkpoints of an unfinished run: pass --resume to continue it")
            claim_folder(self.run.path, "run", overwrite=self.overwrite)
        remove_stale_staging(self.run)
        self.run.write_config(cfg)

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.source = materialize(cfg.model.name)
        self.tokenizer = load_tokenizer(cfg.model, self.source)
        self.data, self.data_stats = build_train_dataset(self.task, self.tokenizer, cfg.data, cfg.seed)
        stats = self.data_stats
        log.info(f"{stats.used} training examples ({stats.total_tokens} tokens, {stats.target_tokens} target tokens)")
        self.evaluator = HeldOutEvaluator.for_run(cfg, self.task, self.tokenizer, self.procs)

    def _setup_model(self) -> None:
        cfg, device = self.cfg, self.procs.device
        reset_peak_memory(device)
        model = self._prepared_model(device)
        model.config.use_cache = False
        if not cfg.model.load_in_4bit:
            model.to(device)
        self.params = count_params(model)
        log.info(f"method={self.method.name}: {self.params['trainable_params']:,} trainable of "
                 f"{self.params['total_params']:,} parameters")
        # sharding comes before the optimizer exists: the optimizer must hold the sharded parameters
        self.model = self.backend.shard(model)

    def _setup_optimizer(self) -> None:
        cfg, procs = self.cfg, self.procs
        self.optimizer = self.method.build_optimizer(self.model, cfg.train)
        self.stream = MicroBatchStream(self.data, cfg.train.batch_size, cfg.seed, cfg.data.shuffle,
                                       cfg.data.group_by_length, procs.rank, procs.world,
                                       packing=cfg.data.packing, max_length=cfg.data.max_length)
        self.steps_per_epoch, self.max_steps = count_steps(cfg.train, self.stream.per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.train, self.max_steps))
        self.callbacks = self.method.callbacks()
        self.state = TrainState(step=0, max_steps=self.max_steps, grad_accum=cfg.train.grad_accum,
                                world_size=procs.world, rank=procs.rank, run_dir=self.run.path)

    def _setup_parallel(self) -> None:
        cfg, procs = self.cfg, self.procs
        self.model, self.optimizer, self.scheduler = self.backend.wrap(self.model, self.optimizer, self.scheduler, self.method)
        self.checkpointer = Checkpointer(self.run, self.backend, cfg.train.keep_checkpoints)
        if self.resume:
            self._resume()
            if self.evaluator is not None:
                self.checkpointer.pinned = self.evaluator.pinned_checkpoint(self.run)
        self.plain_model = self.backend.unwrap(self.model)
        self.selector = TargetPositionSelector(self.plain_model)
        self.loggers = MetricLoggers(self.run, cfg, enabled=procs.is_main)
        if procs.is_main:
            t = cfg.train
            log.info(
                f"global batch = {t.batch_size} per device x {t.grad_accum} accumulation x {procs.world} processes = "
                f"{t.batch_size * t.grad_accum * procs.world} examples; {self.max_steps} optimizer steps "
                f"({self.steps_per_epoch} per epoch)" + (f"; {self.backend.description}" if self.backend.description else "")
            )
        for cb in self.callbacks:
            cb.on_train_begin(self.state, self.plain_model, self.optimizer)

    def _stateful(self) -> list:
        """What a checkpoint restores besides weights, optimizer and schedule (state_dict/load_state_dict each):
        the method's callbacks, fp16's loss scaler, then the evaluator's early-stopping state (each appended
        after the older ones, so checkpoints without them still load)."""
        return [*self.callbacks, self.scaler, *([self.evaluator] if self.evaluator is not None else [])]

    def _steps_done(self) -> int:
        return int((self.run.results() or {}).get("steps", 0))

    def _resume(self) -> None:
        if self.run.is_trained and self.max_steps <= self._steps_done():
            raise FileExistsError(
                f"{self.run.path} is a finished run of {self._steps_done()} steps: --resume continues it only with "
                f"more steps (train.max_steps={2 * self._steps_done()}, say); to train it afresh choose another out="
            )
        info = self.checkpointer.restore_latest(self.method, self.model, self.optimizer, self.scheduler, self._stateful())
        if info is None:
            log.warning(f"--resume: no complete checkpoint in {self.run.checkpoints_root}: starting from step 0"
                        + (" with a clean metrics.jsonl" if self.run.metrics_file.is_file() else ""))
            if self.procs.is_main:
                self.run.metrics_file.unlink(missing_ok=True)
            return
        self.state.step = info["step"]
        # the whole run's numbers, not just what follows the resume (results.json counts them)
        if self.procs.is_main:
            self.tokens_seen = int(info.get("train_tokens", 0))
            self.target_tokens_seen = int(info.get("target_tokens", 0))
        self.train_time_s = float(info.get("train_time_s", 0.0))
        log.info(f"resumed from {info['path']} at step {self.state.step}/{self.max_steps}")
        if self.procs.is_main:
            drop_metrics_after(self.run.metrics_file, self.state.step)

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to the last step (or a stop: divergence, a method's request, preemption), then finish."""
        stopped = None
        # fp32 CPU linears on oneDNN for the whole loop (forward, backward, checkpoint recompute, held-out eval)
        use_onednn = self.cfg.train.onednn_linear and self.backend.plain_weights(self.model)
        kernels = onednn_linears(self.plain_model, use_onednn, skip=(self.selector.head,))
        with catch_stop_signals(lambda signum: log.warning(
                f"received signal {signum}: will checkpoint after this step and exit")) as stop, \
                self._progress() as bar, kernels as self.onednn_layers, \
                lean_mlps(self.plain_model, self.cfg.train.lean_mlp) as self.lean_mlps:
            self.model.train()
            try:
                while self.state.step < self.max_steps:
                    step_loss, targets, grad_norm = self.train_step()
                    if not math.isfinite(step_loss):
                        stopped = "diverged"
                        self.diverged_what = self.diverged_what or f"loss became {step_loss}"
                        break
                    self._after_step(step_loss, targets, grad_norm, bar)
                    if any(cb.should_stop(self.state) for cb in self.callbacks):
                        stopped = "method_requested_stop"
                        break
                    if self.evaluator is not None and self.evaluator.should_stop():
                        stopped = "early_stopped"
                        break
                    if any_process(stop.hit, self.procs):
                        stopped = "preempted"
                        break
            finally:
                self.selector.remove()
        return self.finish(stopped)

    @contextlib.contextmanager
    def _progress(self):
        bar = None
        if self.procs.is_main and self.cfg.train.progress_bar:
            from tqdm import tqdm

            # in a log file (SLURM) a line every 30 s instead of a redraw per step
            interval = 0.1 if sys.stderr.isatty() else 30.0
            bar = tqdm(total=self.max_steps, initial=self.state.step, desc="train", unit="step",
                       dynamic_ncols=True, mininterval=interval)
        try:
            yield bar
        finally:
            if bar is not None:
                bar.close()

    def train_step(self) -> tuple[float, float, Optional[float]]:
        """One optimizer step: (loss over the step's global target tokens, their count, grad norm).

        A non-finite loss returns before the update (gradients dropped, nothing stepped).
        """
        cfg, state, procs, backend, model = self.cfg, self.state, self.procs, self.backend, self.model
        t_step = time.perf_counter()
        micro = []
        for k in range(cfg.train.grad_accum):
            epoch, examples = self.stream.get(state.step * cfg.train.grad_accum + k)
            micro.append(collate(examples, self.tokenizer.pad_token_id))
        state.epoch = epoch
        local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        global_targets = all_reduce_sum(float(local_targets), procs)
        for cb in self.callbacks:
            cb.on_step_begin(state, self.plain_model)
        step_loss_sum = 0.0
        for k, batch in enumerate(micro):
            state.micro_step = k
            batch = {key: v.to(procs.device, non_blocking=True) for key, v in batch.items()}
            sync = k == len(micro) - 1
            with backend.accumulating(model, sync):
                with backend.autocast():
                    loss_sum = target_loss(model, self.selector, batch, chunk_tokens=cfg.train.loss_chunk_tokens)
                # gradients are averaged over ranks: scale so the result is sum / global targets
                scaled = loss_sum * (procs.world / max(global_targets, 1.0))
                try:
                    backend.backward(model, self.scaler.scale(scaled), sync)
                except FloatingPointError as exc:  # raised by methods that step inside backward
                    raise diverged_in_backward(self, exc) from exc
            step_loss_sum += float(loss_sum.detach())
            self.tokens_seen += real_tokens(batch)  # not padding (a packed batch has no 2D attention_mask)
        step_loss = all_reduce_sum(step_loss_sum, procs) / max(global_targets, 1.0)
        self.target_tokens_seen += local_targets
        if not math.isfinite(step_loss):
            self.optimizer.zero_grad(set_to_none=True)
            return step_loss, global_targets, None
        for cb in self.callbacks:
            cb.on_before_optimizer_step(state, self.plain_model, self.optimizer)
        self.scaler.unscale_(self.optimizer)
        norm = backend.clip_gradients(model, self.optimizer, cfg.train.max_grad_norm)
        if norm is not None and not math.isfinite(norm) and not self.precision.uses_scaler:
            # inf/nan gradients: stop before they reach the weights (fp16's scaler skips such a step instead)
            self.optimizer.zero_grad(set_to_none=True)
            self.diverged_what = f"the gradient norm became {norm}"
            return float("nan"), global_targets, None
        engine_norm = backend.step(model, self.optimizer, self.scheduler, cfg.train.max_grad_norm, self.scaler)
        grad_norm = (engine_norm if engine_norm is not None else norm) if cfg.train.max_grad_norm > 0 else None
        state.step += 1
        for cb in self.callbacks:
            cb.on_step_end(state, self.plain_model, self.optimizer)
        self.train_time_s += time.perf_counter() - t_step
        return step_loss, global_targets, grad_norm

    def _after_step(self, step_loss: float, targets: float, grad_norm: Optional[float], bar) -> None:
        """Progress bar, logging at ``train.logging_steps``, the held-out evaluation at ``train.eval_steps`` and
        the last step, checkpoints at ``train.save_steps`` and (early stopping) at each new best held-out loss."""
        cfg, state = self.cfg, self.state
        self.last_loss = step_loss
        self.window_loss += step_loss * targets  # global sums: the logged loss is over all ranks
        self.window_tokens += targets
        lr = self.scheduler.get_last_lr()[0]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if state.step % cfg.train.logging_steps == 0 or state.step == self.max_steps:
            tok_s = all_reduce_sum(self.tokens_seen, self.procs) / max(self.train_time_s, 1e-9)
            self.loggers.log({
                "step": state.step, "epoch": state.epoch,
                "loss": self.window_loss / max(self.window_tokens, 1.0),
                "lr": lr,
                **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                "tokens_per_s": tok_s,
                "elapsed_s": time.time() - self.t_start,
            })
            self.window_loss = self.window_tokens = 0.0
        ev = self.evaluator
        if ev is not None and ev.due(state.step, self.max_steps):
            evaluate_now(self)
        best = ev is not None and ev.keeps_best and ev.improved and ev.last_step == state.step
        if state.step < self.max_steps and (best or (cfg.train.save_steps and state.step % cfg.train.save_steps == 0)):
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint of this step (every process calls it), with the run's totals so far."""
        totals = {"train_tokens": all_reduce_sum(self.tokens_seen, self.procs),
                  "target_tokens": all_reduce_sum(self.target_tokens_seen, self.procs),
                  "train_time_s": self.train_time_s}
        self.checkpointed_step = self.state.step
        return self.checkpointer.save(self.state, self.method, self.model, self.optimizer, self.scheduler,
                                      self._stateful(), totals)

    # ---- the end ----------------------------------------------------------------------------------
    def finish(self, stopped: Optional[str]) -> dict[str, Any]:
        """Divergence and preemption checkpoint and raise; otherwise checkpoint, write the artifact and results.json."""
        run = self.run
        if stopped == "diverged":
            stop_diverged(self)
        if stopped == "preempted":
            ckpt = self.save_checkpoint()
            self.loggers.close()
            log.warning(f"preempted at step {self.state.step}: checkpoint {ckpt}; resume with `tunelab train --resume {run.path}`")
            raise Preempted()
        if self.evaluator is not None and self.evaluator.last_step != self.state.step:
            evaluate_now(self)  # a stop the loop's evaluation did not see (a method's request)
        for cb in self.callbacks:
            cb.on_train_end(self.state, self.plain_model)
        if self.checkpointed_step != self.state.step:
            self.save_checkpoint()  # the end state, resumable: `--resume RUN train.max_steps=MORE` continues it
        artifact_step = load_best(self)  # early stopping: the artifact is the best step's model
        # collectives run on every rank (a collective called by rank 0 alone deadlocks the others)
        tokens_total = all_reduce_sum(self.tokens_seen, self.procs)
        target_tokens_total = all_reduce_sum(self.target_tokens_seen, self.procs)
        memory = memory_accounting(self)
        final_model = self.backend.final_model(self.method, self.model, self._fresh_prepared_model)
        results: dict[str, Any] = {}
        if self.procs.is_main:
            with saving(run.artifact_dir(self.method), self.run.checkpoints()):
                tmp = make_temp_dir(run.path, ".artifact-")
                try:
                    self.method.save_artifact(final_model, tmp)
                    atomic_replace_dir(tmp, run.artifact_dir(self.method))
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                self.tokenizer.save_pretrained(str(run.tokenizer_dir))
                results = {**run_results(self, stopped, final_model, tokens_total, target_tokens_total), **memory}
                if self.evaluator is not None:
                    results["eval"] = self.evaluator.summary(artifact_step)
                run.write_results(results)
            log.info(f"done: {self.state.step} steps in {self.train_time_s:.1f}s, {results['train_tokens_per_s']:.0f} "
                     f"tokens/s, final loss {self.last_loss:.4f} -> {run.path}")
        self.loggers.close()
        if self.procs.world > 1:
            self.backend.barrier()
        return results

    def _prepared_model(self, device: torch.device):
        """The base model loaded on ``device`` and prepared by the method (adapters, masks, ...)."""
        model = self.method.prepare(load_model(self.model_cfg, self.source, device), self.cfg)
        if self.precision.name == "bf16-true":
            keep_trainable_in_fp32(model)  # adapters in bf16 would lose their small updates
        return model

    def _fresh_prepared_model(self):
        """An unsharded copy of the prepared model on CPU, for backends that gather the trained tensors into one."""
        return self._prepared_model(torch.device("cpu"))
