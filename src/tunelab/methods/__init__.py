"""Fine-tuning methods behind one contract (see :mod:`tunelab.methods.base`).

Each module below defines a method and registers it in :data:`tunelab.registry.METHODS` next to its
class; importing this package imports them all, by name.
"""

from __future__ import annotations

from tunelab.methods.base import Callback, Method, TrainState
from tunelab.registry import METHODS

from tunelab.methods import base_model, full, galore, lora, rosa  # noqa: E402,F401  (registers them)

get_method = METHODS.get
known_methods = METHODS.known

__all__ = ["METHODS", "Callback", "Method", "TrainState", "get_method", "known_methods"]
