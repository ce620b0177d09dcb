"""Gated MLPs that keep two of their four activations for backward (``train.lean_mlp``).

Llama-family blocks compute ``down_proj(act(gate_proj(x)) * up_proj(x))``. Under autograd that
keeps four [tokens x intermediate] tensors per block until backward: ``gate`` (for the activation's
gradient), ``act(gate)`` and ``up`` (for the product's), and the product (the input ``down_proj``
needs for its weight or adapter gradient). They are the largest saved tensors of such a model: on
SmolLM2-135M (intermediate 1,536 = 2.7x the hidden size) 60% of everything a LoRA step saves.

Here each block keeps only ``gate`` and ``up``:

* :class:`GatedActivation` computes ``act(gate) * up`` with the same ops, saves ``gate`` and ``up``
  and recomputes ``act(gate)`` in backward;
* the product, which ``down_proj`` (its weight's gradient, or LoRA's ``A``, or a 4-bit layer) saves
  as its input, is not stored: a saved-tensor hook (``torch.autograd.graph.saved_tensors_hooks``)
  recognises it as it is saved and keeps the recipe instead, ``gate`` and ``up`` (saved anyway),
  and recomputes ``act(gate) * up`` when backward asks for it.

The recomputations are elementwise passes, a rounding error next to the block's matmuls, and the
same ops on the same values, so loss and gradients are bitwise those of the stock module
(``tests/test_lean_mlp.py``). This is activation checkpointing of the two cheapest ops of the block
only (PyTorch's selective checkpointing needs torch.compile or a policy over the whole block);
Liger-Kernel's SwiGLU saves the same but is a Triton kernel, which does not run on CPU.

:func:`lean_mlps` switches, for a block, the MLPs whose ``forward`` is exactly that expression
(checked on the compiled code of the class's ``forward``, so Llama, Mistral, Qwen2/3, SmolLM3, Olmo,
Gemma, Granite... match, and any model that computes something else keeps its own forward) and
whose activation is a parameter-free module (SiLU, GELU...). Methods never see the switch: it is a
forward on the MLP, and the MLP's projections (plain, PEFT-wrapped, 4-bit) are called as they are.
Inside a region with its own saved-tensor hooks (non-reentrant activation checkpointing) those
hooks win and the product is stored as usual.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from tunelab.utils import log


class GatedActivation(torch.autograd.Function):
    """``act(gate) * up``, saving ``gate`` and ``up`` only; ``act(gate)`` is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: nn.Module) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[:2]
        grad_gate = grad_up = None
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(need_gate)
            activated = ctx.act(leaf)  # the forward's op on the forward's values: the same tensor, bitwise
        if need_up:
            grad_up = grad_out * activated.detach()
        if need_gate:
            (grad_gate,) = torch.autograd.grad(activated, leaf, grad_out * up)
        return grad_gate, grad_up, None


def _reference_forward(self, x):  # the expression a gated MLP must compute, byte for byte, to be switched
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _code_key(fn) -> tuple:
    code = fn.__code__
    return code.co_code, code.co_names, code.co_varnames, code.co_consts[1:]  # co_consts[0]: the docstring


_REFERENCE = _code_key(_reference_forward)


def is_gated_mlp(module: nn.Module) -> bool:
    """Whether ``module`` computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a parameter-free
    activation, so :func:`lean_forward` may stand in for its forward."""
    forward = getattr(type(module), "forward", None)
    act = getattr(module, "act_fn", None)
    return (forward is not None and hasattr(forward, "__code__") and "forward" not in vars(module)
            and isinstance(act, nn.Module) and next(act.parameters(), None) is None
            and all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and _code_key(forward) == _REFERENCE)


class _Recipe:
    """What a saved product (or a view of it: a linear layer saves its input flattened to 2-D) is
    rebuilt from: ``act(gate) * up``, viewed as ``shape``."""

    __slots__ = ("gate", "up", "act", "shape")

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, act: nn.Module, shape: torch.Size):
        self.gate, self.up, self.act, self.shape = gate, up, act, shape

    def rebuild(self) -> torch.Tensor:
        with torch.no_grad():
            return (self.act(self.gate) * self.up).view(self.shape)  # the forward's ops and values: bitwise


class _ProductHooks:
    """Saved-tensor hooks that store the product being fed to ``down_proj`` as its :class:`_Recipe`."""

    def __init__(self):
        self.pending: tuple = ()  # (product, gate, up, act) while down_proj runs on it

    def pack(self, t: torch.Tensor):
        if self.pending and _is_view_of_all(t, self.pending[0]):
            _, gate, up, act = self.pending
            # detached: the same storage (kept anyway by GatedActivation), no hold on the graph before them
            return _Recipe(gate.detach(), up.detach(), act, t.shape)
        return t

    @staticmethod
    def unpack(saved):
        return saved.rebuild() if isinstance(saved, _Recipe) else saved


def _is_view_of_all(t: torch.Tensor, product: torch.Tensor) -> bool:
    """``t`` holds exactly ``product``'s elements, in its order, unchanged since: ``product`` itself
    (maybe under another Python wrapper) or a contiguous reshape of it."""
    return (type(t) is torch.Tensor and t.data_ptr() == product.data_ptr() and t.numel() == product.numel()
            and t.dtype == product.dtype and t._version == product._version
            and t.is_contiguous() and product.is_contiguous())


def lean_forward(mlp: nn.Module, hooks: _ProductHooks):
    def forward(x):
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
            return mlp.down_proj(mlp.act_fn(gate) * up)
        product = GatedActivation.apply(gate, up, mlp.act_fn)
        hooks.pending = (product, gate, up, mlp.act_fn)
        try:
            return mlp.down_proj(product)
        finally:
            hooks.pending = ()

    forward._tunelab_lean = True  # type: ignore[attr-defined]
    return forward


@contextlib.contextmanager
def lean_mlps(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the model's gated MLPs (:func:`is_gated_mlp`) keep two activations instead of
    four; yields how many MLPs were switched (0 when disabled or none matches)."""
    mlps = [m for m in model.modules() if is_gated_mlp(m)] if enabled else []
    hooks = _ProductHooks()
    saved_hooks = torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack) if mlps else contextlib.nullcontext()
    try:
        for mlp in mlps:
            mlp.forward = lean_forward(mlp, hooks)
        if mlps:
            log.debug(f"lean gated MLPs: {len(mlps)}")
        with saved_hooks:
            yield len(mlps)
    finally:
        for mlp in mlps:
            if getattr(vars(mlp).get("forward"), "_tunelab_lean", False):
                del mlp.forward
