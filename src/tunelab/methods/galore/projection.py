"""GaLore's projections: which side(s) of a weight's gradient to project, and the top-r singular basis.

``top_singular_basis`` is hand-written rather than ``torch.svd_lowrank`` because the random sketch
must come from a private generator seeded per (seed, parameter, step): every DDP rank then gets the
same projection, the global RNG is untouched, and a resume recomputes the same projections without
storing any generator state. The algorithm is the randomized range finder of Halko et al., as in
``torch.svd_lowrank``; ``svd="exact"`` uses ``torch.linalg.svd`` like the reference.
"""

from __future__ import annotations

from typing import Optional

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_MODES = ("randomized", "exact")


def projection_sides(shape: tuple[int, ...] | torch.Size, proj_type: str) -> tuple[bool, bool]:
    """(left, right): which orthonormal factors ``proj_type`` keeps for a weight of this shape.

    ``std`` projects the larger dimension away from the moments' smaller side: right (Vh[:r]) when
    m ≥ n, else left (U[:, :r]); ``reverse_std`` the opposite; ``full`` both sides.
    """
    m, n = int(shape[0]), int(shape[1])
    if proj_type == "std":
        return (False, True) if m >= n else (True, False)
    if proj_type == "reverse_std":
        return (True, False) if m >= n else (False, True)
    if proj_type == "left":
        return True, False
    if proj_type == "right":
        return False, True
    if proj_type == "full":
        return True, True
    raise ValueError(f"unknown GaLore proj_type '{proj_type}' (known: {', '.join(PROJ_TYPES)})")


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps), stable across runs and machines."""
    mask = (1 << 64) - 1
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


def top_singular_basis(
    grad: torch.Tensor,
    rank: int,
    left: bool,
    right: bool,
    svd: str = "randomized",
    oversample: int = 8,
    niter: int = 2,
    seed: int = 0,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Orthonormal bases of ``grad``'s top-``rank`` singular subspace (fp16/bf16 computed in fp32).

    Returns (U[:, :rank] or None, Vh[:rank] or None) as requested by ``left`` / ``right``.
    """
    a = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
    m, n = a.shape
    if svd == "exact":
        u, _s, vh = torch.linalg.svd(a, full_matrices=False)
        return (u[:, :rank] if left else None), (vh[:rank, :] if right else None)
    if svd != "randomized":
        raise ValueError(f"unknown svd mode '{svd}' (known: {', '.join(SVD_MODES)})")
    q = min(rank + max(oversample, 0), m, n)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=torch.float64).to(a.device, a.dtype)
    basis = torch.linalg.qr(a @ omega).Q  # m×q, spans (approximately) the top column space
    for _ in range(max(niter, 0)):  # power iterations sharpen the spectrum
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    ub, _s, vh = torch.linalg.svd(basis.mT @ a, full_matrices=False)  # q×n, small
    u = (basis @ ub[:, :rank]) if left else None
    return u, (vh[:rank, :] if right else None)
