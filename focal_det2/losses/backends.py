"""
Which implementation of the fused losses runs, per device type: ``eager``
(the chunked torch ops of :mod:`.fused`), ``triton`` (the kernels of
:mod:`.triton_kernels`) or ``compile`` (the chunked ops through
``torch.compile``). Chosen on first use from ``FOCAL_DET2_BACKEND`` or the
device, and logged once per device type.
"""

import logging
import os
from typing import Callable, Optional, Tuple

import torch

__all__ = ["BACKEND_ENV", "BACKENDS", "backend", "compiled", "select_backend"]

logger = logging.getLogger(__name__)

BACKEND_ENV = "FOCAL_DET2_BACKEND"
BACKENDS = ("eager", "triton", "compile")

_backends = {}  # device type -> chosen backend
_kernels = {}


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def _triton_missing() -> Optional[str]:
    """None if Triton imports, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton does not import ({e})"
    return None


def select_backend(device_type: str = "cpu") -> Tuple[str, str]:
    """
    The backend of the fused losses on ``device_type`` and why.

    ``FOCAL_DET2_BACKEND`` forces one of ``eager`` (chunked torch ops),
    ``triton`` (one Triton kernel per loss family, for CUDA tensors; for CPU
    tensors only under ``TRITON_INTERPRET=1``) or ``compile`` (the eager
    chunk kernels through ``torch.compile``). Unset, CUDA tensors take
    ``triton`` where Triton imports and every other device ``eager``, the
    fastest measured on each (``benchmarks/bench_loss.py``).

    Raises:
        ValueError: an unknown value, the former ``FOCAL_DET2_COMPILE``, or a
            forced backend this device or installation cannot run.
    """
    if os.environ.get("FOCAL_DET2_COMPILE") is not None:
        raise ValueError(
            "FOCAL_DET2_COMPILE is no longer read: set FOCAL_DET2_BACKEND=compile (or eager, triton) instead."
        )
    flag = os.environ.get(BACKEND_ENV, "").strip()
    if not flag:
        if device_type == "cuda":
            missing = _triton_missing()
            if missing is None:
                return "triton", f"the default on cuda; {BACKEND_ENV}=eager|compile chooses another"
            return "eager", f"the default on cuda without Triton: {missing}"
        return (
            "eager",
            f"the default on {device_type}; {BACKEND_ENV}=compile compiles the chunk kernels",
        )
    if flag not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={flag!r}: allowed values are {', '.join(BACKENDS)}.")
    if flag == "compile" and not hasattr(torch, "compile"):
        raise ValueError(
            f"{BACKEND_ENV}=compile: this torch ({torch.__version__}) has no torch.compile."
        )
    if flag == "triton":
        missing = _triton_missing()
        if missing is not None:
            raise ValueError(f"{BACKEND_ENV}=triton: {missing}.")
        if device_type != "cuda" and not (device_type == "cpu" and _triton_interpreting()):
            raise ValueError(
                f"{BACKEND_ENV}=triton: Triton kernels run on CUDA tensors, these are on {device_type} "
                "(TRITON_INTERPRET=1 runs them on CPU tensors only, slowly, for tests)."
            )
    return flag, f"{BACKEND_ENV}={flag}"


def backend(device_type: str = "cpu") -> str:
    """
    Returns:
        str: ``"eager"``, ``"triton"`` or ``"compile"``, the implementation
        this process uses for tensors on ``device_type``. Chosen by
        :func:`select_backend` on first use and logged once per device type.
    """
    if device_type not in _backends:
        _backends[device_type], why = select_backend(device_type)
        logger.info(
            "focal_det2 fused losses on %s: %s kernels (%s).",
            device_type,
            _backends[device_type],
            why,
        )
    return _backends[device_type]


def _reset_backend():
    """Forget the chosen backends and compiled kernels (for tests)."""
    _backends.clear()
    _kernels.clear()


def compiled(fn: Callable, device_type: str) -> Callable:
    """``fn`` itself, or its ``torch.compile``d version under the compile backend of ``device_type``."""
    if backend(device_type) != "compile":
        return fn
    key = (fn, device_type)  # each device type falls back to eager on its own
    if key not in _kernels:
        _kernels[key] = _with_eager_fallback(torch.compile(fn, dynamic=True), fn, device_type)
    return _kernels[key]


def _with_eager_fallback(compiled: Callable, eager: Callable, device_type: str) -> Callable:
    def run(*args, **kwargs):
        if _backends.get(device_type) == "compile":
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # no compiler, unsupported op, ...: run eagerly from now on
                logger.warning(
                    "focal_det2 fused losses on %s: torch.compile failed (%s); using eager kernels.",
                    device_type,
                    e,
                )
                _backends[device_type] = "eager"
        return eager(*args, **kwargs)

    return run
