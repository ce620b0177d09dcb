"""RoSA math in pure PyTorch: the adapted linear layer, its autograd Functions and mask selection.

One adapted layer computes ``O = X·(W + S)ᵀ + b + s·(drop(X)·Aᵀ)·Bᵀ`` with W frozen (plain or
bitsandbytes 4-bit), LoRA factors A (r×n), B (m×r), scale s = alpha/r, and a sparse S holding
``nnz`` trainable values on a fixed mask (flat row-major indices into W).

Formulations (measured on CPU, 1 thread, 1600 tokens, SmolLM2-135M shapes; see the RoSA section of README.md):

* forward, training: ``W_eff = W.clone(); W_eff.view(-1).index_add_(idx, v)`` then one dense GEMM.
  The copy costs 0.1–0.5 ms per layer against 14–36 ms for the GEMM, and is recomputed in
  backward rather than saved (no extra weight-sized activation memory). A CSR
  ``F.linear(X, W) + (S·Xᵀ)ᵀ`` was 3–5 ms slower per layer and per direction.
* gradient of the values: SDDMM, ``dv[k] = Σ_t dO[t, row_k]·X[t, col_k]``, never a dense dW.
  ``torch.sparse.sampled_addmm`` on the CSR pattern took 2–7 ms per layer; the row/column gather
  formulation 6–80 ms (it moves T×nnz values); the dense dOᵀ·X GEMM 11–33 ms. ``sddmm="auto"``
  therefore uses sampled_addmm (fp32 math), falling back to the chunked gather where a backend
  lacks it. ``sddmm="dense"`` (one transient m×n GEMM per layer) exists for GPUs, where a dense
  bf16 GEMM can beat a bandwidth-bound SDDMM; measure before switching.
* inference (no autograd): few tokens ⇒ ``base(X)`` plus a gather/index_add of the nnz products
  (no weight copy per decoding step, works on 4-bit bases unchanged); many tokens ⇒ ``W_eff``.
* gradient collection for the mask: an identity autograd Function on the base output captures
  dO in backward and accumulates ``G = dOᵀ·X`` (or G²) in fp32 into a per-layer buffer. This is
  the forward/backward-hook construction of the paper without ``register_full_backward_hook``:
  W never requires grad (4-bit bases work), it fires once per backward even with gradient
  checkpointing (a forward hook fires twice there), and a zero-size leaf forces the backward to
  run where nothing upstream requires grad (first layer, ``spa_only``).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RosaLinear",
    "dense_weight",
    "is_4bit",
    "is_8bit",
    "sddmm",
    "topk_indices",
    "SDDMM_IMPLS",
]

SDDMM_IMPLS = ("auto", "sampled", "gather", "dense")
# Elements per chunk for the gather formulations (bounds the T×chunk temporaries).
_CHUNK_ELEMS = 1 << 24


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


def _effective_weight(base: nn.Module, idx: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
    chunk = max(1, _CHUNK_ELEMS // max(t, 1))
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


# ------------------------------------------------------------------------------------------
# Autograd Functions
# ------------------------------------------------------------------------------------------


class _SparseLinearFn(torch.autograd.Function):
    """``F.linear(x, W + S, bias)`` with SDDMM gradients for the values of S (W frozen)."""

    @staticmethod
    def forward(ctx, x, values, bias, layer):  # type: ignore[override]
        base = layer.base_layer
        cdt = compute_dtype(base, x)
        meta = layer._meta()
        w_eff = _effective_weight(base, meta["flat"], values, cdt)
        out = F.linear(x.to(cdt), w_eff, None if bias is None else bias.to(cdt))
        del w_eff
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        ctx.cdt = cdt
        ctx.save_for_backward(x, values)
        return out

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        x, values = ctx.saved_tensors
        layer = ctx.layer
        m, n = layer.out_features, layer.in_features
        meta = layer._meta()
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            w_eff = _effective_weight(layer.base_layer, meta["flat"], values, ctx.cdt)
            dx = torch.matmul(d_out.to(ctx.cdt), w_eff).to(ctx.x_dtype)
            del w_eff
        if ctx.needs_input_grad[1]:
            dv = sddmm(d_out.reshape(-1, m), x.reshape(-1, n), meta, layer.sddmm_impl).to(values.dtype)
        if ctx.needs_input_grad[2]:
            db = d_out.reshape(-1, m).sum(0).to(layer.base_layer.bias.dtype)
        return dx, dv, db, None


class _GradTap(torch.autograd.Function):
    """Identity on the base output; in backward, hands (dO, X) to the layer's gradient collector."""

    @staticmethod
    def forward(ctx, out, x, dummy, layer):  # type: ignore[override]
        ctx.layer = layer
        ctx.save_for_backward(x)
        # a copy, not a view: models may modify a layer's output in place (collection steps only)
        return out.clone()

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        ctx.layer._accumulate(d_out, x)
        return (d_out if ctx.needs_input_grad[0] else None), None, None, None


# ------------------------------------------------------------------------------------------
# Mask selection
# ------------------------------------------------------------------------------------------


def topk_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k largest entries of ``score`` (per layer, not global)."""
    flat = score.reshape(-1)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=flat.device)
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    idx = torch.topk(flat, k, sorted=False).indices
    return idx.sort().values


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices where they fit (halves the buffer and the saved file), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


# ------------------------------------------------------------------------------------------
# The adapted layer
# ------------------------------------------------------------------------------------------


class RosaLinear(nn.Module):
    """A frozen linear layer with a LoRA adapter and a sparse adapter on a fixed mask.

    Parameters: ``lora_A`` (r×n), ``lora_B`` (m×r) and ``rosa_values`` (nnz,), all fp32 (fp64 on an
    fp64 base) whatever the base dtype.
    Buffer: ``rosa_indices`` (nnz,) flat row-major indices into W, sorted, int32 where they fit
    (non-persistent: the method's state dicts and files carry it explicitly, with the mask state).
    The values exist from construction on (zero), so an optimizer built before the mask exists
    already holds them; until the mask is set they take no part in the forward and get no grad.

    Flags set by the RoSA scheduler: ``collecting`` (accumulate G for the mask), ``spa_active``
    (the sparse part is in the forward and trains). ``mask_ready`` tells whether the indices hold a
    mask.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        name: str,
        r: int,
        alpha: float,
        dropout: float,
        nnz: int,
        use_rslora: bool = False,
        sddmm_impl: str = "auto",
    ):
        super().__init__()
        if is_8bit(base_layer):
            raise NotImplementedError(
                f"{name}: bitsandbytes 8-bit layers are not supported by RoSA; load the base in 4-bit or full precision"
            )
        self.base_layer = base_layer
        self.rosa_name = name
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        numel = self.in_features * self.out_features
        if not 0 <= nnz <= numel:
            raise ValueError(f"{name}: nnz {nnz} outside [0, {numel}]")
        self.r = int(r)
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = 0.0 if r == 0 else (alpha / math.sqrt(r) if use_rslora else alpha / r)
        self.nnz = int(nnz)
        self.sddmm_impl = sddmm_impl
        device = base_layer.weight.device
        # adapters train in fp32 (fp64 on an fp64 base), whatever the base dtype (bf16, 4-bit)
        pdt = torch.promote_types(base_layer.weight.dtype, torch.float32)
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=pdt))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=pdt))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.nnz > 0:
            self.rosa_values = nn.Parameter(torch.zeros(self.nnz, device=device, dtype=pdt))
            self.register_buffer(
                "rosa_indices", torch.zeros(self.nnz, device=device, dtype=index_dtype(numel)), persistent=False
            )
        else:
            self.register_parameter("rosa_values", None)
            self.register_buffer("rosa_indices", None, persistent=False)
        self.mask_ready = False
        self.spa_active = False
        self.collecting = False
        self.grad_acc_mode = "mean_squared"
        self.collect_device: Optional[torch.device] = None  # None: the weight's device
        self._acc: Optional[torch.Tensor] = None
        self._acc_count = 0
        self._mask_version = 0
        self._meta_cache: Optional[tuple] = None

    # ---- transformers compatibility (code that inspects q_proj.weight etc.) ------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}→{self.out_features}, r={self.r}, nnz={self.nnz}, mask_ready={self.mask_ready}"

    # ---- mask ----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_mask(self, flat_idx: torch.Tensor) -> None:
        """Install a mask (flat row-major indices, any int dtype); checks count, range, uniqueness."""
        if self.nnz == 0:
            if flat_idx.numel():
                raise ValueError(
                    f"{self.rosa_name}: layer has no sparse part but the mask holds {flat_idx.numel()} entries"
                )
            return
        flat_idx = flat_idx.reshape(-1).to(device=self.rosa_indices.device, dtype=torch.int64)
        numel = self.in_features * self.out_features
        if flat_idx.numel() != self.nnz:
            raise ValueError(
                f"{self.rosa_name}: the mask holds {flat_idx.numel()} entries but this layer's density gives "
                f"{self.nnz}: use the same method.density / density_pattern as the run that built the mask"
            )
        flat_idx = flat_idx.sort().values
        if flat_idx.numel() and (int(flat_idx[0]) < 0 or int(flat_idx[-1]) >= numel):
            raise ValueError(
                f"{self.rosa_name}: mask indices outside [0, {numel}): the mask was built for a differently "
                f"shaped layer"
            )
        if flat_idx.numel() > 1 and bool((flat_idx[1:] == flat_idx[:-1]).any()):
            raise ValueError(f"{self.rosa_name}: the mask holds duplicate indices")
        self.rosa_indices.copy_(flat_idx.to(self.rosa_indices.dtype))
        self.mask_ready = True
        self._mask_version += 1
        self._meta_cache = None

    def _meta(self) -> dict:
        """Index views of the mask on the current device (cached until the mask or device changes)."""
        idx = self.rosa_indices
        key = (self._mask_version, idx.device)
        if self._meta_cache is None or self._meta_cache[0] != key:
            flat = idx.to(torch.int64)
            rows = torch.div(flat, self.in_features, rounding_mode="floor")
            cols = flat - rows * self.in_features
            crow = torch.zeros(self.out_features + 1, dtype=torch.int64, device=idx.device)
            crow[1:] = torch.bincount(rows, minlength=self.out_features).cumsum(0)
            shape = (self.out_features, self.in_features)
            meta = {"flat": flat, "rows": rows, "cols": cols, "crow": crow, "shape": shape}
            self._meta_cache = (key, meta)
        return self._meta_cache[1]

    @torch.no_grad()
    def sparse_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dense(S) as an m×n tensor (zeros where the mask is not)."""
        out = torch.zeros(self.out_features * self.in_features, dtype=dtype, device=self.base_layer.weight.device)
        if self.nnz and self.mask_ready:
            out.index_add_(0, self._meta()["flat"], self.rosa_values.detach().to(dtype))
        return out.view(self.out_features, self.in_features)

    @torch.no_grad()
    def lora_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s·B·A as an m×n tensor."""
        if self.r == 0:
            return torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.base_layer.weight.device)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    # ---- gradient collection ---------------------------------------------------------------
    @torch.no_grad()
    def _accumulate(self, d_out: torch.Tensor, x: torch.Tensor) -> None:
        acc_dtype = torch.promote_types(d_out.dtype, torch.float32)
        d2 = d_out.reshape(-1, self.out_features).to(acc_dtype)
        x2 = x.reshape(-1, self.in_features).to(acc_dtype)
        dev = self.collect_device or d2.device
        if self._acc is None:
            self._acc = torch.zeros(self.out_features, self.in_features, dtype=acc_dtype, device=dev)
            self._acc_count = 0
        squared = self.grad_acc_mode == "mean_squared"
        if not squared and self._acc.device == d2.device:
            self._acc.addmm_(d2.t(), x2)  # no m×n temporary
        else:
            g = d2.t() @ x2
            if squared:
                g.square_()
            self._acc.add_(g.to(self._acc.device))
        self._acc_count += 1

    def reset_collection(self) -> None:
        self._acc = None
        self._acc_count = 0

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        if self.spa_active and self.nnz > 0 and self.mask_ready:
            bias = base.bias
            grad_path = torch.is_grad_enabled() and (
                self.rosa_values.requires_grad or x.requires_grad or (bias is not None and bias.requires_grad)
            )
            if grad_path:
                out = _SparseLinearFn.apply(x, self.rosa_values, bias, self)
            else:
                out = self._sparse_forward_inference(x)
        else:
            out = base(x, *args, **kwargs)
            if self.collecting and self.nnz > 0 and torch.is_grad_enabled():
                dummy = torch.zeros((), device=out.device, dtype=out.dtype, requires_grad=True)
                out = _GradTap.apply(out, x.detach(), dummy, self)
        if self.r > 0:
            lx = self.lora_dropout(x.to(self.lora_A.dtype))
            # scale the r-wide hidden instead of the m-wide output: same math, less work
            out = out + F.linear(F.linear(lx, self.lora_A) * self.scaling, self.lora_B).to(out.dtype)
        return out

    @torch.no_grad()
    def _sparse_forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        meta = self._meta()
        t = x.numel() // self.in_features
        if not is_4bit(base) and t * self.nnz > 4 * self.in_features * self.out_features:
            cdt = compute_dtype(base, x)
            w_eff = _effective_weight(base, meta["flat"], self.rosa_values, cdt)
            return F.linear(x.to(cdt), w_eff, None if base.bias is None else base.bias.to(cdt))
        out = base(x)
        o2 = out.view(-1, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        v = self.rosa_values.to(out.dtype)
        chunk = max(1, _CHUNK_ELEMS // max(self.nnz, 1))
        for s in range(0, t, chunk):
            e = min(t, s + chunk)
            o2[s:e].index_add_(1, meta["rows"], x2[s:e].index_select(1, meta["cols"]).to(out.dtype) * v)
        return out

    # ---- merge -------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with s·B·A + dense(S) folded into W (4-bit: dequantize, add, requantize)."""
        base = self.base_layer
        delta = self.lora_delta(torch.float32) + self.sparse_delta(torch.float32)
        if is_4bit(base):
            import bitsandbytes as bnb

            w = base.weight
            merged = dense_weight(base, torch.float32) + delta
            qs = w.quant_state
            new_w = bnb.nn.Params4bit(
                merged.to(qs.dtype).cpu(),
                requires_grad=False,
                quant_type=getattr(qs, "quant_type", "nf4"),
                blocksize=getattr(qs, "blocksize", 64),
                compress_statistics=getattr(w, "compress_statistics", True),
                quant_storage=getattr(w, "quant_storage", torch.uint8),
                module=base,
            )
            base.weight = new_w.to(w.device)
            return base
        w = base.weight
        w.data.copy_((w.data.to(torch.float32) + delta).to(w.dtype))
        return base
