"""alpha-balanced sigmoid cross entropy, the paper's baseline, eq. (2): ``MODEL.FOCAL.LOSS cross_entropy``."""

from . import functional, fused
from .base import DenseClassificationLoss
from .build import register_loss

__all__ = ["SigmoidCrossEntropyLoss"]


@register_loss("cross_entropy")
class SigmoidCrossEntropyLoss(DenseClassificationLoss):
    """
    alpha-balanced sigmoid CE, the paper's baseline; has no gamma
    (MODEL.FOCAL.GAMMA must stay at its default or 0): see
    :func:`functional.sigmoid_cross_entropy`.
    """

    uses_gamma = False
    supports_label_smoothing = True

    def loss(self, logits, labels, *, gamma, class_alpha):
        return fused.sigmoid_cross_entropy(logits, labels, **self.weighting(class_alpha))

    def reference(self, logits, labels, *, gamma, class_alpha):
        return functional.sigmoid_cross_entropy(logits, labels, **self.weighting(class_alpha))
