"""What ``moba bench`` shows and writes besides the JSON: the table, the CSV, the PNG plots, the summary."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from moba_cli.bench.runner import RECORD_FIELDS
from moba_cli.utils.sizes import format_size

STATUS_STYLE = {"ok": "green", "estimated": "yellow", "skipped": "dim", "oom": "magenta", "error": "bold red"}


def _group_key(r: dict) -> tuple:
    return (r["pass"], r["batch"], r["heads"], r["kv_heads"], r["head_dim"], r["dtype"])


def _group_label(key: tuple) -> str:
    p, b, h, kv, d, dtype = key
    heads = f"{h}" if h == kv else f"{h}/{kv}"
    return f"{p}, B={b}, H={heads}, D={d}, {dtype}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fmt_ms(x: float | None, digits: int = 4) -> str:
    """Milliseconds with about ``digits`` significant digits and never an exponent: 0.0123, 12.34, 18080."""
    if x is None:
        return "-"
    for bound, places in ((1000, 0), (100, 1), (10, 2), (1, 3)):
        if x >= bound:
            return f"{x:.{max(0, places - (4 - digits))}f}"
    return f"{x:.{digits - 1}g}" if x < 0.001 else f"{x:.{digits}f}".rstrip("0")


def fmt_tflops(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _chunk_label(rows: list[dict]) -> str:
    chunks = sorted({r["chunk"] for r in rows})
    chunk = str(chunks[0]) if len(chunks) == 1 else "seq/" + str(rows[0]["seq"] // rows[0]["chunk"])
    return f"chunk {chunk}, topk {rows[0]['topk']}"


def records_tables(records: list[dict]) -> list[Table]:
    """One compact table per (pass, batch, heads, head_dim, dtype); skipped records are listed apart."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[_group_key(r)].append(r)
    tables = []
    for key, rows in groups.items():
        shown = [r for r in rows if r["status"] != "skipped"]
        if not shown:
            continue
        table = Table(title=f"{_group_label(key)}, {_chunk_label(rows)}", title_justify="left",
                      title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold",
                      collapse_padding=True)
        for col in ("seq", "provider", "ms", "min-max", "TFLOP/s", "GiB+", "x cuDNN", "x flash"):
            table.add_column(col, justify="left" if col == "provider" else "right", no_wrap=True)
        prev_seq = None
        for r in sorted(shown, key=lambda r: r["seq"]):
            if prev_seq is not None and r["seq"] != prev_seq:
                table.add_section()
            prev_seq = r["seq"]
            est = "~" if r["status"] == "estimated" else ""
            if r["status"] in ("ok", "estimated"):
                ms = est + fmt_ms(r["ms"])
                spread = f"{fmt_ms(r['ms_min'], 3)}-{fmt_ms(r['ms_max'], 3)}"
            else:
                ms, spread = f"[{STATUS_STYLE[r['status']]}]{r['status']}[/]", ""
            mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**30:.2f}"
            table.add_row(
                format_size(r["seq"]) + ("*" if r.get("anchor_for") else ""),
                r["provider"],
                ms,
                spread,
                est + fmt_tflops(r["tflops"]),
                mem,
                _speedup(r, "speedup_vs_sdpa_cudnn", "sdpa-cudnn"),
                _speedup(r, "speedup_vs_sdpa_flash", "sdpa-flash"),
            )
        tables.append(table)
    return tables


def _speedup(r: dict, field: str, base: str) -> str:
    x = r.get(field)
    if x is None or r["provider"] == base:
        return "-"
    mark = "~" if base in (r.get("baseline_estimated") or "") or r["status"] == "estimated" else ""
    return f"{mark}{x:.2f}"


def print_report(records: list[dict], console: Console, title: str) -> None:
    console.print(f"[bold]{title}[/]", highlight=False)
    for table in records_tables(records):
        console.print(table)
    console.print(
        "[dim]ms: median time per call; min-max over the timed runs; GiB+: peak memory above the inputs; "
        "~: estimated by the S^2 law, not run; *: length measured only to estimate a longer one; x cuDNN, "
        "x flash: speedup against sdpa-cudnn, sdpa-flash on the same shape.[/]"
    )
    reasons = Counter((r["provider"], r["status"], r["reason"]) for r in records
                      if r["status"] in ("skipped", "error", "oom") and r["reason"])
    for (provider, status, reason), n in sorted(reasons.items()):
        style = STATUS_STYLE.get(status, "")
        times = f" ({n} cases)" if n > 1 else ""
        console.print(f"  [{style}]{status}[/] {provider}{times}: {reason}", highlight=False, soft_wrap=True)


def write_csv(records: list[dict], path: Path) -> Path:
    fields = list(RECORD_FIELDS) + sorted({k for r in records for k in r} - set(RECORD_FIELDS))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            w.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()})
    return path


def fit_suptitle(fig, title: str, margin: float = 0.96) -> None:
    """Set the figure's title, wrapped onto more lines until it fits ``margin`` of the figure's width.

    A one-panel figure is only 5.5 inches wide; an unwrapped title would run past both edges. tight_layout
    then keeps room above the panels for however many lines there are.
    """
    import textwrap

    renderer = fig.canvas.get_renderer()
    width = margin * fig.get_window_extent(renderer).width
    text = fig.suptitle(title)
    cols = len(title)
    while text.get_window_extent(renderer).width > width and cols > 12:
        cols = int(cols * 0.85)
        text.set_text(textwrap.fill(title, cols))


def write_plots(records: list[dict], stem: Path) -> tuple[list[Path], str | None]:
    """``<stem>-time.png`` (log-log time per provider) and ``<stem>-speedup.png`` (vs sdpa-cudnn).

    Returns the files written and a note when plots were skipped.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install matplotlib); no plots written"
    timed = [r for r in records if r["status"] in ("ok", "estimated") and r["ms"]]
    if not timed:
        return [], "nothing was timed; no plots written"
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in timed:
        groups[_group_key(r)].append(r)
    from matplotlib.ticker import FuncFormatter, LogLocator

    from moba_cli.bench.providers import PROVIDER_NAMES

    present = {r["provider"] for r in timed}
    providers = [p for p in PROVIDER_NAMES if p in present] + sorted(present - set(PROVIDER_NAMES))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(PROVIDER_NAMES + sorted(present))}
    width = {p: 2.6 if p == "moba-triton" else 1.4 for p in providers}
    files = []

    def panel_grid(n):
        cols = min(3, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        return fig, list(axes.flat)

    def finish_panel(ax, key, rows, ylabel):
        seqs = sorted({r["seq"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs)
        ax.set_xticklabels([format_size(s) for s in seqs], rotation=0)
        ax.minorticks_off()
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(_group_label(key), fontsize=10)
        ax.set_xlabel("sequence length (decode: KV-cache length)" if key[0] == "decode" else "sequence length")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)

    def save(fig, title, suffix):
        fit_suptitle(fig, title)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-{suffix}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)

    # Time against sequence length.
    fig, axes = panel_grid(len(groups))
    for ax, (key, rows) in zip(axes, groups.items(), strict=False):
        for p in providers:
            pts = sorted((r["seq"], r["ms"], r["status"]) for r in rows if r["provider"] == p)
            if not pts:
                continue
            meas = [(s, m) for s, m, st in pts if st == "ok"]
            est = [(s, m) for s, m, st in pts if st == "estimated"]
            if meas:
                ax.plot(*zip(*meas, strict=True), "o-", color=colors[p], lw=width[p], label=p)
            if est:
                link = meas[-1:] + est
                ax.plot(*zip(*link, strict=True), "--", color=colors[p], alpha=0.7)
                ax.plot(*zip(*est, strict=True), "o", mfc="none", color=colors[p],
                        label=f"{p} (estimated)" if not meas else None)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
        finish_panel(ax, key, rows, "time per call (ms)")
    save(fig, "moba bench: time per call (hollow = estimated, S^2 law)", "time")

    # Speedup against sdpa-cudnn.
    sp = [r for r in timed if r["speedup_vs_sdpa_cudnn"] is not None and r["provider"] != "sdpa-cudnn"]
    if sp:
        sgroups: dict[tuple, list[dict]] = defaultdict(list)
        for r in sp:
            sgroups[_group_key(r)].append(r)
        fig, axes = panel_grid(len(sgroups))
        for ax, (key, rows) in zip(axes, sgroups.items(), strict=False):
            for p in providers:
                pts = sorted((r["seq"], r["speedup_vs_sdpa_cudnn"], bool(r["baseline_estimated"])
                              or r["status"] == "estimated") for r in rows if r["provider"] == p)
                if not pts:
                    continue
                ax.plot([s for s, _, _ in pts], [x for _, x, _ in pts], "-", color=colors[p], lw=width[p], label=p)
                for s, x, est in pts:
                    ax.plot([s], [x], "o", color=colors[p], mfc="none" if est else colors[p])
            ax.axhline(1.0, color="gray", lw=1, ls=":")
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_locator(LogLocator(base=2))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
            finish_panel(ax, key, rows, "speedup vs sdpa-cudnn (x)")
        save(fig, "moba bench: speedup against dense sdpa-cudnn (hollow = baseline estimated)", "speedup")
    return files, None


def summarize(records: list[dict]) -> dict:
    """Headline numbers: status counts, MoBA-vs-dense speedups per shape, the best ones, failures."""
    counts = Counter(r["status"] for r in records)
    moba = [r for r in records if r["provider"] == "moba-triton" and r["status"] == "ok"]
    rows = [
        {k: r[k] for k in ("pass", "batch", "seq", "heads", "kv_heads", "head_dim", "chunk", "topk", "ms",
                           "tflops", "sparsity", "speedup_vs_sdpa_cudnn", "speedup_vs_sdpa_flash",
                           "baseline_estimated")}
        for r in moba
    ]
    best = {}
    for field in ("speedup_vs_sdpa_cudnn", "speedup_vs_sdpa_flash"):
        cands = [r for r in moba if r[field] is not None]
        if cands:
            r = max(cands, key=lambda r: r[field])
            best[field] = {"value": r[field], "pass": r["pass"], "seq": r["seq"], "heads": r["heads"],
                           "baseline_estimated": r["baseline_estimated"]}
    problems = [f"{r['provider']} {r['pass']} seq={r['seq']} H={r['heads']}: {r['status']}: {r['reason']}"
                for r in records if r["status"] in ("error", "oom")]
    # Say how the times were really taken (a CPU run has no CUDA events), as the records do.
    used = sorted({r["timer"] for r in records if r.get("timer")})
    timers = "; ".join(used) if used else "nothing was timed"
    return {
        "status_counts": dict(counts),
        "moba_triton": rows,
        "best": best,
        "longest_seq_moba_triton": max((r["seq"] for r in moba), default=None),
        "problems": problems,
        "fields": {
            "ms": "median of the timed runs; " + timers,
            "peak_mem_bytes": "peak allocated during one call minus what was allocated just before it (inputs "
                              "and provider preparation excluded)",
            "peak_mem_total_bytes": "peak allocated by the whole process during that call (inputs included)",
            "tflops": "4 * attended pairs * head_dim (x3.5 for fwd+bwd) / time; gate FLOPs not counted",
            "speedup_vs_*": "baseline ms / this ms on the same shape and pass",
        },
    }
