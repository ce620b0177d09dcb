"""LoRA and its family (QLoRA, DoRA, rsLoRA, init variants) through PEFT.

W' = W + (alpha / r) · B·A with A (r×n) and B (m×r, zero-initialised) trained and W frozen
(Hu et al., arXiv 2106.09685). rsLoRA scales by alpha/sqrt(r) (arXiv 2312.03732); DoRA splits
magnitude and direction (arXiv 2402.09353); QLoRA keeps W in 4-bit NF4 (arXiv 2305.14314).
The adapter is saved in PEFT's own format, so ``PeftModel.from_pretrained(base, RUN/adapter)`` loads it.
Training builds PEFT's layers except on plain ``nn.Linear`` targets, where
:mod:`tunelab.methods.lora_dropout` keeps the adapter-input dropout's mask as one bit per element
instead of a dropped-out copy of every layer's input (PEFT's numbers, less memory), and on CPU draws
the dropout masks from a quarter of the random numbers torch's ``bernoulli_`` would (``FastDropout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Union

from torch import nn

from tunelab.config import MethodConfig, RunConfig, opt
from tunelab.methods.base import Callback, Method, TrainState
from tunelab.registry import METHODS

INIT_CHOICES = ("default", "gaussian", "pissa", "olora", "loftq", "eva", "corda")


@dataclass
class LoraConfig(MethodConfig):
    """LoRA adapters (PEFT)."""

    name: str = opt("lora", "Low-rank adapters through PEFT.")
    rank: int = opt(8, "LoRA rank r.")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = opt(0.05, "Dropout on the adapter input.")
    target_modules: Union[str, list[str]] = opt(
        "all-linear", "Modules to adapt: 'all-linear' or a list of module-name suffixes (q_proj, v_proj, ...)."
    )
    use_rslora: bool = opt(False, "Rank-stabilised LoRA: scale alpha/sqrt(r).")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA); 1.2-2x slower per step.")
    init: str = opt("default", f"Adapter init: {', '.join(INIT_CHOICES)}.")
    bias: str = opt("none", "Train biases: none, all, lora_only.")
    modules_to_save: Optional[list[str]] = opt(None, "Extra modules trained in full and saved (e.g. lm_head).")
    rank_pattern: dict = opt(factory=dict, help="Per-module rank overrides {regex: rank}.")
    alpha_pattern: dict = opt(factory=dict, help="Per-module alpha overrides {regex: alpha}.")


@METHODS.register
class LoraMethod(Method):
    name = "lora"
    display_order = 20
    rank_key = "rank"
    config_cls = LoraConfig
    artifact_dir = "adapter"
    #: train with :class:`~tunelab.methods.lora_dropout.BitMaskDropoutLinear` layers (False: PEFT's
    #: stock layers, which keep a dropped-out copy of each input; bench/bench_memory.py compares them)
    bit_mask_dropout: ClassVar[bool] = True

    @classmethod
    def validate(cls, run_cfg: RunConfig) -> list[str]:
        c: LoraConfig = run_cfg.method  # type: ignore[assignment]
        p = []
        if c.rank < 1:
            p.append(f"method.rank must be >= 1, got {c.rank}")
        if c.alpha <= 0:
            p.append(f"method.alpha must be > 0, got {c.alpha}")
        if not 0.0 <= c.dropout < 1.0:
            p.append(f"method.dropout must be in [0, 1), got {c.dropout}")
        if c.init not in INIT_CHOICES:
            p.append(f"method.init '{c.init}' is unknown (known: {', '.join(INIT_CHOICES)})")
        if c.bias not in ("none", "all", "lora_only"):
            p.append(f"method.bias must be none, all or lora_only, got '{c.bias}'")
        return p

    def peft_config(self):
        import peft

        c: LoraConfig = self.config  # type: ignore[assignment]
        init = True if c.init == "default" else c.init
        config = peft.LoraConfig(
            r=c.rank,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=c.target_modules,
            use_rslora=c.use_rslora,
            use_dora=c.use_dora,
            init_lora_weights=init,
            bias=c.bias,
            modules_to_save=c.modules_to_save,
            rank_pattern=dict(c.rank_pattern),
            alpha_pattern=dict(c.alpha_pattern),
            task_type="CAUSAL_LM",
        )
        if self.bit_mask_dropout:
            from tunelab.methods import lora_dropout

            lora_dropout.register(config)
        return config

    def prepare(self, model: nn.Module, run_cfg: RunConfig) -> nn.Module:
        import peft

        if run_cfg.model.load_in_4bit:
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=run_cfg.model.gradient_checkpointing
            )
        try:
            model = peft.get_peft_model(model, self.peft_config())
        except ValueError as exc:
            raise ValueError(
                f"LoRA could not be applied: {exc}. Check method.target_modules "
                f"(got {self.config.target_modules!r}); 'all-linear' adapts every linear layer but the output head."
            ) from exc
        from tunelab.methods.lora_dropout import share_dropout_scratch, use_fast_dropout

        use_fast_dropout(model)  # CPU: a quarter of the random numbers per mask (see FastDropout)
        self._scratch = share_dropout_scratch(model)  # CPU: the dropout's temporaries reuse one memory
        return model

    def callbacks(self) -> list[Callback]:
        return [_ReleaseDropoutScratch(self)]

    def save_artifact(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def load_for_inference(self, base_model: nn.Module, artifact_dir: Path) -> nn.Module:
        import peft

        return peft.PeftModel.from_pretrained(base_model, str(artifact_dir), is_trainable=False)

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()


class _ReleaseDropoutScratch(Callback):
    """Frees the dropout's scratch memory (:class:`~tunelab.methods.lora_dropout.DropoutScratch`) when
    training ends: evaluation and generation run without dropout."""

    def __init__(self, method: LoraMethod):
        self.method = method

    def on_train_end(self, state: TrainState, model: nn.Module) -> None:
        scratch = getattr(self.method, "_scratch", None)
        if scratch is not None:
            scratch.release()
