"""focal_det2: the focal-loss family as swappable Detectron2 components.

Importing the package registers the losses, the head, the gamma schedules,
the FocalRetinaNet meta-architecture and the embedded digits data sets.
"""

from . import data  # noqa: F401  registers digits_train / digits_val
from .config import add_focal_config
from .losses import FOCAL_LOSS_REGISTRY, build_focal_loss
from .modeling import FOCAL_HEAD_REGISTRY, FocalRetinaNet, FocalRetinaNetHead, build_focal_head
from .schedules import GAMMA_SCHEDULE_REGISTRY, build_gamma_schedule

__version__ = "0.1.0"
__all__ = [
    "add_focal_config",
    "FOCAL_LOSS_REGISTRY",
    "build_focal_loss",
    "FOCAL_HEAD_REGISTRY",
    "FocalRetinaNet",
    "FocalRetinaNetHead",
    "build_focal_head",
    "GAMMA_SCHEDULE_REGISTRY",
    "build_gamma_schedule",
]
