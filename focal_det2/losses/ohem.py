"""
Online hard example mining in a one-stage detector, the paper's section 5.1
and Table 1d baseline for FL: ``MODEL.FOCAL.LOSS ohem``.

Each anchor's loss is alpha-balanced sigmoid cross entropy summed over its K
classes; per image, the valid anchors are ranked by that loss, non-maximum
suppression over their predicted boxes (IoU ``NMS_THRESH``) removes the
lower-loss one of each overlapping pair, and the ``BATCH_PER_IMAGE`` hardest
survivors form the minibatch. With ``POS_FRACTION`` f > 0 the minibatch
keeps positives and negatives at f : (1 - f) (0.25: SSD's 1:3): at most
``f * BATCH_PER_IMAGE`` hardest positives, and ``(1 - f) / f`` times as many
hardest negatives. The loss is CE summed over the minibatch (other anchors
count as ignored), normalised like every loss by the foreground count.
"""

import math
from typing import Optional, Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from torch import Tensor
from torchvision.ops import nms

from . import fused
from .build import register_loss
from .cross_entropy import SigmoidCrossEntropyLoss

__all__ = ["OHEMLoss", "anchor_losses"]


def _snap(x: float) -> float:
    """
    ``x`` rounded to 9 decimals, so that a quota meant to be whole or a half is one before
    it is rounded to an integer: in binary 100 x 0.29 is 28.999... and 3 x 0.6 / 0.4 4.4999...
    """
    return round(x, 9)


def anchor_losses(
    logits: Tensor, labels: Tensor, alpha: float, class_alpha: Optional[Tensor]
) -> Tensor:
    """
    Each anchor's alpha-balanced sigmoid CE summed over its classes, with no
    gradient and no one-hot target:

        l_i = sum_k n_k softplus(x_ik) + [label_i < K] (p_c softplus(-x_ic) - n_c softplus(x_ic)),

    ``c = label_i``, ``p_k = a_k`` and ``n_k = 1 - a_k`` with ``a_k`` = CLASS_ALPHA[k]
    or ALPHA (``p_k = n_k = 1`` for ALPHA -1);
    ``-inf`` for ignored anchors, so that they are never selected.

    Args:
        logits (Tensor): (N, K).
        labels (Tensor): (N,) in [-1, K].

    Returns:
        Tensor: (N,) float32 (float64 for float64 logits).
    """
    with torch.no_grad():
        x = logits.float() if logits.dtype != torch.float64 else logits
        k = x.shape[1]
        a_pos, a_neg = fused.sigmoid_alphas(alpha, class_alpha, x)
        softplus = fused.softplus(x)
        losses = (
            (softplus * a_neg).sum(dim=1)
            if isinstance(a_neg, Tensor)
            else softplus.sum(dim=1) * a_neg
        )
        rows = ((labels >= 0) & (labels < k)).nonzero().squeeze(1)
        c = labels[rows]
        x_c, sp_c = x[rows, c], softplus[rows, c]
        a_c = a_pos[c] if isinstance(a_pos, Tensor) else a_pos
        na_c = a_neg[c] if isinstance(a_neg, Tensor) else a_neg
        losses[rows] += a_c * (sp_c - x_c) - na_c * sp_c  # softplus(-x) = softplus(x) - x
        return losses.masked_fill_(labels < 0, float("-inf"))


@register_loss("ohem")
class OHEMLoss(SigmoidCrossEntropyLoss):
    """
    OHEM over alpha-balanced sigmoid CE (the loss, its reference and its scores
    are :class:`SigmoidCrossEntropyLoss`'s, on the kept anchors); see the module
    docstring. Has no gamma (MODEL.FOCAL.GAMMA must stay at its default or 0).
    """

    # Hard examples are ranked by the hard-target CE (:func:`anchor_losses`), as in the paper.
    supports_label_smoothing = False

    @configurable
    def __init__(
        self,
        *,
        batch_per_image: int = 128,
        nms_thresh: float = 0.5,
        pos_fraction: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            batch_per_image (int): MODEL.FOCAL.OHEM.BATCH_PER_IMAGE, >= 1.
            nms_thresh (float): MODEL.FOCAL.OHEM.NMS_THRESH in (0, 1]; 1 turns the NMS off.
            pos_fraction (float): MODEL.FOCAL.OHEM.POS_FRACTION in [0, 1); 0 for no ratio.
            kwargs: see :class:`~focal_det2.losses.DenseClassificationLoss`.
        """
        super().__init__(**kwargs)
        if (
            isinstance(batch_per_image, bool)
            or not isinstance(batch_per_image, int)
            or batch_per_image < 1
        ):
            raise ValueError(
                f"MODEL.FOCAL.OHEM.BATCH_PER_IMAGE={batch_per_image!r} must be an integer >= 1."
            )
        if not 0.0 < nms_thresh <= 1.0:
            raise ValueError(
                f"MODEL.FOCAL.OHEM.NMS_THRESH={nms_thresh} must be in (0, 1]; 1 turns the NMS off."
            )
        if not 0.0 <= pos_fraction < 1.0:
            raise ValueError(
                f"MODEL.FOCAL.OHEM.POS_FRACTION={pos_fraction} must be in [0, 1): the positives' share of "
                "the minibatch (0.25 for 1 positive per 3 negatives), or 0 for none."
            )
        self.batch_per_image = batch_per_image
        self.nms_thresh = nms_thresh
        self.pos_fraction = pos_fraction
        if pos_fraction > 0 and self._max_positives == 0:
            raise ValueError(
                f"MODEL.FOCAL.OHEM.POS_FRACTION={pos_fraction} with BATCH_PER_IMAGE={batch_per_image} "
                "lets floor(POS_FRACTION * BATCH_PER_IMAGE) = 0 positives, and so no negatives, into a "
                "minibatch: the loss would be 0. Raise either so that their product is >= 1, or set "
                "POS_FRACTION 0 (no ratio)."
            )

    @classmethod
    def from_config(cls, cfg):
        ohem = cfg.MODEL.FOCAL.OHEM
        return {
            **super().from_config(cfg),
            "batch_per_image": ohem.BATCH_PER_IMAGE,
            "nms_thresh": ohem.NMS_THRESH,
            "pos_fraction": ohem.POS_FRACTION,
        }

    @classmethod
    def add_config(cls, cfg):
        cfg.MODEL.FOCAL.OHEM = CN()
        # Anchors in each image's minibatch (the paper tried 128, 256 and 512).
        cfg.MODEL.FOCAL.OHEM.BATCH_PER_IMAGE = 128
        # IoU of the NMS over the ranked anchors' predicted boxes (the paper: 0.5, 0.7); 1 turns it off.
        cfg.MODEL.FOCAL.OHEM.NMS_THRESH = 0.5
        # Positives' share of the minibatch: 0.25 keeps 1 positive per 3 negatives (SSD); 0 for none.
        cfg.MODEL.FOCAL.OHEM.POS_FRACTION = 0.0

    @property
    def needs_boxes(self) -> bool:
        return self.nms_thresh < 1.0

    def select(self, logits, labels, *, boxes, num_images):
        """
        ``labels`` with every anchor outside the per-image minibatches set to
        -1. ``boxes`` (N, 4) are needed unless NMS_THRESH is 1.
        """
        n = labels.shape[0]
        if num_images < 1 or n % num_images:
            raise ValueError(f"ohem: {n} anchors do not split into num_images={num_images} images.")
        if self.needs_boxes and (boxes is None or boxes.shape != (n, 4)):
            got = None if boxes is None else tuple(boxes.shape)
            raise ValueError(
                f"ohem with MODEL.FOCAL.OHEM.NMS_THRESH={self.nms_thresh} needs boxes of shape "
                f"({n}, 4), got {got}: pass the anchors' predicted boxes, or set NMS_THRESH 1 "
                "(no NMS)."
            )
        if n == 0:
            return labels
        losses = anchor_losses(logits, labels, self.alpha, self._class_alpha_on(logits))
        keep = torch.zeros(n, dtype=torch.bool, device=labels.device)
        per_image = n // num_images
        for start in range(0, n, per_image):
            rows = slice(start, start + per_image)
            image_boxes = None if boxes is None else boxes[rows]
            chosen = self._minibatch(losses[rows], labels[rows], image_boxes)
            keep[start + chosen] = True
        return torch.where(keep, labels, torch.full_like(labels, -1))

    def _minibatch(self, losses: Tensor, labels: Tensor, boxes: Optional[Tensor]) -> Tensor:
        """Indices of one image's minibatch among its (R,) anchors."""
        valid = (labels >= 0).nonzero().squeeze(1)
        order = valid[torch.argsort(losses[valid], descending=True, stable=True)]
        if self.needs_boxes:
            order = self._survivors(order, labels, boxes)
        if self.pos_fraction == 0:
            return order[: self.batch_per_image]
        is_pos = labels[order] < self.num_classes
        positives, negatives = order[is_pos], order[~is_pos]
        num_pos, num_neg = self._quota(len(positives))
        return torch.cat([positives[:num_pos], negatives[: min(len(negatives), num_neg)]])

    @property
    def _max_positives(self) -> int:
        """The most positives the ratio lets into a minibatch: ``floor(f * BATCH_PER_IMAGE)``."""
        return math.floor(_snap(self.batch_per_image * self.pos_fraction))

    def _quota(self, num_positives: int) -> Tuple[int, int]:
        """
        Positives and negatives the ratio asks for when ``num_positives`` survive:
        ``P = min(num_positives, floor(f B))`` and ``P (1 - f) / f`` negatives, rounded
        half up (3 x 0.6 / 0.4 = 4.5 gives 5).
        """
        num_pos = min(num_positives, self._max_positives)
        num_neg = _snap(num_pos * (1 - self.pos_fraction) / self.pos_fraction)
        return num_pos, math.floor(num_neg + 0.5)

    def _survivors(self, order: Tensor, labels: Tensor, boxes: Tensor) -> Tensor:
        """
        The anchors of ``order`` (hardest first) that greedy NMS keeps, hardest
        first, at least as many as the minibatch takes.

        Greedy NMS keeps an anchor iff no kept harder anchor overlaps it, so the
        survivors among the first m anchors of ``order`` are exactly the first
        survivors among all of them. NMS therefore runs over the hardest
        ``4 BATCH_PER_IMAGE`` anchors, then a 4x longer prefix, until the
        minibatch is decided: the same minibatch as NMS over every anchor,
        without its cost (about R x survivors box comparisons, for R anchors).
        """
        # Scores falling with the position make NMS keep ``order``'s ranking, ties included.
        scores = -torch.arange(len(order), dtype=torch.float32, device=order.device)
        m = 4 * self.batch_per_image
        while True:
            head = order[:m]
            kept = head[nms(boxes[head].float(), scores[:m], self.nms_thresh)]
            if m >= len(order) or self._decided(kept, labels, order[m:]):
                return kept
            m *= 4

    def _decided(self, kept: Tensor, labels: Tensor, rest: Tensor) -> bool:
        """Whether the survivors ``kept`` of a prefix already hold the whole minibatch."""
        if self.pos_fraction == 0:
            return len(kept) >= self.batch_per_image
        num_pos = int((labels[kept] < self.num_classes).sum())
        if num_pos < self._max_positives and bool((labels[rest] < self.num_classes).any()):
            return False  # a positive later in the ranking may still enter the minibatch
        return len(kept) - num_pos >= self._quota(num_pos)[1]

    def __repr__(self):
        return super().__repr__()[:-1] + (
            f", batch_per_image={self.batch_per_image}, nms_thresh={self.nms_thresh}, "
            f"pos_fraction={self.pos_fraction})"
        )
