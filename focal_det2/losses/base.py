"""
The interface every registered loss implements: it knows how many logits it
needs per anchor, how to initialise the classifier bias from the foreground
prior, its summed loss over valid anchors (fast, and by definition), and
per-class scores for inference, so the head and the inference path never
branch on the loss's name. Config checks shared by all losses live here.
"""

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from ..config import DEFAULT_ALPHA, DEFAULT_CB_BETA, DEFAULT_GAMMA, check_class_weighting_name
from .fused import compute_dtype

__all__ = ["DenseClassificationLoss", "SigmoidScores", "check_finite_number"]


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


class DenseClassificationLoss:
    """
    Base of the registered losses: alpha/class-alpha handling, argument
    checks and the call interface. Subclasses define :meth:`loss` and
    :meth:`reference`, and override :attr:`num_logits`, :meth:`init_bias`
    and :meth:`score_module` where the sigmoid defaults do not fit
    (README "Adding a loss").
    """

    uses_gamma = True
    # True for losses whose :meth:`loss` and :meth:`reference` read :attr:`label_smoothing`
    # (MODEL.FOCAL.LABEL_SMOOTHING); other losses refuse a value other than 0.
    supports_label_smoothing = False
    # True for losses that read ALPHA beside CLASS_ALPHA (softmax_focal weighs its background
    # 1 - ALPHA); the sigmoid losses do not, and refuse ALPHA moved from its default then.
    reads_alpha_with_class_alpha = False

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        gamma: float = DEFAULT_GAMMA,
        alpha: float = DEFAULT_ALPHA,
        class_alpha: Sequence[float] = (),
        label_smoothing: float = 0.0,
        class_weighting: str = "none",
        cb_beta: float = DEFAULT_CB_BETA,
    ):
        """
        Args:
            num_classes (int): K, the number of foreground classes.
            gamma (float): default focusing parameter (MODEL.FOCAL.GAMMA).
            alpha (float): foreground weight in [0, 1], or -1 for none (MODEL.FOCAL.ALPHA).
            class_alpha (sequence[float]): empty, or K per-class weights in [0, 1]
                (MODEL.FOCAL.CLASS_ALPHA).
            label_smoothing (float): eps in [0, 1), for losses that
                :attr:`supports_label_smoothing` (MODEL.FOCAL.LABEL_SMOOTHING).
            class_weighting (str): MODEL.FOCAL.CLASS_WEIGHTING; other than "none", the loss
                needs its class weights (:meth:`set_class_weights`) before it is called.
            cb_beta (float): beta in [0, 1) of the class weights' effective number
                (MODEL.FOCAL.CB_BETA), counted by :class:`~focal_det2.class_balance.ClassWeights`;
                only with ``class_weighting`` other than "none".
        """
        if (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, numbers.Integral)
            or num_classes < 1
        ):
            raise ValueError(
                f"MODEL.RETINANET.NUM_CLASSES={num_classes!r} must be an integer >= 1."
            )
        self.num_classes = num_classes
        self.check_gamma(gamma, "MODEL.FOCAL.GAMMA")
        check_finite_number(alpha, "MODEL.FOCAL.ALPHA")
        if not (0.0 <= alpha <= 1.0 or alpha == -1):
            raise ValueError(f"MODEL.FOCAL.ALPHA={alpha} must be in [0, 1], or -1 to disable.")
        for a in class_alpha:
            check_finite_number(a, "MODEL.FOCAL.CLASS_ALPHA")
        class_alpha = tuple(float(a) for a in class_alpha)
        if class_alpha and len(class_alpha) != num_classes:
            raise ValueError(
                f"MODEL.FOCAL.CLASS_ALPHA has {len(class_alpha)} values; it must be empty or "
                f"have NUM_CLASSES={num_classes}."
            )
        if any(not 0.0 <= a <= 1.0 for a in class_alpha):
            raise ValueError(
                f"MODEL.FOCAL.CLASS_ALPHA={list(class_alpha)}: values must be in [0, 1]."
            )
        self._check_read(gamma, alpha, class_alpha)
        self.check_label_smoothing(label_smoothing)
        self._check_class_weighting(class_weighting, cb_beta)
        self.class_weighting = class_weighting
        self.cb_beta = float(cb_beta)
        self.gamma = gamma
        self.alpha = alpha
        self.class_alpha = class_alpha
        self.label_smoothing = float(label_smoothing)
        self._class_alpha_cache = {}
        self.class_weights: Optional[Tuple[float, ...]] = None
        self._class_weights_cache = {}

    def _check_read(self, gamma: float, alpha: float, class_alpha: Tuple[float, ...]):
        """
        Raise, naming the key, for a value this loss would not read: a gamma other than the
        default or 0 for a loss without gamma, an alpha moved from its default beside
        CLASS_ALPHA for a loss that reads only the latter.
        """
        name = getattr(self, "name", type(self).__name__)
        if not self.uses_gamma and gamma not in (DEFAULT_GAMMA, 0.0):
            raise ValueError(
                f"MODEL.FOCAL.GAMMA={gamma}: MODEL.FOCAL.LOSS {name} has no gamma (it is gamma "
                f"0); leave it at {DEFAULT_GAMMA} or 0, or choose a focal loss."
            )
        if class_alpha and not self.reads_alpha_with_class_alpha and alpha != DEFAULT_ALPHA:
            raise ValueError(
                f"MODEL.FOCAL.ALPHA={alpha} is not read by MODEL.FOCAL.LOSS {name} when "
                f"MODEL.FOCAL.CLASS_ALPHA is set (CLASS_ALPHA replaces it class by class); "
                f"leave it at {DEFAULT_ALPHA}, or leave CLASS_ALPHA empty."
            )

    @staticmethod
    def _check_class_weighting(weighting: str, beta: float):
        """Raise, naming the key and what is allowed, for a bad CLASS_WEIGHTING or CB_BETA."""
        check_class_weighting_name(weighting)
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta < 1.0:
            raise ValueError(f"MODEL.FOCAL.CB_BETA={beta!r} must be a number in [0, 1).")
        if weighting == "none" and beta != DEFAULT_CB_BETA:
            raise ValueError(
                f"MODEL.FOCAL.CB_BETA={beta} is read only with class weights; leave it at "
                f"{DEFAULT_CB_BETA}, or set MODEL.FOCAL.CLASS_WEIGHTING effective_number."
            )

    @classmethod
    def from_config(cls, cfg):
        return {
            "num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
            "gamma": cfg.MODEL.FOCAL.GAMMA,
            "alpha": cfg.MODEL.FOCAL.ALPHA,
            "class_alpha": cfg.MODEL.FOCAL.CLASS_ALPHA,
            "label_smoothing": cfg.MODEL.FOCAL.LABEL_SMOOTHING,
            "class_weighting": cfg.MODEL.FOCAL.CLASS_WEIGHTING,
            "cb_beta": cfg.MODEL.FOCAL.CB_BETA,
        }

    @classmethod
    def check_label_smoothing(cls, value):
        """Raise, naming MODEL.FOCAL.LABEL_SMOOTHING, unless ``value`` is in [0, 1) and this loss reads it."""
        key = "MODEL.FOCAL.LABEL_SMOOTHING"
        check_finite_number(value, key)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{key}={value} must be in [0, 1).")
        if value and not cls.supports_label_smoothing:
            from .build import registered_losses

            names = sorted(n for n, c in registered_losses().items() if c.supports_label_smoothing)
            raise ValueError(
                f"{key}={value}: MODEL.FOCAL.LOSS {getattr(cls, 'name', cls.__name__)} has no "
                f"label smoothing; leave it at 0, or use one of {names}."
            )

    def check_gamma(self, gamma: float, key: str):
        """Raise if ``gamma``, read from config key ``key``, is not allowed for this loss."""
        check_finite_number(gamma, key)
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
            Tensor: (R, K) per-class scores in [0, 1], by :meth:`score_module`.
        """
        return self.score_module()(logits)

    def score_module(self) -> nn.Module:
        """
        The inference scores as an ``nn.Module`` without parameters or
        state_dict entries, which a model holds so that it scripts and traces
        for deployment (the loss itself is a plain Python object). Sigmoid by
        default; losses with other scores override this, not :meth:`scores`.
        """
        return SigmoidScores()

    def loss(
        self, logits: Tensor, labels: Tensor, *, gamma: float, class_alpha: Optional[Tensor]
    ) -> Tensor:
        """The fast summed loss (a kernel of :mod:`.fused`), on checked inputs."""
        raise NotImplementedError

    def reference(
        self, logits: Tensor, labels: Tensor, *, gamma: float, class_alpha: Optional[Tensor]
    ) -> Tensor:
        """The same loss as :meth:`loss` by its definition (:mod:`.functional`), which tests hold it to."""
        raise NotImplementedError

    def weighting(self, class_alpha: Optional[Tensor]) -> dict:
        """
        The keyword arguments ``alpha``, ``class_alpha`` and ``label_smoothing``
        that the kernels of :mod:`.fused` and the formulas of :mod:`.functional` take.
        """
        return {
            "alpha": self.alpha,
            "class_alpha": class_alpha,
            "label_smoothing": self.label_smoothing,
        }

    @classmethod
    def add_config(cls, cfg):
        """Add this loss's own config keys, if any, to ``cfg.MODEL.FOCAL`` (called by ``add_focal_config``)."""

    # True for losses that choose their anchors by the predicted boxes (OHEM's NMS): the
    # meta-architecture then passes ``boxes`` to :meth:`__call__` (``num_images`` always).
    needs_boxes = False

    def select(
        self, logits: Tensor, labels: Tensor, *, boxes: Optional[Tensor], num_images: int
    ) -> Tensor:
        """
        The anchors the loss counts, as labels: ``labels`` with the anchors it
        leaves out set to -1. All of them by default; OHEM keeps the hardest.
        """
        return labels

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        gamma: Optional[float] = None,
        *,
        boxes: Optional[Tensor] = None,
        num_images: int = 1,
    ) -> Tensor:
        """
        Args:
            logits (Tensor): (N, num_logits).
            labels (Tensor): (N,) int64: 0..K-1 foreground class, K background, -1 ignored.
            gamma (float or None): overrides the configured gamma (used by the schedule).
            boxes (Tensor or None): (N, 4) the anchors' predicted boxes (XYXY), for losses
                that select anchors by them (:attr:`needs_boxes`).
            num_images (int): the rows are ``num_images`` images' anchors, image after image.

        Returns:
            Tensor: scalar, the loss summed over the anchors :meth:`select` keeps (all
            anchors whose label is not -1, except for losses that select).
        """
        return self._on_selected(self.loss, logits, labels, gamma, boxes, num_images)

    def reference_loss(
        self,
        logits: Tensor,
        labels: Tensor,
        gamma: Optional[float] = None,
        *,
        boxes: Optional[Tensor] = None,
        num_images: int = 1,
    ) -> Tensor:
        """:meth:`__call__` computed by :meth:`reference`: the definition, for tests and checks."""
        return self._on_selected(self.reference, logits, labels, gamma, boxes, num_images)

    def _on_selected(self, fn, logits, labels, gamma, boxes, num_images) -> Tensor:
        """``fn`` (:meth:`loss` or :meth:`reference`) on checked inputs and the anchors :meth:`select` keeps."""
        self._check_inputs(logits, labels)
        self.check_class_weights_set()
        if gamma is None:
            gamma = self.gamma
        else:
            self.check_gamma(gamma, "gamma")
            if not self.uses_gamma and gamma not in (self.gamma, 0.0):
                raise ValueError(
                    f"gamma={gamma}: {getattr(self, 'name', type(self).__name__)} has no gamma "
                    f"(it is gamma 0); leave gamma out, or pass {self.gamma} or 0."
                )
        selected = self.select(logits, labels, boxes=boxes, num_images=num_images)
        class_alpha = self._class_alpha_on(logits)
        total = fn(logits, selected, gamma=gamma, class_alpha=class_alpha)
        if self.class_weights is None:
            return total
        return self._class_weighted(fn, total, logits, selected, gamma, class_alpha)

    def check_class_weights_set(self):
        """Raise, naming CLASS_WEIGHTING and how to set them, if the loss needs class weights it lacks."""
        if self.class_weighting != "none" and self.class_weights is None:
            raise RuntimeError(
                f"MODEL.FOCAL.CLASS_WEIGHTING={self.class_weighting}: the loss has no class "
                "weights. train_net.py counts them before training (or loads them on --resume); "
                "otherwise count them with focal_det2.class_balance.ClassWeights(loss, "
                "dataset_names).count() or set them with loss.set_class_weights(weights)."
            )

    def set_class_weights(self, weights: Optional[Sequence[float]]):
        """
        Weigh every term of an anchor whose label is class c by ``weights[c]``
        (background and ignored anchors weigh 1), on top of alpha; ``None``
        removes the weights. Set by the trainer from
        ``MODEL.FOCAL.CLASS_WEIGHTING`` (see :mod:`focal_det2.class_balance`).

        Args:
            weights (sequence[float] or None): K finite weights > 0.
        """
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if len(weights) != self.num_classes:
                raise ValueError(
                    f"class weights: {len(weights)} values, NUM_CLASSES={self.num_classes} needed."
                )
            if any(not (math.isfinite(w) and w > 0) for w in weights):
                raise ValueError(f"class weights {list(weights)} must be finite and > 0.")
        self.class_weights = weights
        self._class_weights_cache = {}

    def _class_weighted(self, fn, total, logits, selected, gamma, class_alpha) -> Tensor:
        """
        ``sum_i w_{label_i} l_i`` (w = 1 for background) from the unweighted ``total``
        ``sum_i l_i``: ``total + sum_c (w_c - 1) fn(anchors of class c)``, one ``fn`` call
        per class present among the selected foreground anchors, so the kernels need no
        per-anchor weight.
        """
        rows = ((selected >= 0) & (selected < self.num_classes)).nonzero().squeeze(1)
        if not rows.numel():
            return total
        labels = selected[rows]
        weights = self._class_weights_on(logits)
        for c in labels.unique().tolist():
            of_c = rows[labels == c]
            loss_c = fn(logits[of_c], selected[of_c], gamma=gamma, class_alpha=class_alpha)
            total = total + (weights[c] - 1) * loss_c
        return total

    @staticmethod
    def _cached_on(values, cache: dict, like: Tensor) -> Tensor:
        """
        ``values`` as a tensor on ``like``'s device, in the dtype the loss computes in for
        ``like`` (float32 for float16/bfloat16 logits: not rounded to half precision), kept in
        ``cache`` for both.
        """
        key = (like.device, compute_dtype(like.dtype))
        if key not in cache:
            cache[key] = torch.tensor(values, dtype=key[1], device=like.device)
        return cache[key]

    def _class_weights_on(self, like: Tensor) -> Tensor:
        """The class weights as a (K,) tensor on ``like``'s device, in its compute dtype, cached."""
        return self._cached_on(self.class_weights, self._class_weights_cache, like)

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
            raise ValueError(
                f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}."
            )
        if labels.numel():
            low, high = torch.aminmax(labels)
            if ((low < -1) | (high > self.num_classes)).item():  # one device sync, not two
                raise ValueError(
                    f"labels must be in [-1, {self.num_classes}] (-1 ignored, {self.num_classes} "
                    f"background), got values in [{int(low)}, {int(high)}]"
                    + (
                        f": the data has classes beyond the model's NUM_CLASSES="
                        f"{self.num_classes} (MODEL.RETINANET.NUM_CLASSES; a LazyConfig's "
                        "model.num_classes)."
                        if high > self.num_classes
                        else "."
                    )
                )

    def _class_alpha_on(self, like: Tensor) -> Optional[Tensor]:
        """CLASS_ALPHA as a (K,) tensor on ``like``'s device, in its compute dtype, cached."""
        if not self.class_alpha:
            return None
        return self._cached_on(self.class_alpha, self._class_alpha_cache, like)

    def __repr__(self):
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, gamma={self.gamma}, "
            f"alpha={self.alpha}, class_alpha={list(self.class_alpha)}"
            + (f", label_smoothing={self.label_smoothing})" if self.label_smoothing else ")")
        )


def check_finite_number(value, key: str):
    """Raise if ``value`` (config key or argument ``key``) is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{key}={value!r} must be a number, got {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{key}={value} must be finite.")
