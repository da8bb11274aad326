"""GPU check of the transformers integration: a ~1B Llama-architecture model with MoBA at 128K tokens.

What it does (about 1-3 minutes on one H200, nothing downloaded):

1. builds a randomly initialised Llama-architecture model from the config below (hidden 2048, 16 layers,
   32 heads, 8 KV heads, head dim 64, intermediate 8192: ~1.1B parameters), saves it to a temporary
   directory and converts it with ``moba convert``'s library function (chunk 4096, top-k 12, last:3 full);
2. loads it with ``moba_cli.load_model`` in bfloat16 and prefills ~128K tokens with MoBA (no grad, only
   the last position's logits), recording time and peak memory, and checks from the per-layer counters
   that layers 0-12 ran MoBA and 13-15 full attention; the same weights with dense SDPA for reference;
3. greedy-decodes 16 tokens through a KV cache (the MoBA decode path with cached block means), timing
   every step, and checks the means were built once per layer and updated once per completed block (the
   prompt ends 8 tokens before a block boundary so one block completes while decoding); compares the
   last decode step's logits with a fresh MoBA prefill of the whole sequence; runs ``model.generate``
   for the same 16 tokens.

Writes ``$OUT/gpu_hf_prefill.json`` (moba-result schema, kind ``gpu-hf-prefill``) and prints a summary.
Exit code 1 when a check failed. Usage: ``python benchmarks/hf_prefill.py [--seq 131064] [--no-full]``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

CHUNK, TOPK, FULL_LAYERS = 4096, 12, "last:3"
DEVICE = "cuda"
MODEL_CONFIG = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


# A smoke-test mode (--tiny) runs the same steps on a tiny model, on the CPU when there is no GPU.
TINY_CONFIG = {**MODEL_CONFIG, "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
               "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 1024}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> None:
    _sync()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


def _cache_kw(model, cache) -> dict:
    """transformers 5.24 calls it ``cache``; earlier releases ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def build_and_convert(root: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from moba_cli.integrations import convert_checkpoint

    config = LlamaConfig(**MODEL_CONFIG)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except TypeError:
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    src, dst = root / "src", root / "moba"
    model.save_pretrained(src)
    del model
    convert_checkpoint(src, dst, chunk_size=CHUNK, topk=TOPK, full_layers=FULL_LAYERS)
    return dst


def prefill(model, ids: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """One no-grad forward keeping only the last logits -> (logits [vocab] fp32, seconds, peak GiB)."""
    _reset_peak()
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    _sync()
    return logits, time.perf_counter() - t0, _peak_gib()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128 * 1024 - 8, help="prompt tokens (default 131064)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-full", action="store_true", help="skip the dense-SDPA reference prefill")
    ap.add_argument("--tiny", action="store_true", help="smoke test: tiny model, chunk 16, top-k 3 (CPU ok)")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "scratch"))
    out_dir.mkdir(parents=True, exist_ok=True)
    global CHUNK, TOPK, DEVICE
    if args.tiny:
        CHUNK, TOPK = 16, 3
        MODEL_CONFIG.update(TINY_CONFIG)
        if args.seq == ap.get_default("seq"):
            args.seq = 12 * CHUNK - 8
        DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    elif not torch.cuda.is_available():
        print("error: this script needs a CUDA GPU (or --tiny for a smoke test)", file=sys.stderr)
        return 1

    import transformers

    import moba_cli  # noqa: F401 - registers the `moba` attention implementation
    from moba_cli.integrations import attention_mode, expected_sparsity, load_model, moba_stats, reset_moba_stats
    from moba_cli.ops.moba.validate import resolve_backend
    from moba_cli.results import make_result, write_result

    transformers.utils.logging.disable_progress_bar()
    records: list[dict] = []
    summary: dict = {"checks": {}, "errors": []}
    n_layers = MODEL_CONFIG["num_hidden_layers"]
    full_layers = list(range(n_layers - 3, n_layers))

    def check(name: str, ok: bool, detail: str = "") -> None:
        summary["checks"][name] = {"passed": bool(ok), "detail": detail}
        print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moba-hf-") as tmp:
        t0 = time.perf_counter()
        dst = build_and_convert(Path(tmp))
        summary["build_convert_s"] = time.perf_counter() - t0
        model = load_model(dst, dtype=torch.bfloat16).to(DEVICE).eval()
        summary["parameters"] = sum(p.numel() for p in model.parameters())
        summary["backend"] = resolve_backend("auto", torch.empty(1, device=DEVICE))
        print(f"model: {summary['parameters'] / 1e9:.2f}B parameters, MoBA backend {summary['backend']}, "
              f"built+converted in {summary['build_convert_s']:.1f}s", flush=True)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (1, args.seq), device=DEVICE, generator=gen)

        # Warm-up (Triton compilation) on a shorter prompt, then the measured 128K prefill. The warm-up
        # must span more than TOPK blocks: with top-k covering every block MoBA takes the dense path and
        # would leave the sparse kernels to compile inside the measured call.
        warm = min(args.seq, (TOPK + 4) * CHUNK)
        try:
            prefill(model, ids[:, :warm])
            reset_moba_stats(model)
            logits_moba, secs, peak = prefill(model, ids)
            stats = moba_stats(model)
            records.append({"phase": "prefill", "attention": "moba", "tokens": args.seq, "seconds": secs,
                            "tokens_per_s": args.seq / secs, "peak_gib": peak})
            print(f"MoBA prefill {args.seq} tokens: {secs:.2f}s, peak {peak:.1f} GiB", flush=True)
            moba_ok = [r["layer"] for r in stats if r["prefill_moba"] == 1 and r["prefill_full"] == 0]
            full_ok = [r["layer"] for r in stats if r["prefill_full"] == 1 and r["prefill_moba"] == 0]
            summary["per_layer"] = stats
            check("prefill_paths_per_layer",
                  moba_ok == list(range(n_layers - 3)) and full_ok == full_layers,
                  f"MoBA layers {moba_ok}, full layers {full_ok}")
            check("prefill_logits_finite", bool(torch.isfinite(logits_moba).all()))
        except Exception as e:  # noqa: BLE001 - record and go on to the other phases
            summary["errors"].append(f"moba prefill: {e!r}")
            traceback.print_exc()
            logits_moba = None

        if not args.no_full:
            try:
                with attention_mode(model, "full"):
                    prefill(model, ids[:, :warm])
                    logits_full, secs, peak = prefill(model, ids)
                records.append({"phase": "prefill", "attention": "full-sdpa", "tokens": args.seq, "seconds": secs,
                                "tokens_per_s": args.seq / secs, "peak_gib": peak})
                print(f"dense SDPA prefill {args.seq} tokens: {secs:.2f}s, peak {peak:.1f} GiB", flush=True)
                if logits_moba is not None:
                    summary["last_logits_moba_vs_full_max_abs"] = float((logits_moba - logits_full).abs().max())
            except Exception as e:  # noqa: BLE001
                summary["errors"].append(f"full prefill: {e!r}")
                traceback.print_exc()

        # Decode through a KV cache, token by token.
        try:
            from transformers import DynamicCache

            reset_moba_stats(model)
            _reset_peak()
            cache = DynamicCache(config=model.config)
            kw = _cache_kw(model, cache)
            with torch.no_grad():
                t0 = time.perf_counter()
                logits = model(ids, use_cache=True, logits_to_keep=1, **kw).logits[:, -1]
                _sync()
                cached_prefill_s = time.perf_counter() - t0
                tokens = [int(logits.argmax(-1))]
                step_s = []
                for _ in range(args.new_tokens - 1):
                    nxt = torch.tensor([[tokens[-1]]], device=DEVICE)
                    _sync()
                    t0 = time.perf_counter()
                    logits = model(nxt, use_cache=True, **kw).logits[:, -1]
                    _sync()
                    step_s.append(time.perf_counter() - t0)
                    tokens.append(int(logits.argmax(-1)))
            peak = _peak_gib()
            last_decode = logits[0].float()
            step_ms = sorted(1e3 * s for s in step_s)
            records.append({"phase": "decode", "attention": "moba", "tokens": args.seq, "new_tokens": args.new_tokens,
                            "prefill_with_cache_s": cached_prefill_s, "step_ms_median": step_ms[len(step_ms) // 2],
                            "step_ms_max": step_ms[-1], "peak_gib": peak})
            print(f"decode: {args.new_tokens} tokens, median step {step_ms[len(step_ms) // 2]:.1f} ms "
                  f"(max {step_ms[-1]:.1f}), peak {peak:.1f} GiB", flush=True)
            dstats = moba_stats(model)
            summary["per_layer_decode"] = dstats
            end = args.seq + args.new_tokens - 1  # keys in the cache after the last step
            completed = end // CHUNK - (args.seq + 1) // CHUNK  # blocks finished after the first decode step
            moba_rows = [r for r in dstats if r["kind"] == "moba"]
            check("decode_paths_per_layer",
                  all(r["decode_moba"] == args.new_tokens - 1 for r in moba_rows)
                  and all(r["decode_full"] == args.new_tokens - 1 for r in dstats if r["kind"] == "full"),
                  f"decode calls per layer {[r['decode_moba'] + r['decode_full'] for r in dstats]}")
            check("block_means_incremental",
                  all(r["means_computed"] == 1 and r["means_updated"] == completed for r in moba_rows),
                  f"computed {[r['means_computed'] for r in moba_rows]}, updated "
                  f"{[r['means_updated'] for r in moba_rows]} (expected 1 and {completed} per MoBA layer)")
            del cache
            # The last decode step against a fresh MoBA prefill of the same sequence.
            full_seq = torch.cat([ids, torch.tensor([tokens[:-1]], device=DEVICE)], dim=1)
            ref, _, _ = prefill(model, full_seq)
            diff = float((ref - last_decode).abs().max())
            scale = float(ref.abs().max())
            summary["decode_vs_prefill"] = {"max_abs": diff, "logit_scale": scale,
                                            "argmax_equal": int(ref.argmax()) == int(last_decode.argmax())}
            check("decode_matches_prefill", diff <= 0.05 * max(scale, 1.0) or int(ref.argmax()) == tokens[-1],
                  f"max abs {diff:.3g} (logits up to {scale:.3g}), argmax equal "
                  f"{summary['decode_vs_prefill']['argmax_equal']}")
            summary["generated_manual"] = tokens
        except Exception as e:  # noqa: BLE001
            summary["errors"].append(f"decode: {e!r}")
            traceback.print_exc()

        try:
            _reset_peak()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                     pad_token_id=0, attention_mask=torch.ones_like(ids))
            _sync()
            secs = time.perf_counter() - t0
            gen_tokens = out[0, args.seq:].tolist()
            records.append({"phase": "generate", "attention": "moba", "tokens": args.seq,
                            "new_tokens": args.new_tokens, "seconds": secs, "peak_gib": _peak_gib()})
            summary["generated"] = gen_tokens
            same = gen_tokens == summary.get("generated_manual")
            print(f"generate: {args.new_tokens} tokens in {secs:.2f}s (incl. the 128K prefill)", flush=True)
            check("generate_equals_manual_decode", same, "" if same else
                  f"generate {gen_tokens} vs manual {summary.get('generated_manual')}")
        except Exception as e:  # noqa: BLE001
            summary["errors"].append(f"generate: {e!r}")
            traceback.print_exc()

    summary["sparsity_moba_layer"] = expected_sparsity(args.seq, CHUNK, TOPK)
    summary["total_s"] = time.perf_counter() - t_start
    config = {"model": MODEL_CONFIG, "chunk_size": CHUNK, "topk": TOPK, "full_layers": full_layers,
              "seq": args.seq, "new_tokens": args.new_tokens, "dtype": "bfloat16", "device": DEVICE,
              "tiny": args.tiny}
    result = make_result("gpu-hf-prefill", config, records, summary)
    path = write_result(result, out_dir / "gpu_hf_prefill.json", out_dir)
    failed = [k for k, v in summary["checks"].items() if not v["passed"]]
    print(json.dumps({"records": records, "failed_checks": failed, "errors": summary["errors"]}, indent=1))
    print(f"wrote {path}; total {summary['total_s']:.0f}s; "
          f"{'ALL CHECKS PASSED' if not failed and not summary['errors'] else 'SOME CHECKS FAILED'}")
    return 0 if not failed and not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
