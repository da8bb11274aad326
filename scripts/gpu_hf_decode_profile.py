"""Where a decode step's time goes: the 1.1B model of scripts/gpu_hf_prefill.py with a 128K-token cache,
16 MoBA-mode steps then 16 steps with every layer dense (``attention_mode(model, "full")``), then a torch
profiler over 6 MoBA steps (top ops by CUDA and by CPU time). Writes $OUT/gpu_hf_decode_profile.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_hf_prefill as g  # noqa: E402

from moba_cli import load_model  # noqa: E402
from moba_cli.integrations import attention_mode  # noqa: E402


def steps(model, tok, kw, n):
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tok = model(tok[:, None], use_cache=True, **kw).logits[:, -1].argmax(-1)
        torch.cuda.synchronize()
        times.append(round(1e3 * (time.perf_counter() - t0), 2))
    return tok, times


def main() -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    seq = 128 * 1024 - 8
    res = {}
    with tempfile.TemporaryDirectory(prefix="moba-hf-") as tmp:
        model = load_model(g.build_and_convert(Path(tmp)), dtype=torch.bfloat16).to("cuda").eval()
        ids = torch.randint(0, g.MODEL_CONFIG["vocab_size"], (1, seq), device="cuda")
        cache = DynamicCache(config=model.config)
        kw = g._cache_kw(model, cache)
        with torch.no_grad():
            tok = model(ids, use_cache=True, logits_to_keep=1, **kw).logits[:, -1].argmax(-1)
            tok, res["moba_ms"] = steps(model, tok, kw, 16)
            with attention_mode(model, "full"):
                tok, res["full_ms"] = steps(model, tok, kw, 16)
            tok, res["moba_again_ms"] = steps(model, tok, kw, 8)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                tok, res["profiled_ms"] = steps(model, tok, kw, 6)
        ka = prof.key_averages()
        res["top_cuda"] = ka.table(sort_by="cuda_time_total", row_limit=15)
        res["top_cpu"] = ka.table(sort_by="self_cpu_time_total", row_limit=15)
    for k in ("moba_ms", "full_ms", "moba_again_ms", "profiled_ms"):
        print(k, res[k], flush=True)
    print(res["top_cuda"][:5000])
    print(res["top_cpu"][:5000])
    out = Path(os.environ.get("OUT", "scratch"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_hf_decode_profile.json").write_text(json.dumps(
        {**res, "gpu": torch.cuda.get_device_name(0), "git_commit": os.environ.get("MOBA_GIT_COMMIT")}, indent=1))


if __name__ == "__main__":
    main()
