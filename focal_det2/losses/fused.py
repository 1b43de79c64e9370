"""
Fast paths of the focal-loss family on class-index targets.

Same signatures and results as :mod:`focal_det2.losses.functional` (the
definitions they are tested against), computed so that the (N, K) block of
logits is read once and the gradient is written once:

* every (anchor, class) element is first treated as a negative, over the
  whole block; the one positive column of a foreground row is then corrected
  by gather/scatter at ``(i, label_i)``. No (N, K) one-hot or boolean target
  tensor is built.
* The loss and its closed-form gradient (the paper's appendix B) come out of
  one pass, taken in chunks of rows that stay in cache; the gradient is
  written straight into one logits-sized tensor, kept by the autograd
  Function and scaled in place by the incoming gradient in backward. A second
  backward through a retained graph recomputes it from the saved logits.
  (Recomputing it in every backward instead would take the transcendental
  functions twice.)
* Nothing else grows with the logits: a chunk's scratch buffers are gradient
  rows not written yet (those after the chunk, see :func:`_row_chunks`), and
  per-anchor weights and sums are taken chunk by chunk. On the CPU the extra
  memory of a forward + backward is the gradient plus a few hundred kB; on a
  GPU, plus the fresh scratch of the last chunks (up to 2-3 x 16 MB).
* Each chunk is summed by PyTorch's pairwise sum, the chunk sums in float64;
  ignored anchors (label -1) get zero loss and zero gradient, whatever their
  logits (inf and NaN too).
* Everything is written with ``exp(-|x|)`` and ``log(1 + exp(-|x|))``,
  never ``log(p)``, so float32 logits in [-100, 100] give a finite loss and
  gradient. ``exp`` is taken as ``exp2``, faster on the CPU; on CPUs where
  PyTorch dispatches AVX-512 kernels ATen's ``log1p`` costs many times
  ``log``, and ``log(1 + t)`` is then taken from ``log`` with an exact
  correction (:func:`_log1p_exp_neg_abs`). ``benchmarks/bench_loss.py``
  measures these per-element costs (its op table; README "The loss on the CPU").

Backends (:mod:`.backends`, chosen and logged once per device type): CUDA tensors
take the Triton kernels of :mod:`focal_det2.losses.triton_kernels` (one
kernel per loss family, no chunks); other devices take the chunk kernels
here, as plain torch ops (``eager``). ``FOCAL_DET2_BACKEND=eager|triton|compile``
forces one; ``compile`` runs the chunk kernels through ``torch.compile``
(falling back to eager, with a warning, where compilation fails).
float16 and bfloat16 logits are computed in float32 on every backend.
"""

from functools import lru_cache, partial
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backends
from .functional import softmax_class_alpha

__all__ = [
    "sigmoid_focal_loss",
    "sigmoid_cross_entropy",
    "softmax_focal_loss",
    "focal_star_loss",
    "sigmoid_alphas",
    "softplus",
]

# Elements per chunk of rows. On the CPU the size trades cache residency against
# per-op overhead: a chunk and its one to three scratch buffers should stay in L3,
# while smaller chunks pay PyTorch's fixed cost per op more often.
# benchmarks/bench_loss.py measures it (README, "The loss on the CPU"); re-run it
# before changing this. On a GPU chunks only bound the scratch memory.
CPU_CHUNK_ELEMENTS = 1 << 19
LARGE_CHUNK_ELEMENTS = 1 << 22
# Smallest chunk that takes its scratch space from the gradient (see _row_chunks):
# below it, the few rows left take fresh scratch. On a GPU the caching allocator
# reuses scratch space from call to call, so chunks do not shrink there.
CPU_MIN_CHUNK_ELEMENTS = 1 << 12
# Below this gamma, 1 / gamma overflows float32 (and gamma rounds to 0): it is handled apart.
_TINY_GAMMA = 1e-20
_LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


def _chunk_elements(logits: Tensor) -> int:
    return CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else LARGE_CHUNK_ELEMENTS


def _min_chunk_elements(logits: Tensor) -> int:
    return CPU_MIN_CHUNK_ELEMENTS if logits.device.type == "cpu" else LARGE_CHUNK_ELEMENTS


Chunk = Tuple[int, int, Optional[int]]


def _row_chunks(logits: Tensor, spare: int = 0) -> List[Chunk]:
    """
    Row ranges ``(start, end, scratch)`` of about ``_chunk_elements`` elements
    each, covering the rows of ``logits`` in order.

    With ``spare`` > 0, a chunk's scratch space is ``spare`` chunk-sized blocks
    of the gradient rows that are not written yet: rows ``[scratch, scratch +
    spare * (end - start))``, right after the chunk. Where fewer rows than that
    are left, chunks shrink to ``1 / (spare + 1)`` of what is left, down to
    ``_min_chunk_elements``; the last rows get ``scratch = None``: fresh
    scratch space, at most ``(spare + 1) * _min_chunk_elements`` elements per block.
    """
    n, k = logits.shape
    step = max(1, _chunk_elements(logits) // max(k, 1))
    min_rows = max(1, _min_chunk_elements(logits) // max(k, 1))
    chunks, start = [], 0
    while spare and start < n:
        rows = min(step, (n - start) // (spare + 1))
        if rows < min_rows:
            break
        chunks.append((start, start + rows, start + rows))
        start += rows
    chunks += [(r, min(r + step, n), None) for r in range(start, n, step)]
    return chunks


def _scratch(
    grad: Optional[Tensor], chunk: Chunk, spare: int, fresh: Optional[Tensor]
) -> Optional[Tensor]:
    """(spare, R, C) scratch space of ``chunk`` (R rows): gradient rows not yet written, or ``fresh``'s first R rows."""
    r0, r1, scratch = chunk
    if scratch is None:
        return None if fresh is None else fresh[:, : r1 - r0]
    return grad[scratch : scratch + spare * (r1 - r0)].view(spare, r1 - r0, grad.shape[1])


def _sum(sums: List[Tensor], like: Tensor) -> Tensor:
    """Sum of the chunks' 0-dim sums, in float64 (0 for no chunks)."""
    return (
        torch.stack(sums).sum(dtype=torch.float64)
        if sums
        else like.new_zeros((), dtype=torch.float64)
    )


def _workspace(logits: Tensor, chunks: List[Chunk], count: int) -> Optional[Tensor]:
    """
    (count, R, C) scratch buffers for the chunks without scratch rows of their
    own (R the largest such chunk), allocated once per call: temporaries
    allocated and freed chunk after chunk would be returned to the OS and
    page-faulted in again by glibc's default malloc. None if no chunk needs it,
    and under the compile backend, whose fused kernels need no scratch space.
    """
    rows = max((r1 - r0 for r0, r1, scratch in chunks if scratch is None), default=0)
    if backends.backend(logits.device.type) == "compile" or rows == 0:
        return None
    return logits.new_empty((count, rows, logits.shape[1]))


# ----------------------------------------------------------------------------- autograd


class _FusedLoss(torch.autograd.Function):
    """
    A summed loss whose forward also computes d loss / d logits when the
    logits need it; backward scales that gradient in place by the incoming
    scalar gradient. Saves only the logits and labels, to recompute the
    gradient if backward runs a second time (``retain_graph=True``).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, compute: Callable) -> Tensor:
        loss, grad = compute(logits, labels, ctx.needs_input_grad[0])
        ctx.compute = compute
        ctx.grad = grad
        ctx.save_for_backward(logits, labels)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            logits, labels = ctx.saved_tensors
            grad = ctx.compute(logits, labels, True)[1]
        return grad.mul_(grad_loss), None, None


def _apply(compute: Callable, logits: Tensor, labels: Tensor) -> Tensor:
    if torch.is_grad_enabled() and logits.requires_grad:
        return _FusedLoss.apply(logits, labels, compute)
    return compute(logits, labels, False)[0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """
    The dtype the fused losses compute and sum in for logits of ``dtype``:
    float32 for float16 and bfloat16 (AMP), else ``dtype``. Weights the loss
    multiplies by (CLASS_ALPHA, class weights) are kept in it, not rounded to
    the logits' half precision.
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _eager_logits(logits: Tensor) -> Tensor:
    """
    float16 and bfloat16 logits in float32 for the eager and compile
    backends, whose math runs in the logits' dtype; autograd casts the
    gradient back. (The Triton kernels read any of them and compute in float32.)
    """
    return logits.to(compute_dtype(logits.dtype))


def _use_triton(logits: Tensor) -> bool:
    """
    The Triton kernels compute in float32: they take float32, float16 and
    bfloat16 logits; float64 logits, asked for for their precision, take the
    eager path.
    """
    return logits.dtype != torch.float64 and backends.backend(logits.device.type) == "triton"


def _sigmoid_loss(logits: Tensor, labels: Tensor, **params) -> Tensor:
    """:func:`_sigmoid_family` (with ``params``) on the backend of ``logits``' device."""
    if _use_triton(logits):
        from . import triton_kernels

        return triton_kernels.sigmoid_family(logits, labels, **params)
    return _apply(partial(_sigmoid_family, **params), _eager_logits(logits), labels)


# ----------------------------------------------------------------------------- sigmoid losses


class SigmoidScratch(NamedTuple):
    """
    The chunk-sized buffers of one :func:`sigmoid_focal_terms` call, named by
    what each holds when the call returns (None: a fresh tensor is allocated):

    * ``loss``: ``log(1 + e^-|z|)``, then ``softplus(z)``, then the returned loss;
    * ``sigmoid``: scratch for that log, then ``max(z, 0)``, then ``sigmoid(z)``,
      then the returned gradient: the gradient rows themselves when the caller
      wants the gradient;
    * ``modulator``: ``log sigmoid(z)``, then ``sigmoid(z)^gamma``; unused at gamma 0;
    * ``shifted``: ``z = scale x + shift`` of :func:`_sigmoid_chunk`, where ``z`` is not ``x``.

    A chunk's scratch space (:func:`_scratch`) is :meth:`count` blocks, in this
    order, skipping ``sigmoid`` when the gradient rows hold it and the unused ones.
    """

    loss: Optional[Tensor] = None
    sigmoid: Optional[Tensor] = None
    modulator: Optional[Tensor] = None
    shifted: Optional[Tensor] = None

    @staticmethod
    def count(gamma: float, want_grad: bool, shifted: bool) -> int:
        """Blocks of scratch space a chunk needs (the gradient rows not counted)."""
        return 1 + (not want_grad) + (gamma != 0) + shifted

    @classmethod
    def of(
        cls, work: Optional[Tensor], grad_out: Optional[Tensor], gamma: float, shifted: bool
    ) -> "SigmoidScratch":
        """The buffers in ``work`` ((count, *shape), or None for fresh ones), with ``grad_out`` as ``sigmoid``."""
        blocks = iter(work) if work is not None else iter(lambda: None, 0)
        loss = next(blocks)
        sigmoid = grad_out if grad_out is not None else next(blocks)
        modulator = next(blocks) if gamma != 0 else None
        return cls(loss, sigmoid, modulator, next(blocks) if shifted else None)


def sigmoid_focal_terms(
    z: Tensor,
    gamma: float,
    weight=1.0,
    grad_scale: Optional[float] = None,
    scratch: SigmoidScratch = SigmoidScratch(),
) -> Tuple[Tensor, Optional[Tensor]]:
    """
    The focal term of a negative as a function of its logit ``z`` (for a
    positive, call it at ``-z``), and its derivative (the paper's appendix B):

        phi(z)  = sigmoid(z)^gamma * softplus(z)
                = -(1 - p_t)^gamma * log(p_t),          p_t = sigmoid(-z),
        phi'(z) = sigmoid(z)^gamma * (s + gamma * softplus(z) * (1 - s)),  s = sigmoid(z),

    with ``softplus(z) = max(z, 0) + log1p(exp(-|z|))`` and, for gamma other
    than 0, 1 and 2, ``sigmoid(z)^gamma = exp(gamma * (min(z, 0) - log1p(exp(-|z|))))``:
    finite for any finite ``z``. ``exp(-|z|)`` is taken as ``exp2(-|z| log2(e))``,
    faster than ``exp`` on the CPU, and ``s + g (1 - s)`` as ``lerp(s, 1, g)``.

    Args:
        z (Tensor): logits, any shape.
        gamma (float): >= 0.
        weight (float, Tensor or tuple of them): broadcastable to ``z``, multiplies
            both results; a tuple multiplies by each of its factors in turn.
        grad_scale (float or None): if given, also return ``weight * grad_scale * phi'(z)``.
        scratch (SigmoidScratch): where the loss and the gradient are written (fresh by default).

    Returns:
        Tensor: ``weight * phi(z)``, shape of ``z``.
        Tensor or None: ``weight * grad_scale * phi'(z)``.
    """
    weight = weight if isinstance(weight, tuple) else (weight,)
    log_term = _log1p_exp_neg_abs(z, out=scratch.loss, tmp=scratch.sigmoid)  # log(1 + e^-|z|)
    positive_part = torch.clamp_min(z, 0, out=scratch.sigmoid)
    if gamma not in (0, 1, 2):
        log_sigmoid = torch.sub(z, positive_part, out=scratch.modulator).sub_(log_term)
    softplus = log_term.add_(positive_part)
    want_grad = grad_scale is not None
    if gamma == 0:
        grad = (
            _times(_times(torch.sigmoid(z, out=scratch.sigmoid), weight), grad_scale)
            if want_grad
            else None
        )
        return _times(softplus, weight), grad
    s = torch.sigmoid(z, out=scratch.sigmoid)
    if gamma == 1:
        modulator = _times(torch.mul(s, weight[0], out=scratch.modulator), weight[1:])
    elif gamma == 2:
        modulator = _times(torch.mul(s, s, out=scratch.modulator), weight)
    else:
        modulator = _times(log_sigmoid.mul_(gamma).exp_(), weight)
    if not want_grad:
        return softplus.mul_(modulator), None
    if gamma < _TINY_GAMMA:
        # 1 / gamma would overflow; gamma * softplus is negligible, so s * (1 - gamma * softplus)
        # + gamma * softplus has no cancellation.
        grad = s.addcmul_(s, softplus, value=-gamma).add_(softplus, alpha=gamma).mul_(modulator)
        return softplus.mul_(modulator), _times(grad, grad_scale)
    gamma_softplus = _times(softplus, gamma)
    grad = torch.lerp(s, s.new_ones(()), gamma_softplus, out=s).mul_(modulator)
    return _times(gamma_softplus.mul_(modulator), 1 / gamma), _times(grad, grad_scale)


def smoothed_focal_terms(
    z: Tensor,
    gamma: float,
    delta: float,
    weight=1.0,
    grad_scale: Optional[float] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """
    :func:`sigmoid_focal_terms` for the soft target ``delta`` in (0, 1/2)
    (label smoothing: ``delta = eps / 2``): fvcore's soft-target focal term
    of a column with target ``delta`` as a function of its logit ``z`` (for
    the anchor's class, call it at ``-z``), and its derivative:

        psi(z)  = u^gamma * BCE(z, delta),  u = 1 - p_t = (1 - delta) s + delta (1 - s),
        psi'(z) = u^gamma * ((s - delta) + gamma * BCE(z, delta) * (1 - 2 delta) * s (1 - s) / u),

    with ``s = sigmoid(z)`` and ``BCE(z, delta) = log1p(exp(-|z|)) + max(z, 0)
    - delta z`` (every term >= 0 but the last, at most ``delta |z|``), and ``u >= delta``
    keeps ``1 / u`` finite at gamma 0. At delta 0 this is ``phi`` of
    :func:`sigmoid_focal_terms`. Fresh tensors (label smoothing is off the
    hot path); arguments as in :func:`sigmoid_focal_terms`.
    """
    e = torch.abs(z).mul_(-_LOG2_E).exp2_()  # exp(-|z|)
    # BCE(z, delta) = log1p(e) + max(z, 0) - delta z
    bce = _log1p_(e.clone(), tmp=None).add_(torch.clamp_min(z, 0)).sub_(z, alpha=delta)
    s = torch.sigmoid(z)
    s_neg = torch.sigmoid(torch.neg(z, out=e))  # sigmoid(-z): 1 - s without cancellation
    u = torch.lerp(s_neg, s, 1 - delta)  # delta s_neg + (1 - delta) s
    modulator = _times(u.pow(gamma), weight)  # 0^0 = 1
    loss = bce * modulator
    if grad_scale is None:
        return loss, None
    slope = torch.sub(s, delta)
    if gamma != 0:
        bend = bce.mul_(s).mul_(s_neg).div_(u.clamp_min_(torch.finfo(u.dtype).tiny))
        slope.add_(bend, alpha=gamma * (1 - 2 * delta))
    return loss, _times(slope.mul_(modulator), grad_scale)


def _slow_log1p(device: torch.device) -> bool:
    """
    True where ATen's ``log1p`` costs many times ``log``: CPUs on which
    PyTorch dispatches AVX-512 kernels. The per-element costs are measured
    by ``benchmarks/bench_loss.py`` (its elementwise-op line) and quoted, with
    their commit, in README's "The loss on the CPU".
    """
    return device.type == "cpu" and "AVX512" in torch.backends.cpu.get_cpu_capability()


def _log1p_exp_neg_abs(z: Tensor, out: Optional[Tensor], tmp: Optional[Tensor]) -> Tensor:
    """
    ``log(1 + t)``, ``t = exp(-|z|)``, into ``out``, with ``tmp`` (shape of
    ``z``) as scratch space; either may be None for a fresh tensor.

    Where ``log1p`` is slow (:func:`_slow_log1p`) it is taken from ``log``:
    with ``u = 1 + t`` rounded, ``v = u - 1`` is exact and so is ``u = v + 1``,
    and ``log(1 + t) = log(u) + (t - v)`` up to ``(t - v) t``, below 2^-24
    relative to the result: float32 precision for any ``t`` in (0, 1], also
    where ``1 + t`` rounds to 1.
    """
    return _log1p_(torch.abs(z, out=out).mul_(-_LOG2_E).exp2_(), tmp)


def softplus(x: Tensor) -> Tensor:
    """
    ``softplus(x) = max(x, 0) + log(1 + exp(-|x|))`` as a fresh tensor, with the
    ``log1p`` of :func:`_log1p_exp_neg_abs` (ATen's ``softplus`` is as slow as its
    ``log1p`` under AVX-512 dispatch).
    """
    return _log1p_exp_neg_abs(x, out=None, tmp=None).add_(x.clamp_min(0))


def _log1p_(t: Tensor, tmp: Optional[Tensor]) -> Tensor:
    """``log(1 + t)`` in place, ``t`` in (0, 1], as :func:`_log1p_exp_neg_abs` takes it."""
    if not _slow_log1p(t.device):
        return t.log1p_()
    v = torch.add(t, 1, out=tmp).sub_(1)
    return t.sub_(v).add_(v.add_(1).log_())


def _is_one(weight) -> bool:
    return not isinstance(weight, Tensor) and weight == 1


def _times(t: Tensor, weight) -> Tensor:
    """``t * weight``, in place; ``weight`` a float, a tensor or a tuple of them (each multiplies); 1 is skipped."""
    for w in weight if isinstance(weight, tuple) else (weight,):
        t = t if _is_one(w) else t.mul_(w)
    return t


def _sigmoid_chunk(
    x: Tensor,
    ignored_rows: Tensor,
    pos_rows: Tensor,
    pos_cols: Tensor,
    grad_out: Optional[Tensor],
    work: Optional[Tensor],
    *,
    gamma: float,
    scale: float,
    shift: float,
    neg_weight,
    delta: float = 0.0,
) -> Tensor:
    """
    Sum of the negative terms of one chunk of rows, ``neg_weight * phi(scale *
    x + shift)`` (:func:`sigmoid_focal_terms`; with ``delta`` > 0,
    :func:`smoothed_focal_terms`'s ``psi``), over the valid rows and every
    column except at the positives, which are left to the caller.

    Args:
        x (Tensor): (R, K) logits.
        ignored_rows (Tensor): (I,) the rows labelled -1: zero loss and gradient,
            whatever their logits.
        pos_rows, pos_cols (Tensor): (P,) positions of the positives in the chunk.
        grad_out (Tensor or None): (R, K), receives the gradient of the negative terms.
        work (Tensor or None): (M, R, K) scratch space laid out as :class:`SigmoidScratch`
            (M from :meth:`SigmoidScratch.count`); None for fresh tensors.
        neg_weight (float or Tensor): weight of a negative, a float or per class, (K,).
        delta (float): the negatives' soft target (label smoothing / 2), or 0.

    Returns:
        Tensor: 0-dim sum, dtype of ``x`` (PyTorch sums a chunk pairwise, to float32 precision).
    """
    if delta:
        return _smoothed_sigmoid_chunk(
            x, ignored_rows, pos_rows, pos_cols, grad_out, gamma, scale, shift, neg_weight, delta
        )
    shifted = scale != 1 or shift != 0
    scratch = SigmoidScratch.of(work, grad_out, gamma, shifted)
    z = torch.mul(x, scale, out=scratch.shifted).add_(shift) if shifted else x
    grad_scale = scale if grad_out is not None else None
    loss, _ = sigmoid_focal_terms(z, gamma, neg_weight, grad_scale, scratch)  # grad in grad_out
    loss[pos_rows, pos_cols] = 0
    loss[ignored_rows] = 0
    if grad_out is not None:
        grad_out[ignored_rows] = 0
    return loss.sum()


def _smoothed_sigmoid_chunk(
    x, ignored_rows, pos_rows, pos_cols, grad_out, gamma, scale, shift, neg_weight, delta
) -> Tensor:
    """:func:`_sigmoid_chunk` with label smoothing, on fresh tensors (no scratch layout)."""
    grad_scale = scale if grad_out is not None else None
    loss, grad = smoothed_focal_terms(x * scale + shift, gamma, delta, neg_weight, grad_scale)
    loss[pos_rows, pos_cols] = 0
    loss[ignored_rows] = 0
    if grad_out is not None:
        grad[ignored_rows] = 0
        grad_out.copy_(grad)
    return loss.sum()


def _foreground(labels: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """Rows (sorted) and classes of the foreground anchors: (P,), (P,)."""
    rows = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
    return rows, labels[rows]


def _ignored(labels: Tensor) -> Tensor:
    """
    Rows (sorted) of the ignored anchors, (I,). They add nothing, whatever
    their logits (inf, NaN), as in the reference, which drops them: their
    terms are set to 0 (taken by index, cheaper than weighting every row by
    0 or 1, and ``0 * inf`` is NaN).
    """
    return (labels < 0).nonzero().squeeze(1)


def _chunk_bounds(rows: Tensor, chunks: List[Chunk]) -> List[int]:
    """Index of the first of the sorted ``rows`` in each chunk, then ``len(rows)``."""
    if len(chunks) == 1:  # no search, no device sync
        return [0, len(rows)]
    starts = torch.tensor([chunk[0] for chunk in chunks[1:]], dtype=torch.long, device=rows.device)
    return [0] + torch.searchsorted(rows, starts).tolist() + [len(rows)]


def sigmoid_alphas(alpha: float, class_alpha: Optional[Tensor], like: Tensor, delta: float = 0.0):
    """
    Weights of positives and negatives: ``(a, 1 - a)`` with ``a`` a (K,) tensor
    for ``class_alpha`` (on ``like``'s device and dtype), else floats;
    ``(1.0, 1.0)`` for ``alpha == -1``. With label smoothing (targets ``1 -
    delta`` and ``delta``), ``alpha_t = a t + (1 - a)(1 - t)`` at them:
    ``((1 - delta) a_pos + delta a_neg, (1 - delta) a_neg + delta a_pos)``.
    The eager kernels and the Triton launch both take their weights from here.
    """
    if class_alpha is not None:
        a = class_alpha.to(like)
        a_pos, a_neg = a, 1 - a
    elif alpha < 0:
        a_pos, a_neg = 1.0, 1.0
    else:
        a_pos, a_neg = alpha, 1.0 - alpha
    if delta:
        a_pos, a_neg = a_pos * (1 - delta) + a_neg * delta, a_neg * (1 - delta) + a_pos * delta
    return a_pos, a_neg


def _sigmoid_family(
    logits: Tensor,
    labels: Tensor,
    want_grad: bool,
    *,
    gamma: float,
    scale: float,
    shift: float,
    factor: float,
    alpha: float,
    class_alpha: Optional[Tensor],
    label_smoothing: float = 0.0,
) -> Tuple[Tensor, Optional[Tensor]]:
    """
    ``factor * sum_valid alpha_t * phi(s_t * scale * x + shift)``, with ``phi``
    from :func:`sigmoid_focal_terms` at ``gamma`` and ``s_t`` = -1 for the
    anchor's class, +1 elsewhere; and its gradient. With ``label_smoothing``
    eps > 0, ``phi`` is :func:`smoothed_focal_terms`'s ``psi`` at ``delta =
    eps / 2`` and ``alpha_t = a t + (1 - a)(1 - t)`` at the smoothed target
    ``t``: ``(1 - delta) a + delta (1 - a)`` for the anchor's class,
    ``(1 - delta)(1 - a) + delta a`` elsewhere.

    Returns:
        Tensor: scalar loss, dtype of ``logits``.
        Tensor or None: (N, K) gradient if ``want_grad``.
    """
    k = logits.shape[1]
    delta = label_smoothing / 2
    pos_rows, pos_cls = _foreground(labels, k)
    ignored = _ignored(labels)
    a_pos, a_neg = sigmoid_alphas(alpha, class_alpha, logits, delta)
    count = SigmoidScratch.count(gamma, want_grad, scale != 1 or shift != 0)
    eager = backends.backend(logits.device.type) == "eager"
    spare = count if want_grad and eager and not delta else 0
    grad = (
        logits.new_empty(logits.shape) if want_grad else None
    )  # contiguous: scratch rows are views of it

    chunks = _row_chunks(logits, spare)
    fresh = None if delta else _workspace(logits, chunks, count)
    bounds = _chunk_bounds(pos_rows, chunks)
    ignored_bounds = _chunk_bounds(ignored, chunks)
    kernel = partial(
        backends.compiled(_sigmoid_chunk, logits.device.type),
        gamma=gamma,
        scale=scale,
        shift=shift,
        neg_weight=a_neg * factor,
        delta=delta,
    )
    sums = []
    for chunk, p0, p1, i0, i1 in zip(
        chunks, bounds[:-1], bounds[1:], ignored_bounds[:-1], ignored_bounds[1:]
    ):
        r0, r1, _ = chunk
        sums.append(
            kernel(
                logits[r0:r1],
                ignored[i0:i1] - r0,
                pos_rows[p0:p1] - r0,
                pos_cls[p0:p1],
                grad[r0:r1] if want_grad else None,
                _scratch(grad, chunk, spare, fresh),
            )
        )
    total = _sum(sums, logits)

    # The positives: phi at -scale * x + shift.
    a_pos = a_pos[pos_cls] * factor if isinstance(a_pos, Tensor) else a_pos * factor
    terms = partial(smoothed_focal_terms, delta=delta) if delta else sigmoid_focal_terms
    pos_loss, pos_grad = terms(
        -scale * logits[pos_rows, pos_cls] + shift,
        gamma,
        weight=a_pos,
        grad_scale=-scale if want_grad else None,
    )
    total = total + pos_loss.sum(dtype=torch.float64)
    if want_grad:
        grad[pos_rows, pos_cls] = pos_grad
    return total.to(logits.dtype), grad


def sigmoid_focal_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    gamma: float,
    alpha: float = 0.25,
    class_alpha: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """
    Fast :func:`functional.sigmoid_focal_loss`, the paper's FL, eq. (5):

        FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t),  p_t = sigmoid(x_t),

    ``x_t = x`` for the anchor's class, ``-x`` elsewhere, with the closed-form
    gradient of appendix B, ``dFL/dx = y alpha_t (1 - p_t)^gamma
    (gamma p_t log(p_t) + p_t - 1)``, y = +-1. With ``label_smoothing``, the
    soft-target form and gradient of :func:`smoothed_focal_terms`.

    Args:
        logits (Tensor): (N, K).
        labels (Tensor): (N,) int64 in [-1, K].
        gamma (float): focusing parameter, >= 0.
        alpha (float): foreground weight in [0, 1], or -1 for none.
        class_alpha (Tensor or None): (K,) per-class foreground weights.
        label_smoothing (float): eps in [0, 1); targets ``1 - eps/2`` and ``eps/2``.

    Returns:
        Tensor: scalar, the sum over valid anchors and classes.
    """
    return _sigmoid_loss(
        logits,
        labels,
        gamma=gamma,
        scale=1.0,
        shift=0.0,
        factor=1.0,
        alpha=alpha,
        class_alpha=class_alpha,
        label_smoothing=label_smoothing,
    )


def sigmoid_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 0.25,
    class_alpha: Optional[Tensor] = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """
    Fast :func:`functional.sigmoid_cross_entropy`, eq. (2):
    ``CE(p_t) = -alpha_t * log(p_t)``, i.e. :func:`sigmoid_focal_loss` at gamma 0,
    gradient ``y alpha_t (p_t - 1)``. Shapes as in :func:`sigmoid_focal_loss`.
    """
    return sigmoid_focal_loss(
        logits,
        labels,
        gamma=0.0,
        alpha=alpha,
        class_alpha=class_alpha,
        label_smoothing=label_smoothing,
    )


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
    Fast :func:`functional.focal_star_loss`, FL* of appendix A, eq. (6)-(7):

        p_t* = sigmoid(gamma * x_t + beta),  FL* = -alpha_t * log(p_t*) / gamma,

    gradient ``dFL*/dx = y alpha_t (p_t* - 1)``. Shapes as in
    :func:`sigmoid_focal_loss`.

    Args:
        gamma (float): > 0.
        beta (float): shift of the scaled logit.
    """
    if gamma <= 0:
        raise ValueError(f"focal_star_loss divides by gamma; gamma={gamma} must be > 0.")
    # A negative's term is softplus(gamma x - beta) / gamma: phi at gamma 0 of z = gamma x - beta.
    return _sigmoid_loss(
        logits,
        labels,
        gamma=0.0,
        scale=float(gamma),
        shift=-float(beta),
        factor=1.0 / gamma,
        alpha=alpha,
        class_alpha=class_alpha,
    )


# ----------------------------------------------------------------------------- softmax loss


def _softmax_chunk(
    x: Tensor,
    labels: Tensor,
    ignored_rows: Tensor,
    grad_out: Optional[Tensor],
    work: Optional[Tensor],
    *,
    gamma: float,
    class_weight: Tensor,
    smooth_weight: Optional[Tensor] = None,
) -> Tensor:
    """
    Softmax focal loss of one chunk of rows. With ``e_j = exp(x_j - max_j x)``,
    ``S = sum_{j != y} e_j``:

        log(p_t)     = (x_y - max x) - log1p((e_y - 1) + S),
        log(1 - p_t) = -log1p(e_y / S),
        FL           = -w (1 - p_t)^gamma log(p_t),

    and the closed-form gradient, with ``D = w (1 - p_t)^gamma (gamma p_t
    log(p_t) + p_t - 1)``: ``dFL/dx_y = D`` and ``dFL/dx_j = -D e_j / S`` for
    ``j != y``.

    Args:
        x (Tensor): (R, C) logits.
        labels (Tensor): (R,) in [-1, C).
        ignored_rows (Tensor): (I,) the rows labelled -1: zero loss and gradient,
            whatever their logits.
        grad_out (Tensor or None): (R, C), receives the gradient (and serves as
            scratch space before).
        work (Tensor or None): (1, R, C) scratch space without ``grad_out``, or None
            for a fresh tensor.
        class_weight (Tensor): (C + 1,) the weight w of label -1 (0), then the alpha of each class.
        smooth_weight (Tensor or None): (C,) with label smoothing, ``eps / C`` times each
            column's alpha: adds :func:`_uniform_softmax_terms` (``class_weight`` then
            carries the factor ``1 - eps``).

    Returns:
        Tensor: 0-dim sum over the valid rows, dtype of ``x``.
    """
    y = labels.clamp_min(0)[:, None]
    weight = class_weight.index_select(0, labels + 1)[:, None]
    x_max = x.amax(dim=1, keepdim=True)
    e = torch.sub(x, x_max, out=grad_out if grad_out is not None or work is None else work[0])
    e = e.mul_(_LOG2_E).exp2_()
    e_y = e.gather(1, y)
    e.scatter_(1, y, 0.0)
    others = e.sum(dim=1, keepdim=True)
    log_pt = (x.gather(1, y) - x_max).sub_(torch.log1p((e_y - 1).add_(others)))
    log_1m_pt = torch.log1p(e_y / others).neg_()
    # (1 - p_t)^gamma is 1 to machine precision below _TINY_GAMMA (which float32 rounds to 0).
    modulator = torch.exp(gamma * log_1m_pt) if gamma >= _TINY_GAMMA else torch.ones_like(log_pt)
    weight = weight * modulator
    row_loss = (weight * log_pt).neg_()  # (R, 1)
    if grad_out is not None:
        d = weight * (gamma * log_pt.exp() * log_pt - log_1m_pt.exp())
        coef = -d / others.clamp_min(torch.finfo(x.dtype).tiny)  # 0 where p_t == 1
        e.mul_(coef).scatter_(1, y, d)
    if smooth_weight is not None:
        uniform, uniform_grad = _uniform_softmax_terms(
            x, smooth_weight, gamma, grad_out is not None
        )
        row_loss += uniform
        if grad_out is not None:
            grad_out.add_(uniform_grad)
    row_loss[ignored_rows] = 0
    if grad_out is not None:
        grad_out[ignored_rows] = 0
    return row_loss.sum()


def _uniform_softmax_terms(
    x: Tensor, weight: Tensor, gamma: float, want_grad: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """
    ``sum_j w_j FL_j(x_i)``, the focal loss of row i at every label j, and
    its gradient: the label-smoothing part of the softmax loss. With ``e_j =
    exp(x_j - max x)``, ``m`` the first column of the largest logit, ``S_m =
    sum_{j != m} e_j``, ``Z = 1 + S_m`` and ``S_j = Z - e_j`` (>= 1) for ``j != m``:

        log p_j = (x_j - max x) - log1p(S_m),  log(1 - p_j) = log(S_j) - log1p(S_m),
        FL_j = -(1 - p_j)^gamma log p_j,
        G_j = w_j (1 - p_j)^gamma (gamma p_j log(p_j) / S_j - 1 / Z),
        d/dx_i = Z G_i - e_i sum_j G_j,

    (``G_j = w_j dFL_j/dx_j / S_j``; the label-j loss has ``dFL_j/dx_i = -dFL_j/dx_j
    e_i / S_j`` at ``i != j``). No ``1 - p`` is taken by subtraction.

    Args:
        x (Tensor): (R, C) logits.
        weight (Tensor): ``w``, broadcastable to (R, C).

    Returns:
        Tensor: (R, 1) sums over j; (R, C) gradient if ``want_grad``.
    """
    x_max, top = x.max(dim=1, keepdim=True)
    e = torch.sub(x, x_max).mul_(_LOG2_E).exp2_()
    s_top = e.scatter(1, top, 0.0).sum(dim=1, keepdim=True)
    z = s_top + 1
    others = torch.sub(z, e).scatter_(1, top, s_top).clamp_min_(torch.finfo(x.dtype).tiny)
    log_z = torch.log1p(s_top)  # (R, 1)
    log_p = (x - x_max).sub_(log_z)
    log_1m_p = torch.log(others).sub_(log_z)  # log(S_j / Z); log, not log1p: slow on AVX-512
    modulator = torch.exp(gamma * log_1m_p) if gamma >= _TINY_GAMMA else torch.ones_like(x)
    weighted = modulator.mul_(weight)
    loss = (weighted * log_p).sum(dim=1, keepdim=True).neg_()
    if not want_grad:
        return loss, None
    g = (e / z).mul_(log_p).mul_(gamma).div_(others).sub_(z.reciprocal()).mul_(weighted)
    return loss, g.mul(z).sub_(e * g.sum(dim=1, keepdim=True))


def _softmax_family(
    logits: Tensor,
    labels: Tensor,
    want_grad: bool,
    *,
    gamma: float,
    class_weight: Tensor,
    label_smoothing: float = 0.0,
) -> Tuple[Tensor, Optional[Tensor]]:
    """
    Loss and gradient of :func:`softmax_focal_loss`, chunk by chunk (``class_weight`` in the
    logits' dtype).
    """
    smooth_weight = None
    if label_smoothing:
        smooth_weight = class_weight[1:] * (label_smoothing / logits.shape[1])
        class_weight = class_weight * (1 - label_smoothing)
    grad = logits.new_empty(logits.shape) if want_grad else None
    chunks = _row_chunks(logits)
    fresh = (
        None if want_grad else _workspace(logits, chunks, 1)
    )  # the gradient is the scratch space
    kernel = partial(
        backends.compiled(_softmax_chunk, logits.device.type),
        gamma=gamma,
        class_weight=class_weight,
        smooth_weight=smooth_weight,
    )
    ignored = _ignored(labels)
    bounds = _chunk_bounds(ignored, chunks)
    sums = []
    for chunk, i0, i1 in zip(chunks, bounds[:-1], bounds[1:]):
        r0, r1, _ = chunk
        grad_out = grad[r0:r1] if want_grad else None
        sums.append(
            kernel(
                logits[r0:r1],
                labels[r0:r1],
                ignored[i0:i1] - r0,
                grad_out,
                _scratch(None, chunk, 0, fresh),
            )
        )
    return _sum(sums, logits).to(logits.dtype), grad


def _label_weights(
    num_classes: int, alpha: float, class_alpha: Optional[Tensor], dtype: torch.dtype, device
) -> Tensor:
    """
    The (K + 2,) weight of each label -1..K of the softmax loss: 0 for -1 (ignored), then
    :func:`softmax_class_alpha`'s (K + 1,), in ``dtype`` on ``device``.
    """
    class_weight = softmax_class_alpha(num_classes, alpha, class_alpha, dtype, device)
    return torch.cat([class_weight.new_zeros(1), class_weight])


def _capturing(device: torch.device) -> bool:
    """
    Whether ``device``'s current CUDA stream is being captured into a CUDA graph: its ops are
    recorded, not run, so a table built then holds nothing until the graph is replayed (and is
    not cached).
    """
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@lru_cache(maxsize=64)
def _alpha_weights(num_classes: int, alpha: float, dtype: torch.dtype, device) -> Tensor:
    """
    :func:`_label_weights` without CLASS_ALPHA, which depends on numbers alone: built once
    per (K, alpha, dtype, device), so that a call adds no small kernels before the loss's own
    on a GPU (building it takes five, and the Triton path cast it to float32: six). Read only:
    the kernels never write to it.
    """
    return _label_weights(num_classes, alpha, None, dtype, device)


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
    Fast :func:`functional.softmax_focal_loss`, focal loss on a (K+1)-way
    softmax with a background column:

        FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t),  p_t = softmax(x)[label],

    with the closed-form gradient of :func:`_softmax_chunk`. With
    ``label_smoothing`` eps, ``(1 - eps)`` times that plus ``eps / C`` times
    the loss at every label (:func:`_uniform_softmax_terms`).

    Args:
        logits (Tensor): (N, K+1), column K is background.
        labels (Tensor): (N,) int64 in [-1, K].
        label_smoothing (float): eps in [0, 1).

    Returns:
        Tensor: scalar, the sum over valid anchors.
    """
    dtype, num_classes = compute_dtype(logits.dtype), logits.shape[1] - 1
    if class_alpha is None and not _capturing(logits.device):
        class_weight = _alpha_weights(num_classes, float(alpha), dtype, logits.device)
    else:
        class_weight = _label_weights(num_classes, alpha, class_alpha, dtype, logits.device)
    if _use_triton(logits):  # float32 weights: the Triton kernels take float32, float16, bfloat16
        from . import triton_kernels

        return triton_kernels.softmax_family(
            logits, labels, gamma=gamma, class_weight=class_weight, label_smoothing=label_smoothing
        )
    compute = partial(
        _softmax_family, gamma=gamma, class_weight=class_weight, label_smoothing=label_smoothing
    )
    return _apply(compute, _eager_logits(logits), labels)
