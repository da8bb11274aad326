"""`moba convert`: switch a transformers checkpoint's attention to MoBA (weights untouched)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from moba_cli.commands._common import console, user_errors

HELP = (
    "Switch a transformers checkpoint's attention to MoBA.\n\n"
    "SRC is a local checkpoint directory (a Hugging Face cache snapshot works too), or a hub id where the "
    "network allows. DST receives its own copy of every file (a copy-on-write clone where the filesystem "
    "supports it, so no extra space on btrfs/XFS) and a config.json recording the MoBA settings, so that "
    "`moba_cli.load_model(DST)`, or `AutoModelForCausalLM.from_pretrained(DST)` after `import moba_cli`, "
    "runs MoBA. Supported: Llama, Mistral/Mixtral, Qwen2/Qwen3 (and their MoE variants), Phi-3, with head "
    "dim 32, 64 or 128 and no sliding window narrower than the context (a wider one is dropped from the "
    "config).\n\n"
    "Prints the layer split and the expected sparsity at 32K, 128K and 1M tokens, and writes a result JSON "
    "into DST (and to --out, which may lie inside DST). DST is built in a hidden folder beside it and renamed "
    "at the end: a failure or a kill leaves nothing behind (at the latest after the next run). SRC is never "
    "changed, and --force replaces only a folder an earlier `moba convert` wrote and nobody changed since.\n\n"
    "Examples:\n\n"
    "  moba convert ./Llama-3.2-1B ./Llama-3.2-1B-moba --chunk 4096 --topk 12 --full-layers last:3\n\n"
    "  moba convert ~/.cache/huggingface/hub/models--org--name/snapshots/<rev> ./name-moba --full-layers 0,30-31"
)


def convert(
    src: Annotated[
        str, typer.Argument(metavar="SRC", help="Checkpoint directory (or hub id org/name).", show_default=False)
    ],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="Directory to create (must not exist unless --force).")],
    chunk: Annotated[str, typer.Option("--chunk", help="Keys per MoBA block (e.g. 4096 or 4k).")] = "4096",
    topk: Annotated[int, typer.Option("--topk", help="Blocks each query attends, counting its own.")] = 12,
    full_layers: Annotated[
        str,
        typer.Option(
            "--full-layers",
            help="Layers kept on full attention: last:N, first:N, a list like 0,5,31 (ranges 4-7; -1 is the last "
            "layer), none, all.",
        ),
    ] = "last:3",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace DST if an earlier `moba convert` wrote it and nothing in it changed since "
            "(any other existing folder is refused).",
        ),
    ] = False,
    link: Annotated[
        bool,
        typer.Option(
            "--link",
            help="Hard-link the weight files instead of copying them: no extra disk space, but DST's weights "
            "ARE SRC's files, so writing into DST's weights (save_pretrained, torch.save) changes SRC.",
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(
            "--out", help="Also write the result JSON here: a folder, or a file ending in .json (any case)."
        )
    ] = None,
) -> None:
    with user_errors():
        from moba_cli.errors import MobaError
        from moba_cli.integrations.convert import convert_checkpoint
        from moba_cli.utils.sizes import parse_size

        try:
            chunk_size = parse_size(chunk)
        except MobaError as e:
            raise MobaError(f"--chunk: {e}") from None
        result = convert_checkpoint(
            src, dst, chunk_size=chunk_size, topk=topk, full_layers=full_layers, force=force, out=out, link=link
        )
        print_summary(result)


def _layers(idx: list[int]) -> str:
    if not idx:
        return "none"
    if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 2:
        return f"{idx[0]}-{idx[-1]}"
    return ",".join(map(str, idx))


def print_summary(result: dict[str, Any]) -> None:
    from moba_cli.utils.sizes import format_size

    s = result["summary"]
    n_full = len(s["full_layers"])
    console.print(
        f"[bold]converted[/] {result['config']['src']} -> {s['dst']} ({s['model_type']})",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"layers: {s['num_layers']} ({s['num_layers'] - n_full} MoBA: {_layers(s['moba_layers'])}; "
        f"{n_full} full: {_layers(s['full_layers'])})",
        highlight=False,
    )
    console.print(
        f"heads: {s['num_heads']}, KV heads: {s['num_kv_heads']}, head dim: {s['head_dim']}; "
        f"chunk {s['chunk_size']}, top-k {s['topk']}",
        highlight=False,
    )
    if s.get("config_edits"):
        console.print(f"config edits: {s['config_edits']} (sliding window never narrower than the context)")
    table = Table(title="expected sparsity (causal pairs skipped)", title_justify="left")
    for col in ("tokens", "blocks", "per MoBA layer", "whole model"):
        table.add_column(col, justify="right")
    for r in result["records"]:
        table.add_row(
            format_size(r["seq_len"]), str(r["blocks"]),
            f"{100 * r['sparsity_moba_layer']:.2f}%", f"{100 * r['sparsity_model']:.2f}%",
        )
    console.print(table)
    how = [f"{s[k]} {word}" for k, word in (("files_cloned", "cloned (copy-on-write)"), ("files_copied", "copied"),
           ("files_linked", "hard-linked to SRC")) if s.get(k)]
    console.print(
        f"weights: {len(s['weights'])} file(s); files: {', '.join(how) or 'none'}; result: {s['result_file']}",
        highlight=False,
        soft_wrap=True,
    )
    if s.get("skipped"):
        console.print(f"not copied (hidden): {', '.join(s['skipped'])}", highlight=False, soft_wrap=True)
    if s.get("out_file"):
        console.print(f"result also written to {s['out_file']}", highlight=False, soft_wrap=True)
