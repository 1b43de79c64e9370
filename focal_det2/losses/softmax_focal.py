"""Focal loss on a (K+1)-way softmax with a background column, as in Detectron (v1): ``MODEL.FOCAL.LOSS softmax_focal``."""

import math

import torch
from torch import Tensor, nn

from . import functional, fused
from .base import DenseClassificationLoss
from .build import register_loss

__all__ = ["SoftmaxFocalLoss", "SoftmaxScores"]


class SoftmaxScores(nn.Module):
    """Inference scores of the softmax loss: ``softmax(x)`` without the background column K."""

    def forward(self, logits: Tensor) -> Tensor:
        """
        Args:
            logits (Tensor): (R, K + 1), column K background.

        Returns:
            Tensor: (R, K) per-class scores in [0, 1].
        """
        return logits.softmax(dim=-1)[..., :-1]


@register_loss("softmax_focal")
class SoftmaxFocalLoss(DenseClassificationLoss):
    """
    (K+1)-way softmax focal loss with a background column, as in Detectron (v1):
    see :func:`functional.softmax_focal_loss`.
    """

    supports_label_smoothing = True
    reads_alpha_with_class_alpha = True

    @property
    def num_logits(self):
        return self.num_classes + 1

    def init_bias(self, prior_prob, gamma=None):
        """
        Foreground logits 0 and background ``log(K (1 - pi) / pi)``, so that
        background starts at ``1 - pi`` and the K classes share ``pi``.
        """
        bias = torch.zeros(self.num_logits)
        bias[-1] = math.log(self.num_classes * (1 - prior_prob) / prior_prob)
        return bias

    def score_module(self):
        return SoftmaxScores()

    def loss(self, logits, labels, *, gamma, class_alpha):
        return fused.softmax_focal_loss(logits, labels, gamma=gamma, **self.weighting(class_alpha))

    def reference(self, logits, labels, *, gamma, class_alpha):
        return functional.softmax_focal_loss(
            logits, labels, gamma=gamma, **self.weighting(class_alpha)
        )
