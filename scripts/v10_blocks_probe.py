"""v10 probe (H200): the long-block forward (ops/moba/cudnn_blocks.py) through the public call, on and off.

For each case: forward time with the same inputs every call (cuDNN's plans cached), forward time on fresh
inputs every call (the gate picks new per-block query counts, so cuDNN plans new shapes: the cost a
training step sees), forward+backward time and peak memory. JSON lines to $OUT/v10b/probe.jsonl.
"""

from __future__ import annotations

import os

import torch
from probe_lib import JsonLines, inputs, wall

from moba_cli import moba_attention
from moba_cli.ops.moba import cudnn_blocks

emit = JsonLines("v10b")


def case(name, t, hq, hkv, chunk, topk, reps=2, bwd=False):
    rec = {"name": name, "shape": [t, hq, hkv, chunk, topk], "commit": os.environ.get("MOBA_GIT_COMMIT")}
    for on in (True, False):
        cudnn_blocks.CUDNN_BLOCKS = on
        tag = "on" if on else "off"
        x = inputs(t, hq, hkv, 0)
        f = lambda x=x: moba_attention(*x, chunk_size=chunk, topk=topk)  # noqa: E731
        wall(f)
        rec[f"{tag}_same_ms"] = min(wall(f) for _ in range(reps))
        del x
        fresh = []
        for s in range(reps):
            x = inputs(t, hq, hkv, 100 + s)
            fresh.append(wall(lambda x=x: moba_attention(*x, chunk_size=chunk, topk=topk)))
            del x
        rec[f"{tag}_fresh_ms"] = fresh
        if bwd:
            x = inputs(t, hq, hkv, 0, grad=True)
            do = torch.randn_like(x[0])

            def fb(x=x, do=do):
                moba_attention(*x, chunk_size=chunk, topk=topk).backward(do)

            wall(fb)
            torch.cuda.reset_peak_memory_stats()
            rec[f"{tag}_fwdbwd_ms"] = min(wall(fb) for _ in range(reps))
            rec[f"{tag}_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            del x, do
        torch.cuda.empty_cache()
    cudnn_blocks.CUDNN_BLOCKS = None
    emit(**rec)


CASES = {
    "2m-c32768-k4-h4": ((2 << 20, 4, 4, 32768, 4), dict(reps=4, bwd=True)),
    "4m-c65536-k3": ((4 << 20, 1, 1, 65536, 3), dict(reps=4, bwd=True)),
    "10m-c163840-k3": ((10 << 20, 1, 1, 163840, 3), dict(reps=3)),
}

if __name__ == "__main__":
    import sys

    emit(torch=torch.__version__, cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name())
    for name in sys.argv[1:] or list(CASES):
        args, kw = CASES[name]
        case(name, *args, **kw)
