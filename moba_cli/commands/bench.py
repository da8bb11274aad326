"""`moba bench`: time MoBA against dense attention (options only; the work is in :mod:`moba_cli.bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moba_cli.commands._common import console, err_console, user_errors

# One source line per paragraph, "\n\n" between paragraphs and "\n" between list items: rich wraps the text to
# the terminal, so a line break inside a sentence would show up as a ragged line.
HELP = (
    "Time MoBA (ours: moba-triton) against dense causal attention and other MoBA implementations, from 32k "
    "to 10M tokens.\n\n"
    "Every kernel is spot-checked against a float32 reference before it is timed; a wrong one is reported as "
    "an error, never as a time.\n\n"
    "[bold]Sizes[/]: --seq takes 32k, 128k, 1m, 10m or plain integers (binary units: 1m = 1048576) and comma "
    "lists such as --seq 32k,128k,1m; --chunk takes the same units (4k). --heads also takes a list (1,8).\n\n"
    "[bold]Presets[/] (explicit options override them):\n"
    "paper: the MoBA paper's 1M setting: chunk 4096, topk 12, heads 1,8, seq 32k,128k,512k,1m, fwd and "
    "fwd+bwd.\n"
    "flashmoba: FlashMoBA's benchmark setting: chunk 128, topk 8, 16 heads, seq 64k..512k, fwd+bwd.\n"
    "10m: the paper's 10M setting: chunk = seq/64, topk 3, 1 head, seq 10m, fwd.\n"
    "Without a preset: seq 32k,128k, 8 heads, D 128, chunk 512, topk 3, bf16, fwd.\n\n"
    "[bold]Providers[/] (moba-triton always runs; choose the others with --baselines, default all):\n"
    "moba-triton: ours.\n"
    "moba-naive: float32 reference, small sizes only.\n"
    "flex-moba: the same MoBA with stock PyTorch (torch gate + FlexAttention BlockMask, compiled), timed "
    "including its gate.\n"
    "sdpa-cudnn, sdpa-flash: dense causal attention through torch SDPA's cuDNN / FlashAttention-2 backends "
    "(GQA via enable_gqa, or K/V expanded outside the timed region, written in the record's note).\n"
    "sdpa-math: dense math backend, for CPU smoke runs.\n"
    "flash-attn (dense), flash-moba (FlashMoBA) and moba-ref (the MoBA authors' package) are optional: used "
    "when installed, else skipped.\n\n"
    "[bold]Decode[/]: --pass decode times one new token against a KV cache of --seq tokens (MoBA decode "
    "against dense SDPA).\n\n"
    "[bold]Method[/]: warm-up, then median/min/max over --repeats calls (CUDA events, L2 flushed; a CPU run "
    "uses the wall clock, as each record's timer says); peak "
    "memory per provider above the inputs (peak_mem_bytes) and in total (peak_mem_total_bytes); TFLOP/s "
    "counted on the attended (query, key) pairs (4*pairs*D forward, x3.5 fwd+bwd); speedups against "
    "sdpa-cudnn and sdpa-flash. A dense call predicted slower than --max-dense-seconds is extrapolated (S^2 "
    "law) instead.\n\n"
    "[bold]Statuses[/]: ok; estimated (extrapolated, with estimated_from); skipped (cannot run here, with a "
    "reason); oom (out of GPU memory; the bench goes on); error (failed, or its spot-check did not match).\n\n"
    "[bold]Files[/]: results/bench/<gpu-name>/bench-<time>.json (schema moba-result/1), a .csv with the same "
    "stem, and -time.png / -speedup.png plots (needs matplotlib); --out takes a folder or a .json path. While "
    "it runs, finished records are kept in <stem>.partial.json (removed at the end), so an interrupted run "
    "loses nothing.\n\n"
    "[bold]Without a GPU[/], only --device cpu works: a tiny smoke run of the bench itself (defaults seq "
    "256,512, 2 heads, D 32, chunk 64, fp32; CUDA-only providers are recorded as skipped)."
)


Opt = typer.Option


def bench(
    seq: Annotated[
        str | None,
        Opt("--seq", help="Sequence lengths (decode: KV-cache lengths), e.g. 32k,128k,1m. (default: 32k,128k; "
                          "256,512 on CPU)"),
    ] = None,
    batch: Annotated[int | None, Opt("--batch", help="Sequences per call. (default: 1)")] = None,
    heads: Annotated[str | None, Opt("--heads", help="Query heads, or a list: 1,8. (default: 8; 2 on CPU)")] = None,
    kv_heads: Annotated[
        int | None, Opt("--kv-heads", help="Key/value heads; must divide --heads (GQA/MQA). (default: --heads)")
    ] = None,
    head_dim: Annotated[int | None, Opt("--head-dim", help="Head dimension. (default: 128; 32 on CPU)")] = None,
    chunk: Annotated[
        str | None, Opt("--chunk", help="MoBA block size in keys, e.g. 512 or 4k. (default: 512; 64 on CPU)")
    ] = None,
    topk: Annotated[int | None, Opt("--topk", help="Blocks per query, own block included. (default: 3)")] = None,
    dtype: Annotated[str | None, Opt("--dtype", help="bf16, fp16 or fp32. (default: bf16; fp32 on CPU)")] = None,
    passes: Annotated[
        list[str] | None, Opt("--pass", help="fwd, fwd+bwd or decode; repeat or use commas. (default: fwd)")
    ] = None,
    baselines: Annotated[
        str | None, Opt("--baselines", help="Providers besides moba-triton: all, none, or a comma list. "
                                            "(default: all)")
    ] = None,
    repeats: Annotated[
        int | None, Opt("--repeats", help="Timed calls per measurement. (default: 10; 3 on CPU)")
    ] = None,
    preset: Annotated[str | None, Opt("--preset", help="paper, flashmoba or 10m (see above).")] = None,
    device: Annotated[str, Opt("--device", help="cuda (or cuda:N), or cpu for a tiny smoke run.")] = "cuda",
    out: Annotated[
        Path | None,
        Opt("--out", help="Folder or .json file for the results. (default: results/bench/<gpu-name>/)"),
    ] = None,
    max_dense_seconds: Annotated[
        float, Opt("--max-dense-seconds", help="Estimate (S^2 law) dense calls predicted slower than this.")
    ] = 30.0,
    check_rows: Annotated[int, Opt("--check-rows", help="Query rows sampled for each spot-check.")] = 256,
    seed: Annotated[int, Opt("--seed", help="Seed of the random inputs.")] = 0,
    # A plain flag rather than --plots/--no-plots: the pair takes a column of its own in the help table.
    no_plots: Annotated[bool, Opt("--no-plots", help="Skip the PNG plots (they need matplotlib).")] = False,
) -> None:
    with user_errors():
        from moba_cli.bench import build_config, run_bench
        from moba_cli.ops.moba.options import KernelOptions

        KernelOptions.from_env()  # a malformed MOBA_* kernel variable stops the command before any work

        config = build_config(
            seq=seq, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, chunk=chunk, topk=topk,
            dtype=dtype, passes=passes, baselines=baselines, repeats=repeats, preset=preset, device=device,
            max_dense_seconds=max_dense_seconds, check_rows=check_rows, seed=seed, plots=not no_plots,
            out=str(out) if out is not None else None,
        )
        run_bench(config, console, progress_console=err_console)
