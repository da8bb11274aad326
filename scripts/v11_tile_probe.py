"""v11 probe (H200): cuDNN's non-causal forward rate for the long-block forward's call shapes, sustained.

Each shape runs back to back for about 1.5 s (the GPU's clocks settle under load), and shapes alternate
with the baseline (131072 query rows on one 163840-key block) so drift shows. Shapes: row counts that fill
whole waves of 132 SMs, batched calls over consecutive key blocks (a strided view of k) and over one key
block repeated (stride 0). JSON lines to $OUT/v11b/probe.jsonl.
"""

from __future__ import annotations

import time

import torch
from probe_lib import JsonLines

emit = JsonLines("v11b")
DEV = torch.device("cuda")
D, C = 128, 163840
SDPA = torch.ops.aten._scaled_dot_product_cudnn_attention


def sustained(fn, pairs: float, secs: float = 1.5) -> dict:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    n = max(2, int(secs / max(one, 1e-4)))
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / n
    return {"ms": round(ms, 3), "tflops": round(pairs * 4 * D / ms / 1e9, 1), "n": n}


def main() -> None:
    emit(torch=torch.__version__, cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name(),
         sms=torch.cuda.get_device_properties(0).multi_processor_count)
    try:
        import cudnn  # noqa: F401

        emit(cudnn_frontend="importable")
    except Exception as e:  # noqa: BLE001
        emit(cudnn_frontend=f"no: {e}")
    g = torch.Generator(device=DEV).manual_seed(0)
    nb = 16
    kv = [torch.randn(nb * C, 1, D, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(2)]
    qbuf = torch.randn(8 * 163840, 1, D, device=DEV, dtype=torch.bfloat16, generator=g)
    scale = D**-0.5

    def blocks(x, b):  # [b, 1, C, D] view of consecutive blocks
        return x[: b * C].view(b, C, 1, D).transpose(1, 2)

    def single(rows):
        q4 = qbuf[:rows].transpose(0, 1)[None]
        k4, v4 = (x[:C].transpose(0, 1)[None] for x in kv)
        return (lambda: SDPA(q4, k4, v4, None, True, 0.0, False, False, scale=scale)), rows * C

    def batched(b, rows, repeat):
        q4 = qbuf[: b * rows].view(b, rows, 1, D).transpose(1, 2)
        if repeat:
            k4, v4 = (x[:C].transpose(0, 1)[None].expand(b, 1, C, D) for x in kv)
        else:
            k4, v4 = (blocks(x, b) for x in kv)
        return (lambda: SDPA(q4, k4, v4, None, True, 0.0, False, False, scale=scale)), b * rows * C

    def causal(b, size):
        q4 = qbuf[: b * size].view(b, size, 1, D).transpose(1, 2)
        k4, v4 = (x[: b * size].view(b, size, 1, D).transpose(1, 2) for x in kv)
        return (lambda: SDPA(q4, k4, v4, None, True, 0.0, True, False, scale=scale)), b * size * size / 2

    shapes = [
        ("single", 131072, lambda: single(131072)),
        ("single", 135168, lambda: single(135168)),
        ("single", 163840, lambda: single(163840)),
        ("single", 126720, lambda: single(126720)),
        ("single", 65536, lambda: single(65536)),
        ("single", 262144, lambda: single(262144)),
        ("batched-consecutive", "8x131072", lambda: batched(8, 131072, False)),
        ("batched-repeat", "8x131072", lambda: batched(8, 131072, True)),
        ("batched-consecutive", "4x135168", lambda: batched(4, 135168, False)),
        ("causal", "8x163840", lambda: causal(8, 163840)),
        ("causal", "16x81920", lambda: causal(16, 81920)),
        ("noncausal-half", "8x81920", lambda: batched(8, 81920, False)),
    ]
    base_fn, base_pairs = single(131072)
    for what, shape, make in shapes:
        try:
            fn, pairs = make()
            rec = sustained(fn, pairs)
            ok = True
        except Exception as e:  # noqa: BLE001
            rec, ok = {"error": str(e).splitlines()[0][:300]}, False
        base = sustained(base_fn, base_pairs, 0.7)
        emit(what=what, shape=shape, ok=ok, **rec, baseline_tflops=base["tflops"])
    # stride-0 batch gives the same result as separate calls? (only if it ran)
    try:
        fn, _ = batched(2, 4096, True)
        o = fn()[0]
        q4 = qbuf[:8192].view(2, 4096, 1, D).transpose(1, 2)
        k4, v4 = (x[:C].transpose(0, 1)[None] for x in kv)
        ref = torch.cat([SDPA(q4[i:i + 1], k4, v4, None, True, 0.0, False, False, scale=scale)[0] for i in range(2)])
        emit(check="repeat-vs-separate", max_abs=(o.float() - ref.float()).abs().max().item())
    except Exception as e:  # noqa: BLE001
        emit(check="repeat-vs-separate", error=str(e).splitlines()[0][:300])


if __name__ == "__main__":
    main()
