"""RoSA: robust adaptation, low-rank plus sparse adapters (Nikdan et al., arXiv 2401.04679).

Modules, in the order they build on each other: ``config`` (RosaConfig, schedules), ``sparse_ops``
(base weights, W + S, SDDMM), ``layer`` (RosaLinear), ``adapters`` (placing layers in a model),
``artifact`` (the saved adapter), ``masks`` (choosing, saving, loading masks), ``schedule`` (the
RosaScheduler callback) and ``method`` (RosaMethod, registered as ``method=rosa``).
"""

from tunelab.methods.rosa.adapters import adapter_tensors, find_targets, layer_plan, rosa_layers, trainable_counts
from tunelab.methods.rosa.artifact import ADAPTER_FILE, CONFIG_FILE, load_adapter, save_adapter
from tunelab.methods.rosa.config import SCHEDULE_FORMS, RosaConfig, parse_schedule
from tunelab.methods.rosa.layer import RosaLinear
from tunelab.methods.rosa.masks import MASKS_FILE, build_masks, load_masks, save_masks, topk_indices
from tunelab.methods.rosa.method import RosaMethod
from tunelab.methods.rosa.schedule import RosaScheduler
from tunelab.methods.rosa.sparse_ops import SDDMM_IMPLS, dense_weight, is_4bit, sddmm

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "MASKS_FILE",
    "SCHEDULE_FORMS",
    "SDDMM_IMPLS",
    "RosaConfig",
    "RosaLinear",
    "RosaMethod",
    "RosaScheduler",
    "adapter_tensors",
    "build_masks",
    "dense_weight",
    "find_targets",
    "is_4bit",
    "layer_plan",
    "load_adapter",
    "load_masks",
    "parse_schedule",
    "rosa_layers",
    "save_adapter",
    "save_masks",
    "sddmm",
    "topk_indices",
    "trainable_counts",
]
