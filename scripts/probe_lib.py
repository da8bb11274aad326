"""Helpers shared by the long-block probe scripts (run on the GPU machine as ``python scripts/<probe>.py``)."""

from __future__ import annotations

import json
import os
import time

import torch


class JsonLines:
    """Prints each record and appends it to ``$OUT/<name>/probe.jsonl``."""

    def __init__(self, name: str):
        self.dir = os.path.join(os.environ.get("OUT", "/tmp"), name)
        os.makedirs(self.dir, exist_ok=True)
        self._f = open(os.path.join(self.dir, "probe.jsonl"), "a")

    def __call__(self, **kw) -> None:
        line = json.dumps(kw)
        print(line, flush=True)
        self._f.write(line + "\n")
        self._f.flush()


def inputs(t: int, hq: int, hkv: int, seed: int, grad: bool = False) -> list[torch.Tensor]:
    """Random bf16 q ``[1, t, hq, 128]`` and k, v ``[1, t, hkv, 128]`` on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, t, h, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
            for h in (hq, hkv, hkv)]


def wall(fn) -> float:
    """Milliseconds of one call of ``fn``, synchronised on both ends."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3
