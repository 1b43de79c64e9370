"""focal_det2: the focal-loss family as swappable Detectron2 components.

Importing the package registers the losses (those of ``losses/`` and the files
named in ``FOCAL_DET2_EXTRA_LOSSES``), the head, the gamma schedules, the
FocalRetinaNet meta-architecture and the embedded digits data sets. The
deprecation warnings that importing fvcore and Detectron2 prints are hidden
while the package imports them, and only then: the process's warning filters
are left as they were. Scripts that want the same quiet at run time call
:func:`hide_third_party_deprecations` (train_net.py and the tools do).
"""

import warnings

from .quiet import hide_third_party_deprecations

with warnings.catch_warnings():  # restores the caller's filters
    hide_third_party_deprecations()  # fvcore and Detectron2 call torch.jit.script at import
    from . import data  # noqa: F401  registers digits_train / digits_val
    from .config import add_focal_config
    from .losses import FOCAL_LOSS_REGISTRY, build_focal_loss
    from .losses.build import load_extra_losses
    from .modeling import (
        FOCAL_HEAD_REGISTRY,
        FocalRetinaNet,
        FocalRetinaNetHead,
        build_focal_head,
    )
    from .schedules import GAMMA_SCHEDULE_REGISTRY, build_gamma_schedule

load_extra_losses()  # FOCAL_DET2_EXTRA_LOSSES: loss files outside the package, run as they are

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
