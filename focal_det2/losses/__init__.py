"""
The losses, one file each (``sigmoid_focal.py``, ...): a class that registers
itself as a ``MODEL.FOCAL.LOSS`` name. Shared by all: the interface
(``base.py``), the reference formulas (``functional.py``), the fast kernels
(``fused.py``, ``triton_kernels.py``, chosen by ``backends.py``) and the
registry (``build.py``).
"""

from . import functional
from .base import DenseClassificationLoss
from .build import FOCAL_LOSS_REGISTRY, build_focal_loss, register_loss, registered_losses

# Each module registers its loss.
from .cross_entropy import SigmoidCrossEntropyLoss
from .focal_star import FocalStarLoss
from .ohem import OHEMLoss
from .sigmoid_focal import SigmoidFocalLoss
from .softmax_focal import SoftmaxFocalLoss

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
