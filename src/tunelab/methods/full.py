"""Full fine-tuning: every weight trains with AdamW. The baseline every method is compared to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tunelab.config import MethodConfig, RunConfig, opt
from tunelab.methods.base import Method
from tunelab.registry import METHODS


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning of all parameters."""

    name: str = opt("full", "Full fine-tuning (all weights train).")
    freeze_embeddings: bool = opt(False, "Keep the input embeddings (and tied lm_head) frozen.")


@METHODS.register
class FullMethod(Method):
    name = "full"
    display_order = 10
    config_cls = FullConfig
    artifact_dir = "model"
    updates_base_weights = True  # train.precision=bf16-true is refused: its bf16 weights would lose small updates

    @classmethod
    def validate(cls, run_cfg: RunConfig) -> list[str]:
        if run_cfg.model.load_in_4bit:
            return ["method=full cannot train a 4-bit base (its weights are frozen integers): "
                    "set model.load_in_4bit=false or use method=lora (QLoRA)"]
        return []

    def prepare(self, model: nn.Module, run_cfg: RunConfig) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        if self.config.freeze_embeddings:
            model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def save_artifact(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load_for_inference(self, base_model: nn.Module, artifact_dir: Path) -> nn.Module:
        from safetensors.torch import load_file

        files = sorted(Path(artifact_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{artifact_dir} holds no *.safetensors weights")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        missing, unexpected = base_model.load_state_dict(state, strict=False)
        # tied lm_head is not stored separately
        missing = [m for m in missing if not (m.endswith("lm_head.weight") and base_model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"{artifact_dir} does not match the base model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return base_model

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # nothing to fold in: the weights are the model


