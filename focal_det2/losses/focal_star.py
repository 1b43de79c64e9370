"""FL*, the paper's appendix A: ``MODEL.FOCAL.LOSS focal_star``, with ``MODEL.FOCAL.STAR_BETA``."""

import math

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from . import functional, fused
from .base import DenseClassificationLoss, check_finite_number
from .build import register_loss

__all__ = ["FocalStarLoss", "FocalStarScores"]


class FocalStarScores(nn.Module):
    """Inference scores of FL*: ``p* = sigmoid(gamma * x + beta)``."""

    def __init__(self, gamma: float, beta: float):
        """
        Args:
            gamma (float): FL*'s gamma at inference (MODEL.FOCAL.GAMMA).
            beta (float): MODEL.FOCAL.STAR_BETA.
        """
        super().__init__()
        self.gamma = float(gamma)
        self.beta = float(beta)

    def forward(self, logits: Tensor) -> Tensor:
        """
        Args:
            logits (Tensor): (R, K).

        Returns:
            Tensor: (R, K) per-class scores in [0, 1].
        """
        return torch.sigmoid(self.gamma * logits + self.beta)

    def extra_repr(self):
        return f"gamma={self.gamma}, beta={self.beta}"


@register_loss("focal_star")
class FocalStarLoss(DenseClassificationLoss):
    """
    FL*, the paper's appendix A: see :func:`functional.focal_star_loss`.
    Scores are ``p* = sigmoid(gamma * x + beta)`` at the configured gamma
    (MODEL.FOCAL.GAMMA, where a gamma schedule ends).
    """

    @configurable
    def __init__(self, *, beta: float = 1.0, **kwargs):
        """
        Args:
            beta (float): MODEL.FOCAL.STAR_BETA.
            kwargs: see :class:`DenseClassificationLoss`.
        """
        super().__init__(**kwargs)
        check_finite_number(beta, "MODEL.FOCAL.STAR_BETA")
        self.beta = beta

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "beta": cfg.MODEL.FOCAL.STAR_BETA}

    @classmethod
    def add_config(cls, cfg):
        # beta of FL* (paper appendix A): p_t* = sigmoid(gamma * x_t + beta).
        cfg.MODEL.FOCAL.STAR_BETA = 1.0

    def check_gamma(self, gamma, key):
        check_finite_number(gamma, key)
        if gamma <= 0:
            raise ValueError(f"{key}={gamma}: focal_star divides by gamma, it must be > 0.")

    def init_bias(self, prior_prob, gamma=None):
        """``b`` such that ``sigmoid(gamma * b + beta) = pi``, at the gamma training starts with."""
        gamma = self.gamma if gamma is None else gamma
        self.check_gamma(gamma, "gamma")
        prior_logit = -math.log((1 - prior_prob) / prior_prob)
        return torch.full((self.num_logits,), (prior_logit - self.beta) / gamma)

    def score_module(self):
        return FocalStarScores(self.gamma, self.beta)

    def loss(self, logits, labels, *, gamma, class_alpha):
        return fused.focal_star_loss(
            logits, labels, gamma=gamma, beta=self.beta, alpha=self.alpha, class_alpha=class_alpha
        )

    def reference(self, logits, labels, *, gamma, class_alpha):
        return functional.focal_star_loss(
            logits, labels, gamma=gamma, beta=self.beta, alpha=self.alpha, class_alpha=class_alpha
        )

    def __repr__(self):
        return super().__repr__()[:-1] + f", beta={self.beta})"
