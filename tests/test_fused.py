"""
The fast paths in ``focal_det2.losses.fused`` against the reference formulas
in ``focal_det2.losses.functional``: values and gradients (float32 against
the reference evaluated in float64 on the same inputs, and float64 against
float64), ignored anchors, all-ignored and empty batches, extreme logits,
gradcheck of the autograd Functions, and the backend choice read from
FOCAL_DET2_BACKEND. The Triton kernels run here through Triton's
interpreter (TRITON_INTERPRET=1, set by conftest where there is no CUDA).
"""

import logging

import pytest
import torch
from conftest import logged, use_triton, with_gammas

from focal_det2.losses import backends, functional, fused

LOSSES = ["sigmoid_focal", "cross_entropy", "focal_star", "softmax_focal"]
FAST = {
    "sigmoid_focal": fused.sigmoid_focal_loss,
    "cross_entropy": fused.sigmoid_cross_entropy,
    "focal_star": fused.focal_star_loss,
    "softmax_focal": fused.softmax_focal_loss,
}
REFERENCE = {
    "sigmoid_focal": functional.sigmoid_focal_loss,
    "cross_entropy": functional.sigmoid_cross_entropy,
    "focal_star": functional.focal_star_loss,
    "softmax_focal": functional.softmax_focal_loss,
}
F64 = torch.float64
NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def default_backend(monkeypatch):
    """Every test starts from unchosen backends with FOCAL_DET2_BACKEND unset."""
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    monkeypatch.delenv("FOCAL_DET2_COMPILE", raising=False)
    backends._reset_backend()
    yield
    backends._reset_backend()


def kwargs_of(name, *, gamma=2.0, alpha=0.25, class_alpha=None, beta=0.5):
    kwargs = {"alpha": alpha, "class_alpha": class_alpha}
    if name != "cross_entropy":
        kwargs["gamma"] = gamma
    if name == "focal_star":
        kwargs["beta"] = beta
    return kwargs


def batch(name, num_anchors=300, *, scale=3.0, dtype=torch.float32, seed=0):
    """Seeded logits (N, K or K+1) and labels with every kind of label (-1, classes, K)."""
    g = torch.Generator().manual_seed(seed)
    cols = NUM_CLASSES + 1 if name == "softmax_focal" else NUM_CLASSES
    logits = (torch.randn(num_anchors, cols, generator=g, dtype=F64) * scale).to(dtype)
    labels = torch.randint(-1, NUM_CLASSES + 1, (num_anchors,), generator=g)
    labels[: NUM_CLASSES + 2] = torch.arange(-1, NUM_CLASSES + 1)
    return logits, labels


def value_and_grad(fn, logits, labels, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    value = fn(x, labels, **kwargs)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def assert_matches_reference(name, logits, labels, **kwargs):
    """
    The fast path equals the reference evaluated in float64 on the same inputs:
    1e-5 relative (float32; float64 to 1e-12), with an absolute floor for the
    gradient entries that underflow in float32.
    """
    value, grad = value_and_grad(FAST[name], logits, labels, **kwargs)
    ref_kwargs = dict(kwargs)
    if kwargs.get("class_alpha") is not None:
        ref_kwargs["class_alpha"] = kwargs["class_alpha"].to(F64)
    ref_value, ref_grad = value_and_grad(REFERENCE[name], logits.to(F64), labels, **ref_kwargs)
    assert value.dtype == logits.dtype and grad.dtype == logits.dtype
    rtol = 1e-12 if logits.dtype == F64 else 1e-5
    atol = 1e-12 * ref_grad.abs().max().item()
    torch.testing.assert_close(value.to(F64), ref_value, rtol=rtol, atol=0)
    torch.testing.assert_close(grad.to(F64), ref_grad, rtol=rtol, atol=atol)
    return value, grad


# (CPU_CHUNK_ELEMENTS, CPU_MIN_CHUNK_ELEMENTS) in rows of K + 1: None keeps the defaults (one
# chunk of 300 rows); a minimum above every chunk gives each its fresh scratch space (not rows
# of the gradient), a minimum of one row lets chunks take the gradient's rows down to one.
EAGER_CHUNKS = {"one chunk": None, "many chunks": (3, 1 << 20), "scratch in the gradient": (8, 1)}


def set_eager_chunks(monkeypatch, chunking):
    """Set the eager path's chunk constants to those of ``chunking`` (:data:`EAGER_CHUNKS`)."""
    if EAGER_CHUNKS[chunking] is not None:
        rows, min_rows = EAGER_CHUNKS[chunking]
        monkeypatch.setattr(fused, "CPU_CHUNK_ELEMENTS", rows * (NUM_CLASSES + 1))
        monkeypatch.setattr(fused, "CPU_MIN_CHUNK_ELEMENTS", min_rows * (NUM_CLASSES + 1))


@pytest.fixture(params=[*EAGER_CHUNKS, "triton", "triton, small blocks"])
def chunking(request, monkeypatch, paths):
    """
    Runs a test with the eager path's default chunk sizes (one chunk, fresh
    scratch space), with chunks of 3 rows and fresh scratch space, with
    chunks of 8 rows down to 1 that take their scratch space from the
    gradient's free rows, and with the Triton kernels (float32; float64
    logits take the eager path there too), as launched and with blocks of 64
    elements (sigmoid) and 4 rows (softmax), so that programs start inside rows.
    """
    if request.param in EAGER_CHUNKS:
        set_eager_chunks(monkeypatch, request.param)
    elif request.param.startswith("triton"):
        use_triton(monkeypatch)
        if request.param == "triton, small blocks":
            from focal_det2.losses import triton_kernels

            monkeypatch.setattr(triton_kernels, "SIGMOID_BLOCK", 64)
            monkeypatch.setattr(
                triton_kernels, "SOFTMAX_ELEMENTS", 4 * 8
            )  # 4 rows of next_pow2(K + 1) = 8
    yield
    if request.param.startswith("triton"):  # float32 on the kernels, float64 on the eager path
        assert all(d != F64 for d in paths["triton"]) and all(d == F64 for d in paths["eager"])
        assert paths["triton"] or paths["eager"]
    else:
        assert paths["eager"] and not paths["triton"]


# ----------------------------------------------------------------------------- equal to the reference


GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]  # 0 and 2 have special cases, 1 too
GAMMA_CASES = [("cross_entropy", 0.0)] + [
    (name, gamma)
    for name in ["sigmoid_focal", "focal_star", "softmax_focal"]
    for gamma in GAMMAS
    if not (name == "focal_star" and gamma == 0)  # FL* divides by gamma
]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name, gamma", GAMMA_CASES)
def test_matches_reference(name, gamma, dtype, chunking):
    logits, labels = batch(name, dtype=dtype)
    assert_matches_reference(name, logits, labels, **kwargs_of(name, gamma=gamma))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("alpha", [-1, 0.0, 0.25, 1.0])
def test_matches_reference_for_alpha(name, alpha, dtype, chunking):
    logits, labels = batch(name, dtype=dtype, seed=1)
    assert_matches_reference(name, logits, labels, **kwargs_of(name, alpha=alpha))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("alpha", [-1, 0.25])
def test_matches_reference_with_class_alpha(name, alpha, dtype, chunking):
    logits, labels = batch(name, dtype=dtype, seed=2)
    class_alpha = torch.linspace(0.1, 0.9, NUM_CLASSES, dtype=dtype)
    assert_matches_reference(
        name, logits, labels, **kwargs_of(name, alpha=alpha, class_alpha=class_alpha)
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", ["sigmoid_focal", "focal_star", "softmax_focal"])
def test_matches_reference_with_class_alpha_at_gamma_1(name, dtype, backend_name):
    """gamma = 1 has its own modulator (no power): CLASS_ALPHA still weighs each class."""
    logits, labels = batch(name, dtype=dtype, seed=2)
    class_alpha = torch.linspace(0.1, 0.9, NUM_CLASSES, dtype=dtype)
    kwargs = kwargs_of(name, gamma=1.0, class_alpha=class_alpha)
    assert_matches_reference(name, logits, labels, **kwargs)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_star_without_shift_matches_reference(gamma, backend_name):
    """STAR_BETA 0: the logits scaled by gamma, not shifted."""
    logits, labels = batch("focal_star", seed=18)
    assert_matches_reference(
        "focal_star", logits, labels, **kwargs_of("focal_star", gamma=gamma, beta=0.0)
    )


@pytest.mark.parametrize("name, gamma", with_gammas(LOSSES, [0.5, 2.0]))
def test_float32_value_matches_float32_reference(name, gamma, backend_name):
    logits, labels = batch(name, num_anchors=2000, seed=3)
    ours = FAST[name](logits, labels, **kwargs_of(name, gamma=gamma))
    ref = REFERENCE[name](logits, labels, **kwargs_of(name, gamma=gamma))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", LOSSES)
def test_realistic_retinanet_batch(name, backend_name):
    # 80 classes, logits around the prior logit -4.6, ~1% foreground, ~5% ignored.
    g = torch.Generator().manual_seed(4)
    cols = 81 if name == "softmax_focal" else 80
    logits = torch.randn(1000, cols, generator=g) * 2 - 4
    u = torch.rand(1000, generator=g)
    labels = torch.where(u < 0.06, -1, 80)
    labels[u < 0.01] = torch.randint(0, 80, (int((u < 0.01).sum()),), generator=g)
    assert_matches_reference(name, logits, labels, **kwargs_of(name))


# ----------------------------------------------------------------------------- chunk plan


# 103 rows of 80: with spare 1, the first chunk takes 51 rows (the smallest, 4,080 elements),
# leaving 52 rows of fresh scratch; stopping at 51 instead would leave all 103, 8,240 > 2 x 4,096.
@pytest.mark.parametrize("num_anchors", [0, 1, 103, 5_000, 200_000])
@pytest.mark.parametrize("spare", [0, 1, 2, 3])
def test_chunks_cover_the_rows_and_scratch_rows_are_free(num_anchors, spare):
    logits = torch.empty(num_anchors, 80)
    chunks = fused._row_chunks(logits, spare)
    step = fused.CPU_CHUNK_ELEMENTS // 80
    starts, ends = [c[0] for c in chunks], [c[1] for c in chunks]
    assert starts == [0] + ends[:-1] if chunks else num_anchors == 0  # in order, no gaps
    assert (ends[-1] if chunks else 0) == num_anchors
    fresh_rows = 0
    for r0, r1, scratch in chunks:
        assert 0 < r1 - r0 <= step
        if scratch is None:
            fresh_rows = max(fresh_rows, r1 - r0)
        else:  # the rows right after the chunk, all before the end: none written yet
            assert spare and scratch == r1 and r1 + spare * (r1 - r0) <= num_anchors
    if spare:  # only the last few rows need fresh scratch space
        assert fresh_rows * 80 < (spare + 1) * fused.CPU_MIN_CHUNK_ELEMENTS
        assert all(c[2] is None for c in chunks[len(chunks) - sum(c[2] is None for c in chunks) :])


def test_chunk_sums_are_added_in_float64():
    # float32 chunk sums 2^25 and three 1s: added in float32, each 1 is below half the spacing
    # of floats at 2^25 (4) and may be lost; in float64 the total is exact.
    sums = [torch.tensor(2.0**25), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0)]
    total = fused._sum(sums, torch.empty(0))
    assert total.dtype == F64 and total.item() == 2**25 + 3
    none = fused._sum([], torch.empty(0))  # no chunks: 0, also in float64
    assert none.dtype == F64 and none.item() == 0.0


# ----------------------------------------------------------------------------- ignored, empty, extreme


def assert_ignored_anchors_add_nothing(name, **kwargs):
    """
    An ignored anchor adds nothing to the loss or the gradient, whatever its
    logits: also inf and NaN, which the reference drops with the row (a
    weight of 0 would give 0 * inf = NaN).
    """
    logits, labels = batch(name, seed=5)
    ignored = labels == -1
    value, grad = value_and_grad(FAST[name], logits, labels, **kwargs)
    only_valid = FAST[name](logits[~ignored], labels[~ignored], **kwargs)
    torch.testing.assert_close(value, only_valid, rtol=1e-6, atol=0)
    assert torch.all(grad[ignored] == 0)
    moved = logits.clone()
    fills = torch.tensor([50.0, float("inf"), float("-inf"), float("nan")])
    rows = ignored.nonzero().squeeze(1)
    moved[rows] = fills[torch.arange(len(rows)) % 4, None]
    moved[rows[1], 0] = float("-inf")  # a row with both infinities
    moved_value, moved_grad = value_and_grad(FAST[name], moved, labels, **kwargs)
    assert moved_value == value
    assert torch.equal(moved_grad, grad)


@pytest.mark.parametrize("name", LOSSES)
def test_ignored_anchors_have_zero_loss_and_gradient(name, chunking):
    assert_ignored_anchors_add_nothing(name, **kwargs_of(name))


def test_softmax_weight_table_is_built_once_per_alpha_and_not_during_graph_capture(monkeypatch):
    """
    Without CLASS_ALPHA, softmax_focal's (K + 2,) weight table is built once per (K, alpha,
    dtype, device) and reused (a call then runs no small ops for it); a table built while a
    CUDA graph is captured holds nothing until the graph replays, so none is cached then.
    """
    logits, labels = batch("softmax_focal", num_anchors=40, seed=26)
    fused._alpha_weights.cache_clear()
    monkeypatch.setattr(fused, "_capturing", lambda device: True)
    for alpha in (0.25, 0.25, 0.5):
        assert_matches_reference(
            "softmax_focal", logits, labels, **kwargs_of("softmax_focal", alpha=alpha)
        )
    assert fused._alpha_weights.cache_info().currsize == 0
    monkeypatch.setattr(fused, "_capturing", lambda device: False)
    for alpha in (0.25, 0.25, 0.5):
        assert_matches_reference(
            "softmax_focal", logits, labels, **kwargs_of("softmax_focal", alpha=alpha)
        )
    info = fused._alpha_weights.cache_info()
    assert (info.currsize, info.hits) == (2, 1)
    table = fused._alpha_weights(NUM_CLASSES, 0.5, torch.float32, logits.device)
    assert table.tolist() == [0.0] + [0.5] * NUM_CLASSES + [0.5]
    assert (
        fused._alpha_weights(NUM_CLASSES, 0.25, torch.float32, logits.device).tolist()[-1] == 0.75
    )


@pytest.mark.parametrize("name", ["sigmoid_focal", "cross_entropy", "softmax_focal"])
def test_ignored_anchors_add_nothing_with_label_smoothing(name, backend_name):
    assert_ignored_anchors_add_nothing(name, **kwargs_of(name), label_smoothing=0.1)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("num_anchors", [0, 4])
def test_all_ignored_batch_is_zero_and_connected(name, num_anchors, backend_name):
    cols = NUM_CLASSES + 1 if name == "softmax_focal" else NUM_CLASSES
    logits = torch.randn(
        num_anchors, cols, generator=torch.Generator().manual_seed(6)
    ).requires_grad_(True)
    labels = torch.full((num_anchors,), -1, dtype=torch.long)
    out = FAST[name](logits, labels, **kwargs_of(name))
    assert out.dim() == 0 and out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize(
    "gamma", [4.6e-296, 0.5, 2.0, 5.0]
)  # 4.6e-296: 1 / gamma overflows float32
def test_extreme_logits_are_finite_and_match(name, gamma, backend_name):
    if name == "focal_star" and gamma < 1e-3:
        pytest.skip("FL* is -log(p*) / gamma: it grows as 1 / gamma by definition")
    g = torch.Generator().manual_seed(7)
    cols = NUM_CLASSES + 1 if name == "softmax_focal" else NUM_CLASSES
    signs = torch.cartesian_prod(
        *[torch.tensor([-100.0, 100.0])] * 3
    )  # every sign pattern of +-100
    corners = torch.cat([signs, signs[:, :1].expand(-1, cols - 3)], dim=1)
    logits = torch.cat([corners, corners, (torch.rand(40, cols, generator=g) * 200 - 100)])
    labels = torch.arange(len(logits)) % (NUM_CLASSES + 2) - 1
    value, grad = assert_matches_reference(name, logits, labels, **kwargs_of(name, gamma=gamma))
    assert torch.isfinite(value) and torch.all(torch.isfinite(grad))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", ["sigmoid_focal", "focal_star", "softmax_focal"])
@pytest.mark.parametrize("gamma", [1e-30, 1e-12])
def test_tiny_gamma_matches_reference(name, gamma, dtype, backend_name):
    # gamma -> 0 on ordinary logits: 1e-30 is below float32 (gamma * x rounds to 0), no NaN.
    logits, labels = batch(name, dtype=dtype, seed=16)
    value, grad = assert_matches_reference(name, logits, labels, **kwargs_of(name, gamma=gamma))
    assert torch.isfinite(value) and torch.all(torch.isfinite(grad))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSSES)
def test_half_precision_logits_on_the_eager_path(name, dtype, paths):
    """
    float16 / bfloat16 logits (SOLVER.AMP) on the CPU: math in float32, the
    loss summed in float32, the gradient in the logits' dtype and within its
    rounding of the float64 reference on the same (rounded) logits.
    """
    logits, labels = batch(name, dtype=dtype, seed=17)
    value, grad = value_and_grad(FAST[name], logits, labels, **kwargs_of(name))
    ref_value, ref_grad = value_and_grad(REFERENCE[name], logits.to(F64), labels, **kwargs_of(name))
    assert paths["eager"] == [torch.float32] and not paths["triton"]
    assert value.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(value.to(F64), ref_value, rtol=1e-6, atol=0)
    eps = torch.finfo(dtype).eps
    atol = eps * ref_grad.abs().max().item()
    torch.testing.assert_close(grad.to(F64), ref_grad, rtol=eps, atol=atol)


# ----------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("name, gamma", with_gammas(LOSSES, [0.5, 2.0, 3.0]))
@pytest.mark.parametrize("with_class_alpha", [False, True])
def test_gradcheck_float64(name, gamma, with_class_alpha, monkeypatch):
    monkeypatch.setattr(fused, "CPU_CHUNK_ELEMENTS", 4 * (NUM_CLASSES + 1))  # several chunks
    logits, labels = batch(name, num_anchors=12, scale=2.0, dtype=F64, seed=8)
    class_alpha = torch.linspace(0.1, 0.9, NUM_CLASSES, dtype=F64) if with_class_alpha else None
    kwargs = kwargs_of(name, gamma=gamma, class_alpha=class_alpha)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: FAST[name](t, labels, **kwargs), (x,), eps=1e-6, atol=1e-7, rtol=1e-5
    )


@pytest.mark.parametrize("name", LOSSES)
def test_backward_scales_by_the_incoming_gradient_and_can_run_twice(name, backend_name):
    logits, labels = batch(name, seed=9)
    _, grad = value_and_grad(FAST[name], logits, labels, **kwargs_of(name))
    x = logits.clone().requires_grad_(True)
    out = FAST[name](x, labels, **kwargs_of(name)) / 4
    out.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, grad / 4, rtol=1e-6, atol=0)
    out.backward()  # a retained graph: the gradient is recomputed from the saved logits
    torch.testing.assert_close(x.grad, grad / 2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", LOSSES)
def test_no_grad_and_non_contiguous_logits(name, backend_name):
    logits, labels = batch(name, seed=10)
    value, grad = value_and_grad(FAST[name], logits, labels, **kwargs_of(name))
    with torch.no_grad():
        assert FAST[name](logits.clone().requires_grad_(True), labels, **kwargs_of(name)) == value
    wide = torch.cat([logits, torch.zeros_like(logits)], dim=1)[:, : logits.shape[1]]
    assert not wide.is_contiguous()
    v2, g2 = value_and_grad(FAST[name], wide, labels, **kwargs_of(name))
    assert v2 == value and torch.equal(g2, grad)
    strided = torch.stack([labels, torch.full_like(labels, -1)], dim=1)[:, 0]
    assert not strided.is_contiguous()
    v3, g3 = value_and_grad(FAST[name], logits, strided, **kwargs_of(name))
    assert v3 == value and torch.equal(g3, grad)


def test_softmax_with_more_classes_than_a_block_of_rows(backend_name):
    """LVIS-like width: 1203 classes + background, wider than Triton's block of 512 elements."""
    g = torch.Generator().manual_seed(22)
    logits = torch.randn(6, 1204, generator=g) * 3
    labels = torch.tensor([-1, 0, 5, 1202, 1203, 700])
    assert_matches_reference("softmax_focal", logits, labels, **kwargs_of("softmax_focal"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", LOSSES)
def test_cuda_matches_reference(name):
    logits, labels = batch(name, num_anchors=5000, seed=15)
    value, grad = value_and_grad(FAST[name], logits.cuda(), labels.cuda(), **kwargs_of(name))
    ref_value, ref_grad = value_and_grad(REFERENCE[name], logits.to(F64), labels, **kwargs_of(name))
    torch.testing.assert_close(value.cpu().to(F64), ref_value, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        grad.cpu().to(F64), ref_grad, rtol=1e-5, atol=1e-12 * ref_grad.abs().max().item()
    )


def test_focal_star_rejects_non_positive_gamma():
    logits, labels = batch("focal_star")
    with pytest.raises(ValueError, match="gamma"):
        fused.focal_star_loss(logits, labels, gamma=0.0)


@pytest.mark.parametrize("name", LOSSES)
def test_registered_losses_call_the_fast_path(name, monkeypatch):
    from detectron2.config import get_cfg

    import focal_det2

    cfg = get_cfg()
    focal_det2.add_focal_config(cfg)
    cfg.MODEL.RETINANET.NUM_CLASSES = NUM_CLASSES
    cfg.MODEL.FOCAL.LOSS = name
    loss = focal_det2.build_focal_loss(cfg)
    calls = []
    fast = getattr(fused, FAST[name].__name__)
    monkeypatch.setattr(
        fused, FAST[name].__name__, lambda *a, **k: calls.append(1) or fast(*a, **k)
    )
    logits, labels = batch(name, seed=11)
    loss(logits, labels)
    assert calls == [1]


# ----------------------------------------------------------------------------- backend choice


def test_compile_backend_compiles_for_real_and_matches_the_reference(monkeypatch):
    """
    FOCAL_DET2_BACKEND=compile with the real torch.compile (the other tests record its calls
    instead): the chunk kernels compile on this machine and give the reference, with no
    fallback to eager (which sets the backend to eager, with a log line: bench_loss's compile
    rows would then time eager code).
    """
    monkeypatch.setenv(backends.BACKEND_ENV, "compile")
    backends._reset_backend()
    try:
        logits, labels = batch("sigmoid_focal", seed=12)
        assert_matches_reference("sigmoid_focal", logits, labels, gamma=2.0)
        assert backends._kernels and backends.backend("cpu") == "compile"
    finally:
        backends._reset_backend()


def test_default_backend_is_eager_on_the_cpu_and_logged_once(monkeypatch, caplog, paths):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    caplog.set_level(logging.INFO, logger=backends.__name__)
    logits, labels = batch("sigmoid_focal", seed=12)
    assert_matches_reference("sigmoid_focal", logits, labels, gamma=2.0)
    assert_matches_reference("sigmoid_focal", logits, labels, gamma=1.0)
    assert backends.backend("cpu") == "eager"
    assert compiled == [] and paths["eager"] and not paths["triton"]
    messages = [r.getMessage() for r in caplog.records if r.name == backends.__name__]
    assert len(messages) == 1 and "on cpu: eager" in messages[0] and "default" in messages[0]


def test_default_backend_on_cuda_is_triton_where_it_imports(monkeypatch):
    assert backends.select_backend("cuda")[0] == "triton"
    # chosen on first use for the tensors' device type
    assert backends.backend("cuda") == "triton" and backends.backend("cpu") == "eager"
    monkeypatch.setattr(backends, "_triton_missing", lambda: "Triton does not import (test)")
    backend, why = backends.select_backend("cuda")
    assert backend == "eager" and "Triton does not import" in why


def test_backend_env_eager_takes_the_eager_path(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "eager")
    assert backends.select_backend("cuda") == ("eager", "FOCAL_DET2_BACKEND=eager")


def test_backend_env_value_is_read_without_surrounding_whitespace(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, " eager\n")
    assert backends.select_backend("cpu") == ("eager", "FOCAL_DET2_BACKEND=eager")


def test_compile_backend_compiles_each_kernel_once(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "compile")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn, kw)) or fn)

    def kernel(x):
        return x + 1

    first = backends.compiled(kernel, "cpu")
    assert backends.compiled(kernel, "cpu") is first and compiled == [(kernel, {"dynamic": True})]
    assert first(1) == 2


def test_compile_falls_back_to_eager_per_device_type(monkeypatch):
    """A kernel that fails to compile for one device type stays compiled for another."""
    monkeypatch.setenv(backends.BACKEND_ENV, "compile")
    monkeypatch.setattr(backends, "select_backend", lambda device_type: ("compile", "test"))
    calls = []

    def compile_failing_first(fn, **kwargs):  # the first compiled kernel fails, the next works
        calls.append(fn)
        if len(calls) == 1:

            def failing(x):
                raise RuntimeError("no compiler (test)")

            return failing
        return lambda x: fn(x) * 10  # "compiled": tells itself apart from eager

    monkeypatch.setattr(torch, "compile", compile_failing_first)

    def kernel(x):
        return x + 1

    on_cpu, on_cuda = backends.compiled(kernel, "cpu"), backends.compiled(kernel, "cuda")
    with logged(backends.logger) as warnings:
        assert on_cpu(1) == 2  # failed: eager, from now on
        assert on_cuda(1) == 20 and on_cpu(1) == 2
    assert backends.backend("cpu") == "eager" and backends.backend("cuda") == "compile"
    assert [w.getMessage() for w in warnings] == [
        "focal_det2 fused losses on cpu: torch.compile failed (no compiler (test)); "
        "using eager kernels."
    ]


def test_float64_logits_under_triton_take_the_eager_kernels_uncompiled(monkeypatch):
    """The triton backend runs float64 logits through the chunk kernels themselves, not torch.compile."""
    use_triton(monkeypatch)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    logits, labels = batch("sigmoid_focal", seed=12)
    assert_matches_reference("sigmoid_focal", logits.double(), labels, gamma=2.0)
    assert backends.backend("cpu") == "triton" and compiled == []


def test_backend_env_triton_runs_the_kernels(monkeypatch):
    use_triton(monkeypatch)
    from focal_det2.losses import triton_kernels

    launched = []
    real = triton_kernels._sigmoid_launch
    monkeypatch.setattr(
        triton_kernels, "_sigmoid_launch", lambda *a, **k: launched.append(1) or real(*a, **k)
    )
    logits, labels = batch("sigmoid_focal", seed=12)
    assert_matches_reference("sigmoid_focal", logits, labels, gamma=2.0)
    assert backends.backend("cpu") == "triton" and len(launched) == 2  # forward and backward


@pytest.mark.parametrize("interpret", ["0", "", None], ids=["0", "empty", "unset"])
def test_backend_env_triton_on_the_cpu_without_the_interpreter_raises(monkeypatch, interpret):
    monkeypatch.setenv(backends.BACKEND_ENV, "triton")
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(
        ValueError,
        match="FOCAL_DET2_BACKEND=triton: Triton kernels run on CUDA tensors, these are on cpu",
    ):
        backends.select_backend("cpu")


@pytest.mark.parametrize("device_type", ["mps", "xpu", "cpu"])
def test_default_backend_elsewhere_than_cuda_is_eager_even_where_triton_imports(
    monkeypatch, device_type
):
    monkeypatch.setattr(backends, "_triton_missing", lambda: None)
    backend, why = backends.select_backend(device_type)
    assert backend == "eager" and f"the default on {device_type}" in why


def test_backend_env_triton_under_the_interpreter_without_triton_raises(monkeypatch):
    """On CPU tensors under TRITON_INTERPRET=1, a Triton that does not import is named too."""
    monkeypatch.setenv(backends.BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_triton_missing", lambda: "Triton does not import (test)")
    with pytest.raises(ValueError, match="FOCAL_DET2_BACKEND=triton: Triton does not import"):
        backends.select_backend("cpu")


def test_backend_env_compile_without_torch_compile_raises(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "compile")
    monkeypatch.delattr(torch, "compile")
    with pytest.raises(
        ValueError, match=r"FOCAL_DET2_BACKEND=compile: this torch \(.*\) has no torch.compile"
    ):
        backends.select_backend("cpu")


@pytest.mark.parametrize("device_type", ["mps", "xpu"])
def test_backend_env_triton_on_other_devices_raises(monkeypatch, device_type):
    """Refused even where the interpreter runs CPU tensors."""
    monkeypatch.setenv(backends.BACKEND_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_triton_missing", lambda: None)
    with pytest.raises(
        ValueError, match=f"run on CUDA tensors, these are on {device_type} .*CPU tensors only"
    ):
        backends.select_backend(device_type)


def test_backend_env_triton_without_triton_raises(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "triton")
    monkeypatch.setattr(backends, "_triton_missing", lambda: "Triton does not import (test)")
    with pytest.raises(ValueError, match="FOCAL_DET2_BACKEND=triton: Triton does not import"):
        backends.select_backend("cuda")


def test_backend_env_compile_compiles_the_chunk_kernels(monkeypatch, caplog):
    # torch.compile is replaced by a recorder, so the test checks the wiring without compiling.
    monkeypatch.setenv(backends.BACKEND_ENV, "compile")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn.__name__) or fn)
    caplog.set_level(logging.INFO, logger=backends.__name__)
    for name in ["sigmoid_focal", "softmax_focal"]:
        logits, labels = batch(name, seed=13)
        assert_matches_reference(name, logits, labels, **kwargs_of(name))
    assert backends.backend("cpu") == "compile"
    assert sorted(compiled) == ["_sigmoid_chunk", "_softmax_chunk"]
    messages = [r.getMessage() for r in caplog.records if r.name == backends.__name__]
    assert len(messages) == 1 and "compile" in messages[0]


def test_failed_compilation_falls_back_to_eager(monkeypatch, caplog):
    monkeypatch.setenv(backends.BACKEND_ENV, "compile")

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    logits, labels = batch("sigmoid_focal", seed=14)
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        assert_matches_reference("sigmoid_focal", logits, labels, gamma=2.0)
    assert backends.backend("cpu") == "eager"
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)


def test_unknown_backend_env_value_raises(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "cuda")
    with pytest.raises(
        ValueError, match="FOCAL_DET2_BACKEND='cuda': allowed values are eager, triton, compile"
    ):
        backends.select_backend()


@pytest.mark.parametrize("value", ["1", "0", ""])
def test_former_compile_env_raises_naming_its_replacement(monkeypatch, value):
    """Set at all (even empty), FOCAL_DET2_COMPILE is refused: it is no longer read."""
    monkeypatch.setenv("FOCAL_DET2_COMPILE", value)
    with pytest.raises(ValueError, match="FOCAL_DET2_BACKEND=compile"):
        backends.select_backend()


# ----------------------------------------------------------------------------- log1p without log1p


@pytest.mark.parametrize("slow_log1p", [False, True], ids=["log1p", "log1p from log"])
@pytest.mark.parametrize(
    "name, smoothing",
    [("sigmoid_focal", 0.0), ("cross_entropy", 0.0), ("focal_star", 0.0)]
    + [("sigmoid_focal", 0.1), ("cross_entropy", 0.1)],
)
def test_both_log1p_formulas_match_the_reference_in_every_chunking(
    name, smoothing, slow_log1p, monkeypatch
):
    """
    The sigmoid losses on the eager path with ATen's ``log1p`` and with the one taken from
    ``log`` (AVX-512 CPUs), whichever this machine dispatches: the chunk kernels pass their
    scratch buffers to it (one chunk, fresh scratch in many chunks, scratch in the gradient),
    and label smoothing takes it on its own path.
    """
    monkeypatch.setattr(fused, "_slow_log1p", lambda device: slow_log1p)
    logits, labels = batch(name, seed=3)
    kwargs = kwargs_of(name, class_alpha=torch.linspace(0.1, 0.9, NUM_CLASSES))
    if smoothing:
        kwargs["label_smoothing"] = smoothing
    ref_kwargs = dict(kwargs, class_alpha=kwargs["class_alpha"].to(F64))
    ref_value, ref_grad = value_and_grad(REFERENCE[name], logits.to(F64), labels, **ref_kwargs)
    # the smoothed terms lose a few bits where a soft target's two terms nearly cancel
    atol = (1e-6 if smoothing else 1e-12) * ref_grad.abs().max().item()
    for chunking in EAGER_CHUNKS:
        set_eager_chunks(monkeypatch, chunking)
        value, grad = value_and_grad(FAST[name], logits, labels, **kwargs)
        torch.testing.assert_close(value.to(F64), ref_value, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad.to(F64), ref_grad, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("slow_log1p", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log1p_of_exp_neg_abs_is_exact_to_rounding_either_way(slow_log1p, dtype, monkeypatch):
    # AVX-512 CPUs take log(1 + t) from log (ATen's log1p costs 10x there): the correction
    # must keep full precision where 1 + t rounds to 1 (|z| > 17 in float32, > 37 in float64).
    monkeypatch.setattr(fused, "_slow_log1p", lambda device: slow_log1p)
    limit = 87.0 if dtype == torch.float32 else 120.0  # exp(-|z|) stays a normal number
    z = torch.cat(
        [
            torch.linspace(-limit, limit, 20001, dtype=F64),
            torch.tensor([0.0, 1e-30, -1e-30], dtype=F64),
        ]
    )
    z = z.to(dtype)
    got = fused._log1p_exp_neg_abs(z, out=None, tmp=None)
    t = torch.exp(-z.to(F64).abs())
    want = torch.log1p(t)
    # exp(-|z|) is taken as exp2(-|z| log2(e)), whose rounded argument costs |z| log2(e) eps relative.
    eps = torch.finfo(dtype).eps
    error = (got.to(F64) - want).abs() / (want * eps * (2 + z.to(F64).abs() * 1.4427))
    assert error.max() <= 1, f"{error.max():.2f}x the allowed rounding at z = {z[error.argmax()]}"


@pytest.mark.parametrize("slow_log1p", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_softplus_is_exact_to_rounding_either_way(slow_log1p, dtype, monkeypatch):
    # OHEM's per-anchor losses: max(x, 0) + log(1 + e^-|x|) with the log1p of either dispatch,
    # against float64 log1p(exp(x)) (ATen's softplus returns x above 20, dropping e^-x).
    monkeypatch.setattr(fused, "_slow_log1p", lambda device: slow_log1p)
    limit = 87.0 if dtype == torch.float32 else 120.0  # exp(-|x|) stays a normal number
    x = torch.linspace(-limit, limit, 4001, dtype=F64)
    want = torch.log1p(torch.exp(x))
    got = fused.softplus(x.to(dtype)).to(F64)
    # as above: exp2's rounded argument costs |x| log2(e) eps relative
    error = (got - want).abs() / (want * torch.finfo(dtype).eps * (2 + x.abs() * 1.4427))
    assert error.max() <= 1, f"{error.max():.2f}x the allowed rounding at x = {x[error.argmax()]}"
