"""The RoSA schedule callback: which optimizer steps train LoRA, collect gradients, train the sparse part.

``wlN``: LoRA alone for steps [0, N); LoRA + gradient collection for [N, N + spa_num_grads); the
masks are built at the end of the last collection step; LoRA + sparse from then on. A loaded mask
(``mask_from`` or a checkpoint) skips the collection. The reference's callback froze every parameter
and printed every step; this one only flips the layers' ``collecting`` / ``spa_active`` flags.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from tunelab.methods.base import Callback, TrainState
from tunelab.methods.rosa.adapters import rosa_layers
from tunelab.methods.rosa.config import RosaConfig, parse_schedule
from tunelab.methods.rosa.layer import RosaLinear
from tunelab.methods.rosa.masks import build_masks
from tunelab.utils import log


class RosaScheduler(Callback):
    """Switches gradient collection and the sparse part by optimizer step; builds the masks."""

    def __init__(self, config: RosaConfig):
        self.config = config
        kind, warmup = parse_schedule(config.schedule) or ("wl", 0)
        self.kind = kind
        self.spa_start = warmup  # first optimizer step the sparse part may train / collection may start
        self.mask_ready = False
        self.mask_source: Optional[str] = None  # collected | mask_from | checkpoint
        self.mask_built_at_step: Optional[int] = None
        self.collected_steps = 0
        self.collect_start_step: Optional[int] = None
        self.collect_time_s = 0.0
        self.build_time_s = 0.0
        self.collected_micro_batches: dict[str, int] = {}
        self._collect_t0: Optional[float] = None
        self._collecting = False

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def has_sparse(self) -> bool:
        return self.kind != "lora_only"

    def _layers(self, model: nn.Module) -> list[RosaLinear]:
        return [m for m in rosa_layers(model) if m.nnz > 0]

    def _set_collecting(self, layers: list[RosaLinear], on: bool) -> None:
        dev = torch.device("cpu") if self.config.collect_device == "cpu" else None
        for m in layers:
            m.collecting = on
            m.grad_acc_mode = self.config.grad_acc_mode
            m.collect_device = dev
        self._collecting = on

    # ---- hooks -------------------------------------------------------------------------------
    def on_train_begin(self, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        layers = self._layers(model)
        model_has_masks = bool(layers) and all(m.mask_ready for m in layers)
        if self.mask_ready and not model_has_masks:
            raise RuntimeError(
                "RoSA: the checkpoint says the masks were built, but the model holds none: load the "
                "checkpoint's trainable state (it carries the mask indices) before training resumes"
            )
        if model_has_masks and not self.mask_ready:
            self.mask_ready = True
            self.mask_source = self.mask_source or ("mask_from" if self.config.mask_from else "checkpoint")
        if not self.mask_ready and self.has_sparse and state.step > self.spa_start and self.collected_steps == 0:
            if state.is_main:
                log.info(
                    f"RoSA: resuming at step {state.step} inside/after the collection window without masks; "
                    f"collecting gradients again for {self.config.spa_num_grads} step(s) from now"
                )

    def on_step_begin(self, state: TrainState, model: nn.Module) -> None:
        layers = self._layers(model)
        if not self.has_sparse or not layers:
            return
        if self.mask_ready:
            active = state.step >= self.spa_start
            for m in layers:
                m.spa_active = active
            if self._collecting:
                self._set_collecting(layers, False)
            return
        if state.step >= self.spa_start:
            if not self._collecting:
                for m in layers:
                    m.reset_collection()
                self._set_collecting(layers, True)
                self.collect_start_step = state.step
                self.collected_steps = 0
                if state.is_main:
                    log.info(
                        f"RoSA: collecting gradients ({self.config.grad_acc_mode}) for the masks over "
                        f"{self.config.spa_num_grads} step(s) from step {state.step}"
                    )
            if self._collect_t0 is None:
                self._collect_t0 = time.perf_counter()

    def on_step_end(self, state: TrainState, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self._collecting:
            return
        self.collected_steps += 1
        if self.collected_steps < self.config.spa_num_grads:
            return
        layers = self._layers(model)
        self._set_collecting(layers, False)
        if any(m.weight.is_cuda for m in layers):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.collect_time_s += t0 - (self._collect_t0 or t0)
        self._collect_t0 = None
        self.collected_micro_batches = build_masks(layers)
        self.build_time_s = time.perf_counter() - t0
        self.mask_ready = True
        self.mask_source = "collected"
        self.mask_built_at_step = state.step  # the masks train from this step on
        for m in layers:
            m.spa_active = state.step >= self.spa_start
        if state.is_main:
            nnz = sum(m.nnz for m in layers)
            log.info(
                f"RoSA: masks built after step {state.step - 1} ({nnz:,} sparse values over {len(layers)} layers; "
                f"collection {self.collect_time_s:.1f}s, top-k {self.build_time_s:.1f}s)"
            )

    def on_train_end(self, state: TrainState, model: nn.Module) -> None:
        if self.config.mask_only and not self.mask_ready and state.is_main:
            log.warning(
                f"RoSA mask_only run ended at step {state.step} before the masks were built (at the end of step "
                f"{self.spa_start + self.config.spa_num_grads - 1}); raise train.max_steps"
            )

    def should_stop(self, state: TrainState) -> bool:
        return bool(self.config.mask_only and self.mask_ready)

    def state_dict(self) -> dict:
        return {
            "mask_ready": self.mask_ready,
            "mask_source": self.mask_source,
            "mask_built_at_step": self.mask_built_at_step,
            "collect_time_s": self.collect_time_s,
            "build_time_s": self.build_time_s,
            "collected_micro_batches": dict(self.collected_micro_batches),
        }

    def load_state_dict(self, state: dict) -> None:
        self.mask_ready = bool(state.get("mask_ready", False))
        self.mask_source = state.get("mask_source")
        self.mask_built_at_step = state.get("mask_built_at_step")
        self.collect_time_s = float(state.get("collect_time_s", 0.0))
        self.build_time_s = float(state.get("build_time_s", 0.0))
        self.collected_micro_batches = dict(state.get("collected_micro_batches", {}))
        # gradients of an unfinished window are not checkpointed: a resume restarts the window
        self.collected_steps = 0
        self._collecting = False
        self._collect_t0 = None
