"""
Launch sweep of the Triton loss kernels on the GPU. For each launch configuration of each kernel
family, the forward + backward of ``ours_sigmoid_focal`` (the sigmoid kernel: ``SIGMOID_BLOCK``
elements and ``SIGMOID_WARPS`` warps per program) and ``ours_softmax_focal`` (the softmax
kernel: ``SOFTMAX_ELEMENTS`` elements, so ``SOFTMAX_ELEMENTS / 128`` rows of 81 logits, at most
32 a warp, and ``SOFTMAX_WARPS`` warps per program) at N anchors x K = 80, on the inputs of
``bench_loss.py`` and timed as ``bench_loss.py --device cuda`` times them: the median of
per-call CUDA events from an idle GPU, and the mean of calls back to back. The configuration in
``focal_det2/losses/triton_kernels.py`` is marked ``*``. Each configuration's loss and gradient
are checked against the committed configuration's (the sum's order changes with the blocks, so
within a few roundings of the dtype).

Usage::

    python benchmarks/bench_launch.py              # N = 2M, float32 and bfloat16, ~2 min on an H200
    python benchmarks/bench_launch.py --report benchmarks/results/bench_launch_cuda.json
"""

import argparse
import json
import os
import time
from pathlib import Path

import bench_loss
from common import REPO, machine_info

# family: (implementation timed, module constants of its launch, the values swept for each)
SWEEPS = {
    "sigmoid": (
        "ours_sigmoid_focal",
        ("SIGMOID_BLOCK", "SIGMOID_WARPS"),
        [(block, warps) for block in (1024, 2048, 4096, 8192) for warps in (4, 8, 16)],
    ),
    "softmax": (
        "ours_softmax_focal",
        ("SOFTMAX_ELEMENTS", "SOFTMAX_WARPS"),
        # rows of 128 (K = 80): 4 to 32 with one warp, then one row a thread on 2 and 4 warps
        [(elements, 1) for elements in (512, 1024, 2048, 4096)] + [(8192, 2), (16384, 4)],
    ),
}
# Largest relative difference allowed between two configurations' loss and gradient, in
# roundings of the logits' dtype (the gradient is stored in it; the loss is a float32 sum in
# another order).
ROUNDINGS = 8
EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def _loss_and_grad(name, logits, labels):
    import torch

    value = bench_loss._loss_fn(name, labels)(logits)
    (grad,) = torch.autograd.grad(value, logits)
    return value.detach().float(), grad.float()


def disagreement(value, grad, ref_value, ref_grad) -> float:
    """The larger relative difference of the loss and of the gradient (max norm) from the reference's."""
    loss_diff = float((value - ref_value).abs() / ref_value.abs().clamp_min(1e-30))
    grad_diff = float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30))
    return max(loss_diff, grad_diff)


def sweep_family(family: str, n: int, dtype_name: str, repeats: int, warmup: int) -> list:
    """Every configuration of ``family`` at N anchors in ``dtype_name``, the committed one first."""
    import torch

    from focal_det2.losses import backends, triton_kernels

    name, keys, grid = SWEEPS[family]
    committed = tuple(getattr(triton_kernels, key) for key in keys)
    os.environ[backends.BACKEND_ENV] = "triton"  # no silent fallback to another backend
    backends._reset_backend()
    logits, labels = bench_loss._make_inputs(
        n, name == "ours_softmax_focal", getattr(torch, dtype_name), "cuda"
    )
    fwd, fwd_bwd = bench_loss._calls(name, logits, labels)
    ref = _loss_and_grad(name, logits, labels)
    results = []
    try:
        for values in [committed] + [v for v in grid if v != committed]:
            for key, value in zip(keys, values):
                setattr(triton_kernels, key, value)
            r = {"family": family, "N": n, "dtype": dtype_name, **dict(zip(keys, values))}
            r["committed"] = values == committed
            r["disagreement"] = disagreement(*_loss_and_grad(name, logits, labels), *ref)
            if r["disagreement"] > ROUNDINGS * EPS[dtype_name]:
                raise RuntimeError(
                    f"{family} {dict(zip(keys, values))} {dtype_name}: loss or gradient differs from the "
                    f"committed configuration's by {r['disagreement']:.3g} (relative)"
                )
            for _ in range(warmup):
                fwd_bwd()
            r["fwd_bwd_ms"] = bench_loss._cuda_median_ms(fwd_bwd, repeats)
            r["fwd_bwd_stream_ms"] = bench_loss._cuda_stream_ms(fwd_bwd, repeats)
            results.append(r)
    finally:
        for key, value in zip(keys, committed):
            setattr(triton_kernels, key, value)
        torch.cuda.empty_cache()
    return results


def table(results) -> str:
    """One markdown table per (family, N, dtype): each configuration, fastest back to back first."""
    blocks = []
    for family, n, dtype in sorted({(r["family"], r["N"], r["dtype"]) for r in results}):
        rows = [r for r in results if (r["family"], r["N"], r["dtype"]) == (family, n, dtype)]
        keys = SWEEPS[family][1]
        lines = [
            f"{family}, N = {n}, {dtype} (* committed)",
            "",
            f"| {' | '.join(keys)} | fwd+bwd ms | back to back ms |",
            "| " + " | ".join("---:" for _ in keys) + " | ---: | ---: |",
        ]
        for r in sorted(rows, key=lambda r: r["fwd_bwd_stream_ms"]):
            mark = "*" if r["committed"] else ""
            cells = " | ".join(f"{r[key]}{mark}" for key in keys)
            lines.append(f"| {cells} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_stream_ms']:.3f} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000000", help="comma-separated N")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help=f"comma-separated, of {', '.join(EPS)}"
    )
    parser.add_argument(
        "--families", default="sigmoid,softmax", help=f"comma-separated, of {', '.join(SWEEPS)}"
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "bench_launch_cuda.json")
    )
    parser.add_argument("--report", metavar="JSON", help="reprint a saved run's tables and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(table(json.loads(Path(args.report).read_text())["results"]))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes, families = args.dtypes.split(","), args.families.split(",")
    for option, given, allowed in (("--dtypes", dtypes, EPS), ("--families", families, SWEEPS)):
        unknown = [v for v in given if v not in allowed]
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_launch.py: no CUDA device; the launch sweep times the Triton kernels on one"
        )
    import triton

    out, info, results = Path(args.out), machine_info(), []
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for family in families:
        for dtype in dtypes:
            for n in sizes:
                results += sweep_family(family, n, dtype, args.repeats, args.warmup)
                config = {
                    "K": bench_loss.NUM_CLASSES,
                    "repeats": args.repeats,
                    "triton": triton.__version__,
                }
                out.write_text(
                    json.dumps({"machine": info, "config": config, "results": results}, indent=1)
                )
                print(f"[{time.time() - started:5.0f}s] {family} {dtype} N={n} swept", flush=True)
    print(table(results))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
