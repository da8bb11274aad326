"""Kernel-development probe for issue 4, v9: the dense prefix through cuDNN (not the user benchmark).

1. Whether PyTorch's cuDNN attention op takes grouped heads (32 query / 8 KV heads) as they are, against
   float32 SDPA with K/V expanded (error and whether it runs at all).
2. ``moba_attention`` with the dense prefix off, on (cuDNN's forward on a second stream), and on in one
   stream, same inputs, same machine start: forward and forward+backward (median of CUDA-event timings,
   L2 not flushed), peak memory of forward+backward, and the largest difference from the output without
   the prefix. Settings: the paper preset at 128K x 8 heads, 32/8 heads (GQA) and 32/32, and 1M x 1
   head; a 16K-row prefix at 128K x 8 heads.

Writes $OUT/v9_prefix_probe.json (``--gqa``: the first part only, $OUT/v9_cudnn_gqa.json) and prints one
JSON line a record.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from moba_cli import moba_attention
from moba_cli.ops.moba import dense_prefix
from moba_cli.ops.moba import triton_moba as tm
from scripts.fwd_breakdown import med


def emit(rec: dict, recs: list) -> None:
    recs.append(rec)
    print(json.dumps(rec), flush=True)


def gqa_check() -> dict:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    q = torch.randn(1, 32, 4096, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 4096, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    rec: dict = {"what": "cudnn_gqa"}
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=0.088)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1), is_causal=True,
            scale=0.088)
        rec["ok"] = True
        rec["rel_err"] = ((res[0].float() - ref).norm() / ref.norm()).item()
        do = torch.randn_like(q)
        g = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, k, v, res[0], res[1], res[6], res[7], None, res[2], res[3], res[4], res[5], 0.0, True, scale=0.088)
        rec["bwd_shapes"] = [list(x.shape) for x in g]
    except Exception as e:  # noqa: BLE001 - the probe records what the op says
        rec["ok"] = False
        rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return rec


def ab(name: str, seq: int, hq: int, hkv: int, chunk: int, topk: int, recs: list, variants=(0, 1, 2)) -> None:
    """``variants``: 0 prefix off, 1 on (cuDNN on a second stream), 2 on, one stream."""
    torch.manual_seed(1)
    dev = torch.device("cuda")
    q = torch.randn(1, seq, hq, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, seq, hkv, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    outs: dict = {}
    for flag in variants:
        dense_prefix.DENSE_PREFIX = flag > 0
        tm.PREFIX_STREAM = flag == 1
        grads = [x.detach().requires_grad_() for x in (q, k, v)]

        def fwd():
            return moba_attention(q, k, v, chunk_size=chunk, topk=topk)

        def fwdbwd(grads=grads):
            moba_attention(*grads, chunk_size=chunk, topk=topk).backward(do)

        outs[flag] = fwd()
        rec = {"what": "ab", "case": name, "seq": seq, "heads": hq, "kv_heads": hkv, "chunk": chunk, "topk": topk,
               "variant": ["off", "on, 2 streams", "on, 1 stream"][flag], "fwd_ms": med(fwd, 5)}
        rec["fwdbwd_ms"] = med(fwdbwd, 5)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwdbwd()
        torch.cuda.synchronize()
        rec["fwdbwd_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        rec["grads_finite"] = all(bool(x.grad.isfinite().all()) for x in grads)
        if flag and 0 in outs:
            rec["max_abs_diff_vs_off"] = (outs[flag].float() - outs[0].float()).abs().max().item()
        emit(rec, recs)
    dense_prefix.DENSE_PREFIX = None
    tm.PREFIX_STREAM = True


def main() -> None:
    recs: list = []
    out = os.environ.get("OUT", "/tmp")
    if sys.argv[1:] == ["--gqa"]:  # its own process: a failing cuDNN call must not take the A/B runs down
        emit(gqa_check(), recs)
        with open(os.path.join(out, "v9_cudnn_gqa.json"), "w") as f:
            json.dump({"records": recs, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}, f)
        return
    dense_prefix.MIN_ROWS = 0
    cases = [
        ("paper-128k-h8", 131072, 8, 8, 4096, 12),
        ("paper-128k-gqa", 131072, 32, 8, 4096, 12),
        ("paper-128k-mha32", 131072, 32, 32, 4096, 12),
        ("p16k-128k-h8", 131072, 8, 8, 2048, 8),
        ("paper-1m-h1", 1 << 20, 1, 1, 4096, 12),
    ]
    only = sys.argv[1:]
    for c in cases:
        if not only or c[0] in only:
            ab(*c, recs)
    with open(os.path.join(out, "v9_prefix_probe.json"), "w") as f:
        json.dump({"records": recs, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}, f, indent=1)


if __name__ == "__main__":
    main()
