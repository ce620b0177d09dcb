"""RoSA's settings (:class:`RosaConfig`) and its ``schedule`` forms (default, wlN, spa_only, lora_only).

The schedule forms are the reference code's own names (IST-DASLab/RoSA); no library parses them.
What each setting does to training is in :mod:`tunelab.methods.rosa.method` and README.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional, Union

from tunelab.config import MethodConfig, opt

SCHEDULE_FORMS = (
    "default (= wl0), wlN with N >= 0 (e.g. wl64: LoRA alone for N steps, then collect, then LoRA + sparse), "
    "spa_only, lora_only"
)


@dataclass
class RosaConfig(MethodConfig):
    """RoSA: LoRA + a sparse adapter on a gradient-chosen mask (Nikdan et al., arXiv 2401.04679)."""

    name: str = opt("rosa", "Robust Adaptation: low-rank + sparse adapters.")
    rank: int = opt(8, "LoRA rank r (0 only with schedule=spa_only).")
    alpha: float = opt(16.0, "LoRA alpha; the low-rank update is scaled by alpha/r (alpha/sqrt(r) with use_rslora).")
    dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_modules: Union[str, list[str]] = opt(
        "all-linear",
        "Modules to adapt: 'all-linear' (every linear layer but the output head), a list of module-name "
        "suffixes (q_proj, v_proj, ...) or one regular expression matched against full module names.",
    )
    density: float = opt(
        0.006, "Sparse density d: each adapted m×n layer trains int(d·m·n) values (0 only with schedule=lora_only)."
    )
    rank_pattern: dict = opt(factory=dict, help="Per-module rank overrides {regex: rank}; first match wins.")
    alpha_pattern: dict = opt(factory=dict, help="Per-module alpha overrides {regex: alpha}; first match wins.")
    density_pattern: dict = opt(factory=dict, help="Per-module density overrides {regex: density}; first match wins.")
    schedule: str = opt("default", f"When each part trains: {SCHEDULE_FORMS}.")
    spa_num_grads: int = opt(1, "Optimizer steps whose gradients (all their micro-batches) are accumulated to choose the mask.")
    grad_acc_mode: Literal["mean", "mean_squared"] = opt(
        "mean_squared", "Mask score: |mean of G| (mean) or mean of G² (mean_squared, an empirical diagonal Fisher)."
    )
    lora_lr: Optional[float] = opt(None, "Learning rate of the LoRA factors (null = train.lr; the paper uses 7e-4).")
    sparse_lr: float = opt(2e-4, "Learning rate of the sparse values (the paper uses 2e-4).")
    mask_from: Optional[str] = opt(
        None, "Masks saved by an earlier run (RUN/adapter/masks.safetensors, or its folder): skips gradient collection."
    )
    mask_only: bool = opt(
        False, "Stop as soon as the masks are built and saved (phase 1 of the paper's recipe; pair with schedule=wl64)."
    )
    use_rslora: bool = opt(False, "Rank-stabilised scaling alpha/sqrt(r) for the LoRA part.")
    bias: Literal["none", "all", "rosa_only"] = opt(
        "none", "Also train biases: none, all, or only those of adapted layers (saved with the adapter)."
    )
    modules_to_save: Optional[list[str]] = opt(
        None, "Module-name suffixes trained in full and saved with the adapter (e.g. lm_head)."
    )
    sddmm: Literal["auto", "sampled", "gather", "dense"] = opt(
        "auto",
        "How the sparse gradient dOᵀ·X is sampled on the mask: sampled (torch.sparse.sampled_addmm, fastest "
        "on CPU), gather (pure indexing), dense (one transient m×n GEMM per layer; try on GPUs), auto = sampled "
        "with a gather fallback.",
    )
    collect_device: Literal["auto", "cpu"] = opt(
        "auto",
        "Where the fp32 gradient accumulators of the mask phase live: auto (the weights' device; 4 bytes per "
        "adapted weight) or cpu (saves GPU memory, slower collection steps).",
    )


def parse_schedule(schedule: str) -> Optional[tuple[str, int]]:
    """('wl', N) | ('spa_only', 0) | ('lora_only', 0), or None when unknown."""
    s = str(schedule).strip()
    if s in ("default", "df"):
        return ("wl", 0)
    if s in ("spa_only", "lora_only"):
        return (s, 0)
    m = re.fullmatch(r"wl(\d+)", s)
    if m:
        return ("wl", int(m.group(1)))
    return None
