"""MODEL.FOCAL.LABEL_SMOOTHING: the smoothed targets, closed-form values and gradients, every backend, the model."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import LOSSES, build_loss, digits_cfg, reference_loss_cls, tiny_cfg, use_triton
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from fvcore.nn import sigmoid_focal_loss as fvcore_sigmoid_focal_loss

from focal_det2 import add_focal_config, build_focal_loss
from focal_det2.engine import FocalTrainer
from focal_det2.losses import backends, functional, fused, registered_losses, triton_kernels

F64 = torch.float64
SMOOTHED = [name for name in LOSSES if registered_losses()[name].supports_label_smoothing]
# The losses whose smoothed closed forms the definition tests write out; the other tests run on
# every loss that smooths.
BUILT_IN_SMOOTHED = ["cross_entropy", "sigmoid_focal", "softmax_focal"]
NOT_SMOOTHED = [name for name in LOSSES if name not in SMOOTHED]
KEY = "MODEL.FOCAL.LABEL_SMOOTHING"


@pytest.fixture
def eager(monkeypatch):
    """The eager chunk kernels, chosen afresh."""
    monkeypatch.setenv(backends.BACKEND_ENV, "eager")
    backends._reset_backend()
    yield
    backends._reset_backend()


def smoothed(name, eps, num_classes=3, **values):
    return build_loss(name, num_classes, opts=(KEY, eps), **values)


def precision_of(backend_name):
    """
    The logits' dtype and a tolerance (relative, or absolute near 0) for a
    backend: float64 on the eager path; float32 on Triton, whose kernels
    compute in float32 (float64 logits would take the eager path there, and
    the test would not run them).
    """
    return (torch.float32, 1e-6) if backend_name == "triton" else (F64, 1e-12)


def assert_ran_on(backend_name, paths):
    """The loss ran on the backend's own code (the ``paths`` fixture records it), and only there."""
    other = "eager" if backend_name == "triton" else "triton"
    assert paths[backend_name] and not paths[other]


def batch(num_logits, num_classes, n=64, scale=4.0, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, num_logits, generator=g) * scale).to(dtype)
    labels = torch.randint(-1, num_classes + 1, (n,), generator=g)
    return logits, labels


def test_the_built_in_losses_with_and_without_smoothing():
    assert set(BUILT_IN_SMOOTHED) <= set(SMOOTHED)
    assert {"focal_star", "ohem"} <= set(NOT_SMOOTHED)


# ----------------------------------------------------------------------------- definitions


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1])
def test_sigmoid_reference_is_fvcore_on_the_smoothed_one_hot_target(gamma, alpha):
    """fvcore's own soft-target focal loss (it computes in float32) on targets 1 - eps/2 and eps/2."""
    eps, k = 0.2, 4
    logits, labels = batch(k, k, n=200, dtype=torch.float32)
    ours = functional.sigmoid_focal_loss(
        logits, labels, gamma=gamma, alpha=alpha, label_smoothing=eps
    )
    valid = labels >= 0
    target = F.one_hot(labels[valid], k + 1)[:, :k].float() * (1 - eps) + eps / 2
    peer = fvcore_sigmoid_focal_loss(logits[valid], target, alpha, gamma, reduction="sum")
    torch.testing.assert_close(ours, peer, rtol=2e-6, atol=1e-5)


def test_softmax_reference_at_gamma_0_is_torch_cross_entropy_with_label_smoothing():
    eps, k = 0.3, 5
    logits, labels = batch(k + 1, k, n=200)
    ours = functional.softmax_focal_loss(logits, labels, gamma=0.0, alpha=-1, label_smoothing=eps)
    valid = labels >= 0
    peer = F.cross_entropy(logits[valid], labels[valid], label_smoothing=eps, reduction="sum")
    torch.testing.assert_close(ours, peer)


# ALPHA, CLASS_ALPHA (K = 3) and the softmax background's alpha they give: 1 - ALPHA, or 1 at -1.
ZERO_LOGIT_WEIGHTINGS = {
    "alpha": (0.25, (), 0.75),
    "class_alpha at alpha -1": (-1, (0.1, 0.5, 0.9), 1.0),
}


@pytest.mark.parametrize("name", BUILT_IN_SMOOTHED)
@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("weighting", ZERO_LOGIT_WEIGHTINGS)
def test_zero_logits_closed_form(name, gamma, weighting, backend_name, paths):
    """At x = 0 every p is 1/2 (sigmoid) or 1/C (softmax): the loss and its definition, by hand."""
    eps, k = 0.2, 3
    alpha, class_alpha, a_background = ZERO_LOGIT_WEIGHTINGS[weighting]
    a = list(class_alpha) or [alpha] * k  # each class's alpha
    dtype, tol = precision_of(backend_name)
    loss = smoothed(name, eps, k, gamma=gamma, alpha=alpha, class_alpha=class_alpha)
    labels = torch.tensor([0, 2, 3, -1])  # two positives, one background, one ignored
    logits = torch.zeros(4, loss.num_logits, dtype=dtype)
    if name == "softmax_focal":
        c = k + 1
        term = (1 - 1 / c) ** gamma * math.log(c)  # FL at every label
        a = [*a, a_background]
        expected = sum((1 - eps) * a[y] * term + eps / c * sum(a) * term for y in (0, 2, 3))
    else:
        g = 0.0 if name == "cross_entropy" else gamma
        # BCE(0, t) = log 2 and 1 - p_t = 1/2 for any t: only alpha_t = a t + (1 - a)(1 - t) varies.
        expected = 0.0
        for y in (0, 2, 3):
            for j in range(k):
                t = 1 - eps / 2 if j == y else eps / 2
                expected += (a[j] * t + (1 - a[j]) * (1 - t)) * 0.5**g * math.log(2)
    assert loss(logits, labels).item() == pytest.approx(expected, rel=tol)
    assert_ran_on(backend_name, paths)
    assert loss.reference_loss(logits.to(F64), labels).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", BUILT_IN_SMOOTHED)
def test_gradient_vanishes_at_the_smoothed_target(name, backend_name, paths):
    """Without alpha and gamma, the loss is cross entropy on the smoothed target: d/dx = p - t = 0 at p = t."""
    eps, k = 0.2, 3
    dtype, tol = precision_of(backend_name)
    loss = smoothed(name, eps, k, gamma=0.0, alpha=-1)
    labels = torch.tensor([1, 3, 0])
    if name == "softmax_focal":
        q = F.one_hot(labels, k + 1).to(F64) * (1 - eps) + eps / (k + 1)
        logits = q.log()
    else:
        t = F.one_hot(labels, k + 1)[:, :k].to(F64) * (1 - eps) + eps / 2
        logits = torch.logit(t)
    logits = logits.to(dtype).requires_grad_()
    loss(logits, labels).backward()
    assert_ran_on(backend_name, paths)
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), atol=tol, rtol=0)


@pytest.mark.parametrize("name", SMOOTHED)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_vanishing_smoothing_is_the_hard_loss(name, gamma, backend_name, paths):
    """The smoothed kernels are a different code path; as eps -> 0 they meet the hard-target one."""
    dtype, _ = precision_of(backend_name)
    eps = 1e-9 if dtype == F64 else 1e-6  # 1 - eps / 2 still differs from 1 in float32
    logits, labels = batch(smoothed(name, 0.0).num_logits, 3, dtype=dtype)
    hard = build_loss(name, 3, gamma=gamma)(logits, labels)
    soft = smoothed(name, eps, gamma=gamma)(logits, labels)
    assert_ran_on(backend_name, paths)
    torch.testing.assert_close(soft, hard, rtol=1e-7 if dtype == F64 else 1e-5, atol=0)


# ----------------------------------------------------------------------------- fast paths


@pytest.mark.parametrize("name", SMOOTHED)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha, class_alpha", [(0.25, ()), (-1, ()), (0.25, (0.1, 0.5, 0.9))])
@pytest.mark.parametrize(  # float64 logits take the eager path on every backend
    "backend_name, dtype",
    [("eager", torch.float32), ("eager", F64), ("triton", torch.float32)],
    indirect=["backend_name"],
)
def test_fast_path_equals_reference_in_value_and_gradient(
    name, gamma, alpha, class_alpha, dtype, backend_name, paths
):
    loss = smoothed(name, 0.1, gamma=gamma, alpha=alpha, class_alpha=class_alpha)
    logits, labels = batch(loss.num_logits, 3, n=300, dtype=dtype)
    grads = []
    for fn in (loss, loss.reference_loss):
        x = logits.clone().requires_grad_()
        value = fn(x, labels)
        value.backward()
        grads.append((value, x.grad))
    (value, grad), (ref, ref_grad) = grads
    assert_ran_on(backend_name, paths)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(value, ref, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)


@pytest.mark.parametrize("name", SMOOTHED)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_gradcheck_float64(name, gamma, eager):
    loss = smoothed(name, 0.3, gamma=gamma, class_alpha=(0.2, 0.5, 0.7))
    logits, labels = batch(loss.num_logits, 3, n=12, scale=2.0)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (logits,))


@pytest.mark.parametrize("name", SMOOTHED)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_extreme_logits_are_finite_and_match(name, gamma, backend_name, paths):
    loss = smoothed(name, 0.1, gamma=gamma)
    logits, labels = batch(loss.num_logits, 3, n=200, dtype=torch.float32)
    logits = logits.sign() * 100.0  # sigmoid and softmax saturate in float32
    x = logits.clone().requires_grad_()
    value = loss(x, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    assert_ran_on(backend_name, paths)
    x64 = logits.double().requires_grad_()
    ref = loss.reference_loss(x64, labels)
    ref.backward()
    torch.testing.assert_close(value, ref.float(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_softmax_smoothing_of_confident_rows(gamma, backend_name, paths):
    """
    Rows whose top logit leads the others by 20 to 80 (a confident softmax in float32): the
    other columns' probabilities are e^-20 to e^-80 and their smoothed terms' gradient is
    of that size, which 1 - p taken by subtraction (1 - p_top rounds to 0) would swamp.
    """
    loss = smoothed("softmax_focal", 0.1, gamma=gamma)
    lead = torch.tensor([20.0, 35.0, 50.0, 80.0])
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.arange(8) % 4] = lead.repeat(2)
    labels = torch.tensor([0, 1, 2, 3, 1, 3, 0, 2])  # right (background: 3), then wrong
    x = logits.clone().requires_grad_()
    value = loss(x, labels)
    value.backward()
    assert_ran_on(backend_name, paths)
    x64 = logits.double().requires_grad_()
    ref = loss.reference_loss(x64, labels)
    ref.backward()
    torch.testing.assert_close(value, ref.float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-4, atol=1e-37)


@pytest.mark.parametrize("name", SMOOTHED)
def test_smoothed_backward_scales_by_the_incoming_gradient(name, backend_name, paths):
    loss = smoothed(name, 0.1, gamma=0.5)
    logits, labels = batch(loss.num_logits, 3, dtype=torch.float32)
    grads = []
    for scale in (1.0, 0.25):
        x = logits.clone().requires_grad_()
        (loss(x, labels) * scale).backward()
        grads.append(x.grad)
    assert_ran_on(backend_name, paths)
    torch.testing.assert_close(grads[1], grads[0] * 0.25, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", SMOOTHED)
def test_zero_smoothing_is_bit_identical(name, backend_name, paths):
    """LABEL_SMOOTHING 0 (the default) runs the hard-target kernels: the same bits as without the key."""
    logits, labels = batch(build_loss(name, 3).num_logits, 3, dtype=torch.float32)
    values = []
    for loss in (build_loss(name, 3), smoothed(name, 0.0)):
        x = logits.clone().requires_grad_()
        value = loss(x, labels)
        value.backward()
        values.append((value, x.grad))
    assert_ran_on(backend_name, paths)
    assert torch.equal(values[0][0], values[1][0]) and torch.equal(values[0][1], values[1][1])


@pytest.mark.parametrize("name", SMOOTHED)
@pytest.mark.parametrize("split", ["eager chunks", "triton blocks"])
def test_many_chunks_or_blocks_count_every_row_once(name, split, monkeypatch, paths):
    """
    Chunks of a few rows (eager), and Triton programs of 64 elements (sigmoid,
    starting inside rows) or 2 rows (softmax): every row's smoothed terms are
    counted once.
    """
    if split == "eager chunks":
        monkeypatch.setenv(backends.BACKEND_ENV, "eager")
        monkeypatch.setattr(fused, "CPU_CHUNK_ELEMENTS", 40)
    else:
        use_triton(monkeypatch)
        monkeypatch.setattr(triton_kernels, "SIGMOID_BLOCK", 64)
        # 2 rows of next_pow2(9) = 16: smoothing takes SOFTMAX_SMOOTH_ELEMENTS (the plain
        # kernel's 1 row a program would leave rows out)
        monkeypatch.setattr(triton_kernels, "SOFTMAX_SMOOTH_ELEMENTS", 2 * 16)
        monkeypatch.setattr(triton_kernels, "SOFTMAX_ELEMENTS", 8)
    backends._reset_backend()
    loss = smoothed(name, 0.1, 8)
    logits, labels = batch(loss.num_logits, 8, n=100, dtype=torch.float32)
    x = logits.clone().requires_grad_()
    value = loss(x, labels)
    value.backward()
    assert_ran_on("eager" if split == "eager chunks" else "triton", paths)
    x_ref = logits.double().requires_grad_()
    ref = loss.reference_loss(x_ref, labels)
    ref.backward()
    backends._reset_backend()
    torch.testing.assert_close(value, ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SMOOTHED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernels_match_the_reference(name, dtype):
    """The compiled Triton kernels (the default on CUDA) on a GPU, against the float64 reference."""
    backends._reset_backend()
    loss = smoothed(name, 0.1, 8, class_alpha=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9))
    logits, labels = batch(loss.num_logits, 8, n=5000, dtype=torch.float32)
    logits = logits.to(dtype)
    x = logits.cuda().requires_grad_()
    value = loss(x, labels.cuda())
    value.backward()
    x_ref = logits.double().requires_grad_()
    ref = loss.reference_loss(x_ref, labels)
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # half-precision gradients
    torch.testing.assert_close(value.cpu().double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        x.grad.cpu().double(), x_ref.grad, rtol=tol, atol=tol * x_ref.grad.abs().max().item()
    )


# ----------------------------------------------------------------------------- config and model


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), "abc", True])
@pytest.mark.parametrize("how", ["command line", "python"])
def test_bad_values_raise_naming_the_key(value, how):
    """From the command line yacs refuses a non-float itself (naming the key); set in Python, the loss does."""
    if how == "command line":
        with pytest.raises((ValueError, TypeError), match=KEY):
            build_loss("sigmoid_focal", 3, opts=(KEY, value))
        return
    cfg = get_cfg()
    add_focal_config(cfg)
    cfg.MODEL.FOCAL.LABEL_SMOOTHING = value  # no yacs type check on attribute assignment
    with pytest.raises((ValueError, TypeError), match=KEY):
        build_focal_loss(cfg)


@pytest.mark.parametrize("name", NOT_SMOOTHED)
def test_losses_without_smoothing_refuse_it_naming_the_key_and_the_alternatives(name):
    with pytest.raises(ValueError, match=KEY) as error:
        build_loss(name, 3, opts=(KEY, 0.1))
    assert name in str(error.value) and str(sorted(SMOOTHED)) in str(error.value)
    build_loss(name, 3, opts=(KEY, 0.0))  # 0 is the default every loss accepts


@pytest.mark.parametrize("name", SMOOTHED)
def test_prior_initialisation_is_unchanged(name):
    """Smoothing changes the targets, not the start: the classifier bias still gives every class the prior."""
    biases = []
    for eps in (0.0, 0.1):
        cfg = tiny_cfg()
        cfg.merge_from_list(["MODEL.FOCAL.LOSS", name, KEY, eps])
        biases.append(build_model(cfg).head.cls_score.bias.detach())
    assert torch.equal(biases[0], biases[1])


@pytest.mark.parametrize("name", SMOOTHED)
def test_model_loss_cls_is_the_smoothed_reference(name):
    cfg = tiny_cfg()
    cfg.merge_from_list(["MODEL.FOCAL.LOSS", name, KEY, 0.1])
    torch.manual_seed(0)
    model = build_model(cfg)
    from test_modeling import batch as model_batch

    inputs = model_batch()
    expected = reference_loss_cls(model, inputs, name, gamma=2.0, opts=(KEY, 0.1))
    unsmoothed = reference_loss_cls(model, inputs, name, gamma=2.0)
    model.train()
    with EventStorage(0):
        losses = model(inputs)
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - unsmoothed) > 1e-3 * expected  # the test can tell the two apart


@pytest.mark.parametrize("name", SMOOTHED)
def test_smoothed_loss_trains_and_evaluates_through_the_stock_trainer(name, tmp_path):
    cfg = digits_cfg(f"{name}_R18_FPN_1x", tmp_path, opts=(KEY, 0.1))
    trainer = FocalTrainer(cfg)
    assert trainer.model.focal_loss.label_smoothing == 0.1
    trainer.resume_or_load(resume=False)
    trainer.train()  # evaluates after the last iteration
    assert (tmp_path / "model_final.pth").exists()
    assert "bbox/AP" in (tmp_path / "metrics.json").read_text().splitlines()[-1]


@pytest.mark.parametrize("alpha", [-1, 0.25])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_class_alpha_replaces_alpha_minus_1_when_smoothing(alpha, eps, eager):
    """
    Called directly (the loss objects keep ALPHA at its default beside CLASS_ALPHA), the
    sigmoid definition and kernels weigh by CLASS_ALPHA whatever ``alpha`` is, -1 included:
    as with alpha 0.5, and not as the unweighted loss.
    """
    logits, labels = batch(3, 3, n=50)
    class_alpha = torch.tensor([0.1, 0.5, 0.9], dtype=F64)

    def loss(fn, a, ca=class_alpha):
        return fn(logits, labels, gamma=2.0, alpha=a, class_alpha=ca, label_smoothing=eps)

    expected = loss(functional.sigmoid_focal_loss, 0.5)
    torch.testing.assert_close(loss(functional.sigmoid_focal_loss, alpha), expected)
    torch.testing.assert_close(loss(fused.sigmoid_focal_loss, alpha), expected)
    assert not torch.allclose(loss(functional.sigmoid_focal_loss, -1, None), expected)
