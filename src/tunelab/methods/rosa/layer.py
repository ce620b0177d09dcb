"""The RoSA-adapted linear layer (:class:`RosaLinear`) and the autograd Functions behind it.

One adapted layer computes ``O = X·(W + S)ᵀ + b + s·(drop(X)·Aᵀ)·Bᵀ`` with W frozen (plain or
bitsandbytes 4-bit), LoRA factors A (r×n), B (m×r), scale s = alpha/r, and a sparse S holding
``nnz`` trainable values on a fixed mask (flat row-major indices into W). Hand-written: PEFT has no
RoSA, and the reference is a fork of an old PEFT with CUDA-only kernels.

Formulations (measured on CPU, 1 thread, 1600 tokens, SmolLM2-135M shapes; see the RoSA section of README.md):

* forward, training: ``W_eff = W.clone(); W_eff.view(-1).index_add_(idx, v)`` then one dense GEMM.
  The copy costs 0.1–0.5 ms per layer against 14–36 ms for the GEMM, and is recomputed in
  backward rather than saved (no extra weight-sized activation memory). A CSR
  ``F.linear(X, W) + (S·Xᵀ)ᵀ`` was 3–5 ms slower per layer and per direction.
* gradient of the values: an SDDMM, never a dense dW (:func:`~tunelab.methods.rosa.sparse_ops.sddmm`).
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
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tunelab import cpu_kernels
from tunelab.methods.dropout import FastDropout
from tunelab.methods.rosa.sparse_ops import (
    CHUNK_ELEMS,
    compute_dtype,
    dense_weight,
    effective_weight,
    is_4bit,
    is_8bit,
    sddmm,
)


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
        w_eff = effective_weight(base, meta["flat"], values, cdt)
        xc = x.to(cdt)
        # train.onednn_linear: the dense products on oneDNN (decided once, so backward matches forward)
        ctx.products = cpu_kernels.products_for(xc, w_eff)
        out = ctx.products.linear(xc, w_eff, None if bias is None else bias.to(cdt))
        del w_eff, xc
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
            w_eff = effective_weight(layer.base_layer, meta["flat"], values, ctx.cdt)
            dx = ctx.products.input_grad(d_out.to(ctx.cdt), w_eff).to(ctx.x_dtype)
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
        # on CPU a quarter of nn.Dropout's random numbers per mask (tunelab.methods.dropout)
        self.lora_dropout = FastDropout(dropout) if dropout > 0 else nn.Identity()
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
            w_eff = effective_weight(base, meta["flat"], self.rosa_values, cdt)
            return F.linear(x.to(cdt), w_eff, None if base.bias is None else base.bias.to(cdt))
        out = base(x)
        o2 = out.view(-1, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        v = self.rosa_values.to(out.dtype)
        chunk = max(1, CHUNK_ELEMS // max(self.nnz, 1))
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
