"""`moba data build`: make a training dataset offline (the work is in :mod:`moba_cli.train.data_build`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from moba_cli.commands._common import console, err_console, group, user_errors
from moba_cli.errors import MobaError

app = group("Build training datasets offline (tokenizer, token shards, manifest).", name="data")

HELP = (
    "Build a training dataset offline: read documents, train a byte-level BPE tokenizer on them, and write "
    "memory-mapped token files with a train/validation split, ready for `moba train`.\n\n"
    "[bold]Sources[/] (--source, repeat to mix; --*-fraction sets each one's share of tokens):\n"
    "code: every .py file of this Python's installed packages (site-packages), in sorted path order; narrow "
    "it with --include/--exclude (package names or globs), cap it with --code-max-bytes; --code-group package "
    "makes one long document per package.\n"
    "files: local .txt/.md/.rst files (one document each), .jsonl (one a line, text in --field) or .parquet "
    "(needs pyarrow); folders are read recursively. With --prompt-field and --answer-field they are SFT pairs.\n"
    "synthetic: long-context retrieval documents (passkey, kv lookup, vartrack = variable chains, needle = "
    "moba eval needle's prompt form; needle_multi and kv_multi: many facts, each asked and answered; repeat: "
    "a passage written twice) of "
    "--synthetic-lengths tokens; --sft makes them prompt/answer pairs with the loss on the answer only.\n\n"
    "[bold]Examples[/]:\n"
    "moba data build --source code --out data/code --vocab 4096 --max-tokens 2m\n"
    "moba data build --source code --source synthetic --synthetic-fraction 0.2 --synthetic-lengths 8k,32k "
    "--out data/needle --max-tokens 50m\n"
    "moba data build --source files --files notes/ --out data/notes --tokenizer data/code\n"
    "moba data build --config data.yaml   (the DataConfig keys, or a recipe with data: {path, build: {...}})\n\n"
    "[bold]Output[/]: DATA/tokenizer/, {train,val}.tokens (+ .docs.npy, .mask for SFT), manifest.json with "
    "files_hash and manifest_hash (the same sources and package versions give the same hashes on any "
    "machine). The build goes to a hidden .partial folder first and is renamed at the end, so an interrupted "
    "build leaves no dataset behind. A JSON summary goes to results/data/ (or --result)."
)

Opt = typer.Option


@app.callback()
def _data() -> None:
    """Build training datasets offline (tokenizer, token shards, manifest)."""


@app.command("build", help=HELP, short_help="Build a dataset: tokenizer, token files, manifest.")
def build(
    config: Annotated[Path | None, Opt("--config", help="YAML build config (or a recipe with data.build).")] = None,
    source: Annotated[list[str] | None, Opt("--source", help="code, files or synthetic; repeat to mix.")] = None,
    out: Annotated[Path | None, Opt("--out", help="The dataset folder to create.")] = None,
    vocab: Annotated[int | None, Opt("--vocab", help="Tokenizer vocabulary size. (default: 4096)")] = None,
    max_tokens: Annotated[str | None, Opt("--max-tokens", help="Stop after this many tokens (2m, 500k).")] = None,
    val_fraction: Annotated[float | None, Opt("--val-fraction", help="Share of documents for validation. "
                                              "(default: 0.01)")] = None,
    seed: Annotated[int | None, Opt("--seed", help="Seed of the split and synthetic documents. (default: 0)")] = None,
    tokenizer: Annotated[Path | None, Opt("--tokenizer", help="Reuse this tokenizer (a dataset folder or its "
                                          "tokenizer/).")] = None,
    include: Annotated[list[str] | None, Opt("--include", help="code: packages to read (names or globs).")] = None,
    exclude: Annotated[list[str] | None, Opt("--exclude", help="code: packages to skip.")] = None,
    suffix: Annotated[list[str] | None, Opt("--suffix", help="code: file endings to read. (default: .py)")] = None,
    code_max_bytes: Annotated[str | None, Opt("--code-max-bytes", help="code: stop after this much text.")] = None,
    code_fraction: Annotated[float | None, Opt("--code-fraction", help="code: share of tokens.")] = None,
    code_group: Annotated[str, Opt("--code-group", help="code: one document per file, or per package (long "
                                   "documents for long-context training).")] = "file",
    files: Annotated[list[Path] | None, Opt("--files", help="files: a file or folder; repeat for more.")] = None,
    field: Annotated[str, Opt("--field", help="files: text field of .jsonl / column of .parquet.")] = "text",
    prompt_field: Annotated[str | None, Opt("--prompt-field", help="files: prompt field of SFT pairs.")] = None,
    answer_field: Annotated[str | None, Opt("--answer-field", help="files: answer field of SFT pairs.")] = None,
    files_fraction: Annotated[float | None, Opt("--files-fraction", help="files: share of tokens.")] = None,
    synthetic_tasks: Annotated[str | None, Opt("--synthetic-tasks", help="synthetic: comma list of passkey, kv, "
                                               "vartrack, needle, needle_multi, kv_multi, repeat. "
                                               "(default: passkey,kv,vartrack)")] = None,
    synthetic_lengths: Annotated[str | None, Opt("--synthetic-lengths", help="synthetic: target lengths in "
                                                 "tokens, e.g. 8k,32k. (default: 2k)")] = None,
    synthetic_docs: Annotated[int | None, Opt("--synthetic-docs", help="synthetic: number of documents.")] = None,
    synthetic_fraction: Annotated[float | None, Opt("--synthetic-fraction", help="synthetic: share of "
                                                    "tokens.")] = None,
    sft: Annotated[bool, Opt("--sft", help="synthetic: prompt/answer pairs, loss on the answer only.")] = False,
    overwrite: Annotated[bool, Opt("--overwrite", help="Replace DATA if it is a dataset built before.")] = False,
    result: Annotated[Path | None, Opt("--result", help="JSON file or folder for the summary. "
                                       "(default: results/data/)")] = None,
) -> None:
    with user_errors():
        from moba_cli.results import check_out, make_result, write_result
        from moba_cli.train.data_config import MIN_VOCAB, config_from_dict

        if config is not None:
            if source:
                raise MobaError("give the sources either in --config or with --source, not both")
            raw, default_out = _read_config(config)
            raw.setdefault("out", default_out)
            where = str(config)
        else:
            if not source:
                raise MobaError("nothing to build: give --source (code, files, synthetic) or --config FILE")
            raw = {"sources": [_source(
                s, include, exclude, suffix, code_max_bytes, code_fraction, code_group, files, field, prompt_field,
                answer_field, files_fraction, synthetic_tasks, synthetic_lengths, synthetic_docs,
                synthetic_fraction, sft) for s in source]}
            where = "options"
        if vocab is not None and vocab < MIN_VOCAB:
            raise MobaError(f"--vocab {vocab} is too small: a byte-level BPE needs at least {MIN_VOCAB} "
                            "(256 bytes, 3 special tokens, one merge)")
        if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
            raise MobaError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        overrides = {"vocab_size": vocab, "val_fraction": val_fraction, "seed": seed,
                     "max_tokens": _size("--max-tokens", max_tokens) if max_tokens is not None else None,
                     "tokenizer": str(tokenizer) if tokenizer is not None else None,
                     "out": str(out) if out is not None else None}
        raw.update({k: v for k, v in overrides.items() if v is not None})
        cfg = config_from_dict(raw, where=where)
        if cfg.out is None:
            raise MobaError("no output folder: give --out DATA")
        check_out(result, "results/data", flag="--result")
        manifest = _run(cfg, overwrite)
        records, summary = _summary(cfg, manifest)
        path = write_result(make_result("data-build", {**cfg.to_dict(), "out": cfg.out}, records, summary),
                            result, "results/data")
        _print(cfg, manifest, records, path)


def _size(flag: str, text: str) -> int:
    from moba_cli.utils.sizes import parse_size

    try:
        return parse_size(text)
    except MobaError as e:
        raise MobaError(f"{flag}: {e}") from None


def _read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    """The build mapping of a YAML file: the file itself, or a recipe's ``data.build`` (out: ``data.path``)."""
    import yaml

    if not path.is_file():
        raise MobaError(f"file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MobaError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise MobaError(f"{path}: expected a mapping of build settings")
    data = doc.get("data")
    if isinstance(data, dict) and "sources" not in doc:
        if not isinstance(data.get("build"), dict):
            raise MobaError(f"{path}: the recipe's data section has no 'build' mapping to build from")
        return data["build"], data.get("path") or None
    return doc, None


def _source(kind: str, include, exclude, suffix, code_max_bytes, code_fraction, code_group, files, field, prompt_field,
            answer_field, files_fraction, synthetic_tasks, synthetic_lengths, synthetic_docs, synthetic_fraction,
            sft) -> dict[str, Any]:
    """One source mapping from the flags that belong to it."""
    if kind == "code":
        src: dict[str, Any] = {"kind": "code", "include": include or [], "exclude": exclude or [],
                               "max_bytes": code_max_bytes, "fraction": code_fraction, "group": code_group}
        if suffix:
            src["suffixes"] = [s if s.startswith(".") else "." + s for s in suffix]
        return src
    if kind == "files":
        if not files:
            raise MobaError("--source files needs --files PATH (a file or folder)")
        return {"kind": "files", "paths": [str(p) for p in files], "text_field": field,
                "prompt_field": prompt_field, "answer_field": answer_field, "fraction": files_fraction}
    if kind == "synthetic":
        src = {"kind": "synthetic", "docs": synthetic_docs, "sft": sft, "fraction": synthetic_fraction}
        if synthetic_tasks:
            src["tasks"] = [t.strip() for t in synthetic_tasks.split(",") if t.strip()]
        if synthetic_lengths:
            src["lengths"] = [t.strip() for t in synthetic_lengths.split(",") if t.strip()]
        return src
    raise MobaError(f"unknown source {kind!r}; choose code, files or synthetic")


def _run(cfg, overwrite: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moba_cli.train.data_build import build_dataset

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                label = "training tokenizer (bytes)" if phase == "tokenizer" else "tokenizing (tokens)"
                tasks[phase] = bar.add_task(label, total=total)
            bar.update(tasks[phase], completed=done)

        return build_dataset(cfg, overwrite=overwrite, progress=progress)


def _summary(cfg, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    total = sum(s["tokens"] for s in manifest["splits"].values())
    records = [{"source": i, **s, "share": s["tokens"] / total} for i, s in enumerate(manifest["sources"])]
    summary = {
        "out": cfg.out,
        "tokens": total,
        "docs": sum(s["docs"] for s in manifest["splits"].values()),
        "splits": manifest["splits"],
        "vocab_size": manifest["vocab_size"],
        "dtype": manifest["dtype"],
        "files_hash": manifest["files_hash"],
        "manifest_hash": manifest["manifest_hash"],
        "seconds": manifest["build"]["seconds"],
    }
    return records, summary


def _print(cfg, manifest: dict[str, Any], records: list[dict[str, Any]], path: Path) -> None:
    from rich.table import Table

    table = Table(title=f"dataset {cfg.out}")
    for col in ("source", "docs", "tokens", "share", "skipped"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for r in records:
        table.add_row(r["kind"], f"{r['docs']:,}", f"{r['tokens']:,}", f"{r['share']:.1%}", f"{r['skipped']:,}")
    for name, split in manifest["splits"].items():
        table.add_row(f"[dim]split {name}[/]", f"{split['docs']:,}", f"{split['tokens']:,}", "", "")
    console.print(table)
    console.print(f"vocab {manifest['vocab_size']} ({manifest['dtype']}), files_hash {manifest['files_hash'][:16]}, "
                  f"manifest_hash {manifest['manifest_hash'][:16]}, {manifest['build']['seconds']:.1f} s",
                  highlight=False)
    console.print(f"summary: {path}", highlight=False)
