"""GaLore: gradient low-rank projection (Zhao et al., arXiv 2403.03507).

Modules: ``projection`` (projection sides, top-r singular basis), ``quant8bit`` (8-bit moments),
``optim`` (GaLoreAdamW), ``config`` (GaloreConfig) and ``method`` (GaloreMethod, registered as
``method=galore``, and its GaloreCallback).
"""

from tunelab.methods.galore.config import GaloreConfig
from tunelab.methods.galore.method import GaloreCallback, GaloreMethod, find_targets
from tunelab.methods.galore.optim import GaLoreAdamW
from tunelab.methods.galore.projection import PROJ_TYPES, SVD_MODES, projection_sides, top_singular_basis

__all__ = [
    "PROJ_TYPES",
    "SVD_MODES",
    "GaLoreAdamW",
    "GaloreCallback",
    "GaloreConfig",
    "GaloreMethod",
    "find_targets",
    "projection_sides",
    "top_singular_basis",
]
