"""Plots of evaluation results (matplotlib, files only): needle heatmaps and loss by position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError

SCORES = (("exact", "exact match (greedy answer)"), ("rank1", "true value ranked first"))


def check_matplotlib() -> None:
    """Fail before the work starts when plots are wanted but matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MobaError("plots need matplotlib: pip install matplotlib (or pass --no-plot)") from None


def _grid(records: list[dict[str, Any]], attn: str, score: str, lengths: list[int], depths: list[float]):
    """``[depths, lengths]`` array of a score; NaN where a cell ran out of memory."""
    import numpy as np

    g = np.full((len(depths), len(lengths)), np.nan)
    for r in records:
        if r["attn"] == attn and r["status"] == "ok" and r["length"] in lengths and r["depth"] in depths:
            g[depths.index(r["depth"]), lengths.index(r["length"])] = r[score]
    return g


def _label(n: int) -> str:
    from moba_cli.utils.sizes import format_size

    return format_size(n)


def _panel(ax, grid, lengths, depths, title, cmap, vmin, vmax, first=True):
    import numpy as np

    im = ax.imshow(grid, origin="upper", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(lengths)), [_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    if first:
        ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    for (i, j), v in np.ndenumerate(grid):
        text = "OOM" if np.isnan(v) else f"{v:.2f}"
        dark = not np.isnan(v) and (abs(v) > 0.6 if vmin < 0 else v < 0.5)
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    return im


def needle_heatmaps(
    records: list[dict[str, Any]], attns: list[str], lengths: list[int], depths: list[float], stem: Path | str,
    title: str,
) -> list[Path]:
    """One PNG per attention (both scores, shared 0..1 scale) and, for two, one of MoBA minus full.

    Files: ``<stem>-<attn>.png`` and ``<stem>-diff.png``. Returns their paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = sorted(lengths), list(depths)
    stem = Path(stem)
    paths = []
    width = max(7.0, 1.2 + 0.9 * len(lengths) * len(SCORES))
    height = max(3.5, 1.5 + 0.35 * len(depths))
    jobs = [(attn, [(_grid(records, attn, s, lengths, depths), label) for s, label in SCORES]) for attn in attns]
    if attns == ["moba", "full"]:
        jobs.append(("diff", [
            (_grid(records, "moba", s, lengths, depths) - _grid(records, "full", s, lengths, depths), label)
            for s, label in SCORES
        ]))
    for name, panels in jobs:
        fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
        diff = name == "diff"
        im = None
        for i, (ax, (grid, label)) in enumerate(zip(axes[0], panels, strict=True)):
            im = _panel(ax, grid, lengths, depths, label, "RdBu" if diff else "viridis",
                        -1.0 if diff else 0.0, 1.0, first=i == 0)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="MoBA - full" if diff else "score")
        fig.suptitle(f"{title}: {'MoBA minus full attention' if diff else name}", fontsize=11)
        path = stem.parent / f"{stem.name}-{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def loss_plot(records: list[dict[str, Any]], attns: list[str], path: Path | str, title: str) -> Path:
    """Loss against position (bucket centres), one line per attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for attn in attns:
        rows = sorted((r for r in records if r["attn"] == attn), key=lambda r: r["bucket"])
        xs = [(r["start"] + r["end"]) / 2 for r in rows]
        ax.plot(xs, [r["loss"] for r in rows], marker="o", label="MoBA" if attn == "moba" else "full attention")
    ax.set_xlabel("position in the sequence (tokens, bucket centre)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
