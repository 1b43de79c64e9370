"""focal_det2: the focal-loss family as swappable Detectron2 components.

Importing the package registers the losses, the head, the gamma schedules,
the FocalRetinaNet meta-architecture and the embedded digits data sets; it
first hides two third-party deprecation warnings that importing fvcore and
Detectron2 prints (:func:`focal_det2.quiet.hide_third_party_deprecations`), so
scripts import it before Detectron2.
"""

from .quiet import hide_third_party_deprecations

# Before the imports below import fvcore and Detectron2, which call torch.jit.script at import.
hide_third_party_deprecations()

from . import data  # noqa: E402,F401  registers digits_train / digits_val
from .config import add_focal_config  # noqa: E402
from .losses import FOCAL_LOSS_REGISTRY, build_focal_loss  # noqa: E402
from .modeling import (  # noqa: E402
    FOCAL_HEAD_REGISTRY,
    FocalRetinaNet,
    FocalRetinaNetHead,
    build_focal_head,
)
from .schedules import GAMMA_SCHEDULE_REGISTRY, build_gamma_schedule  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "hide_third_party_deprecations",
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
