"""Rendering: an example (or a prompt) → the exact text and token ids the model sees.

(Placeholder with today's behaviour; the prompt-format work makes this the one place where
``plain`` and ``chat`` formats are rendered for training, eval and generate.)
"""

from __future__ import annotations


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of a fully rendered prompt, as generation feeds them to the model."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
