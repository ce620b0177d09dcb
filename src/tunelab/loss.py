"""The loss on target positions only, shared by training and evaluation (``ref_nll``).

Logits are computed only at positions that have a target (a forward pre-hook on the output head
selects them): prompt and padding positions never pay for the vocabulary projection. The trainer
sums the loss over every target token of an optimizer step and divides by their global count, so
gradient accumulation and data parallelism give the update of one big batch.

Even at target positions the logits are the largest tensor of a step ([targets x vocabulary] in
fp32: 8 x 720-token examples x 49,152 words is gigabytes). So the head's projection and the
cross-entropy run together, ``chunk_tokens`` target tokens at a time, in
:class:`ChunkedCrossEntropy`: the forward keeps only each token's log-sum-exp, the backward
recomputes each chunk's logits from the saved hidden states and head weight. It is hand-written
because the libraries that do this (Liger-Kernel's fused linear cross-entropy, Apple's Cut Cross
Entropy) are Triton/CUDA kernels that do not run on CPU, and torch has no such op.

The chunked loss runs *inside* the head's forward (the pre-hook hands the head zero rows, a forward
hook computes the per-token losses and returns them in place of the logits), so it sees the
weights exactly when the head itself would: FSDP2 unshards the root's parameters (the head, the
embeddings it may be tied to) only around the model's forward, and its backward hooks sit on the
model's outputs, of which the losses are now one. Where the head is not a plain ``nn.Linear``
seen by nobody else, it falls back to the unchunked path (see :func:`why_not_chunked`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from tunelab import cpu_kernels
from tunelab.data import IGNORE_INDEX
from tunelab.data.packing import (
    SEGMENT_SDPA,
    VARLEN_ATTENTION,
    block_causal_mask,
    cu_seq_lens,
    register_segment_sdpa,
)

DEFAULT_CHUNK_TOKENS = 1024  # train.loss_chunk_tokens' default

# config keys of models that transform the head's logits after computing them (softcapping,
# scaling): the losses cannot stand in for those logits, so these models take the unchunked path
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "output_logit_soft_cap", "logit_softcapping")


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on, else the operands'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token ``cross_entropy(linear(hidden, weight, bias).float(), targets)``, ``chunk`` rows at a time.

    The matmul runs in the dtype the head would use (autocast's, or the operands'), the log-sum-exp
    in fp32 as the unchunked path's log-softmax does, in place on the chunk's logits (one
    [chunk x vocabulary] fp32 tensor alive at a time, in forward and backward). Backward:
    ``d loss_i / d logits_i = softmax_i - onehot_i``, computed in place on the recomputed chunk,
    then cast to the matmul dtype for the two products;
    the weight's gradient accumulates over chunks in fp32. Every target must be a valid index.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype):
        n = hidden.shape[0]
        # train.onednn_linear: the products on oneDNN (decided once, so backward matches forward)
        ctx.products = products = cpu_kernels.products_for(hidden, weight)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for s in range(0, n, chunk):
                logits = products.linear(hidden[s:s + chunk].to(dtype), w, b).float()
                target_logits = logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
                # log-sum-exp in place on the chunk: cross_entropy would add a second logits-sized tensor
                # (its log-softmax) at the step's peak, the end of the forward
                top = logits.amax(1)
                chunk_lse = logits.sub_(top[:, None]).exp_().sum(1).log_().add_(top)
                del logits
                lse[s:s + chunk] = chunk_lse
                losses[s:s + chunk] = chunk_lse - target_logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        products = ctx.products
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(dtype)
                probs = products.linear(h, w, b).float()
                probs.sub_(lse[s:s + chunk, None]).exp_()  # softmax, in place
                rows = torch.arange(probs.shape[0], device=probs.device)
                probs[rows, targets[s:s + chunk]] -= 1.0
                probs.mul_(grad_losses[s:s + chunk, None])
                g = probs.to(dtype)
                del probs
                if need_h:
                    grad_h[s:s + chunk] = products.input_grad(g, w)
                if need_w:  # in place on MKL: oneDNN would need a weight-sized buffer per chunk
                    if dtype == torch.float32:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).float()
                if need_b:
                    grad_b += g.float().sum(0)
                del g
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          targets: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """One fp32 loss per row of ``hidden`` [n, d] against ``targets`` [n], never holding more than
    ``chunk_tokens`` rows of logits; equal to ``cross_entropy(linear(hidden, weight, bias).float(),
    targets, reduction="none")`` in value and gradients (hidden, weight, bias)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: give a positive number of tokens per chunk")
    return ChunkedCrossEntropy.apply(hidden, weight, bias, targets, int(chunk_tokens),
                                     _compute_dtype(hidden, weight))


def why_not_chunked(head: nn.Module, selector_hooks: tuple = ()) -> Optional[str]:
    """Why the chunked loss cannot run inside ``head`` (None when it can).

    It computes ``linear(x, head.weight, head.bias)`` itself, so the head must be exactly that, with
    its full weight in hand, and nobody else may watch its input or output:
    - a PEFT layer (LoRA on lm_head, modules_to_save) or a quantized Linear is not a plain linear;
    - accelerate's hooks replace ``forward`` (and may offload the weight);
    - other hooks on the head (a method's, DeepSpeed's) would see the zero-row input;
    - DeepSpeed ZeRO-3 partitions the weight and gathers it only around the head's own forward and
      backward, which the chunked backward is not; an FSDP2/tensor-parallel DTensor weight is a shard.
    """
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return f"the output head is a {type(head).__name__}, not a plain nn.Linear"
    if "forward" in head.__dict__:
        return "the output head's forward is replaced (accelerate hooks)"
    for p in (head.weight, head.bias):
        if p is None:
            continue
        if hasattr(p, "ds_id"):
            return "DeepSpeed ZeRO-3 partitions the output head's weight"
        if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
            return "the output head's weight is a DTensor shard"
    ours = {getattr(h, "id", None) for h in selector_hooks}
    if set(head._forward_pre_hooks) - ours or set(head._forward_hooks) - ours or head._backward_hooks \
            or head._backward_pre_hooks:
        return "other hooks watch the output head"
    return None


def _transforms_logits(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _LOGIT_TRANSFORMS:
            if getattr(cfg, key, None) not in (None, 0, 1, 1.0, False):
                return f"the model transforms its logits ({key})"
    return None


class TargetPositionSelector:
    """Hooks on the output head: keep hidden states only where a target token follows, and (when
    :func:`target_loss` asks) compute the chunked loss there instead of the logits.

    Unchunked, the head computes logits [n_targets, vocab] instead of [batch, seq, vocab]. ``model``
    is the plain model (not a DDP/DeepSpeed wrapper): the hooks sit on its own output head.
    ``last_path`` says which path the last forward took ("chunked" or "logits").
    """

    def __init__(self, model: nn.Module):
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError("the model has no output embeddings (lm_head); tunelab trains causal LMs")
        self.head = head
        config = self.config = getattr(model, "config", None)
        # packed batches (data.packing): how attention must be told where examples end
        self.attn_implementation = getattr(config, "_attn_implementation", None)
        embeddings = model.get_input_embeddings()
        self.mask_dtype = embeddings.weight.dtype if embeddings is not None else torch.float32
        self.model_reason = _transforms_logits(model)
        self.mask: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.chunk_tokens = 0
        self.losses: torch.Tensor | None = None
        self.last_path: str | None = None
        self._hidden: torch.Tensor | None = None
        self.handles = (head.register_forward_pre_hook(self._select), head.register_forward_hook(self._loss))

    def why_not_chunked(self) -> Optional[str]:
        return self.model_reason or why_not_chunked(self.head, self.handles)

    def _select(self, module, args):
        if self.mask is None:
            return None
        hidden = args[0][self.mask]
        if self.targets is None or self.chunk_tokens <= 0 or self.why_not_chunked():
            self.last_path = "logits"
            return (hidden,) + tuple(args[1:])
        self.last_path = "chunked"
        self._hidden = hidden
        return (hidden[:0],) + tuple(args[1:])  # the head's own product is empty: [0, vocab]

    def _loss(self, module, args, output):
        if self._hidden is None:
            return None
        hidden, self._hidden = self._hidden, None
        self.losses = chunked_cross_entropy(hidden, module.weight, module.bias, self.targets, self.chunk_tokens)
        return self.losses  # the model returns them as its "logits"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    raise ValueError(f"reduction={reduction!r}: use 'sum', 'mean' or 'none'")


def padding_mask(selector: TargetPositionSelector, mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The 2D mask a padded batch's forward gets: None where the batch needs none. Under sdpa a
    right-padded batch (every row's real tokens first) is plain causal attention for its real
    tokens, since no real token attends to a later position and the pads all come later; their
    outputs and every target's loss are those of the masked forward (to float rounding: another
    kernel path), and the pads' own outputs go nowhere. Without a mask the model takes sdpa's causal
    path: key and value stay at their own (GQA) heads where the mask made HF repeat them to every
    query head, and no float [batch, 1, seq, seq] copy of the mask is saved per layer. Measured on the
    default model, batch 2 x 351 tokens: 0.09 GiB less in use at the end of forward. Left padding,
    eager and other attention implementations keep the mask."""
    if selector.attn_implementation != "sdpa" or mask.dim() != 2 or mask.shape[1] < 2:
        return mask
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all())
    return None if right_padded else mask


def model_inputs(selector: TargetPositionSelector, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's inputs for ``batch``. A packed batch (it has ``position_ids``, data.packing) gets no
    2D mask, and per attention implementation what keeps its examples apart (see
    :mod:`tunelab.data.packing`): sdpa switches the model to per-example sdpa and passes the examples'
    bounds (``cu_seq_lens_q/k``), eager gets the 4D block-diagonal mask, flash-attention the
    position ids alone (its varlen path); any other implementation is an error."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": padding_mask(selector, batch["attention_mask"])}
    positions = batch["position_ids"]
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": positions, "attention_mask": None}
    impl = selector.attn_implementation
    if impl in ("sdpa", SEGMENT_SDPA):
        if impl == "sdpa":
            # for good, not around the forward: activation checkpointing re-runs it during backward
            register_segment_sdpa()
            selector.config._attn_implementation = selector.attn_implementation = SEGMENT_SDPA
        bounds, longest = cu_seq_lens(positions)
        inputs.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
    elif impl == "eager" or impl is None:
        inputs["attention_mask"] = block_causal_mask(positions, selector.mask_dtype)
    elif impl not in VARLEN_ATTENTION:
        raise ValueError(
            f"data.packing=true needs attention that keeps packed examples apart: sdpa, eager or flash-attention's "
            f"varlen path ({', '.join(VARLEN_ATTENTION)}); the model runs attn_implementation={impl!r}, which "
            f"supports none of them: set model.attn_implementation=sdpa, or data.packing=false")
    return inputs


def target_loss(model: nn.Module, selector: TargetPositionSelector, batch: dict[str, torch.Tensor],
                reduction: str = "sum", chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Cross-entropy at the target positions only: their sum, or (``reduction="none"``) one value per
    target token, row after row (row i's count is its number of labels != -100 after the first).

    ``chunk_tokens`` target tokens at a time go through the head and the loss (0 = all at once, the
    logits [n_targets, vocab] in one tensor); the result is the same to float tolerance.
    """
    labels = batch["labels"]
    shifted = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = shifted != IGNORE_INDEX
    targets = shifted[shifted != IGNORE_INDEX]
    selector.mask, selector.targets, selector.chunk_tokens, selector.losses = mask, targets, chunk_tokens, None
    inputs = model_inputs(selector, batch)
    try:
        out = model(**inputs, use_cache=False)
    finally:
        selector.mask = selector.targets = selector._hidden = None
    losses, selector.losses = selector.losses, None
    if losses is None:
        return F.cross_entropy(out.logits.float(), targets, reduction=reduction)
    if out.logits is not losses:
        raise RuntimeError(
            f"{type(model).__name__} changes the output head's result before returning it as logits, so the "
            "chunked loss cannot stand in for the logits: set train.loss_chunk_tokens=0 (all logits at once)"
        )
    return _reduce(losses, reduction)
