"""
The registered losses. Each knows how many logits it needs per anchor, how
to initialise the classifier bias from the foreground prior, its summed
loss over valid anchors, and per-class scores for inference, so the head
and the inference path never branch on the loss's name.
"""
import math
import numbers
from typing import Optional, Sequence

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from . import fused  # the fast path; functional.py holds the reference formulas it is tested against
from .build import FOCAL_LOSS_REGISTRY

__all__ = [
    "DenseClassificationLoss",
    "SigmoidFocalLoss",
    "SigmoidCrossEntropyLoss",
    "SoftmaxFocalLoss",
    "FocalStarLoss",
    "SigmoidScores",
    "SoftmaxScores",
    "FocalStarScores",
]


class SigmoidScores(nn.Module):
    """
    Inference scores of the sigmoid losses, ``sigmoid(x)``, as a TorchScript-able
    module without parameters or state (see :meth:`DenseClassificationLoss.score_module`).
    """

    def forward(self, logits: Tensor) -> Tensor:
        """
        Args:
            logits (Tensor): (R, K).

        Returns:
            Tensor: (R, K) per-class scores in [0, 1].
        """
        return logits.sigmoid()


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


class DenseClassificationLoss:
    """
    Base of the registered losses: alpha/class-alpha handling, argument
    checks and the call interface. Subclasses define :meth:`loss`,
    :meth:`scores`, :meth:`init_bias` and :attr:`num_logits`.
    """

    uses_gamma = True

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        gamma: float = 2.0,
        alpha: float = 0.25,
        class_alpha: Sequence[float] = (),
    ):
        """
        Args:
            num_classes (int): K, the number of foreground classes.
            gamma (float): default focusing parameter (MODEL.FOCAL.GAMMA).
            alpha (float): foreground weight in [0, 1], or -1 for none (MODEL.FOCAL.ALPHA).
            class_alpha (sequence[float]): empty, or K per-class weights in [0, 1]
                (MODEL.FOCAL.CLASS_ALPHA).
        """
        self.num_classes = num_classes
        self.check_gamma(gamma, "MODEL.FOCAL.GAMMA")
        if not (0.0 <= alpha <= 1.0 or alpha == -1):
            raise ValueError(f"MODEL.FOCAL.ALPHA={alpha} must be in [0, 1], or -1 to disable.")
        class_alpha = tuple(float(a) for a in class_alpha)
        if class_alpha and len(class_alpha) != num_classes:
            raise ValueError(
                f"MODEL.FOCAL.CLASS_ALPHA has {len(class_alpha)} values; it must be empty or "
                f"have NUM_CLASSES={num_classes}."
            )
        if any(not 0.0 <= a <= 1.0 for a in class_alpha):
            raise ValueError(f"MODEL.FOCAL.CLASS_ALPHA={list(class_alpha)}: values must be in [0, 1].")
        self.gamma = gamma
        self.alpha = alpha
        self.class_alpha = class_alpha
        self._class_alpha_cache = {}

    @classmethod
    def from_config(cls, cfg):
        return {
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "gamma": cfg.MODEL.FOCAL.GAMMA,
            "alpha": cfg.MODEL.FOCAL.ALPHA,
            "class_alpha": cfg.MODEL.FOCAL.CLASS_ALPHA,
        }

    def check_gamma(self, gamma: float, key: str):
        """Raise if ``gamma``, read from config key ``key``, is not allowed for this loss."""
        _check_finite_number(gamma, key)
        if gamma < 0:
            raise ValueError(f"{key}={gamma} must be >= 0.")

    @property
    def num_logits(self) -> int:
        """Logits per anchor the classifier must predict."""
        return self.num_classes

    def init_bias(self, prior_prob: float, gamma: Optional[float] = None) -> Tensor:
        """
        Classifier bias for one anchor, shape (num_logits,), so that every
        class starts with probability ``prior_prob``:
        ``b = -log((1 - pi) / pi)`` (the paper, section 4.1).

        ``gamma`` is the focusing parameter training starts with (default
        :attr:`gamma`); only losses whose scores depend on it (FL*) read it.
        """
        return torch.full((self.num_logits,), -math.log((1 - prior_prob) / prior_prob))

    def scores(self, logits: Tensor) -> Tensor:
        """
        Args:
            logits (Tensor): (R, num_logits).

        Returns:
            Tensor: (R, K) per-class scores in [0, 1].
        """
        return logits.sigmoid()

    def score_module(self) -> nn.Module:
        """
        :meth:`scores` as an ``nn.Module`` without parameters or state_dict
        entries, which a model holds so that it scripts and traces for
        deployment (the loss itself is a plain Python object).
        """
        return SigmoidScores()

    def loss(
        self, logits: Tensor, labels: Tensor, *, gamma: float, class_alpha: Optional[Tensor]
    ) -> Tensor:
        raise NotImplementedError

    def __call__(self, logits: Tensor, labels: Tensor, gamma: Optional[float] = None) -> Tensor:
        """
        Args:
            logits (Tensor): (N, num_logits).
            labels (Tensor): (N,) int64: 0..K-1 foreground class, K background, -1 ignored.
            gamma (float or None): overrides the configured gamma (used by the schedule).

        Returns:
            Tensor: scalar, the loss summed over anchors whose label is not -1.
        """
        self._check_inputs(logits, labels)
        if gamma is None:
            gamma = self.gamma
        else:
            self.check_gamma(gamma, "gamma")
        return self.loss(logits, labels, gamma=gamma, class_alpha=self._class_alpha_on(logits))

    def _check_inputs(self, logits: Tensor, labels: Tensor):
        if logits.dim() != 2 or logits.shape[1] != self.num_logits:
            raise ValueError(
                f"{type(self).__name__} expects logits of shape (N, {self.num_logits}), "
                f"got {tuple(logits.shape)}."
            )
        if labels.dtype != torch.int64:
            raise TypeError(
                f"labels must be an int64 tensor of class indices (0..{self.num_classes - 1} class, "
                f"{self.num_classes} background, -1 ignored), got dtype {labels.dtype}."
            )
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}.")
        if labels.numel():
            low, high = torch.aminmax(labels)
            if ((low < -1) | (high > self.num_classes)).item():  # one device sync, not two
                raise ValueError(
                    f"labels must be in [-1, {self.num_classes}] (-1 ignored, {self.num_classes} "
                    f"background), got values in [{int(low)}, {int(high)}]."
                )

    def _class_alpha_on(self, like: Tensor) -> Optional[Tensor]:
        """CLASS_ALPHA as a (K,) tensor on ``like``'s device and dtype, cached."""
        if not self.class_alpha:
            return None
        key = (like.device, like.dtype)
        if key not in self._class_alpha_cache:
            self._class_alpha_cache[key] = torch.tensor(self.class_alpha, dtype=like.dtype, device=like.device)
        return self._class_alpha_cache[key]

    def __repr__(self):
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, gamma={self.gamma}, "
            f"alpha={self.alpha}, class_alpha={list(self.class_alpha)})"
        )


def _check_finite_number(value, key: str):
    """Raise if ``value`` (config key or argument ``key``) is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{key}={value!r} must be a number, got {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{key}={value} must be finite.")


class SigmoidFocalLoss(DenseClassificationLoss):
    """The paper's FL, eq. (5): see :func:`functional.sigmoid_focal_loss`."""

    def loss(self, logits, labels, *, gamma, class_alpha):
        return fused.sigmoid_focal_loss(
            logits, labels, gamma=gamma, alpha=self.alpha, class_alpha=class_alpha
        )


class SigmoidCrossEntropyLoss(DenseClassificationLoss):
    """
    alpha-balanced sigmoid CE, the paper's baseline; ignores gamma:
    see :func:`functional.sigmoid_cross_entropy`.
    """

    uses_gamma = False

    def loss(self, logits, labels, *, gamma, class_alpha):
        return fused.sigmoid_cross_entropy(
            logits, labels, alpha=self.alpha, class_alpha=class_alpha
        )


class SoftmaxFocalLoss(DenseClassificationLoss):
    """
    (K+1)-way softmax focal loss with a background column, as in Detectron (v1):
    see :func:`functional.softmax_focal_loss`.
    """

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

    def scores(self, logits):
        return logits.softmax(dim=1)[:, :-1]

    def score_module(self):
        return SoftmaxScores()

    def loss(self, logits, labels, *, gamma, class_alpha):
        return fused.softmax_focal_loss(
            logits, labels, gamma=gamma, alpha=self.alpha, class_alpha=class_alpha
        )


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
        self.beta = beta

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "beta": cfg.MODEL.FOCAL.STAR_BETA}

    def check_gamma(self, gamma, key):
        _check_finite_number(gamma, key)
        if gamma <= 0:
            raise ValueError(f"{key}={gamma}: focal_star divides by gamma, it must be > 0.")

    def init_bias(self, prior_prob, gamma=None):
        """``b`` such that ``sigmoid(gamma * b + beta) = pi``, at the gamma training starts with."""
        gamma = self.gamma if gamma is None else gamma
        self.check_gamma(gamma, "gamma")
        prior_logit = -math.log((1 - prior_prob) / prior_prob)
        return torch.full((self.num_logits,), (prior_logit - self.beta) / gamma)

    def scores(self, logits):
        return torch.sigmoid(self.gamma * logits + self.beta)

    def score_module(self):
        return FocalStarScores(self.gamma, self.beta)

    def loss(self, logits, labels, *, gamma, class_alpha):
        return fused.focal_star_loss(
            logits, labels, gamma=gamma, beta=self.beta, alpha=self.alpha, class_alpha=class_alpha
        )

    def __repr__(self):
        return super().__repr__()[:-1] + f", beta={self.beta})"


# Registry names are the values of MODEL.FOCAL.LOSS.
@FOCAL_LOSS_REGISTRY.register()
def sigmoid_focal(cfg):
    return SigmoidFocalLoss(cfg)


@FOCAL_LOSS_REGISTRY.register()
def cross_entropy(cfg):
    return SigmoidCrossEntropyLoss(cfg)


@FOCAL_LOSS_REGISTRY.register()
def softmax_focal(cfg):
    return SoftmaxFocalLoss(cfg)


@FOCAL_LOSS_REGISTRY.register()
def focal_star(cfg):
    return FocalStarLoss(cfg)
