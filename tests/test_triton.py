"""
The Triton kernels of the fused losses (``focal_det2.losses.triton_kernels``)
on what only they take: float16 and bfloat16 logits (float32 math, the
gradient in the logits' dtype, the loss in float32), bitwise-repeatable
results, and, on a GPU, the memory of a forward + backward. Run on CPU
tensors through Triton's interpreter (TRITON_INTERPRET=1, set by conftest
without CUDA) and on CUDA tensors where there is a GPU. Equality with the
reference formulas in float32 is covered by ``test_fused.py``'s "triton"
variants.
"""

import math

import pytest
import torch
import triton
import triton.language as tl
from test_fused import FAST, LOSSES, NUM_CLASSES, REFERENCE, batch, kwargs_of
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from focal_det2.losses import backends, triton_kernels

F64 = torch.float64
# Relative rounding of one value of each dtype: the gradient is stored in it.
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SMALLEST_NORMAL = {torch.float32: 1.2e-38, torch.float16: 6.1e-5, torch.bfloat16: 1.2e-38}


@pytest.fixture(params=["cpu", "cuda"])
def device(request, monkeypatch):
    """The Triton backend on CPU tensors (interpreter) or CUDA tensors."""
    if request.param == "cpu" and not backends._triton_interpreting():
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("FOCAL_DET2_COMPILE", raising=False)
    monkeypatch.setenv(backends.BACKEND_ENV, "triton")
    backends._reset_backend()
    yield request.param
    backends._reset_backend()


def run(name, logits, labels, device, **kwargs):
    """Loss and gradient of the fast path on ``device``, back on the CPU."""
    x = logits.to(device).requires_grad_(True)
    value = FAST[name](x, labels.to(device), **kwargs)
    (grad,) = torch.autograd.grad(value, x)
    assert backends.backend(x.device.type) == "triton"
    return value.detach().cpu(), grad.cpu()


def reference(name, logits, labels, **kwargs):
    """The reference formula in float64 on the same (rounded) logits."""
    x = logits.to(F64).requires_grad_(True)
    value = REFERENCE[name](x, labels, **kwargs)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("class_alpha", [False, True])
def test_each_dtype_matches_the_reference_on_the_same_inputs(
    name, gamma, dtype, class_alpha, device
):
    if name == "focal_star" and gamma == 0:
        pytest.skip("FL* divides by gamma")
    logits, labels = batch(name, num_anchors=500, seed=20)
    logits = logits.to(dtype)
    ca = torch.linspace(0.1, 0.9, NUM_CLASSES) if class_alpha else None
    kwargs = kwargs_of(name, gamma=gamma, class_alpha=ca)
    value, grad = run(name, logits, labels, device, **kwargs)
    ref_kwargs = dict(kwargs, class_alpha=None if ca is None else ca.to(F64))
    ref_value, ref_grad = reference(name, logits, labels, **ref_kwargs)
    # The loss is float32 (a float16 sum over anchors overflows), computed in float32.
    assert value.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(value.to(F64), ref_value, rtol=1e-5, atol=0)
    # The gradient: float32 math, then one rounding to the logits' dtype (float16 also underflows).
    atol = SMALLEST_NORMAL[dtype] + 1e-6 * ref_grad.abs().max().item()
    torch.testing.assert_close(grad.to(F64), ref_grad, rtol=2 * EPS[dtype] + 1e-6, atol=atol)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_are_bitwise_repeatable(name, dtype, device):
    logits, labels = batch(name, num_anchors=3000, seed=21)
    first = run(name, logits.to(dtype), labels, device, **kwargs_of(name))
    for _ in range(3):
        again = run(name, logits.to(dtype), labels, device, **kwargs_of(name))
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("name", ["sigmoid_focal", "softmax_focal"])
def test_gamma_zero_is_finite_for_extreme_logits(name, device):
    # The schedule starts at gamma = 0: no 0 * inf in the gradient, even at +-100 and in bfloat16.
    cols = NUM_CLASSES + 1 if name == "softmax_focal" else NUM_CLASSES
    logits = torch.tensor([[100.0, -100.0] * cols])[:, :cols].repeat(NUM_CLASSES + 2, 1)
    labels = torch.arange(NUM_CLASSES + 2) - 1
    for dtype in (torch.float32, torch.bfloat16):
        value, grad = run(name, logits.to(dtype), labels, device, **kwargs_of(name, gamma=0.0))
        assert torch.isfinite(value) and torch.all(torch.isfinite(grad.float()))
        ref_value, ref_grad = reference(
            name, logits.to(dtype), labels, **kwargs_of(name, gamma=0.0)
        )
        torch.testing.assert_close(value.to(F64), ref_value, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad.to(F64), ref_grad, rtol=1e-2, atol=1e-30)


def test_softmax_gamma_zero_is_finite_where_p_t_rounds_to_1(device):
    # One logit at +100, the others at -100, labelled with its column: log(1 - p_t) is -inf in
    # float32, and at gamma 0 the modulator must be 1, not exp(0 * -inf).
    cols = NUM_CLASSES + 1
    logits = torch.full((2, cols), -100.0)
    logits[:, 0] = 100.0
    logits[1, -1] = 100.0
    labels = torch.tensor([0, NUM_CLASSES])
    kwargs = kwargs_of("softmax_focal", gamma=0.0)
    value, grad = run("softmax_focal", logits, labels, device, **kwargs)
    ref_value, ref_grad = reference("softmax_focal", logits, labels, **kwargs)
    assert torch.isfinite(value) and torch.all(torch.isfinite(grad))
    torch.testing.assert_close(value.to(F64), ref_value, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.to(F64), ref_grad, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_empty_half_precision_batch_gives_a_float32_zero(name, dtype, device):
    # As for a non-empty batch: the loss in float32, the (empty) gradient in the logits' dtype.
    cols = NUM_CLASSES + 1 if name == "softmax_focal" else NUM_CLASSES
    logits = torch.zeros(0, cols, dtype=dtype)
    value, grad = run(name, logits, torch.zeros(0, dtype=torch.long), device, **kwargs_of(name))
    assert value.dtype == torch.float32 and value.item() == 0.0
    assert grad.dtype == dtype and grad.shape == (0, cols)


@triton.jit
def _log1p_unit_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a = tl.load(a_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, triton_kernels._log1p_unit(a), mask=mask)


def test_log1p_polynomial_is_float32_accurate_on_0_1(device):
    # The kernels' log(1 + a) for a = e^-|z| in [0, 1]: within 2 float32 spacings of log1p
    # (the polynomial's truncation is 5.3e-9 relative, a tenth of a spacing), relative down to
    # a = 1e-37. A coefficient off by 1e-7 fails. In the interpreter (no fused multiply-adds)
    # it is exact at a = 1, where the truncation is largest: the background's CE at logit 0
    # is log 2 rounded once; a GPU's FMAs round differently, so CUDA is held to the bound.
    a = torch.cat([torch.linspace(0, 1, 20001), torch.logspace(-37, -1, 721)]).to(device)
    out = torch.empty_like(a)
    _log1p_unit_kernel[(triton.cdiv(a.numel(), 1024),)](a, out, a.numel(), BLOCK=1024)
    a, out = a.cpu(), out.cpu()
    ref = torch.log1p(a.to(F64))
    spacing = torch.nextafter(ref.float(), torch.tensor(math.inf)) - ref.float()
    error = (out.to(F64) - ref).abs() / spacing.to(F64)
    assert error.max().item() <= 2.0, (
        f"{error.max().item():.2f} spacings at a = {a[error.argmax()]}"
    )
    assert out[a == 0].item() == 0.0
    if device == "cpu":
        assert out[a == 1].item() == torch.tensor(math.log(2)).item()


def test_launch_sizes_match_tritons_own_arithmetic(monkeypatch):
    """
    The launchers' plain integer arithmetic (triton.cdiv and next_power_of_2 cost microseconds a
    call) against Triton's: a softmax block of next_pow2(C) columns (C itself where C is a power
    of 2), SOFTMAX_ELEMENTS in all (SOFTMAX_SMOOTH_ELEMENTS with label smoothing), at least one
    row and at most one a thread (32 a warp), and enough programs to cover every element or row.
    """
    monkeypatch.setattr(triton_kernels, "SIGMOID_BLOCK", 64)
    monkeypatch.setattr(triton_kernels, "SOFTMAX_ELEMENTS", 2048)
    monkeypatch.setattr(triton_kernels, "SOFTMAX_SMOOTH_ELEMENTS", 512)
    monkeypatch.setattr(triton_kernels, "SOFTMAX_WARPS", 2)
    for c in [1, 2, 3, 7, 8, 9, 16, 17, 64, 80, 81, 127, 128, 129, 300, 3000]:
        block_c = triton.next_power_of_2(c)
        rows = {False: max(1, min(64, 2048 // block_c)), True: max(1, min(64, 512 // block_c))}
        for smooth in (False, True):
            assert triton_kernels._softmax_block(c, smooth) == (rows[smooth], block_c)
        for n in [1, 5, 63, 64, 65, 1000]:
            logits = torch.empty(n, c, device="meta")
            assert triton_kernels._num_programs(triton_kernels._sigmoid_launch, logits, ()) == (
                triton.cdiv(n * c, 64)
            )
            for smoothing in (0.0, 0.1):
                params = (2.0, None, smoothing)
                assert triton_kernels._num_programs(
                    triton_kernels._softmax_launch, logits, params
                ) == triton.cdiv(n, rows[smoothing > 0])
    assert triton_kernels._softmax_block(16)[0] == 64  # 128 rows of 16 would be two a thread
    assert triton_kernels._softmax_block(3000, True)[0] == 1


def test_gamma_is_a_runtime_argument_of_the_kernels():
    """
    A schedule changes gamma every iteration: as a tl.constexpr it would recompile each time.
    FL*'s gamma reaches the sigmoid kernel as scale, shift and factor; alpha and label
    smoothing are runtime values too. Only shapes, block sizes and switches are constexpr.
    """
    import inspect

    runtime = {
        triton_kernels._sigmoid_kernel: {
            "gamma", "scale", "shift", "factor", "pos_weight", "neg_weight", "delta"
        },
        triton_kernels._softmax_kernel: {"gamma", "smoothing"},
    }  # fmt: skip
    for kernel, names in runtime.items():
        params = inspect.signature(kernel.fn).parameters
        for name in names:
            assert params[name].annotation is inspect.Parameter.empty, name
        assert "constexpr" in str(params["GRAD"].annotation)


@pytest.mark.parametrize("name", ["sigmoid_focal", "softmax_focal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_gradient_is_written_in_the_logits_dtype(name, dtype, device, monkeypatch):
    """The buffer the kernels write the gradient into is half precision (half the memory)."""
    written = []
    for launch in ("_sigmoid_launch", "_softmax_launch"):
        real = getattr(triton_kernels, launch)

        def recorded(logits, labels, out, grad_loss, params, grad, real=real):
            if grad:
                written.append(out.dtype)
            return real(logits, labels, out, grad_loss, params, grad)

        monkeypatch.setattr(triton_kernels, launch, recorded)
    logits, labels = batch(name, num_anchors=50, seed=24)
    run(name, logits.to(dtype), labels, device, **kwargs_of(name))
    assert written == [dtype]


class _RecordedOps(TorchDispatchMode):
    """The names of the aten ops run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", LOSSES)
def test_a_call_runs_no_small_ops_beside_its_kernels(name, device, monkeypatch):
    """
    Beside its two kernel launches (run, not recorded), a forward + backward allocates the
    partial sums and the gradient and adds the partial sums; autograd adds the incoming
    gradient (ones) and detaches. On a GPU every other op is a small kernel launched before
    the loss's own: softmax_focal built its (K + 2,) weight table with six on every call.
    """
    for launch in ("_sigmoid_launch", "_softmax_launch"):
        real = getattr(triton_kernels, launch)

        def unrecorded(*args, real=real, **kwargs):
            with _disable_current_modes():
                return real(*args, **kwargs)

        monkeypatch.setattr(triton_kernels, launch, unrecorded)
    logits, labels = batch(name, num_anchors=50, seed=25)
    x, labels = logits.to(device).requires_grad_(True), labels.to(device)
    FAST[name](x, labels, **kwargs_of(name)).backward()  # builds what is cached
    x.grad = None
    with _RecordedOps() as ops:
        FAST[name](x, labels, **kwargs_of(name)).backward()
    assert "sum" in ops.names and "empty_like" in ops.names
    assert set(ops.names) <= {"empty", "sum", "ones_like", "empty_like", "detach"}, ops.names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_backward_allocates_only_the_gradient(name, dtype, device):
    g = torch.Generator().manual_seed(23)
    cols = 81 if name == "softmax_focal" else 80
    logits = (torch.randn(100_000, cols, generator=g) * 2 - 4).to(dtype).cuda().requires_grad_(True)
    labels = torch.full((100_000,), 80).cuda()
    labels[::100] = 3
    FAST[name](logits, labels, **kwargs_of(name)).backward()  # compile, warm the allocator
    logits.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    FAST[name](logits, labels, **kwargs_of(name)).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    size = logits.numel() * logits.element_size()
    assert extra <= 1.05 * size, f"extra {extra / size:.3f}x logits"
