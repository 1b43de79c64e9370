"""
Triton kernels of the fused losses, for CUDA tensors (and, under
``TRITON_INTERPRET=1``, for CPU tensors: that is how ``make test`` checks
their logic without a GPU).

One kernel per loss family, each launched twice per training step:

* forward: every program reads a block of logits and the labels of its rows,
  and writes one float32 partial sum (a tree sum over its block); the
  partial sums are then added by one ``torch.sum`` (a tree too). The order of every addition is fixed by the
  launch, so the same inputs give bitwise the same loss on every run (no
  atomics).
* backward: the same program recomputes its block and writes the
  closed-form gradient, times the incoming gradient read from device memory
  (no host sync), in the logits' dtype.

So a forward + backward reads the logits twice and writes the gradient
once; the only logits-sized allocation is the gradient. The math is float32
whatever the logits' dtype (float32, float16, bfloat16), with ``log1p``
written out (:func:`_log1p`): Triton has none, and ``log(1 + e)`` rounds
``1 + e`` first, which loses ``e`` below 6e-8 whole (the loss of a negative
at a logit below -16.6) and digits of every small ``e``. Gamma is a runtime
argument, so a gamma schedule never recompiles; at gamma = 0 no term raises
0 to a negative power (the gradient is written with ``sigmoid(z)^gamma``,
never ``(1 - p_t)^(gamma - 1)``).
"""

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import fused

__all__ = ["sigmoid_family", "softmax_family"]

# exp(x) is taken as exp2(x log2(e)), log2(e) = 1.4426950408889634, written out in the
# kernels (Triton kernels read no non-constexpr globals).
# Launch configurations. The sigmoid kernel takes SIGMOID_BLOCK consecutive
# elements per program, chosen by a launch sweep on the GPU. The softmax kernel
# takes SOFTMAX_ELEMENTS / next_pow2(C) rows per program (SOFTMAX_SMOOTH_ELEMENTS
# with label smoothing), at most one per thread. Triton lays a (rows, 128) block
# out one row per warp instruction, and each row's own values (its maximum, sum,
# two log1p, modulator) one per thread where there are 32 rows a warp; with fewer,
# every lane of a row repeats that arithmetic (at K = 80, 4 rows a program issued
# 2.5-2.7x the instructions per logit of 32, benchmarks/kernel_sass.py). 32 rows of
# 128 take ~160-200 registers a thread; with label smoothing's extra terms they
# spill, so smoothing keeps 512 elements. README "Performance" says what each gave.
SIGMOID_BLOCK, SIGMOID_WARPS = 4096, 8
SOFTMAX_ELEMENTS, SOFTMAX_SMOOTH_ELEMENTS, SOFTMAX_WARPS = 4096, 512, 1


@triton.jit
def _log1p_unit(a):
    """
    log(1 + a) for 0 <= a <= 1, to float32 precision, from FMAs alone (no
    division): ``a q(a)``, with ``q`` the degree-9 polynomial that
    interpolates ``log(1 + a) / a`` at the Chebyshev nodes of [0, 1]
    (relative truncation error below 5.3e-9, against float32's 6e-8).
    """
    q = -0.0031760570184319597
    q = q * a + 0.019542527261014101
    q = q * a - 0.056373612830107328
    q = q * a + 0.10543623795419526
    q = q * a - 0.15269667074363288
    q = q * a + 0.19663274257204805
    q = q * a - 0.24951616262872074
    q = q * a + 0.33329710498917749
    q = q * a - 0.49999892648063279
    q = q * a + 0.99999999465629198
    return a * q


@triton.jit
def _log1p(a):
    """log(1 + a) for a >= 0: :func:`_log1p_unit` up to 1; above, ``log(1 + a)``, whose
    rounding of ``1 + a`` (6e-8 relative) is small against the result, ``>= log 2``."""
    return tl.where(a <= 1.0, _log1p_unit(tl.minimum(a, 1.0)), tl.log(1.0 + a))


@triton.jit
def _sigmoids(z, e, log1p_e):
    """
    ``sigmoid(z)`` and ``sigmoid(-z) = 1 - sigmoid(z)``, without cancellation, from
    ``e = exp(-|z|)`` and ``log1p_e = log(1 + e)``: ``1 / (1 + e) = 2^(-log2(1 + e))``, an
    exp2 of the logarithm already taken instead of a division, and ``e / (1 + e)``.
    """
    r = tl.exp2(log1p_e * -1.4426950408889634)
    er = e * r
    return tl.where(z >= 0, r, er), tl.where(z >= 0, er, r)


@triton.jit
def _focal_terms(z, e, w, gamma):
    """
    The hard-target terms of :func:`_sigmoid_kernel` at ``z`` (``e = exp(-|z|)``):
    ``w phi(z)`` and ``w phi'(z)``.
    """
    log1p_e = _log1p_unit(e)
    softplus = tl.maximum(z, 0.0) + log1p_e
    # sigmoid(z)^gamma = exp(gamma log sigmoid(z)), log sigmoid(z) = min(z, 0) - log(1 + e^-|z|): finite.
    modulator = tl.exp2((gamma * 1.4426950408889634) * (tl.minimum(z, 0.0) - log1p_e))
    wm = w * modulator
    s, s_neg = _sigmoids(z, e, log1p_e)
    return wm * softplus, wm * (s + gamma * softplus * s_neg)


@triton.jit
def _smoothed_terms(z, e, w, gamma, delta):
    """
    The SMOOTH terms of :func:`_sigmoid_kernel` at ``z`` (``e = exp(-|z|)``):
    ``w psi(z)`` and ``w psi'(z)``.
    """
    log1p_e = _log1p_unit(e)
    bce = log1p_e + (1.0 - delta) * tl.maximum(z, 0.0) + delta * tl.maximum(-z, 0.0)
    s, s_neg = _sigmoids(z, e, log1p_e)
    u = (1.0 - delta) * s + delta * s_neg  # 1 - p_t >= min(delta, 1 - delta) > 0
    wm = w * tl.exp2(gamma * tl.log2(u))
    ratio = tl.fdiv(s * s_neg, tl.maximum(u, 1.1754943508222875e-38))
    bend = gamma * (1.0 - 2.0 * delta) * bce * ratio
    return wm * bce, wm * ((s - delta) + bend)


@triton.jit
def _sigmoid_kernel(
    x_ptr,
    labels_ptr,
    alpha_ptr,
    out_ptr,
    grad_loss_ptr,
    numel,
    gamma,
    scale,
    shift,
    factor,
    pos_weight,
    neg_weight,
    delta,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    CLASS_ALPHA: tl.constexpr,
    GRAD: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    """
    Element ``(i, k)`` of the (N, K) logits, with ``s = -1`` for ``k ==
    label_i`` and +1 elsewhere, contributes ``w phi(z)``, ``z = s scale x +
    shift``, where (appendix B of the paper)

        phi(z)  = sigmoid(z)^gamma softplus(z),
        phi'(z) = sigmoid(z)^gamma (sigmoid(z) + gamma softplus(z) sigmoid(-z)),

    and ``w`` is the positive or negative weight of class k (times
    ``factor``; a (2, K) table with CLASS_ALPHA, negatives' row first), 0
    for ignored rows, whose logits are not read (taken as 0: whatever they
    hold, inf or NaN, an ignored row adds 0, as in the reference). Without
    GRAD, ``out[pid]`` is the sum of the block's terms; with GRAD, ``out``
    is the (N, K) gradient ``w s scale phi'(z) * grad_loss``. A program
    takes BLOCK consecutive elements; index math within it is 32-bit.

    With SMOOTH (label smoothing, soft target ``delta = eps / 2`` of a
    negative), ``phi`` is fvcore's soft-target focal term (the weights come
    mixed for the soft targets, :func:`fused.sigmoid_alphas`):

        psi(z)  = u^gamma BCE(z, delta),  u = (1 - delta) sigmoid(z) + delta sigmoid(-z),
        psi'(z) = u^gamma ((sigmoid(z) - delta) + gamma BCE(z, delta) (1 - 2 delta) sigmoid(z) sigmoid(-z) / u).
    """
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    row0 = start // K
    local = (start - row0 * K).to(tl.int32) + tl.arange(0, BLOCK)  # element index from row0's start
    row = local // K
    col = local - row * K
    mask = tl.arange(0, BLOCK) < tl.minimum(numel - start, BLOCK).to(tl.int32)
    label = tl.load(labels_ptr + row0 + row, mask=mask, other=-1).to(tl.int32)
    x_ptrs = x_ptr + start + tl.arange(0, BLOCK)
    x = tl.load(x_ptrs, mask=mask & (label >= 0), other=0.0).to(tl.float32)
    pos = label == col
    if CLASS_ALPHA:
        # (2, K) table: the negatives' weight of each class, then the positives'
        w = tl.load(alpha_ptr + tl.where(pos, K, 0) + col, mask=mask, other=0.0) * factor
    else:
        w = tl.where(pos, pos_weight, neg_weight)
    w = tl.where(label >= 0, w, 0.0)
    sign = tl.where(pos, -scale, scale)
    z = sign * x + shift
    e = tl.exp2(-tl.abs(z) * 1.4426950408889634)  # exp(-|z|), in (0, 1]
    if SMOOTH:
        loss, slope = _smoothed_terms(z, e, w, gamma, delta)
    else:
        loss, slope = _focal_terms(z, e, w, gamma)
    if GRAD:
        grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
        grad = slope * (sign * grad_loss)
        tl.store(
            out_ptr + start + tl.arange(0, BLOCK), grad.to(out_ptr.dtype.element_ty), mask=mask
        )
    else:
        tl.store(out_ptr + pid, tl.sum(loss, axis=0))


@triton.jit
def _uniform_terms(x, e, x_max, cols, mask, weight_ptr, smoothing, gamma, C: tl.constexpr):
    """
    The label-smoothing part of :func:`_softmax_kernel` (the eager
    ``fused._uniform_softmax_terms``): ``sum_j w_j FL_j`` per row, the focal
    loss at every label j with ``w_j = eps / C weight[j + 1]``, and its
    gradient ``Z G_i - e_i sum_j G_j``, where ``m`` is the row's first largest
    logit, ``S_m = sum_{j != m} e_j``, ``Z = 1 + S_m``, ``S_j = Z - e_j`` for
    ``j != m``, ``log p_j = (x_j - max x) - log1p(S_m)``, ``log(1 - p_j) =
    -log1p(e_j / S_j)`` and ``G_j = w_j (1 - p_j)^gamma (gamma p_j log p_j /
    S_j - 1 / Z)``. Returns ((BLOCK_R,) row losses, (BLOCK_R, BLOCK_C) gradient).
    """
    col_w = tl.load(weight_ptr + 1 + cols, mask=cols < C, other=0.0).to(tl.float32)
    w = tl.where(mask, col_w[None, :] * (smoothing / C), 0.0)
    is_top = cols[None, :] == tl.argmax(x, axis=1)[:, None]
    s_top = tl.sum(tl.where(is_top, 0.0, e), axis=1)
    z = 1.0 + s_top
    others = tl.where(is_top, s_top[:, None], z[:, None] - e)
    others = tl.maximum(others, 1.1754943508222875e-38)
    log_p = tl.where(mask, (x - x_max[:, None]) - _log1p(s_top)[:, None], 0.0)
    log_1m_p = -_log1p(tl.fdiv(e, others))
    modulator = tl.where(gamma >= 1e-20, tl.exp2((gamma * 1.4426950408889634) * log_1m_p), 1.0)
    weighted = w * modulator
    p = tl.fdiv(e, z[:, None])
    g = weighted * (gamma * tl.fdiv(p * log_p, others) - tl.fdiv(1.0, z)[:, None])
    grad = z[:, None] * g - e * tl.sum(g, axis=1)[:, None]
    return -tl.sum(weighted * log_p, axis=1), grad


@triton.jit
def _softmax_kernel(
    x_ptr,
    labels_ptr,
    weight_ptr,
    out_ptr,
    grad_loss_ptr,
    num_rows,
    gamma,
    smoothing,
    C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    GRAD: tl.constexpr,
    SMOOTH: tl.constexpr,
):
    """
    Rows ``[pid BLOCK_R, (pid + 1) BLOCK_R)`` of the (N, C) logits. With
    ``e_j = exp(x_j - max x)``, ``S = sum_{j != y} e_j``:

        log(p_t)     = (x_y - max x) - log1p((e_y - 1) + S),
        log(1 - p_t) = -log1p(e_y / S),
        FL           = -w (1 - p_t)^gamma log(p_t),

    ``w = weight[label + 1]``. Ignored rows are not read, like rows past N
    (whatever their logits hold, inf or NaN, they add 0, as in the
    reference), and get a zero gradient. Without
    GRAD, ``out[pid]`` is the block's sum; with GRAD, ``out`` is the (N, C)
    gradient: ``D = w (1 - p_t)^gamma (gamma p_t log(p_t) + p_t - 1)`` at
    column y and ``-D e_j / S`` elsewhere, times ``grad_loss``. Index math
    within a program is 32-bit.

    With SMOOTH (label smoothing eps = ``smoothing``), ``w`` is scaled by
    ``1 - eps`` and :func:`_uniform_terms` adds ``eps / C`` times the loss at
    every label.
    """
    pid = tl.program_id(0)
    row0 = pid.to(tl.int64) * BLOCK_R
    r = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    in_range = r < tl.minimum(num_rows - row0, BLOCK_R).to(tl.int32)
    label = tl.load(labels_ptr + row0 + r, mask=in_range, other=-1).to(tl.int32)
    row_mask = label >= 0  # the rows read: in range and not ignored
    mask = row_mask[:, None] & (cols < C)[None, :]
    offs = r[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + row0 * C + offs, mask=mask, other=float("-inf")).to(tl.float32)
    w = tl.load(weight_ptr + label + 1, mask=row_mask, other=0.0).to(tl.float32)
    if SMOOTH:
        w = w * (1.0 - smoothing)
    y = tl.maximum(label, 0)
    x_max = tl.max(x, axis=1)
    x_max = tl.where(row_mask, x_max, 0.0)
    e = tl.exp2((x - x_max[:, None]) * 1.4426950408889634)  # 0 at masked columns
    is_y = cols[None, :] == y[:, None]
    # The label's logit read again (a cache hit), not picked out of the row by a row reduction.
    x_y = tl.load(x_ptr + row0 * C + r * C + y, mask=row_mask, other=0.0).to(tl.float32)
    e_y = tl.exp2((x_y - x_max) * 1.4426950408889634)
    others = tl.sum(tl.where(is_y, 0.0, e), axis=1)
    log_pt = tl.where(
        row_mask, (x_y - x_max) - _log1p((e_y - 1.0) + others), 0.0
    )  # rows not read: -inf
    log_1m_pt = -_log1p(tl.fdiv(e_y, others))
    # (1 - p_t)^gamma is 1 below gamma 1e-20, as in the eager path (fused._TINY_GAMMA).
    modulator = tl.where(gamma >= 1e-20, tl.exp2((gamma * 1.4426950408889634) * log_1m_pt), 1.0)
    wm = tl.where(row_mask, w * modulator, 0.0)
    if GRAD:
        grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
        p_t = tl.exp2(log_pt * 1.4426950408889634)
        d = wm * (gamma * p_t * log_pt - tl.exp2(log_1m_pt * 1.4426950408889634)) * grad_loss
        coef = -tl.fdiv(d, tl.maximum(others, 1.1754943508222875e-38))  # 0 where p_t == 1
        grad = tl.where(is_y, d[:, None], coef[:, None] * e)
        if SMOOTH:
            _, uniform_grad = _uniform_terms(
                x, e, x_max, cols, mask, weight_ptr, smoothing, gamma, C
            )
            grad += uniform_grad * grad_loss
        in_bounds = in_range[:, None] & (cols < C)[None, :]  # ignored rows too: zeros
        tl.store(out_ptr + row0 * C + offs, grad.to(out_ptr.dtype.element_ty), mask=in_bounds)
    else:
        block_loss = -tl.sum(wm * log_pt, axis=0)
        if SMOOTH:
            uniform_loss, _ = _uniform_terms(
                x, e, x_max, cols, mask, weight_ptr, smoothing, gamma, C
            )
            block_loss += tl.sum(uniform_loss, axis=0)
        tl.store(out_ptr + pid, block_loss)


# ----------------------------------------------------------------------------- launchers


def _sigmoid_launch(logits, labels, out, grad_loss, params, grad: bool):
    n, k = logits.shape
    numel = n * k
    gamma, scale, shift, factor, weights, delta = params
    class_alpha = isinstance(weights, Tensor)
    if class_alpha:
        alpha_table, pos_weight, neg_weight = weights, 0.0, 0.0
    else:
        alpha_table, (pos_weight, neg_weight) = logits, weights  # the table is unread
    grid = (_num_programs(_sigmoid_launch, logits, params),)
    _sigmoid_kernel[grid](
        logits,
        labels,
        alpha_table,
        out,
        grad_loss,
        numel,
        gamma,
        scale,
        shift,
        factor,
        pos_weight * factor,
        neg_weight * factor,
        delta,
        K=k,
        BLOCK=SIGMOID_BLOCK,
        CLASS_ALPHA=class_alpha,
        GRAD=grad,
        SMOOTH=delta > 0,
        num_warps=SIGMOID_WARPS,
    )


def _softmax_launch(logits, labels, out, grad_loss, params, grad: bool):
    n, c = logits.shape
    gamma, weight, smoothing = params
    block_r, block_c = _softmax_block(c, smoothing > 0)
    grid = (_num_programs(_softmax_launch, logits, params),)
    _softmax_kernel[grid](
        logits,
        labels,
        weight,
        out,
        grad_loss,
        n,
        gamma,
        smoothing,
        C=c,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        GRAD=grad,
        SMOOTH=smoothing > 0,
        num_warps=SOFTMAX_WARPS,
    )


# Launch sizes in plain integer arithmetic: triton.cdiv and triton.next_power_of_2 are
# ConstexprFunctions, about 3 us a call on the host, paid before each launch.
def _softmax_block(c: int, smooth: bool = False) -> Tuple[int, int]:
    """
    (rows, columns) of a softmax program's block: next_pow2(C) columns, SOFTMAX_ELEMENTS in all
    (SOFTMAX_SMOOTH_ELEMENTS with label smoothing), at least 1 row and at most one a thread.
    """
    block_c = 1 << (c - 1).bit_length()
    elements = SOFTMAX_SMOOTH_ELEMENTS if smooth else SOFTMAX_ELEMENTS
    return max(1, min(32 * SOFTMAX_WARPS, elements // block_c)), block_c


def _num_programs(launch, logits, params) -> int:
    """The programs ``launch`` runs on ``logits``: one partial sum each in the forward."""
    n, c = logits.shape
    if launch is _sigmoid_launch:
        return -(-n * c // SIGMOID_BLOCK)
    return -(-n // _softmax_block(c, params[2] > 0)[0])


def _forward(launch, logits, labels, params) -> Tensor:
    if logits.numel() == 0:
        return logits.new_zeros((), dtype=fused.compute_dtype(logits.dtype))
    programs = _num_programs(launch, logits, params)
    partial = torch.empty(programs, dtype=torch.float32, device=logits.device)
    launch(logits, labels, partial, partial, params, grad=False)
    return partial.sum()  # float32, a fixed-order tree over the partial sums


def _backward(launch, logits, labels, params, grad_loss) -> Tensor:
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if logits.numel():
        launch(logits, labels, grad, grad_loss, params, grad=True)  # float32, 0-dim
    return grad


class _TritonLoss(torch.autograd.Function):
    """The summed loss; backward recomputes each block and writes its gradient in one pass."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, launch, params) -> Tensor:
        ctx.launch, ctx.params = launch, params
        ctx.save_for_backward(logits, labels)
        return _forward(launch, logits, labels, params)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        logits, labels = ctx.saved_tensors
        return _backward(ctx.launch, logits, labels, ctx.params, grad_loss), None, None, None


def _apply(launch, logits: Tensor, labels: Tensor, params) -> Tensor:
    logits = logits.contiguous()
    labels = labels.contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TritonLoss.apply(logits, labels, launch, params)
    return _forward(launch, logits, labels, params)


def sigmoid_family(
    logits, labels, *, gamma, scale, shift, factor, alpha, class_alpha, label_smoothing=0.0
) -> Tensor:
    """
    ``factor * sum_valid alpha_t * phi(s_t scale x + shift)`` with ``phi`` the
    focal term at ``gamma`` (see :func:`_sigmoid_kernel`): FL, CE (gamma 0)
    and FL* (gamma 0, scale = gamma*, shift = -beta, factor = 1 / gamma*);
    with ``label_smoothing`` eps, the soft-target term at ``delta = eps / 2``.

    Args:
        logits (Tensor): (N, K) float32, float16 or bfloat16, on CUDA.
        labels (Tensor): (N,) int64 in [-1, K].
        class_alpha (Tensor or None): (K,) per-class foreground weights.

    Returns:
        Tensor: scalar, float32 or wider.
    """
    delta = float(label_smoothing) / 2
    if class_alpha is not None:
        class_alpha = class_alpha.to(device=logits.device, dtype=torch.float32)
    # class_alpha is its own "like": the weights stay on its device and dtype
    pos_weight, neg_weight = fused.sigmoid_alphas(float(alpha), class_alpha, class_alpha, delta)
    if class_alpha is None:
        weights = (float(pos_weight), float(neg_weight))
    else:  # the (2, K) table of _sigmoid_kernel's CLASS_ALPHA: negatives' weights first
        weights = torch.stack([neg_weight, pos_weight])
    params = (float(gamma), float(scale), float(shift), float(factor), weights, delta)
    return _apply(_sigmoid_launch, logits, labels, params)


def softmax_family(logits, labels, *, gamma, class_weight, label_smoothing=0.0) -> Tensor:
    """
    Softmax focal loss of (N, C) logits, with ``class_weight`` (C + 1,): the
    weight of label -1 (0), then the alpha of each class, and
    ``label_smoothing`` eps (see :func:`_softmax_kernel`).
    """
    params = (
        float(gamma),
        class_weight.to(device=logits.device, dtype=torch.float32).contiguous(),
        float(label_smoothing),
    )
    return _apply(_softmax_launch, logits, labels, params)
