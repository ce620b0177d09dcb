"""GaLore's settings (:class:`GaloreConfig`); what they do is in :mod:`tunelab.methods.galore.optim`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from tunelab.config import MethodConfig, opt
from tunelab.methods.galore.projection import PROJ_TYPES, SVD_MODES


@dataclass
class GaloreConfig(MethodConfig):
    """GaLore: gradient low-rank projection of the Adam state (all targeted weights train in full)."""

    name: str = opt("galore", "Full-parameter training with Adam moments in a low-rank gradient subspace.")
    rank: int = opt(8, "Rank r of the gradient subspace of each projected weight (paper pre-training: 128).")
    update_proj_gap: int = opt(200, "Recompute each projection every this many optimizer steps (and at step 0).")
    scale: float = opt(
        0.25, "Multiplier of the back-projected update: the effective step is train.lr × scale "
        "(reference fine-tuning: lr 7e-4 × 0.25; LLaMA-Factory: scale 2; GLUE recipe: scale 4)."
    )
    proj_type: str = opt(
        "std", f"Which side to project ({', '.join(PROJ_TYPES)}): std = right (Vh) when rows >= cols "
        "else left (U); reverse_std the opposite; left/right forced; full both."
    )
    target_modules: Union[str, list[str]] = opt(
        "all-linear", "Linear layers whose weights are projected: 'all-linear' (every linear layer of "
        "attention and MLP, never lm_head) or a list of module-name suffixes (q_proj, down_proj, ...). "
        "Everything else (embeddings, lm_head, norms, biases) trains with plain AdamW."
    )
    svd: str = opt(
        "randomized", f"How to find the subspace ({', '.join(SVD_MODES)}): randomized = randomized range "
        "finder (as torch.svd_lowrank, seeded: identical on every DDP rank), exact = torch.linalg.svd."
    )
    svd_oversample: int = opt(8, "Randomized SVD: extra sketch columns beyond the rank (q = rank + oversample).")
    svd_niter: int = opt(2, "Randomized SVD: power iterations (more = closer to the exact subspace).")
    clamp_rank: bool = opt(
        False, "Lower the rank to a layer's smaller dimension instead of failing when it is larger."
    )
    optim_8bit: bool = opt(
        False, "Keep the Adam moments (of tensors >= 4096 elements) in bitsandbytes blockwise 8-bit (CPU or CUDA). "
        "GaLore's own 8-bit switch: train.optim stays adamw."
    )
    layerwise: bool = opt(
        False, "Update each weight inside backward and free its gradient at once (saves the gradient "
        "memory). Needs train.max_grad_norm=0 and a single process; works with train.grad_accum."
    )
