"""
Properties of every registered loss (built with ``focal_det2.build_focal_loss``)
over random shapes, labels, gammas, alphas, per-class alphas and logits,
extreme ones (+-100) included, checked with hypothesis.
"""

from functools import partial

import pytest
import torch
from conftest import (
    LOSSES,
    TORCH_CE,
    alpha_weighted_bce,
    alpha_weighted_softmax_ce,
    build_loss,
    num_logits_of,
    reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st

F64 = torch.float64
# derandomize: the same examples on every run, as everything else in the suite is seeded.
EXAMPLES = settings(max_examples=60, deadline=None, derandomize=True)

logit_values = st.one_of(
    st.sampled_from([-100.0, 100.0, 0.0]),
    st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False, width=32),
)


@st.composite
def problems(draw, name, *, min_gamma=0.0, max_gamma=5.0, min_beta=-2.0):
    """
    A loss ``name`` with drawn MODEL.FOCAL values and an input for it.

    Returns:
        dict: ``num_classes`` (K), ``params`` (the MODEL.FOCAL values as keyword
            arguments of :func:`build` and of the reference formula),
            ``logits`` (N, C) float64 and ``labels`` (N,) in [-1, K].
    """
    num_classes = draw(st.integers(1, 5))
    num_rows = draw(st.integers(1, 10))
    columns = num_logits_of(name, num_classes)
    flat = draw(st.lists(logit_values, min_size=num_rows * columns, max_size=num_rows * columns))
    labels = draw(st.lists(st.integers(-1, num_classes), min_size=num_rows, max_size=num_rows))
    low_gamma = max(min_gamma, 0.05) if name == "focal_star" else min_gamma  # FL* divides by gamma
    params = dict(
        gamma=draw(st.floats(low_gamma, max_gamma)),
        alpha=draw(st.one_of(st.just(-1.0), st.floats(0.0, 1.0))),
        class_alpha=draw(
            st.one_of(
                st.just(()),
                st.lists(st.floats(0.0, 1.0), min_size=num_classes, max_size=num_classes),
            )
        ),
        beta=draw(st.floats(min_beta, 2.0)),
    )
    return dict(
        num_classes=num_classes,
        params=params,
        logits=torch.tensor(flat, dtype=F64).reshape(num_rows, columns),
        labels=torch.tensor(labels, dtype=torch.int64),
    )


def alphas_of(problem):
    """The problem's alpha and class_alpha, as the torch-written CEs take them."""
    return {k: problem["params"][k] for k in ("alpha", "class_alpha")}


def loss_of(name, problem, **overrides):
    """The loss ``name`` built from a config with the problem's values, ``overrides`` applied."""
    return build_loss(name, problem["num_classes"], **dict(problem["params"], **overrides))


def close(actual, expected, rtol=1e-10):
    """
    float64 agreement to ``rtol`` of the largest magnitude (entries have mixed
    scales), and to 1e-12 absolute: at logits of +-100 a term such as
    log(1 + e^-200) is 1e-87 in one formula and rounds to 0 in another.
    """
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-12)


def rows(problem):
    """(logits, labels) of each anchor alone."""
    return [
        (problem["logits"][i : i + 1], problem["labels"][i : i + 1])
        for i in range(len(problem["labels"]))
    ]


def value_and_grad(loss, logits, labels, **kwargs):
    x = logits.clone().requires_grad_(True)
    value = loss(x, labels, **kwargs)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@pytest.mark.parametrize("name", LOSSES)
@EXAMPLES
@given(data=st.data())
def test_finite_and_non_negative_in_float32(name, data):
    problem = data.draw(problems(name))
    value, grad = value_and_grad(
        loss_of(name, problem), problem["logits"].float(), problem["labels"]
    )
    assert torch.isfinite(value) and value >= 0
    assert torch.isfinite(grad).all()
    ignored = problem["labels"] == -1
    assert (grad[ignored] == 0).all()


@pytest.mark.parametrize("name", LOSSES)
@EXAMPLES
@given(data=st.data())
def test_gradient_equals_autograd_of_the_reference_formula(name, data):
    problem = data.draw(problems(name))
    logits, labels = problem["logits"], problem["labels"]
    value, grad = value_and_grad(loss_of(name, problem), logits, labels)
    ref_value, ref_grad = value_and_grad(
        lambda x, y: reference(name, x, y, **problem["params"]), logits, labels
    )
    close(value, ref_value)
    close(grad, ref_grad)


@pytest.mark.parametrize("name", LOSSES)
@EXAMPLES
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_invariant_to_the_order_of_anchors(name, data, seed):
    problem = data.draw(problems(name))
    logits, labels = problem["logits"], problem["labels"]
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    loss = loss_of(name, problem)
    value, grad = value_and_grad(loss, logits, labels)
    permuted_value, permuted_grad = value_and_grad(loss, logits[perm], labels[perm])
    close(permuted_value, value, rtol=1e-12)
    close(permuted_grad, grad[perm], rtol=1e-12)


@pytest.mark.parametrize("name", ["sigmoid_focal", "softmax_focal"])
@EXAMPLES
@given(data=st.data())
def test_focal_loss_at_most_cross_entropy_per_anchor(name, data):
    """FL = (1 - p_t)^gamma * CE <= CE, CE written with torch ops (not our loss at gamma 0)."""
    problem = data.draw(problems(name))
    loss = loss_of(name, problem)
    torch_ce = partial(TORCH_CE[name], **alphas_of(problem))
    for logits, labels in rows(problem):
        assert loss(logits, labels) <= torch_ce(logits, labels) * (1 + 1e-12) + 1e-12


@EXAMPLES
@given(data=st.data())
def test_focal_star_at_most_cross_entropy_per_anchor_for_gamma_1_or_more(data):
    """
    -log(sigmoid(gamma x_t + beta)) / gamma <= -log(sigmoid(x_t)) for gamma >= 1
    and beta >= 0 (the paper's settings). Below gamma 1 it does not hold: at
    gamma 0.5, beta 0, x_t 10, FL* = 0.013 > CE = 4.5e-5.
    """
    problem = data.draw(problems("focal_star", min_gamma=1.0, min_beta=0.0))
    star, ce = loss_of("focal_star", problem), partial(alpha_weighted_bce, **alphas_of(problem))
    for logits, labels in rows(problem):
        assert star(logits, labels) <= ce(logits, labels) * (1 + 1e-12) + 1e-12


@pytest.mark.parametrize("name", ["sigmoid_focal", "cross_entropy"])
@EXAMPLES
@given(data=st.data())
def test_sigmoid_losses_at_gamma_0_equal_alpha_weighted_bce(name, data):
    """sigmoid_focal and cross_entropy at gamma 0 are alpha_t * BCE."""
    problem = data.draw(problems(name))
    p = problem["params"]
    expected = alpha_weighted_bce(
        problem["logits"], problem["labels"], alpha=p["alpha"], class_alpha=p["class_alpha"]
    )
    close(loss_of(name, problem)(problem["logits"], problem["labels"], gamma=0.0), expected)


@EXAMPLES
@given(data=st.data())
def test_softmax_focal_at_gamma_0_equals_alpha_weighted_softmax_ce(data):
    problem = data.draw(problems("softmax_focal"))
    p = problem["params"]
    expected = alpha_weighted_softmax_ce(
        problem["logits"], problem["labels"], alpha=p["alpha"], class_alpha=p["class_alpha"]
    )
    close(
        loss_of("softmax_focal", problem)(problem["logits"], problem["labels"], gamma=0.0), expected
    )


@EXAMPLES
@given(data=st.data())
def test_focal_star_at_gamma_1_beta_0_equals_cross_entropy(data):
    """FL* has no gamma 0; at gamma 1 and beta 0, p_t* = p_t and FL* = CE (alpha_t * BCE)."""
    problem = data.draw(problems("focal_star"))
    star = loss_of("focal_star", problem, gamma=1.0, beta=0.0)
    expected = alpha_weighted_bce(problem["logits"], problem["labels"], **alphas_of(problem))
    close(star(problem["logits"], problem["labels"]), expected)
