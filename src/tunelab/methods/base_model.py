"""The untrained base model as a method: ``method=base``, what ``tunelab eval --base`` evaluates.

A registered no-op, so the evaluator, generator and report treat a baseline like any other method
(its row, colour and order come from here) instead of testing for the word "base" everywhere.
It trains nothing: ``tunelab train method=base`` is refused with the command that evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tunelab.config import MethodConfig, RunConfig, opt
from tunelab.methods.base import Method
from tunelab.registry import METHODS


@dataclass
class BaseModelConfig(MethodConfig):
    """The untrained base model (nothing is trained; used by `tunelab eval --base`)."""

    name: str = opt("base", "The untrained base model: evaluate or generate with it as it is.")


@METHODS.register
class BaseModelMethod(Method):
    name = "base"
    config_cls = BaseModelConfig
    artifact_dir = None  # nothing is trained, so nothing is saved or loaded
    trains = False
    display_order = 0

    def prepare(self, model: nn.Module, run_cfg: RunConfig) -> nn.Module:
        raise ValueError("method=base is the untrained model and has nothing to train: evaluate it with "
                         "`tunelab eval --base ...`, or choose a method to train (method=lora, full, rosa, galore)")

    def save_artifact(self, model: nn.Module, out_dir: Path) -> None:
        raise ValueError("method=base has no trained artifact to save")

    def load_for_inference(self, base_model: nn.Module, artifact_dir: Path | None) -> nn.Module:
        return base_model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
