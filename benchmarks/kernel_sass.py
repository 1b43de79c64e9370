"""
Static cost of the Triton kernels on a GPU architecture, measured without a GPU: each
kernel of ``focal_det2/losses/triton_kernels.py`` (sigmoid and softmax family, forward
and backward, without and with label smoothing) is compiled for the target with the
launch constants it runs with and the specialisation a launch at K = 80 and N = 400k or
2M gets (16-byte aligned tensors, N and N * K divisible by 16), its machine code (SASS)
is disassembled by the ``nvdisasm`` that Triton ships, and its instructions are counted
per logit (instructions per thread x threads per program / logits per program) and by
opcode, with the registers a thread takes and the bytes it spills to local memory
(``cuobjdump``'s resource usage).

    python benchmarks/kernel_sass.py                        # sm_90 (H100, H200), K = 80
    python benchmarks/kernel_sass.py --arch 100 --out benchmarks/results/kernel_sass.json

The kernels are straight-line code (no loops), so the count is what each
thread issues. An instruction count is not a time: the GPU overlaps
instructions with memory traffic. It shows what a kernel change adds or
removes before a GPU times it (``bench_loss.py --device cuda``).
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

# Kernels compiled for a GPU, not run by Triton's interpreter (which conftest turns on without CUDA).
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import machine_info  # noqa: E402

from focal_det2.losses import triton_kernels as tk  # noqa: E402

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
CUOBJDUMP = os.path.join(os.path.dirname(NVDISASM), "cuobjdump")
# `/*0120*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;`: the opcode after an optional predicate.
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sigmoid_kernel(k: int, dtype: str, grad: bool, smooth: bool = False):
    """(kernel, signature, constexprs, threads, logits per program) of one sigmoid launch."""
    signature = {
        "x_ptr": f"*{dtype}",
        "labels_ptr": "*i64",
        "alpha_ptr": "*fp32",
        "out_ptr": f"*{dtype}" if grad else "*fp32",
        "grad_loss_ptr": "*fp32",
        "numel": "i32",
        **{name: "fp32" for name in ("gamma", "scale", "shift", "factor")},
        **{name: "fp32" for name in ("pos_weight", "neg_weight", "delta")},
    }
    constexprs = {
        "K": k,
        "BLOCK": tk.SIGMOID_BLOCK,
        "CLASS_ALPHA": False,
        "GRAD": grad,
        "SMOOTH": smooth,
    }
    return tk._sigmoid_kernel, signature, constexprs, 32 * tk.SIGMOID_WARPS, tk.SIGMOID_BLOCK


def softmax_kernel(k: int, dtype: str, grad: bool, smooth: bool = False):
    """(kernel, signature, constexprs, threads, logits per program) of one softmax launch (K + 1 logits a row)."""
    c = k + 1
    rows, block_c = tk._softmax_block(c, smooth)
    signature = {
        "x_ptr": f"*{dtype}",
        "labels_ptr": "*i64",
        "weight_ptr": "*fp32",
        "out_ptr": f"*{dtype}" if grad else "*fp32",
        "grad_loss_ptr": "*fp32",
        "num_rows": "i32",
        "gamma": "fp32",
        "smoothing": "fp32",
    }
    constexprs = {"C": c, "BLOCK_R": rows, "BLOCK_C": block_c, "GRAD": grad, "SMOOTH": smooth}
    return tk._softmax_kernel, signature, constexprs, 32 * tk.SOFTMAX_WARPS, rows * c


KERNELS = {"sigmoid": sigmoid_kernel, "softmax": softmax_kernel}


def resource_usage(cubin_path: str) -> dict:
    """
    Registers a thread and the bytes of stack a thread spills to (local memory), from
    ``cuobjdump --dump-resource-usage``: ``REG:175 STACK:0 SHARED:1024 LOCAL:0 ...``.
    """
    out = subprocess.run(
        [CUOBJDUMP, "--dump-resource-usage", cubin_path], capture_output=True, text=True, check=True
    ).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return {
        "registers": int(usage["REG"]),
        "stack_bytes": int(usage["STACK"]) + int(usage["LOCAL"]),
    }


def sass_opcodes(kernel, signature: dict, constexprs: dict, warps: int, arch: int):
    """
    The opcodes of the kernel's SASS for sm_<arch>, padding NOPs left out, and its
    :func:`resource_usage`.
    """
    names = list(signature) + list(constexprs)
    if names != list(kernel.arg_names):
        raise RuntimeError(
            f"{kernel.__name__} takes {list(kernel.arg_names)}; kernel_sass.py describes {names}: "
            "update its signature"
        )
    # What a launch specialises on: aligned pointers, integers divisible by 16.
    aligned = [i for i, name in enumerate(signature) if signature[name].startswith("*")]
    aligned += [i for i, name in enumerate(signature) if signature[name] == "i32"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}
    )
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run(
            [NVDISASM, "-c", path], capture_output=True, text=True, check=True
        ).stdout
        usage = resource_usage(path)
    opcodes = [m.group(1) for m in map(INSTRUCTION.match, sass.splitlines()) if m]
    return [op for op in opcodes if op != "NOP"], usage


def measure(family: str, k: int, dtype_name: str, grad: bool, arch: int, smooth=False) -> dict:
    """The kernel of ``family`` as it is launched, with label smoothing's terms if ``smooth``."""
    kernel, signature, constexprs, threads, logits = KERNELS[family](
        k, DTYPES[dtype_name], grad, smooth
    )
    opcodes, usage = sass_opcodes(kernel, signature, constexprs, threads // 32, arch)
    return {
        "kernel": f"{family} {'backward' if grad else 'forward'}"
        + (", label smoothing" if smooth else ""),
        "dtype": dtype_name,
        "instructions": len(opcodes),
        "per_logit": round(len(opcodes) * threads / logits, 2),
        **usage,
        "by_opcode": dict(collections.Counter(opcodes).most_common()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability x 10 (90: H100, H200)"
    )
    parser.add_argument("--k", type=int, default=80, help="K, the number of classes")
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"of {', '.join(DTYPES)}")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown or not dtypes:
        parser.error(f"--dtypes {args.dtypes!r}: allowed are {', '.join(DTYPES)}")
    results = [
        measure(family, args.k, dtype, grad, args.arch, smooth)
        for dtype in dtypes
        for smooth in (False, True)
        for family in KERNELS
        for grad in (False, True)
    ]
    print(f"SASS for sm_{args.arch}, K = {args.k}, triton {triton.__version__}")
    print(
        "| kernel | dtype | instructions a thread | per logit | MUFU | FFMA + FMUL + FADD "
        "| registers | stack bytes (spills) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        ops = r["by_opcode"]
        arithmetic = sum(ops.get(op, 0) for op in ("FFMA", "FMUL", "FADD"))
        print(
            f"| {r['kernel']} | {r['dtype']} | {r['instructions']} | {r['per_logit']:.1f} "
            f"| {ops.get('MUFU', 0)} | {arithmetic} | {r['registers']} | {r['stack_bytes']} |"
        )
    if args.out:
        config = {
            "arch": args.arch,
            "K": args.k,
            "triton": triton.__version__,
            "commit": machine_info()["commit"],
        }
        with open(args.out, "w") as f:
            json.dump({"config": config, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
