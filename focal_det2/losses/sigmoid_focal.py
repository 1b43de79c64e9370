"""The paper's focal loss FL, eq. (5), on K sigmoids: ``MODEL.FOCAL.LOSS sigmoid_focal``."""

from . import functional, fused
from .base import DenseClassificationLoss
from .build import register_loss

__all__ = ["SigmoidFocalLoss"]


@register_loss("sigmoid_focal")
class SigmoidFocalLoss(DenseClassificationLoss):
    """The paper's FL, eq. (5): see :func:`functional.sigmoid_focal_loss`."""

    supports_label_smoothing = True

    def loss(self, logits, labels, *, gamma, class_alpha):
        return fused.sigmoid_focal_loss(logits, labels, gamma=gamma, **self.weighting(class_alpha))

    def reference(self, logits, labels, *, gamma, class_alpha):
        return functional.sigmoid_focal_loss(
            logits, labels, gamma=gamma, **self.weighting(class_alpha)
        )
