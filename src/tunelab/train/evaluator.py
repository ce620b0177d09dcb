"""Evaluation during training: the held-out loss every ``train.eval_steps`` optimizer steps, and early stopping.

The held-out set is fixed for the whole run: the first ``train.eval_limit`` examples (fixed order)
of the task's eval split (``eval.split``), or, with ``data.eval_fraction > 0``, that fraction held
out of the training split (:func:`tunelab.data.examples.held_out_examples`; the trainer never sees
those rows). At each eval step it is scored teacher-forced exactly as ``tunelab eval`` scores
``ref_nll`` (:func:`tunelab.evaluation.evaluate.reference_loss`: tokenized as in training, the
summed NLL of the reference tokens over their count), and with ``train.eval_generate`` also
generated and scored with the task's metric.

Written here rather than taken from ``transformers.Trainer``'s evaluation loop because tunelab's
loop is its own (its loss at target positions only, its backends); what is shared with ``tunelab
eval`` is reused: the tokenization, :func:`tunelab.loss.target_loss`, the generation engine and
``task.score``. Details that matter:

- The forward runs on the *wrapped* model (DDP, FSDP, DeepSpeed) on every process, in eval mode
  (no dropout) and without gradients; the modules' train/eval flags are put back afterwards.
- Several processes: each scores its shard of the held-out set (``rank::world``) and the sums are
  all-reduced, so every process gets the same number (and the same early-stopping decision). Every
  process runs the same number of forwards (a short shard repeats a filler batch whose result is
  dropped), because a sharded model's forward is a collective. Generation (``eval_generate``): under
  DDP (and ZeRO 1-2) each process generates its share of the prompts and the completions are
  gathered; a sharded model (FSDP, ZeRO-3) must decode in lockstep, so there every process
  generates all of them (with identical prompts and greedy decoding the processes agree).
- No randomness is drawn, and the torch RNG states are restored anyway, so a run with evaluation
  resumes bit-exactly (its state, the best loss so far, goes into every checkpoint).
- Early stopping (``train.early_stopping_patience``): a checkpoint is written at each new best
  held-out loss and kept whatever ``train.keep_checkpoints`` says; after ``patience`` evaluations
  without a better one training stops, and the run's artifact is the best step's model
  (results.json: ``eval.best_step``, ``eval.artifact_step``).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from tunelab.config import ConfigError, RunConfig
from tunelab.data import IGNORE_INDEX, collate, tokenize_references
from tunelab.data.examples import held_out_examples
from tunelab.loss import target_loss
from tunelab.tasks import Example
from tunelab.train.parallel import all_gather_objects, all_reduce_sum
from tunelab.utils import log


def load_held_out(cfg: RunConfig, task, tokenizer) -> tuple[list[Example], str]:
    """(the held-out examples, a description of where they come from), the first ``train.eval_limit``."""
    t, d = cfg.train, cfg.data
    if d.eval_fraction > 0:
        train_examples = task.examples("train", tokenizer=tokenizer, max_prompt_tokens=d.max_length - 8)
        examples = held_out_examples(train_examples, d, cfg.seed)
        source = f"data.eval_fraction={d.eval_fraction} of the training split ({len(examples)} of {len(train_examples)} examples)"
    else:
        split = cfg.eval.split
        try:
            examples = task.examples(split, tokenizer=tokenizer,
                                     max_prompt_tokens=max(8, d.max_length - cfg.eval.max_new_tokens))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError([
                f"train.eval_steps={t.eval_steps} needs a held-out set, but task '{task.name}' has no usable eval "
                f"split '{split}' ({exc}). Hold out part of the training data with data.eval_fraction=0.05, give the "
                f"task an eval split (eval.split=NAME, or the task's test file), or set train.eval_steps=0"
            ]) from exc
        source = f"the first examples of {task.name}/{split}"
    if not examples:
        raise ConfigError([f"train.eval_steps={t.eval_steps}: the held-out set ({source}) is empty: raise data.eval_fraction"])
    if t.eval_limit is not None and t.eval_limit > len(examples):
        log.warning(f"train.eval_limit={t.eval_limit} is more than the {len(examples)} held-out examples "
                    f"({source}): evaluating all {len(examples)}")
    elif t.eval_limit is not None:
        examples = examples[: t.eval_limit]
    return examples, source


class HeldOutEvaluator:
    """Scores the held-out set during training and keeps the early-stopping state (checkpointed)."""

    def __init__(self, cfg: RunConfig, task, tokenizer, procs, examples: list[Example], source: str):
        self.cfg, self.task, self.tokenizer, self.procs = cfg, task, tokenizer, procs
        self.every = cfg.train.eval_steps
        self.patience = cfg.train.early_stopping_patience
        self.examples, self.source = examples, source
        self.tokenized, truncated = self._tokenize(examples)
        if truncated or len(self.tokenized) < len(examples):
            log.warning(f"held-out set: {truncated} references cut at data.max_length={cfg.data.max_length}, "
                        f"{len(examples) - len(self.tokenized)} left out (prompt too long)")
        if not self.tokenized:
            raise ConfigError([f"train.eval_steps: no held-out example fits data.max_length={cfg.data.max_length}: raise it"])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # checkpointed state
        self.best_ref_nll: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad_evals = 0
        self.last_step = -1
        self.curve: list[dict[str, Any]] = []
        if procs.is_main:
            log.info(f"evaluation every {self.every} steps on {len(self.tokenized)} held-out examples ({source})"
                     + (f"; early stopping after {self.patience} evaluations without a better ref_nll" if self.patience else ""))

    @classmethod
    def for_run(cls, cfg: RunConfig, task, tokenizer, procs) -> Optional["HeldOutEvaluator"]:
        """The run's evaluator, or None without ``train.eval_steps``."""
        if cfg.train.eval_steps <= 0:
            return None
        examples, source = load_held_out(cfg, task, tokenizer)
        return cls(cfg, task, tokenizer, procs, examples, source)

    def _tokenize(self, examples: list[Example]):
        """As :func:`~tunelab.evaluation.evaluate.reference_loss` does: over-long references cut, sorted by length."""
        # sorted by length: less padding, and each process's shard (rank::world) gets similar lengths
        out, truncated, _ = tokenize_references(examples, self.tokenizer, self.cfg.data.max_length,
                                                self.cfg.task, self.cfg.data.train_on)
        return out, truncated

    # ---- when ----------------------------------------------------------------------------------
    def due(self, step: int, max_steps: int) -> bool:
        """Every ``train.eval_steps`` steps and at the last one (once per step)."""
        return (step % self.every == 0 or step == max_steps) and step != self.last_step

    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    @property
    def keeps_best(self) -> bool:
        """Early stopping keeps the best step's checkpoint and makes it the artifact."""
        return self.patience > 0

    def pinned_checkpoint(self, run) -> Optional[Path]:
        """The best step's checkpoint, which checkpoint rotation must keep (None without early stopping)."""
        return run.checkpoint_path(self.best_step) if self.keeps_best and self.best_step is not None else None

    # ---- scoring -------------------------------------------------------------------------------
    def evaluate(self, model, plain_model, selector, backend, step: int) -> dict[str, Any]:
        """Score the held-out set at ``step`` (every process calls it); returns the metrics line."""
        t0 = time.perf_counter()
        with _eval_mode(model), _rng_kept():
            nll_sum, n_tokens = self._ref_nll(model, selector, backend)
            metrics = self._generate(model, plain_model, backend) if self.cfg.train.eval_generate else {}
        nll = nll_sum / max(n_tokens, 1.0)
        new_best = self.best_ref_nll is None or nll < self.best_ref_nll
        if new_best:
            self.best_ref_nll, self.best_step, self.bad_evals = nll, step, 0
        else:
            self.bad_evals += 1
        self.last_step = step
        point = {"step": step, "ref_nll": nll, **metrics}
        self.curve.append(point)
        record = {"step": step, "eval/ref_nll": nll, "eval/perplexity": math.exp(min(nll, 50.0)),
                  **{f"eval/{k}": v for k, v in metrics.items()},
                  "eval/reference_tokens": int(n_tokens), "eval/examples": len(self.tokenized),
                  "eval/best_ref_nll": self.best_ref_nll, "eval/time_s": time.perf_counter() - t0}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        if self.procs.is_main:
            log.info(f"eval at step {step}: ref_nll={nll:.4f}" + (f", {shown}" if shown else "")
                     + (" (best so far)" if new_best else f" (best {self.best_ref_nll:.4f} at step {self.best_step}; "
                        f"{self.bad_evals} without improvement)"))
        return record

    @property
    def improved(self) -> bool:
        """Whether the last evaluation was a new best."""
        return self.best_step is not None and self.best_step == self.last_step

    @torch.no_grad()
    def _ref_nll(self, model, selector, backend) -> tuple[float, float]:
        """(summed NLL, reference tokens) over the whole held-out set, each process scoring its shard."""
        rank, world = self.procs.rank, self.procs.world
        bs = max(1, self.cfg.eval.batch_size)
        shard = self.tokenized[rank::world]
        n_batches = math.ceil(math.ceil(len(self.tokenized) / world) / bs)  # the same on every process
        nll_sum, n_tokens = 0.0, 0
        for b in range(n_batches):
            chunk = shard[b * bs:(b + 1) * bs]
            rows = chunk or self.tokenized[:1]  # filler: keeps this process's forwards in step with the others
            batch = {k: v.to(self.procs.device) for k, v in collate(rows, self.pad_id).items()}
            with backend.autocast():
                losses = target_loss(model, selector, batch, reduction="none",
                                     chunk_tokens=self.cfg.train.loss_chunk_tokens)
            if not chunk:
                continue
            counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
            for row_losses, count in zip(torch.split(losses.float(), counts), counts):
                nll_sum += float(row_losses.sum())  # per example, then summed: as reference_loss does
                n_tokens += int(count)
        return all_reduce_sum(nll_sum, self.procs), all_reduce_sum(float(n_tokens), self.procs)

    def _generate(self, model, plain_model, backend) -> dict[str, float]:
        """The task's metrics on completions of the held-out prompts, in the training precision (the
        backend's autocast, as the loss). Each process generates its share (``rank::world``) and the
        completions are gathered, except where the weights are sharded: there every process generates
        all of them in lockstep (:meth:`Backend.decodes_in_lockstep`)."""
        from tunelab.evaluation.engine import generate, generation_settings

        eval_cfg = generation_settings(self.task, self.cfg.eval)
        prompts = self._prompts()
        rank, world = self.procs.rank, self.procs.world
        share = 1 if backend.decodes_in_lockstep(model) else world
        mine = list(range(len(prompts)))[rank::world] if share > 1 else list(range(len(prompts)))
        with backend.autocast():
            texts, _ = generate(plain_model, self.tokenizer, [prompts[i] for i in mine], eval_cfg,
                                self.task.stop_checker(), progress=False)
        raw = [""] * len(prompts)
        parts = all_gather_objects((mine, texts), self.procs) if share > 1 else [(mine, texts)]
        for indices, completions in parts:
            for i, text in zip(indices, completions):
                raw[i] = text
        scored = self.task.score(self.examples, [self.task.trim_completion(c) for c in raw])
        return {k: float(v) for k, v in scored.metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}

    def _prompts(self) -> list[str]:
        """The prompts `tunelab eval` generates from (the run's prompt format)."""
        from tunelab.data.render import generation_prompt

        return [generation_prompt(e, self.tokenizer, self.cfg.task) for e in self.examples]

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"best_ref_nll": self.best_ref_nll, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "last_step": self.last_step, "curve": [dict(p) for p in self.curve]}

    def load_state_dict(self, state: dict) -> None:
        self.best_ref_nll = state.get("best_ref_nll")
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.last_step = int(state.get("last_step", -1))
        self.curve = [dict(p) for p in state.get("curve", [])]

    def summary(self, artifact_step: int) -> dict[str, Any]:
        """results.json's ``eval`` block."""
        return {
            "held_out": self.source, "examples": len(self.tokenized), "every_steps": self.every,
            "best_step": self.best_step, "best_ref_nll": self.best_ref_nll,
            "final_ref_nll": self.curve[-1]["ref_nll"] if self.curve else None,
            "early_stopping_patience": self.patience,
            # the step whose weights the run's artifact holds (the best one under early stopping)
            "artifact_step": artifact_step,
            "curve": self.curve,
        }


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode (no dropout) for the block; every module's own train/eval flag is put back after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
        _reshard(model)


def _reshard(model: torch.nn.Module) -> None:
    """Give FSDP2 back its sharded parameters after forwards without a backward.

    FSDP2 keeps the root module's parameters unsharded after a forward (a backward would need them
    next); only the backward reshards them. After an evaluation none follows, so the module would
    still hold the unsharded tensors, not the optimizer's sharded ones, and the next checkpoint's
    optimizer state would not match the model (seen: KeyError in get_optimizer_state_dict).
    ``FSDPModule.reshard()`` is FSDP2's public call for this; a model without FSDP2 modules is left alone.
    (A Backend hook would be the tidier home: the backends live in train/parallel/, not owned here.)
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def _rng_kept():
    """Whatever the block draws, the training RNG continues as if it had not run (exact resume)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# ---- the trainer's side (functions of a :class:`~tunelab.train.trainer.Trainer`, as in train/results.py) ----
def evaluate_now(trainer) -> None:
    """Score the held-out set at the trainer's step, log it, and pin a new best step's checkpoint."""
    ev, state = trainer.evaluator, trainer.state
    record = ev.evaluate(trainer.model, trainer.plain_model, trainer.selector, trainer.backend, state.step)
    trainer.loggers.log({"step": state.step, "epoch": state.epoch, **record})
    if ev.improved and ev.keeps_best:
        trainer.checkpointer.pinned = ev.pinned_checkpoint(trainer.run)


def load_best(trainer) -> int:
    """Under early stopping, load the best step's weights into the model before the artifact is written;
    returns the step whose weights the artifact holds (every process calls it)."""
    ev, step = trainer.evaluator, trainer.state.step
    if ev is None or not ev.keeps_best or ev.best_step is None or ev.best_step == step:
        return step
    ckpt = trainer.run.checkpoint_path(ev.best_step)
    if not (ckpt / "state.json").is_file():
        log.warning(f"the best step's checkpoint {ckpt} is missing: the artifact holds the last step ({step}) instead")
        return step
    trainer.backend.restore(ckpt, trainer.method, trainer.model, trainer.optimizer, trainer.scheduler)
    log.info(f"early stopping: the artifact holds the best step {ev.best_step} (held-out ref_nll "
             f"{ev.best_ref_nll:.4f}), not the last step {step}")
    return ev.best_step
