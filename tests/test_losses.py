"""
The focal-loss family on class-index targets (0..K-1 foreground, K background,
-1 ignored), tested through the public API: the registered loss objects built
by ``focal_det2.build_focal_loss(cfg)`` ("api") and the reference formulas in
``focal_det2.losses.functional`` ("functional").
"""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as TF
from conftest import (
    FOCUSING_LOSSES,
    LOSSES,
    TORCH_CE,
    UNIT_OPTS,
    build_loss,
    num_logits_of,
    reference,
    with_gammas,
)
from fvcore.nn import sigmoid_focal_loss as fvcore_sigmoid_focal_loss

from focal_det2.losses import functional

SIGMOID_LOSSES = [
    name for name in LOSSES if num_logits_of(name, 3) == 3
]  # K logits, no background column
IMPLS = ["api", "functional"]
F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def num_classes_of(name, logits):
    cols = logits.shape[1]
    return cols if num_logits_of(name, cols) == cols else cols - 1


def compute(impl, name, logits, labels, *, gamma=2.0, alpha=0.25, class_alpha=(), beta=1.0):
    """The summed loss ``name`` of ``logits`` / ``labels`` through ``impl``."""
    if impl == "api":
        loss = build_loss(
            name,
            num_classes_of(name, logits),
            gamma=gamma,
            alpha=alpha,
            class_alpha=class_alpha,
            beta=beta,
        )
        return loss(logits, labels)
    return reference(
        name, logits, labels, gamma=gamma, alpha=alpha, class_alpha=class_alpha, beta=beta
    )


def random_batch(name, *, num_anchors=8, num_classes=3, scale=2.0, dtype=F64, seed=0):
    """Seeded logits (N, K or K+1) and labels covering -1, every class and K."""
    g = torch.Generator().manual_seed(seed)
    cols = num_logits_of(name, num_classes)
    logits = (torch.randn(num_anchors, cols, generator=g) * scale).to(dtype)
    labels = torch.randint(-1, num_classes + 1, (num_anchors,), generator=g)
    labels[: num_classes + 2] = torch.arange(
        -1, num_classes + 1
    )  # every kind of label at least once
    return logits, labels


def grad_of(fn, logits):
    x = logits.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("impl", IMPLS)
def test_sigmoid_focal_closed_form(impl):
    # K = 2: anchor 0 is class 0, anchor 1 background, anchor 2 ignored.
    logits = torch.tensor([[1.0, -2.0], [0.5, -1.0], [3.0, 3.0]], dtype=F64)
    labels = torch.tensor([0, 2, -1])
    a, g = 0.25, 2.0

    def pos(x):  # -alpha (1 - p)^g log p
        p = sigmoid(x)
        return -a * (1 - p) ** g * math.log(p)

    def neg(x):  # -(1 - alpha) p^g log(1 - p)
        p = sigmoid(x)
        return -(1 - a) * p**g * math.log(1 - p)

    expected = pos(1.0) + neg(-2.0) + neg(0.5) + neg(-1.0)
    out = compute(impl, "sigmoid_focal", logits, labels, gamma=g, alpha=a)
    assert out.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_closed_form(impl):
    logits = torch.tensor([[1.0, -2.0], [0.5, -1.0], [3.0, 3.0]], dtype=F64)
    labels = torch.tensor([1, 2, -1])
    a = 0.25
    expected = (
        -(1 - a) * math.log(1 - sigmoid(1.0))  # anchor 0, class 0 is a negative
        - a * math.log(sigmoid(-2.0))  # anchor 0, class 1 is its class
        - (1 - a) * math.log(1 - sigmoid(0.5))  # anchor 1 is background
        - (1 - a) * math.log(1 - sigmoid(-1.0))
    )
    out = compute(impl, "cross_entropy", logits, labels, alpha=a)
    assert out.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_focal_closed_form(impl):
    # K = 2, columns (class 0, class 1, background).
    logits = torch.tensor([[0.2, 1.0, -0.5], [0.3, -0.4, 2.0], [5.0, 5.0, 5.0]], dtype=F64)
    labels = torch.tensor([1, 2, -1])
    a, g = 0.25, 2.0
    p0 = math.exp(1.0) / (math.exp(0.2) + math.exp(1.0) + math.exp(-0.5))  # anchor 0, class 1
    p1 = math.exp(2.0) / (math.exp(0.3) + math.exp(-0.4) + math.exp(2.0))  # anchor 1, background
    expected = -a * (1 - p0) ** g * math.log(p0) - (1 - a) * (1 - p1) ** g * math.log(p1)
    out = compute(impl, "softmax_focal", logits, labels, gamma=g, alpha=a)
    assert out.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_focal_star_closed_form(impl):
    # FL* = -alpha_t log(sigmoid(gamma x_t + beta)) / gamma, x_t = x (positive) or -x.
    logits = torch.tensor([[1.0, -2.0], [0.5, -1.0], [3.0, 3.0]], dtype=F64)
    labels = torch.tensor([0, 2, -1])
    a, g, b = 0.25, 2.0, 1.0

    def term(x_t, alpha_t):
        return -alpha_t * math.log(sigmoid(g * x_t + b)) / g

    expected = term(1.0, a) + term(2.0, 1 - a) + term(-0.5, 1 - a) + term(1.0, 1 - a)
    out = compute(impl, "focal_star", logits, labels, gamma=g, alpha=a, beta=b)
    assert out.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_focal_star_reads_beta(impl):
    logits = torch.tensor([[0.4]], dtype=F64)
    labels = torch.tensor([0])
    g, b = 2.0, -0.7
    expected = -0.25 * math.log(sigmoid(g * 0.4 + b)) / g
    out = compute(impl, "focal_star", logits, labels, gamma=g, beta=b)
    assert out.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["sigmoid_focal", "softmax_focal"])
def test_float64_loss_uses_alpha_at_float64_precision(impl, name):
    # alpha 0.3 and 0.7 are not exact in float32; a float64 loss must not round them.
    logits = torch.tensor([[0.3, -0.2, 0.1]], dtype=F64)
    labels = torch.tensor([0])
    if name == "sigmoid_focal":
        expected = -0.3 * math.log(sigmoid(0.3)) - 0.7 * (
            math.log(1 - sigmoid(-0.2)) + math.log(1 - sigmoid(0.1))
        )
    else:  # class 0 of K = 2
        expected = -0.3 * (0.3 - math.log(math.exp(0.3) + math.exp(-0.2) + math.exp(0.1)))
    out = compute(impl, name, logits, labels, gamma=0.0, alpha=0.3)
    assert out.item() == pytest.approx(expected, rel=1e-13)


def test_float64_loss_uses_class_alpha_and_weights_at_float64_precision():
    """0.3, 0.7 and 1.1 are not exact in float32: a float64 loss must not round them either."""
    loss = build_loss("sigmoid_focal", 2, gamma=0.0, class_alpha=(0.3, 0.7))
    loss.set_class_weights((1.1, 1.0))
    logits, labels = torch.tensor([[0.3, -0.2]], dtype=F64), torch.tensor([0])
    expected = 1.1 * (-0.3 * math.log(sigmoid(0.3)) - (1 - 0.7) * math.log(1 - sigmoid(-0.2)))
    assert loss(logits, labels).item() == pytest.approx(expected, rel=1e-13)


# ----------------------------------------------------------------------------- fvcore agreement


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "gamma, alpha", [(2.0, 0.25), (0.5, 0.25), (0.0, 0.25), (2.0, -1), (1.0, 0.6)]
)
def test_sigmoid_focal_matches_fvcore(impl, gamma, alpha):
    num_classes = 5
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, num_classes, generator=g) * 2  # float32: fvcore computes in float32
    labels = torch.randint(-1, num_classes + 1, (64,), generator=g)
    valid = labels >= 0
    targets = TF.one_hot(labels[valid], num_classes + 1)[
        :, :num_classes
    ].float()  # background: all 0

    ours, ours_grad = grad_of(
        lambda x: compute(impl, "sigmoid_focal", x, labels, gamma=gamma, alpha=alpha), logits
    )
    ref, ref_grad = grad_of(
        lambda x: fvcore_sigmoid_focal_loss(x, targets, alpha=alpha, gamma=gamma, reduction="sum"),
        logits[valid],
    )
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    # fvcore forms 1 - p_t by subtraction in float32, so its tiniest gradient entries
    # carry cancellation error; the gradient agrees to 1e-6 of its own scale.
    grad_scale = ref_grad.abs().max().item()
    torch.testing.assert_close(ours_grad[valid], ref_grad, rtol=1e-6, atol=1e-6 * grad_scale)
    assert torch.all(ours_grad[~valid] == 0)


# ----------------------------------------------------------------------------- fast path = definition


@pytest.mark.parametrize("name, gamma", with_gammas(LOSSES, [0.5, 2.0]))
@pytest.mark.parametrize("alpha, class_alpha", [(0.25, ()), (-1, ()), (0.25, (0.1, 0.5, 0.9))])
def test_every_loss_equals_its_reference_in_value_and_gradient(name, gamma, alpha, class_alpha):
    # Every registered loss: its fast path (__call__) against its definition (reference_loss), float64.
    logits, labels = random_batch(name, num_anchors=30, seed=11)
    values = dict(gamma=gamma, alpha=alpha, class_alpha=class_alpha, beta=0.5)
    fast, fast_grad = grad_of(lambda x: compute("api", name, x, labels, **values), logits)
    ref, ref_grad = grad_of(lambda x: compute("functional", name, x, labels, **values), logits)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name, gamma", with_gammas(LOSSES, [0.5, 2.0]))
@pytest.mark.parametrize("class_alpha", [(), (0.1, 0.5, 0.9)])
def test_gradcheck_float64(impl, name, gamma, class_alpha):
    logits, labels = random_batch(name, num_anchors=8, num_classes=3, seed=2)
    logits.requires_grad_(True)

    def fn(x):
        return compute(
            impl, name, x, labels, gamma=gamma, alpha=0.25, class_alpha=class_alpha, beta=0.5
        )

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- FL vs CE


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["sigmoid_focal", "softmax_focal"])
def test_focal_loss_at_most_torch_cross_entropy_per_anchor(name, impl):
    """FL = (1 - p_t)^gamma * CE <= CE, against torch's own CE, not our loss at gamma 0."""
    logits, labels = random_batch(name, num_anchors=16, num_classes=3, scale=3.0, seed=3)
    torch_ce = partial(TORCH_CE[name], alpha=0.25, class_alpha=())
    assert compute(impl, name, logits, labels, gamma=2.0) <= torch_ce(logits, labels)
    for i in range(len(labels)):
        row = slice(i, i + 1)
        fl_i = compute(impl, name, logits[row], labels[row], gamma=2.0)
        ce_i = torch_ce(logits[row], labels[row])
        assert fl_i <= ce_i, i
        if labels[i] >= 0:  # strictly less where p_t < 1: the test can tell FL from CE
            assert fl_i < ce_i, i


@pytest.mark.parametrize("impl", IMPLS)
def test_sigmoid_focal_equals_cross_entropy_at_gamma_0(impl):
    logits, labels = random_batch("sigmoid_focal", num_anchors=16, seed=4)
    fl, fl_grad = grad_of(lambda x: compute(impl, "sigmoid_focal", x, labels, gamma=0.0), logits)
    ce, ce_grad = grad_of(lambda x: compute(impl, "cross_entropy", x, labels), logits)
    torch.testing.assert_close(fl, ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(fl_grad, ce_grad, rtol=1e-12, atol=1e-15)


def test_sigmoid_focal_at_gamma_0_is_alpha_weighted_bce():
    logits, labels = random_batch("sigmoid_focal", num_anchors=16, seed=4)
    valid = labels >= 0
    targets = TF.one_hot(labels[valid], 4)[:, :3].to(F64)
    weights = 0.25 * targets + 0.75 * (1 - targets)
    fl, fl_grad = grad_of(lambda x: build_loss("sigmoid_focal", 3, gamma=0.0)(x, labels), logits)
    bce, bce_grad = grad_of(
        lambda x: TF.binary_cross_entropy_with_logits(
            x[valid], targets, weight=weights, reduction="sum"
        ),
        logits,
    )
    torch.testing.assert_close(fl, bce, rtol=1e-12, atol=0)
    torch.testing.assert_close(fl_grad, bce_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_focal_at_gamma_0_is_alpha_weighted_softmax_cross_entropy(impl):
    logits, labels = random_batch("softmax_focal", num_anchors=16, seed=5)
    valid = labels >= 0
    weights = torch.where(labels[valid] == 3, 0.75, 0.25).to(F64)
    fl, fl_grad = grad_of(lambda x: compute(impl, "softmax_focal", x, labels, gamma=0.0), logits)
    ce, ce_grad = grad_of(
        lambda x: (weights * TF.cross_entropy(x[valid], labels[valid], reduction="none")).sum(),
        logits,
    )
    torch.testing.assert_close(fl, ce, rtol=1e-12, atol=0)
    torch.testing.assert_close(fl_grad, ce_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("label", [0, 1])  # K = 1: a positive and a background anchor
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_sigmoid_ce_over_fl_ratio(impl, label, gamma):
    logits = torch.tensor([[0.7]], dtype=F64)
    labels = torch.tensor([label])
    p_t = sigmoid(0.7) if label == 0 else 1 - sigmoid(0.7)
    fl = compute(impl, "sigmoid_focal", logits, labels, gamma=gamma)
    ce = compute(impl, "cross_entropy", logits, labels)
    assert (ce / fl).item() == pytest.approx(1 / (1 - p_t) ** gamma, rel=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("label", [0, 1])  # K = 1, columns (class 0, background)
def test_softmax_ce_over_fl_ratio(impl, label):
    logits = torch.tensor([[0.7, -0.4]], dtype=F64)
    labels = torch.tensor([label])
    x_y = 0.7 if label == 0 else -0.4
    p_t = math.exp(x_y) / (math.exp(0.7) + math.exp(-0.4))
    fl = compute(impl, "softmax_focal", logits, labels, gamma=2.0)
    ce = compute(impl, "softmax_focal", logits, labels, gamma=0.0)
    assert (ce / fl).item() == pytest.approx(1 / (1 - p_t) ** 2.0, rel=1e-12)


# ----------------------------------------------------------------------------- alpha and CLASS_ALPHA


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", SIGMOID_LOSSES)
def test_sigmoid_alpha_0_masks_positives(impl, name):
    logits, labels = random_batch(name, num_anchors=8, seed=6)
    out, grad = grad_of(lambda x: compute(impl, name, x, labels, alpha=0.0), logits)
    valid = labels >= 0
    positive = torch.zeros_like(logits, dtype=torch.bool)
    positive[valid] = TF.one_hot(labels[valid], 4)[:, :3].bool()
    assert torch.all(grad[positive] == 0)
    assert torch.all(grad[~positive & valid[:, None]] != 0)
    # the value is the unweighted loss of the negatives alone: give every positive a
    # new logit and the loss must not move
    moved = torch.where(positive, logits + 5.0, logits)
    assert compute(impl, name, moved, labels, alpha=0.0).item() == pytest.approx(
        out.item(), rel=1e-12
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", SIGMOID_LOSSES)
def test_sigmoid_alpha_1_masks_negatives(impl, name):
    logits, labels = random_batch(name, num_anchors=8, seed=6)
    _, grad = grad_of(lambda x: compute(impl, name, x, labels, alpha=1.0), logits)
    valid = labels >= 0
    positive = torch.zeros_like(logits, dtype=torch.bool)
    positive[valid] = TF.one_hot(labels[valid], 4)[:, :3].bool()
    assert torch.all(grad[~positive] == 0)
    assert torch.all(grad[positive] != 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("alpha, masked_label", [(0.0, 0), (1.0, 2)])  # K = 2
def test_softmax_alpha_0_and_1_mask_foreground_and_background(impl, alpha, masked_label):
    logits = torch.tensor([[0.2, 1.0, -0.5], [0.3, -0.4, 2.0]], dtype=F64)
    labels = torch.tensor([0, 2])
    _, grad = grad_of(lambda x: compute(impl, "softmax_focal", x, labels, alpha=alpha), logits)
    masked = labels == masked_label
    assert torch.all(grad[masked] == 0)
    assert torch.all(grad[~masked] != 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_sigmoid_alpha_minus_1_is_unweighted(impl):
    logits = torch.tensor([[1.0, -2.0], [0.5, -1.0]], dtype=F64)
    labels = torch.tensor([0, 2])
    g = 2.0

    def pos(x):
        p = sigmoid(x)
        return -((1 - p) ** g) * math.log(p)

    def neg(x):
        p = sigmoid(x)
        return -(p**g) * math.log(1 - p)

    expected = pos(1.0) + neg(-2.0) + neg(0.5) + neg(-1.0)
    out = compute(impl, "sigmoid_focal", logits, labels, gamma=g, alpha=-1)
    assert out.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", LOSSES)
def test_alpha_minus_1_is_twice_alpha_one_half(impl, name):
    # alpha_t = 1/2 everywhere at ALPHA 0.5, 1 everywhere at ALPHA -1.
    logits, labels = random_batch(name, num_anchors=8, seed=7)
    unweighted = compute(impl, name, logits, labels, alpha=-1)
    half = compute(impl, name, logits, labels, alpha=0.5)
    torch.testing.assert_close(unweighted, 2 * half, rtol=1e-12, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "name", ["sigmoid_focal", "focal_star", "cross_entropy", "ohem"]
)  # closed forms below
def test_sigmoid_class_alpha_weighs_positives_and_negatives_per_class(impl, name):
    # K = 2, CLASS_ALPHA = (0.125, 0.75): class k's positives weigh ca[k], its negatives 1 - ca[k].
    ca = (0.125, 0.75)
    logits = torch.tensor([[1.0, -2.0], [0.5, -1.0]], dtype=F64)
    labels = torch.tensor([1, 2])  # anchor 0 is class 1, anchor 1 background
    g, b = 2.0, 1.0

    def unweighted(x_t):  # the loss of one column with signed logit x_t = y x
        if name == "focal_star":
            return -math.log(sigmoid(g * x_t + b)) / g
        p_t = sigmoid(x_t)
        return -((1 - p_t) ** (g if name == "sigmoid_focal" else 0.0)) * math.log(p_t)

    expected = (
        (1 - ca[0]) * unweighted(-1.0)  # anchor 0, class 0: negative
        + ca[1] * unweighted(-2.0)  # anchor 0, class 1: positive
        + (1 - ca[0]) * unweighted(-0.5)  # anchor 1, background
        + (1 - ca[1]) * unweighted(1.0)
    )
    # CLASS_ALPHA replaces ALPHA: the formulas ignore alpha (0.9), and a config refuses ALPHA
    # moved from its default beside CLASS_ALPHA (tests/test_config.py).
    alpha = 0.25 if impl == "api" else 0.9
    out = compute(impl, name, logits, labels, gamma=g, alpha=alpha, class_alpha=ca, beta=b)
    assert out.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_class_alpha_weighs_foreground_by_class_and_background_by_alpha(impl):
    # K = 2, CLASS_ALPHA = (0.125, 0.75), ALPHA = 0.25: class c weighs ca[c], background 1 - ALPHA.
    ca, a, g = (0.125, 0.75), 0.25, 2.0
    logits = torch.tensor([[0.2, 1.0, -0.5], [1.5, 0.1, 0.3], [0.3, -0.4, 2.0]], dtype=F64)
    labels = torch.tensor([1, 0, 2])

    def unweighted(row, label):
        p = math.exp(row[label]) / sum(math.exp(v) for v in row)
        return -((1 - p) ** g) * math.log(p)

    rows = logits.tolist()
    expected = (
        ca[1] * unweighted(rows[0], 1)
        + ca[0] * unweighted(rows[1], 0)
        + (1 - a) * unweighted(rows[2], 2)
    )
    out = compute(impl, "softmax_focal", logits, labels, gamma=g, alpha=a, class_alpha=ca)
    assert out.item() == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------- ignored anchors


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", LOSSES)
def test_ignored_anchors_contribute_nothing(impl, name):
    logits, labels = random_batch(name, num_anchors=10, seed=8)
    kept = labels >= 0
    full, grad = grad_of(lambda x: compute(impl, name, x, labels), logits)
    only_valid = compute(impl, name, logits[kept], labels[kept])
    torch.testing.assert_close(full, only_valid, rtol=1e-12, atol=0)
    assert torch.all(grad[~kept] == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", LOSSES)
def test_ignored_anchor_logits_do_not_change_the_loss(impl, name):
    logits, labels = random_batch(name, num_anchors=10, seed=8)
    ignored = labels == -1
    moved = logits.clone()
    moved[ignored] = 50.0
    torch.testing.assert_close(
        compute(impl, name, logits, labels), compute(impl, name, moved, labels), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("num_anchors", [0, 4])
def test_all_ignored_batch_is_zero_and_connected(impl, name, num_anchors):
    cols = 4 if name == "softmax_focal" else 3
    logits = torch.randn(
        num_anchors, cols, generator=torch.Generator().manual_seed(9)
    ).requires_grad_(True)
    labels = torch.full((num_anchors,), -1, dtype=torch.long)
    out = compute(impl, name, logits, labels)
    assert out.dim() == 0
    assert out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


# ----------------------------------------------------------------------------- numerical stability


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_finite_for_float32_logits_in_plus_minus_100(impl, name, gamma):
    g = torch.Generator().manual_seed(10)
    cols = 4 if name == "softmax_focal" else 3
    extremes = torch.tensor([-100.0, 100.0])
    corners = extremes[
        torch.cartesian_prod(*[torch.arange(2)] * cols)
    ]  # every sign pattern of +-100
    uniform = torch.rand(32, cols, generator=g) * 200 - 100
    logits = torch.cat([corners, corners, uniform])  # float32
    labels = torch.arange(len(logits)) % 5 - 1  # -1, 0, 1, 2, 3 (= K, background)
    out, grad = grad_of(lambda x: compute(impl, name, x, labels, gamma=gamma), logits)
    assert out.dtype == torch.float32
    assert torch.isfinite(out)
    assert torch.all(torch.isfinite(grad))


@pytest.mark.parametrize("impl", IMPLS)
def test_sigmoid_focal_exact_at_logit_minus_100(impl):
    # p = sigmoid(-100) ~ 3.7e-44 is subnormal in float32: log(p) would be -inf-prone,
    # log-sigmoid gives -100. FL = -alpha (1 - p)^2 log p = 0.25 * 100.
    logits = torch.tensor([[-100.0]])
    labels = torch.tensor([0])
    out = compute(impl, "sigmoid_focal", logits, labels, gamma=2.0)
    assert out.item() == pytest.approx(25.0, rel=1e-6)


# ----------------------------------------------------------------------------- API checks


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [-2, 4])  # K = 3: allowed range [-1, 3]
def test_labels_outside_range_raise(name, bad):
    loss = build_loss(name, 3)
    logits = torch.zeros(3, loss.num_logits)
    labels = torch.tensor([0, bad, 3])
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        loss(logits, labels)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_number_of_logit_columns_raises(name, delta):
    loss = build_loss(name, 3)
    logits = torch.zeros(2, loss.num_logits + delta)
    expected = rf"shape \(N, {loss.num_logits}\), got \(2, {loss.num_logits + delta}\)"
    with pytest.raises(ValueError, match=expected):
        loss(logits, torch.tensor([0, 3]))


@pytest.mark.parametrize("name", FOCUSING_LOSSES)
def test_gamma_override_is_honoured(name):
    logits, labels = random_batch(name, num_anchors=8, seed=11)
    at_2 = build_loss(name, 3, gamma=2.0)
    at_half = build_loss(name, 3, gamma=0.5)
    overridden = at_2(logits, labels, gamma=0.5)
    torch.testing.assert_close(overridden, at_half(logits, labels), rtol=1e-12, atol=0)
    assert not torch.allclose(overridden, at_2(logits, labels))
    # the definition the tests hold the fast path to takes the override as well
    reference = at_2.reference_loss(logits, labels, gamma=0.5)
    torch.testing.assert_close(
        reference, at_half.reference_loss(logits, labels), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("name", ["cross_entropy", "ohem"])
def test_losses_without_gamma_take_gamma_0_or_their_own_and_refuse_others(name):
    """The model passes the scheduled (constant) gamma to every loss; another one is an error."""
    logits, labels = random_batch(name, num_anchors=8, seed=11)
    loss = build_loss(name, 3, opts=["MODEL.FOCAL.OHEM.NMS_THRESH", 1.0])
    assert torch.equal(loss(logits, labels, gamma=0.0), loss(logits, labels))
    assert torch.equal(loss(logits, labels, gamma=loss.gamma), loss(logits, labels))
    with pytest.raises(ValueError, match=rf"gamma=0.5: {name} has no gamma \(it is gamma 0\)"):
        loss(logits, labels, gamma=0.5)
    with pytest.raises(ValueError, match=r"gamma=0.5: .* has no gamma"):
        loss.reference_loss(logits, labels, gamma=0.5)


def test_build_focal_loss_reads_the_configured_gamma():
    logits = torch.tensor([[0.7]], dtype=F64)
    labels = torch.tensor([0])
    p = sigmoid(0.7)
    out = build_loss("sigmoid_focal", 1, gamma=3.0)(logits, labels)
    assert out.item() == pytest.approx(-0.25 * (1 - p) ** 3 * math.log(p), rel=1e-9)


def test_repr_gives_the_settings_and_label_smoothing_only_when_set():
    loss = build_loss("softmax_focal", 3, gamma=1.5, alpha=-1.0, class_alpha=(0.2, 0.5, 0.8))
    assert repr(loss) == (
        "SoftmaxFocalLoss(num_classes=3, gamma=1.5, alpha=-1.0, class_alpha=[0.2, 0.5, 0.8])"
    )
    smoothed = build_loss("cross_entropy", 2, opts=(*UNIT_OPTS, "MODEL.FOCAL.LABEL_SMOOTHING", 0.1))
    assert repr(smoothed) == (
        "SigmoidCrossEntropyLoss(num_classes=2, gamma=2.0, alpha=0.25, class_alpha=[], "
        "label_smoothing=0.1)"
    )


def test_focal_star_repr_and_its_scores_repr_give_beta():
    loss = build_loss("focal_star", 2, gamma=1.5, beta=-0.3)
    assert repr(loss) == (
        "FocalStarLoss(num_classes=2, gamma=1.5, alpha=0.25, class_alpha=[], beta=-0.3)"
    )
    assert repr(loss.score_module()) == "FocalStarScores(gamma=1.5, beta=-0.3)"


def test_ohem_repr_gives_its_minibatch_settings():
    loss = build_loss(
        "ohem",
        3,
        alpha=0.5,
        opts=[
            "MODEL.FOCAL.OHEM.BATCH_PER_IMAGE", 64,
            "MODEL.FOCAL.OHEM.NMS_THRESH", 0.7,
            "MODEL.FOCAL.OHEM.POS_FRACTION", 0.25,
        ],
    )  # fmt: skip
    assert repr(loss) == (
        "OHEMLoss(num_classes=3, gamma=2.0, alpha=0.5, class_alpha=[], batch_per_image=64, "
        "nms_thresh=0.7, pos_fraction=0.25)"
    )


# ----------------------------------------------------------------------------- bias init, scores


@pytest.mark.parametrize("name", ["sigmoid_focal", "cross_entropy"])
@pytest.mark.parametrize("prior", [0.01, 0.3])
def test_sigmoid_bias_init_gives_the_prior(name, prior):
    loss = build_loss(name, 10)
    bias = loss.init_bias(prior)
    assert bias.shape == (10,)
    torch.testing.assert_close(
        bias.double().sigmoid(), torch.full((10,), prior, dtype=F64), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("prior", [0.01, 0.3])
def test_softmax_bias_init_gives_background_1_minus_prior_and_shares_prior(prior):
    loss = build_loss("softmax_focal", 10)
    bias = loss.init_bias(prior)
    assert bias.shape == (11,)
    probs = bias.double().softmax(dim=0)
    assert probs[10].item() == pytest.approx(1 - prior, rel=1e-6)
    torch.testing.assert_close(
        probs[:10], torch.full((10,), prior / 10, dtype=F64), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("gamma, beta", [(2.0, 1.0), (0.5, -0.3)])
def test_focal_star_bias_init_gives_the_prior(gamma, beta):
    loss = build_loss("focal_star", 10, gamma=gamma, beta=beta)
    bias = loss.init_bias(0.01)
    assert bias.shape == (10,)
    torch.testing.assert_close(
        (gamma * bias.double() + beta).sigmoid(),
        torch.full((10,), 0.01, dtype=F64),
        rtol=1e-6,
        atol=0,
    )


def test_focal_star_bias_init_at_another_gamma():
    loss = build_loss("focal_star", 10, gamma=2.0, beta=1.0)
    bias = loss.init_bias(0.01, gamma=0.5)
    torch.testing.assert_close(
        (0.5 * bias.double() + 1.0).sigmoid(), torch.full((10,), 0.01, dtype=F64), rtol=1e-6, atol=0
    )
    with pytest.raises(ValueError, match="must be > 0"):
        loss.init_bias(0.01, gamma=0.0)


@pytest.mark.parametrize(
    "name, num_logits",
    [("sigmoid_focal", 3), ("cross_entropy", 3), ("focal_star", 3), ("softmax_focal", 4)],
)
def test_num_logits(name, num_logits):
    assert build_loss(name, 3).num_logits == num_logits


@pytest.mark.parametrize("name", LOSSES)
def test_scores_have_one_column_per_class(name):
    loss = build_loss(name, 3)
    logits = torch.randn(5, loss.num_logits, generator=torch.Generator().manual_seed(12))
    scores = loss.scores(logits)
    assert scores.shape == (5, 3)
    assert torch.all((scores >= 0) & (scores <= 1))


@pytest.mark.parametrize("name", ["sigmoid_focal", "cross_entropy"])
def test_sigmoid_scores_are_sigmoids(name):
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    expected = torch.tensor([[0.5, sigmoid(2.0), sigmoid(-1.0)]])
    torch.testing.assert_close(build_loss(name, 3).scores(logits), expected)


def test_softmax_scores_drop_the_background_column():
    logits = torch.tensor([[0.0, 1.0, math.log(2.0)]])  # K = 2; exp: 1, e, 2
    z = 1 + math.e + 2
    expected = torch.tensor([[1 / z, math.e / z]])
    torch.testing.assert_close(build_loss("softmax_focal", 2).scores(logits), expected)


def test_focal_star_scores_are_scaled_sigmoids():
    logits = torch.tensor([[0.0, 0.5]])
    expected = torch.tensor([[sigmoid(2.0 * 0.0 - 0.3), sigmoid(2.0 * 0.5 - 0.3)]])
    torch.testing.assert_close(
        build_loss("focal_star", 2, gamma=2.0, beta=-0.3).scores(logits), expected
    )


@pytest.mark.parametrize(
    "name, bad", [("sigmoid_focal", -0.5), ("softmax_focal", -1.0), ("focal_star", 0.0)]
)
def test_gamma_override_is_checked(name, bad):
    loss = build_loss(name)
    logits = torch.zeros(2, 4 if name == "softmax_focal" else 3)
    with pytest.raises(ValueError, match=f"gamma={bad}"):
        loss(logits, torch.tensor([0, 3]), gamma=bad)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("class_alpha", [None, (0.2, 0.5, 0.9)])
def test_sigmoid_focal_terms_are_the_valid_anchors_one_row_losses(label_smoothing, class_alpha):
    # reduction="none" (tools/plot_loss_cdf.py's per-anchor loss): row i of the (M, K) terms is
    # the i-th valid anchor's loss alone; ignored anchors have no row; the terms sum to the loss.
    logits = torch.randn(9, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, -1, 2, 3, 3, -1, 1, 0])
    kwargs = dict(gamma=2.0, alpha=0.25, label_smoothing=label_smoothing)
    if class_alpha is not None:
        kwargs["class_alpha"] = torch.tensor(class_alpha, dtype=F64)
    terms = functional.sigmoid_focal_loss(logits, labels, reduction="none", **kwargs)
    valid = (labels >= 0).nonzero().flatten().tolist()
    assert terms.shape == (len(valid), 3)
    for row, i in enumerate(valid):
        one = functional.sigmoid_focal_loss(logits[i : i + 1], labels[i : i + 1], **kwargs)
        torch.testing.assert_close(terms[row].sum(), one, rtol=1e-12, atol=0)
    total = functional.sigmoid_focal_loss(logits, labels, **kwargs)
    torch.testing.assert_close(terms.sum(), total, rtol=1e-12, atol=0)
    for reduction in ("mean", "Sum", None):
        with pytest.raises(
            ValueError, match=f"reduction={reduction!r}: it must be 'sum' or 'none'"
        ):
            functional.sigmoid_focal_loss(logits, labels, reduction=reduction, **kwargs)


@pytest.mark.parametrize(
    "fn, given, defaults",
    [
        (functional.sigmoid_focal_loss, {"gamma": 2.0}, {"alpha": 0.25}),
        (functional.sigmoid_cross_entropy, {}, {"alpha": 0.25}),
        (functional.softmax_focal_loss, {"gamma": 2.0}, {"alpha": 0.25}),
        (functional.focal_star_loss, {"gamma": 2.0}, {"alpha": 0.25, "beta": 1.0}),
    ],
)
def test_reference_formulas_default_to_the_papers_alpha_and_beta(fn, given, defaults):
    """Called without alpha (beta), the reference formulas are the paper's alpha-balanced
    losses: alpha 0.25, FL* beta 1, as MODEL.FOCAL.ALPHA and STAR_BETA default."""
    logits = torch.randn(6, 4, dtype=F64, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 2, 3, -1, 3])
    if fn is not functional.softmax_focal_loss:
        logits, labels = logits[:, :3], labels.clamp(max=3)
    explicit = fn(logits, labels, **given, **defaults)
    assert fn(logits, labels, **given) == explicit
    for key, value in defaults.items():  # each default matters: another value changes the loss
        assert fn(logits, labels, **given, **{**defaults, key: value / 2}) != explicit
