"""Per-step decode times of the 1.1B model of scripts/gpu_hf_prefill.py at a 128K-token cache: 24 steps
with the integration's unchecked lengths, then 24 with the host-syncing range check forced back on, then
24 unchecked again (so compilation and warm-up show as the first steps, not as a difference). Writes
$OUT/gpu_hf_decode_steps.json. Usage: python scripts/gpu_hf_decode_steps.py
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

import moba_cli.ops.moba.decode as dec  # noqa: E402
from moba_cli import load_model  # noqa: E402


def main() -> None:
    from transformers import DynamicCache

    seq = 128 * 1024 - 8
    with tempfile.TemporaryDirectory(prefix="moba-hf-") as tmp:
        model = load_model(g.build_and_convert(Path(tmp)), dtype=torch.bfloat16).to("cuda").eval()
        gen = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, g.MODEL_CONFIG["vocab_size"], (1, seq), device="cuda", generator=gen)
        cache = DynamicCache(config=model.config)
        kw = g._cache_kw(model, cache)
        original = dec.moba_decode
        phases = {}
        with torch.no_grad():
            tok = model(ids, use_cache=True, logits_to_keep=1, **kw).logits[:, -1].argmax(-1)
            for phase, checked in (("unchecked-1", False), ("checked", True), ("unchecked-2", False)):
                if checked:
                    dec.moba_decode = lambda *a, **k: original(*a, **{**k, "check_lengths": True})
                else:
                    dec.moba_decode = original
                steps = []
                for _ in range(24):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    tok = model(tok[:, None], use_cache=True, **kw).logits[:, -1].argmax(-1)
                    torch.cuda.synchronize()
                    steps.append(round(1e3 * (time.perf_counter() - t0), 2))
                phases[phase] = {"steps_ms": steps, "median_ms": sorted(steps)[len(steps) // 2]}
                print(phase, phases[phase]["median_ms"], steps, flush=True)
        dec.moba_decode = original
    out = Path(os.environ.get("OUT", "scratch"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_hf_decode_steps.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cache_tokens": seq,
         "git_commit": os.environ.get("MOBA_GIT_COMMIT"), "phases": phases}, indent=1))


if __name__ == "__main__":
    main()
