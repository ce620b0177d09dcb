"""RoSA's tensor operations: the frozen base weight (plain or bitsandbytes 4-bit), W + S, and the SDDMM.

Hand-written because the reference's CUDA kernels (spops: sm80+, int16 indices) do not run on the
CPU and fail to build for some users; everything here is plain PyTorch. The mask is a sorted list of
flat row-major indices into W (see :class:`~tunelab.methods.rosa.layer.RosaLinear`).

SDDMM, the gradient of the sparse values: ``dv[k] = Σ_t dO[t, row_k]·X[t, col_k]``, never a dense dW.
Measured on CPU, 1 thread, 1600 tokens, SmolLM2-135M shapes (see the RoSA section of README.md):
``torch.sparse.sampled_addmm`` on the CSR pattern took 2–7 ms per layer; the row/column gather
formulation 6–80 ms (it moves T×nnz values); the dense dOᵀ·X GEMM 11–33 ms. ``sddmm="auto"``
therefore uses sampled_addmm (fp32 math), falling back to the chunked gather where a backend
lacks it. ``sddmm="dense"`` (one transient m×n GEMM per layer) exists for GPUs, where a dense
bf16 GEMM can beat a bandwidth-bound SDDMM; measure before switching.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

SDDMM_IMPLS = ("auto", "sampled", "gather", "dense")
# Elements per chunk for the gather formulations (bounds the T×chunk temporaries).
CHUNK_ELEMS = 1 << 24


# ------------------------------------------------------------------------------------------
# Base weights (plain or quantized)
# ------------------------------------------------------------------------------------------


def is_4bit(base: nn.Module) -> bool:
    w = getattr(base, "weight", None)
    return w is not None and w.__class__.__name__ == "Params4bit"


def is_8bit(base: nn.Module) -> bool:
    weight = getattr(base, "weight", None)
    return base.__class__.__name__ == "Linear8bitLt" or weight.__class__.__name__ == "Int8Params"


def compute_dtype(base: nn.Module, x: Optional[torch.Tensor] = None) -> torch.dtype:
    """The dtype the layer computes in: the weight's for float weights, compute_dtype for 4-bit."""
    if is_4bit(base):
        cdt = getattr(base, "compute_dtype", None)
        if cdt is not None:
            return cdt
        if x is not None and x.dtype.is_floating_point:
            return x.dtype
        return torch.float32
    return base.weight.dtype


def dense_weight(base: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W as a dense float tensor (m×n). Plain weights are returned as is (never modify them);
    4-bit weights are dequantized into a fresh tensor."""
    w = base.weight
    if is_4bit(base):
        import bitsandbytes.functional as bnbF

        out = bnbF.dequantize_4bit(w.data, w.quant_state)
        return out.to(dtype) if dtype is not None else out
    if is_8bit(base):
        raise NotImplementedError("RoSA does not support bitsandbytes 8-bit bases; use 4-bit or a float base")
    w = w.detach()
    return w.to(dtype) if dtype is not None and w.dtype != dtype else w


def effective_weight(base: nn.Module, idx: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh dense ``W + dense(S)`` in ``dtype``."""
    w = dense_weight(base, dtype)
    if not is_4bit(base) and w.data_ptr() == base.weight.data_ptr():
        w = w.clone()
    w.view(-1).index_add_(0, idx, values.detach().to(dtype))
    return w


# ------------------------------------------------------------------------------------------
# SDDMM: the dense gradient dOᵀ·X sampled on the mask
# ------------------------------------------------------------------------------------------


def _sddmm_sampled(d_out: torch.Tensor, x: torch.Tensor, meta: dict) -> torch.Tensor:
    m, n = meta["shape"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            meta["crow"], meta["cols"], torch.zeros(meta["cols"].numel(), dtype=d_out.dtype, device=d_out.device),
            (m, n), check_invariants=False,
        )
        out = torch.sparse.sampled_addmm(pattern, d_out.t(), x, beta=0.0, alpha=1.0)
    return out.values()


def _sddmm_gather(d_out: torch.Tensor, x: torch.Tensor, meta: dict, acc_dtype: torch.dtype) -> torch.Tensor:
    rows, cols = meta["rows"], meta["cols"]
    nnz, t = rows.numel(), d_out.shape[0]
    d_t = d_out.t().contiguous()  # m×T: gathering whole rows is contiguous
    x_t = x.t().contiguous()  # n×T
    out = torch.empty(nnz, dtype=acc_dtype, device=d_out.device)
    chunk = max(1, CHUNK_ELEMS // max(t, 1))
    for s in range(0, nnz, chunk):
        e = min(nnz, s + chunk)
        a = d_t.index_select(0, rows[s:e]).to(acc_dtype)
        b = x_t.index_select(0, cols[s:e]).to(acc_dtype)
        out[s:e] = (a * b).sum(1)
    return out


def _sddmm_dense(d_out: torch.Tensor, x: torch.Tensor, meta: dict, acc_dtype: torch.dtype) -> torch.Tensor:
    g = d_out.t() @ x  # transient m×n
    return g.view(-1).index_select(0, meta["flat"]).to(acc_dtype)


_SAMPLED_BROKEN: set[str] = set()


def sddmm(d_out: torch.Tensor, x: torch.Tensor, meta: dict, impl: str = "auto") -> torch.Tensor:
    """``(d_outᵀ·x)`` at the mask positions, in mask order, in fp32 (fp64 for fp64 inputs).

    d_out: T×m, x: T×n (any float dtype). meta: the layer's mask metadata (see RosaLinear._meta).
    """
    acc_dtype = torch.promote_types(d_out.dtype, torch.float32)
    if impl == "dense":
        return _sddmm_dense(d_out, x, meta, acc_dtype)
    if impl == "gather":
        return _sddmm_gather(d_out, x, meta, acc_dtype)
    dev = d_out.device.type
    if impl == "sampled" or dev not in _SAMPLED_BROKEN:
        try:
            return _sddmm_sampled(d_out.to(acc_dtype), x.to(acc_dtype), meta)
        except (RuntimeError, NotImplementedError):
            if impl == "sampled":
                raise
            _SAMPLED_BROKEN.add(dev)
            warnings.warn(
                f"torch.sparse.sampled_addmm failed on {dev}; RoSA falls back to the gather SDDMM "
                f"(slower; method.sddmm=dense may be faster on GPUs)",
                RuntimeWarning,
                stacklevel=2,
            )
    return _sddmm_gather(d_out, x, meta, acc_dtype)
