from . import functional
from .build import FOCAL_LOSS_REGISTRY, build_focal_loss
from .dense import (  # registers the losses
    DenseClassificationLoss,
    FocalStarLoss,
    SigmoidCrossEntropyLoss,
    SigmoidFocalLoss,
    SoftmaxFocalLoss,
)
