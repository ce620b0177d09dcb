"""The loss on target positions only, shared by training and evaluation (``ref_nll``).

Logits are computed only at positions that have a target (a forward pre-hook on the output head
selects them): prompt and padding positions never pay for the vocabulary projection. The trainer
sums it over every target token of an optimizer step and divides by their global count, so
gradient accumulation and data parallelism give the update of one big batch.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.data import IGNORE_INDEX


class TargetPositionSelector:
    """Forward pre-hook on the output head: keep hidden states only where a target token follows.

    The head then computes logits [n_targets, vocab] instead of [batch, seq, vocab]. ``model`` is
    the plain model (not a DDP/DeepSpeed wrapper): the hook sits on its own output head.
    """

    def __init__(self, model: nn.Module):
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError("the model has no output embeddings (lm_head); tunelab trains causal LMs")
        self.mask: torch.Tensor | None = None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.mask is None:
            return None
        hidden = args[0]
        return (hidden[self.mask],) + tuple(args[1:])

    def remove(self) -> None:
        self.handle.remove()


def target_loss(model: nn.Module, selector: TargetPositionSelector, batch: dict[str, torch.Tensor],
                reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy at the target positions only: their sum, or (``reduction="none"``) one value per
    target token, row after row (row i's count is its number of labels != -100 after the first)."""
    labels = batch["labels"]
    shifted = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = shifted != IGNORE_INDEX
    targets = shifted[shifted != IGNORE_INDEX]
    selector.mask = mask
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        selector.mask = None
    logits = out.logits
    return nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)
