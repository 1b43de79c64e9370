"""
The losses, one file each (``sigmoid_focal.py``, ...): a class that registers
itself as a ``MODEL.FOCAL.LOSS`` name. Shared by all: the interface
(``base.py``), the reference formulas (``functional.py``), the fast kernels
(``fused.py``, ``triton_kernels.py``, chosen by ``backends.py``) and the
registry (``build.py``). Every other module of this folder is imported with
the package, so a new loss is one new file here.
"""

import importlib
import pkgutil

from . import functional
from .base import DenseClassificationLoss
from .build import FOCAL_LOSS_REGISTRY, build_focal_loss, register_loss, registered_losses

# Each module registers its loss.
from .cross_entropy import SigmoidCrossEntropyLoss
from .focal_star import FocalStarLoss
from .ohem import OHEMLoss
from .sigmoid_focal import SigmoidFocalLoss
from .softmax_focal import SoftmaxFocalLoss

_SHARED = {"backends", "base", "build", "functional", "fused", "triton_kernels"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")  # registers its loss

__all__ = [
    "DenseClassificationLoss",
    "FOCAL_LOSS_REGISTRY",
    "build_focal_loss",
    "register_loss",
    "registered_losses",
    "functional",
    "SigmoidFocalLoss",
    "SigmoidCrossEntropyLoss",
    "SoftmaxFocalLoss",
    "FocalStarLoss",
    "OHEMLoss",
]
