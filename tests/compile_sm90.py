"""Compile the prefill and decode kernels for Hopper (sm_90) without a GPU, with the launch settings the ops use.

The Triton interpreter runs kernels as Python, so it cannot see errors that only the compiler raises (a
loop-carried variable changing type, an unsupported construct); this catches them on a CPU machine.
Run by tests/test_kernels_compile.py in a subprocess without TRITON_INTERPRET. Prints one line a kernel.

Decode: the real launchers (``moba_decode_triton`` with the arguments ``moba_decode`` passes, and
``dense_decode_triton``) run on meta tensors with their kernels swapped for recorders, so the constexprs,
``num_warps``/``num_stages`` and Triton's own argument specialisation (ints equal to 1, divisibility by 16)
are exactly those of a launch on the H200; each distinct launch is then compiled. The attention forward and
the lean forward's counting sort (``SlotSchedule``) are recorded the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from moba_cli.ops.moba import bwd, fwd, gate, slot_schedule
from moba_cli.ops.moba import triton_decode as td
from moba_cli.ops.moba.options import KernelOptions

TARGET = GPUTarget("cuda", 90, 32)
H200_SMS = 132  # the decode launcher sizes its KV split from the SM count
# A block may use at most 227 KiB of shared memory on sm_90; more fails only at launch (OutOfResources).
SM90_MAX_SHARED = 232448
DECODE_KERNELS = ("_gate_tile_kernel", "_gate_merge_kernel", "_attn_kernel", "_combine_kernel")
P32, I32 = "*fp32", "*i32"


def compile_kernel(fn, types: dict[str, str], consts: dict, source=ASTSource, label: str | None = None,
                   **options) -> None:
    """Compile ``fn`` with pointers and integer arguments specialised as divisible by 16, as a launch with
    aligned tensors specialises them (except ``do_not_specialize`` arguments): that decides vectorised and
    asynchronous (pipelined) loads, so the registers and shared memory match the GPU's. ``source``:
    ``GluonASTSource`` for a Gluon kernel."""
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    skip = {fn.arg_names[n] if isinstance(n, int) else n for n in fn.do_not_specialize or ()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and n not in skip and (signature[n].startswith("*") or signature[n] == "i32")}
    kernel = triton.compile(source(fn=fn, signature=signature, constexprs=consts, attrs=attrs), target=TARGET,
                            options=options)
    report(label or f"{fn.__name__} {consts}", kernel)


def report(what: str, kernel) -> None:
    """One line a compiled kernel; fail when it needs more shared memory than an sm_90 block has."""
    shared = kernel.metadata.shared
    if shared > SM90_MAX_SHARED:
        raise SystemExit(f"{what} needs {shared} bytes of shared memory, more than sm_90's {SM90_MAX_SHARED}")
    print(f"{what} ok, shared memory {shared} bytes", flush=True)


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kw)`` records the launch instead of running it."""

    def __init__(self, fn, launches: list) -> None:
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


@contextmanager
def recording_decode_launches() -> Iterator[list]:
    """Swap the decode kernels for recorders (and report an H200's SM count) while the block runs."""
    launches: list = []
    saved = {name: getattr(td, name) for name in (*DECODE_KERNELS, "_sm_count")}
    try:
        for name in DECODE_KERNELS:
            setattr(td, name, _Recorder(saved[name], launches))
        td._sm_count = lambda device: H200_SMS
        yield launches
    finally:
        for name, value in saved.items():
            setattr(td, name, value)


def decode_launches() -> list:
    """Every kernel launch of the decode ops for the shapes below, as ``(fn, args, kwargs)``."""
    cases = []  # (dtype, D, Hq, Hkv, cache length, chunk, topk); topk 0 = dense_decode_triton
    for hq, hkv in ((32, 32), (32, 8), (32, 1)):  # MHA, GQA, MQA: G, GD and GP differ
        # The GPU decode check's gates; the cache length sets the merge's candidate tile T2.
        cases += [(torch.bfloat16, 128, hq, hkv, 128 * 1024, 4096, 12), (torch.bfloat16, 128, hq, hkv, 2**20, 512, 8)]
    cases += [
        (torch.bfloat16, 128, 32, 8, 300, 512, 8),  # a cache shorter than one block: no past block, no gate tiles
        (torch.bfloat16, 128, 32, 8, 128 * 1024, 0, 0),  # dense split-KV baseline
        (torch.float16, 64, 16, 2, 32 * 1024, 512, 3),
        (torch.float16, 64, 16, 16, 32 * 1024, 512, 3),
        (torch.float32, 128, 32, 8, 32 * 1024, 512, 3),  # exact dots (DOT_PREC ieee)
    ]
    with recording_decode_launches() as launches:
        for dtype, d, hq, hkv, cache_len, chunk, topk in cases:
            # transformers' cache [B, Hkv, L, D] seen as [B, L, Hkv, D], as the HF integration passes it.
            kc = torch.empty(1, hkv, cache_len, d, dtype=dtype, device="meta").transpose(1, 2)
            q = torch.empty(1, hq, d, dtype=dtype, device="meta")
            seqlens = torch.empty(1, dtype=torch.int32, device="meta")
            if topk == 0:
                td.dense_decode_triton(q, kc, kc, seqlens, d**-0.5)
            else:
                means = torch.empty(1, max(1, (cache_len - 1) // chunk), hkv, d, device="meta")
                # The positional arguments moba_decode passes, no tuning knobs.
                td.moba_decode_triton(q, kc, kc, seqlens, means, chunk, topk, d**-0.5)
    return launches


def compile_launch(fn, args: tuple, kwargs: dict, backend, done: set) -> None:
    """Compile one recorded launch the way ``JITFunction.run`` would, unless an identical one was compiled."""
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(*args, **kwargs)
    key = (fn.__name__, str(specialization), str(opts))
    if key in done:
        return
    done.add(key)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    consts = {p.name: bound[p.name] for p in fn.params if p.is_constexpr and p.name != "NEG"}
    report(f"{fn.__name__} {consts} warps={options.num_warps} stages={options.num_stages}", kernel)


def forward_launches() -> list:
    """Every launch of ``fwd.forward`` (the attention slots) on meta tensors, TMA descriptors on and off,
    for the forward configurations the op picks (bf16 D=128 at chunk 4096, 128 and 1000; fp16 D=64)."""
    from types import SimpleNamespace

    launches: list = []
    saved = {name: getattr(fwd, name) for name in ("_fwd_kernel",)}
    try:
        for name in saved:
            setattr(fwd, name, _Recorder(saved[name], launches))
        # chunk 1000: key tiles that do not divide the block (EVEN off)
        cases = ((torch.bfloat16, 128, 4096), (torch.bfloat16, 128, 128), (torch.float16, 64, 512),
                 (torch.bfloat16, 128, 1000))
        for dtype, d, chunk in cases:
            for desc in (True, False):
                opts = KernelOptions(fwd_desc=desc)
                t, hq, hkv = 4 * chunk, 8, 2
                q = torch.empty(t, hq, d, dtype=dtype, device="meta")
                k = torch.empty(t, hkv, d, dtype=dtype, device="meta")
                ints = torch.empty(t, dtype=torch.int32, device="meta")
                layout = SimpleNamespace(chunk_size=chunk, num_blocks=4, block_start=ints, block_end=ints)
                # three slots: the first launch, a merging one, the own-block one that writes the output;
                # one slot (top-k 1) at the first setting: a launch that is first and last
                for slots in (3, 1) if (dtype, d, chunk) == cases[0] else (3,):
                    sel = torch.empty(t, hq, slots, dtype=torch.int32, device="meta")
                    sched = SimpleNamespace(slots=slots, tiles_bound=7, slot_first=ints, block_idx=sel, pair_t=ints,
                                            group_off=ints, group_cnt=ints, tile_group=ints, tile_off=ints)
                    fwd.forward(q, k, k, layout, sched, d**-0.5, opts)
    finally:
        for name, value in saved.items():
            setattr(fwd, name, value)
    return launches


def slot_schedule_launches() -> list:
    """Both passes of the lean forward's counting sort (slot_schedule.py), as ``SlotSchedule`` launches them
    on meta tensors for every past slot of 12 (a slot's block list starts 16-byte aligned or not): int16
    lists at the paper preset (1M rows, 1 head, 256 blocks) and with a dense-prefix skip (512K rows, 16
    heads, 1024 blocks, the most that take the counting sort). Block lists are int32 only from 32768 blocks
    on, which are sorted instead."""
    from types import SimpleNamespace

    launches: list = []
    saved = slot_schedule._slot_count_kernel
    try:
        slot_schedule._slot_count_kernel = _Recorder(saved, launches)
        for dtype, rows, heads, nb, with_skip in ((torch.int16, 2**20, 1, 256, False),
                                                  (torch.int16, 2**19, 16, 1024, True)):
            sel = torch.empty(rows, heads, 12, dtype=dtype, device="meta")
            ints = torch.empty(nb, dtype=torch.int32, device="meta")
            layout = SimpleNamespace(num_blocks=nb, block_start=ints, block_end=ints)
            skip = torch.empty(rows, dtype=torch.bool, device="meta") if with_skip else None
            for s in range(1, 12):
                slot_schedule.SlotSchedule(sel, s, layout, 128, 0, skip)
    finally:
        slot_schedule._slot_count_kernel = saved
    return launches


def compile_gluon() -> None:
    """The Hopper backward in Gluon (gluon_bwd.py): bf16 and fp16, key tiles dividing the block or not.
    Skipped, with a line saying why, where this Triton has no Gluon API the kernel can use (gluon_compat.py);
    there the op runs the Triton backward."""
    from moba_cli.ops.moba.gluon_compat import gluon_supported

    ok, why = gluon_supported()
    if not ok:
        print(f"gluon backward skipped: {why}", flush=True)
        return
    from triton.experimental.gluon._runtime import GluonASTSource

    from moba_cli.ops.moba import gluon_bwd

    fn = gluon_bwd.bwd_dkdv_kernel
    for t in ("*bf16", "*fp16"):
        for even in (True, False):
            types = {"Q": t, "K": t, "V": t, "DO": t, "LSE": P32, "DELTA": P32, "DK": t, "DV": t, "DQ": P32,
                     "PAIR_T": I32, "GROUP_OFF": I32, "GROUP_CNT": I32, "BS": I32, "BE": I32, "qk_scale": "fp32",
                     "sm_scale": "fp32"}
            consts = {"H": 8, "G": 4, "D": 128, "EVEN": even, "BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8}
            compile_kernel(fn, types, consts, source=GluonASTSource, label=f"gluon {fn.__name__} {t} EVEN={even}",
                           num_warps=8)


def main() -> None:
    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 64)):
        t = "*bf16" if dtype == torch.bfloat16 else "*fp16"
        common = {"PAIR_T": I32, "GROUP_OFF": I32, "GROUP_CNT": I32, "BS": I32, "BE": I32, "qk_scale": "fp32"}
        gate_types = {"Q": t, "KM": P32, "KMH": t, "KML": t, "TB": I32, "FB": I32, "OUT": I32, "SCR": P32}
        compile_kernel(
            gate._gate_kernel, gate_types,
            {"G": 4, "NPAST": 11, "D": d, "BLOCK_M": 64, "BLOCK_N": 16, "PREC": "tf32x3",
             "SPLIT": dtype == torch.bfloat16}, num_warps=4,
        )
        for ng, bm in ((8, 64), (16, 32)):
            compile_kernel(
                gate._gate_grouped_kernel, gate_types,
                {"H": 8, "G": 4, "NPAST": ng - 1, "NG": ng, "D": d, "BLOCK_M": bm, "BLOCK_N": 16, "PREC": "tf32x3",
                 "SPLIT": dtype == torch.bfloat16}, num_warps=4, num_stages=3,
            )
        b = bwd.bwd_config(d, dtype, False)
        for even in (True, False):
            compile_kernel(
                bwd._bwd_dq_kernel,
                {"Q": t, "K": t, "V": t, "DO": t, "LSE": P32, "DELTA": P32, "DQ": P32, "TILE_GROUP": I32,
                 "TILE_OFF": I32, "SLOT_FIRST": I32, "sm_scale": "fp32", **common},
                {"H": 8, "G": 4, "D": d, "FIRST": even, "EVEN": even, "BLOCK_M": b["BLOCK_M"], "BLOCK_N": b["BLOCK_N"],
                 "PREC": "tf32"}, num_warps=b["num_warps"], num_stages=b["num_stages"],
            )
            # dK/dV: with dQ fused, and without (the dQ pass's tiles)
            for fused in (True, False):
                b = bwd.bwd_config(d, dtype, fused)
                compile_kernel(
                    bwd._bwd_dkdv_kernel,
                    {"Q": t, "K": t, "V": t, "DO": t, "LSE": P32, "DELTA": P32, "DK": t, "DV": t, "DQ": P32,
                     "sm_scale": "fp32", **common},
                    {"H": 8, "G": 4, "D": d, "EVEN": even, "BLOCK_M": b["BLOCK_M"], "BLOCK_N": b["BLOCK_N"],
                     "PREC": "tf32", "FUSED_DQ": fused}, num_warps=b["num_warps"], num_stages=b["num_stages"],
                )
    compile_gluon()
    compile_kernel(gate._block_mean_kernel, {"K": "*bf16", "BS": I32, "BE": I32, "KM": P32}, {"D": 128, "BLOCK_T": 64})
    backend, done = make_backend(TARGET), set()
    for fn, args, kwargs in forward_launches():
        compile_launch(fn, args, kwargs, backend, done)
    for fn, args, kwargs in slot_schedule_launches():
        compile_launch(fn, args, kwargs, backend, done)
    for fn, args, kwargs in decode_launches():
        compile_launch(fn, args, kwargs, backend, done)


if __name__ == "__main__":
    print(f"triton {triton.__version__}, torch {torch.__version__}", flush=True)
    main()
