"""Compile the prefill kernels for Hopper (sm_90) without a GPU, with the launch settings the op uses.

The Triton interpreter runs kernels as Python, so it cannot see errors that only the compiler raises (a
loop-carried variable changing type, an unsupported construct); this catches them on a CPU machine.
Run by tests/test_kernels_compile.py in a subprocess without TRITON_INTERPRET. Prints one line a kernel.
"""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moba_cli.ops.moba import triton_moba as tm

TARGET = GPUTarget("cuda", 90, 32)
P32, I32 = "*fp32", "*i32"


def compile_kernel(fn, types: dict[str, str], consts: dict, **options) -> None:
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=TARGET, options=options)
    print(f"{fn.__name__} {consts} ok, shared memory {kernel.metadata.shared} bytes", flush=True)


def main() -> None:
    for dtype, d, chunk in ((torch.bfloat16, 128, 4096), (torch.bfloat16, 128, 128), (torch.float16, 64, 512)):
        t = "*bf16" if dtype == torch.bfloat16 else "*fp16"
        common = {"PAIR_T": I32, "GROUP_OFF": I32, "GROUP_CNT": I32, "BS": I32, "BE": I32, "qk_scale": "fp32"}
        compile_kernel(
            tm._gate_kernel, {"Q": t, "KM": P32, "TB": I32, "FB": I32, "OUT": I32},
            {"G": 4, "NPAST": 11, "D": d, "BLOCK_M": 64, "BLOCK_N": 16, "PREC": "tf32x3",
             "SPLIT": dtype == torch.bfloat16}, num_warps=4,
        )
        f, b = tm._fwd_config(d, dtype, chunk), tm._bwd_config(d, dtype)
        for even in (True, False):
            compile_kernel(
                tm._fwd_kernel,
                {"Q": t, "K": t, "V": t, "ACC": P32, "M": P32, "L": P32, "TILE_GROUP": I32, "TILE_OFF": I32, **common},
                {"H": 8, "G": 4, "D": d, "FIRST": not even, "EVEN": even, "BLOCK_M": f["BLOCK_M"],
                 "BLOCK_N": f["BLOCK_N"], "PREC": "tf32"}, num_warps=f["num_warps"], num_stages=f["num_stages"],
            )
            compile_kernel(
                tm._bwd_dq_kernel,
                {"Q": t, "K": t, "V": t, "DO": t, "LSE": P32, "DELTA": P32, "DQ": P32, "TILE_GROUP": I32,
                 "TILE_OFF": I32, "sm_scale": "fp32", **common},
                {"H": 8, "G": 4, "D": d, "FIRST": even, "EVEN": even, "BLOCK_M": b["BLOCK_M"], "BLOCK_N": b["BLOCK_N"],
                 "PREC": "tf32"}, num_warps=b["num_warps"], num_stages=b["num_stages"],
            )
            compile_kernel(
                tm._bwd_dkdv_kernel,
                {"Q": t, "K": t, "V": t, "DO": t, "LSE": P32, "DELTA": P32, "DK": t, "DV": t, "sm_scale": "fp32",
                 **common},
                {"H": 8, "G": 4, "D": d, "EVEN": even, "BLOCK_M": b["BLOCK_M"], "BLOCK_N": b["BLOCK_N"],
                 "PREC": "tf32"}, num_warps=b["num_warps"], num_stages=b["num_stages"],
            )
    compile_kernel(tm._block_mean_kernel, {"K": "*bf16", "BS": I32, "BE": I32, "KM": P32}, {"D": 128, "BLOCK_T": 64})


if __name__ == "__main__":
    main()
