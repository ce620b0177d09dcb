"""Gated MLPs that keep two of their four activations for backward (``train.lean_mlp``).

Llama-family blocks compute ``down_proj(act(gate_proj(x)) * up_proj(x))``. Under autograd that
keeps four [tokens x intermediate] tensors per block until backward: ``gate`` (for the activation's
gradient), ``act(gate)`` and ``up`` (for the product's), and the product (the input ``down_proj``
needs for its weight or adapter gradient). They are the largest saved tensors of such a model: on
SmolLM2-135M (intermediate 1,536 = 2.7x the hidden size) 55% of everything a LoRA step saves.

:class:`GatedActivation` computes ``act(gate) * up`` with the same ops, saves only ``gate`` and
``up`` and recomputes ``act(gate)`` in backward (one elementwise pass over ``gate``: a rounding
error next to the block's matmuls), so each block holds three of those tensors instead of four. The
forward and both gradients are the same ops on the same values as autograd's, so the numbers are
bitwise those of the stock module (``tests/test_lean_mlp.py``). Liger-Kernel's SwiGLU does the
same as a Triton kernel, which does not run on CPU, so it is written here, in torch.

:func:`lean_mlps` switches, for a block, the MLPs whose ``forward`` is exactly that expression
(checked on the compiled code of the class's ``forward``, so Llama, Mistral, Qwen2/3, SmolLM3, Olmo,
Gemma, Granite... match, and any model that computes something else keeps its own forward) and
whose activation is a parameter-free module (SiLU, GELU...). Methods never see the switch: it is a
forward on the MLP, and the MLP's projections (plain, PEFT-wrapped, 4-bit) are called as they are.
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


def lean_forward(mlp: nn.Module):
    def forward(x):
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return mlp.down_proj(GatedActivation.apply(gate, up, mlp.act_fn))
        return mlp.down_proj(mlp.act_fn(gate) * up)

    forward._tunelab_lean = True  # type: ignore[attr-defined]
    return forward


@contextlib.contextmanager
def lean_mlps(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the model's gated MLPs (:func:`is_gated_mlp`) save two activations instead of
    four; yields how many MLPs were switched (0 when disabled or none matches)."""
    mlps = [m for m in model.modules() if is_gated_mlp(m)] if enabled else []
    try:
        for mlp in mlps:
            mlp.forward = lean_forward(mlp)
        if mlps:
            log.debug(f"lean gated MLPs: {len(mlps)}")
        yield len(mlps)
    finally:
        for mlp in mlps:
            if getattr(vars(mlp).get("forward"), "_tunelab_lean", False):
                del mlp.forward
