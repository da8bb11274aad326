"""Sweep figures: loss against compute (log-log, both attentions and their fits) and trailing-token loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"moba": "tab:blue", "full": "tab:orange", "moba->full": "tab:green", "full->moba": "tab:red"}


def plot_sweep(records: list[dict[str, Any]], fits: dict[str, Any], out_dir: Path) -> dict[str, str | None]:
    """Write ``loss_vs_compute.png`` and ``trailing_loss.png``; returns their paths (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"loss_vs_compute": None, "trailing_loss": None, "note": "matplotlib is not installed"}
    import numpy as np

    from moba_cli.train.fit import predict

    paths: dict[str, str | None] = {}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for attn in sorted({r["attn"] for r in records}):
        pts = [r for r in records if r["attn"] == attn and r["final_val_loss"]]
        if not pts:
            continue
        c = np.array([r["compute"] for r in pts])
        ax.scatter(c, [r["final_val_loss"] for r in pts], color=COLORS.get(attn), label=f"{attn}")
        for r in pts:
            ax.annotate(str(r["size"]), (r["compute"], r["final_val_loss"]), fontsize=7, alpha=0.7)
        if attn in fits:
            f = fits[attn]
            xs = np.geomspace(c.min() / 1.5, c.max() * 1.5, 50)
            err = f" ± {f['b_err']:.3f}" if f.get("b_err") is not None else ""
            extra = f" + {f['e']:.2f}" if f.get("e") is not None else ""
            ax.plot(xs, predict(f, xs), color=COLORS.get(attn), ls="--",
                    label=f"{attn} fit: {f['a']:.3g}·C^-{f['b']:.3f}{err}{extra}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    # Losses span a narrow range: plain numbers on the y axis, not 2.5x10^0.
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.4g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.4g"))
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel("validation LM loss")
    ax.set_title("MoBA vs full attention: loss against compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "loss_vs_compute.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths["loss_vs_compute"] = str(path)

    with_pos = [r for r in records if r.get("val_loss_by_position")]
    if with_pos:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in with_pos:
            by = r["val_loss_by_position"]
            xs = (np.arange(len(by)) + 0.5) / len(by) * r["seq_len"]
            ls = "-" if r["attn"] == "moba" else "--"
            ax.plot(xs, by, ls=ls, marker=".", label=f"{r['size']} {r['attn']}")
        ax.set_xlabel("position in the row (bucket centre, tokens)")
        ax.set_ylabel("validation loss")
        ax.set_title("Loss by position (the last buckets are the trailing tokens)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / "trailing_loss.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths["trailing_loss"] = str(path)
    else:
        paths["trailing_loss"] = None
    return paths
