"""
Reference formulas of the focal-loss family on class-index targets.

Every function takes ``logits`` of shape (N, C) and ``labels`` of shape (N,)
with values ``0..K-1`` (foreground class), ``K`` (background) or ``-1``
(ignored), and returns the loss summed over the valid anchors. They are
written with log-sigmoid / log-softmax, never ``log(p)``, so float32 logits
in [-100, 100] give a finite loss and gradient; ``(1 - p_t)^gamma`` is
evaluated as ``exp(gamma * log(1 - p_t))`` for the same reason (with label
smoothing as a power of ``1 - p_t``, which is then at least eps/2 > 0).

With ``label_smoothing`` eps > 0, the sigmoid losses take the smoothed
binary targets ``t = 1 - eps/2`` (the anchor's class) and ``eps/2`` (every
other column) in fvcore's soft-target focal loss, and the softmax loss the
smoothed distribution ``q = (1 - eps) onehot(label) + eps / C`` over its C
columns (see each function). At eps = 0 they are the hard-target formulas.

These are the definitions the fast paths in :mod:`focal_det2.losses.fused`
are tested against.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sigmoid_focal_loss",
    "sigmoid_cross_entropy",
    "softmax_focal_loss",
    "focal_star_loss",
    "sigmoid_alpha_t",
    "softmax_alpha_t",
    "softmax_class_alpha",
]


def _valid_targets(logits: Tensor, labels: Tensor):
    """
    Returns:
        Tensor: (M, K) logits of the M anchors whose label is not -1.
        Tensor: (M, K) bool, True where column k is the anchor's class
            (all False for background).
    """
    valid = labels >= 0
    x = logits[valid]
    classes = torch.arange(logits.shape[1], device=logits.device)
    return x, labels[valid, None] == classes


def sigmoid_alpha_t(
    target: Tensor, alpha: float, class_alpha: Optional[Tensor], dtype: torch.dtype
):
    """
    alpha_t of the sigmoid losses: ``a_k`` where ``target`` is True and
    ``1 - a_k`` elsewhere, with ``a_k = class_alpha[k]`` if given, else
    ``alpha``; 1 everywhere when ``alpha == -1`` and no ``class_alpha``.

    Args:
        target (Tensor): (M, K) bool.
        alpha (float): foreground weight, or -1.
        class_alpha (Tensor or None): (K,) per-class weights.
        dtype (torch.dtype): dtype of the result (the loss's).
    """
    if class_alpha is None and alpha < 0:
        return torch.ones((), dtype=dtype, device=target.device)
    a = torch.as_tensor(
        alpha if class_alpha is None else class_alpha, dtype=dtype, device=target.device
    )
    return torch.where(target, a, 1 - a)


def softmax_class_alpha(
    num_classes: int, alpha: float, class_alpha: Optional[Tensor], dtype: torch.dtype, device=None
) -> Tensor:
    """
    The (K+1,) alpha of each class of the softmax loss: a foreground class c
    weighs ``class_alpha[c]`` (or ``alpha``), the background (column K)
    ``1 - alpha``; ``alpha == -1`` weighs background (and foreground without
    ``class_alpha``) 1.
    """
    fg = torch.full((num_classes,), 1.0 if alpha < 0 else alpha, dtype=dtype, device=device)
    if class_alpha is not None:
        fg = class_alpha.to(fg)
    bg = fg.new_full((1,), 1.0 if alpha < 0 else 1 - alpha)
    return torch.cat([fg, bg])


def softmax_alpha_t(
    labels: Tensor,
    num_classes: int,
    alpha: float,
    class_alpha: Optional[Tensor],
    dtype: torch.dtype,
):
    """
    alpha_t of the softmax loss, :func:`softmax_class_alpha` at each label.

    Args:
        labels (Tensor): (M,) in [0, K].
        num_classes (int): K.
        dtype (torch.dtype): dtype of the result (the loss's).
    """
    return softmax_class_alpha(num_classes, alpha, class_alpha, dtype, labels.device)[labels]


def sigmoid_focal_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    gamma: float,
    alpha: float = 0.25,
    class_alpha: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
    reduction: str = "sum",
) -> Tensor:
    """
    The paper's focal loss, eq. (5), on K independent sigmoids:

        FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t),  p_t = sigmoid(x_t),

    with ``x_t = x`` for the anchor's class and ``x_t = -x`` for every other
    column; background anchors are negative in all K columns.

    With ``label_smoothing`` eps > 0 the target of each column is ``t = 1 -
    eps/2`` for the anchor's class and ``eps/2`` elsewhere, in fvcore's
    soft-target form (``fvcore.nn.sigmoid_focal_loss`` on the smoothed
    one-hot target):

        FL = alpha_t * (1 - p_t)^gamma * BCE(x, t),
        p_t = p t + (1 - p)(1 - t),  alpha_t = a t + (1 - a)(1 - t),  p = sigmoid(x).

    Args:
        logits (Tensor): (N, K).
        labels (Tensor): (N,) int64 in [-1, K].
        gamma (float): focusing parameter, >= 0.
        alpha (float): foreground weight in [0, 1], or -1 for none.
        class_alpha (Tensor or None): (K,) per-class foreground weights.
        label_smoothing (float): eps in [0, 1).
        reduction (str): "sum", or "none" for the terms themselves.

    Returns:
        Tensor: scalar, the sum over valid anchors and classes; with
            ``reduction="none"``, (M, K): the terms of the M anchors whose
            label is not -1, in order.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction={reduction!r}: it must be 'sum' or 'none'.")
    x, target = _valid_targets(logits, labels)
    if label_smoothing:
        loss = _smoothed_sigmoid_focal(x, target, gamma, alpha, class_alpha, label_smoothing)
    else:
        x_t = torch.where(target, x, -x)
        modulator = torch.exp(gamma * F.logsigmoid(-x_t))
        loss = -modulator * F.logsigmoid(x_t)
        loss = sigmoid_alpha_t(target, alpha, class_alpha, loss.dtype) * loss
    return loss.sum() if reduction == "sum" else loss


def _smoothed_targets(target: Tensor, label_smoothing: float, dtype: torch.dtype) -> Tensor:
    """The sigmoid losses' smoothed targets: ``1 - eps/2`` where ``target`` (bool) is True, ``eps/2`` elsewhere."""
    t = torch.full(target.shape, label_smoothing / 2, dtype=dtype, device=target.device)
    return t.masked_fill_(target, 1 - label_smoothing / 2)


def _smoothed_sigmoid_focal(x, target, gamma, alpha, class_alpha, label_smoothing) -> Tensor:
    """The (M, K) terms of :func:`sigmoid_focal_loss` with label smoothing, on the valid anchors' ``x`` and ``target``."""
    t = _smoothed_targets(target, label_smoothing, x.dtype)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    one_minus_pt = torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t  # no cancellation
    loss = bce * one_minus_pt.pow(gamma)
    if class_alpha is None and alpha < 0:
        return loss
    a = torch.as_tensor(alpha if class_alpha is None else class_alpha, dtype=x.dtype).to(x.device)
    return (a * t + (1 - a) * (1 - t)) * loss


def sigmoid_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 0.25,
    class_alpha: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """
    alpha-balanced sigmoid cross-entropy, the paper's baseline, eq. (2):
    ``CE(p_t) = -alpha_t * log(p_t)``, i.e. :func:`sigmoid_focal_loss` at gamma 0
    (with ``label_smoothing``, alpha-weighted BCE on the smoothed targets).
    Shapes as in :func:`sigmoid_focal_loss`.
    """
    return sigmoid_focal_loss(
        logits,
        labels,
        gamma=0.0,
        alpha=alpha,
        class_alpha=class_alpha,
        label_smoothing=label_smoothing,
    )


def softmax_focal_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    gamma: float,
    alpha: float = 0.25,
    class_alpha: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """
    Focal loss on a (K+1)-way softmax with a background column, as in Detectron (v1):

        FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t),  p_t = softmax(x)[label].

    ``log(1 - p_t)`` is the log-sum-exp of the other columns minus that of all.

    With ``label_smoothing`` eps > 0 the target is the distribution ``q =
    (1 - eps) onehot(label) + eps / C`` over the C = K+1 columns, and the loss
    its expectation over the columns,

        FL = sum_j q_j alpha_j (1 - p_j)^gamma (-log p_j),

    which at gamma 0 and alpha -1 is ``F.cross_entropy(x, label,
    label_smoothing=eps)``.

    Args:
        logits (Tensor): (N, K+1), column K is background.
        labels (Tensor): (N,) int64 in [-1, K].
        label_smoothing (float): eps in [0, 1).

    Returns:
        Tensor: scalar, the sum over valid anchors.
    """
    valid = labels >= 0
    x, y = logits[valid], labels[valid]
    lse = torch.logsumexp(x, dim=1)
    log_pt = x.gather(1, y[:, None]).squeeze(1) - lse
    log_1m_pt = torch.logsumexp(x.scatter(1, y[:, None], float("-inf")), dim=1) - lse
    loss = -torch.exp(gamma * log_1m_pt) * log_pt
    alpha_t = softmax_alpha_t(y, logits.shape[1] - 1, alpha, class_alpha, loss.dtype)
    if not label_smoothing:
        return (alpha_t * loss).sum()
    return (1 - label_smoothing) * (alpha_t * loss).sum() + _uniform_softmax_focal(
        x, gamma, alpha, class_alpha, label_smoothing
    )


def _uniform_softmax_focal(x, gamma, alpha, class_alpha, label_smoothing) -> Tensor:
    """
    ``eps / C * sum_rows sum_j alpha_j (1 - p_j)^gamma (-log p_j)`` over (M, C)
    valid logits ``x``: the smoothing part of :func:`softmax_focal_loss`.
    ``log(1 - p_j)`` is ``log1p(-p_j)`` except at each row's largest logit,
    where it is the log-sum-exp of the other columns minus that of all.
    """
    c = x.shape[1]
    log_p = torch.log_softmax(x, dim=1)
    top = x.argmax(dim=1, keepdim=True)
    log_1m_top = torch.logsumexp(x.scatter(1, top, float("-inf")), dim=1, keepdim=True)
    # p at the top set to 0: log1p(-1) at a top p of 1 would make a NaN gradient through the scatter.
    p_below_top = log_p.exp().scatter(1, top, 0.0)
    log_1m_p = torch.log1p(-p_below_top).scatter(
        1, top, log_1m_top - torch.logsumexp(x, dim=1, keepdim=True)
    )
    alpha_j = softmax_class_alpha(c - 1, alpha, class_alpha, x.dtype, x.device)
    return label_smoothing / c * (alpha_j * torch.exp(gamma * log_1m_p) * -log_p).sum()


def focal_star_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    gamma: float,
    beta: float = 1.0,
    alpha: float = 0.25,
    class_alpha: Optional[Tensor] = None,
) -> Tensor:
    """
    FL*, the paper's appendix A, eq. (6)-(7):

        p_t* = sigmoid(gamma * x_t + beta),  FL* = -alpha_t * log(p_t*) / gamma,

    with ``x_t = y * x`` and ``y`` in {-1, +1}. Shapes as in :func:`sigmoid_focal_loss`.

    Args:
        gamma (float): > 0.
        beta (float): shift of the scaled logit.
    """
    x, target = _valid_targets(logits, labels)
    x_t = torch.where(target, x, -x)
    loss = -F.logsigmoid(gamma * x_t + beta) / gamma
    return (sigmoid_alpha_t(target, alpha, class_alpha, loss.dtype) * loss).sum()
