"""The figure of a difference map: the distribution of Δ/σ beside a normal one, and its strongest
positive and negative peaks with the atoms nearest to them."""

from __future__ import annotations

import math

import numpy as np

from ._save import new_figure

__all__ = ["difference_figure"]


def difference_figure(values, positive: list[dict], negative: list[dict], *, threshold: float = 3.0,
                      n_shown: int = 15):
    """Two panels: a histogram of Δ/σ over the map's support (log counts) beside the normal
    distribution of the same count (what noise alone would give), with ±`threshold` marked; and the
    `n_shown` strongest peaks of each sign as bars, labelled by their nearest atom and its distance.

    **Arguments:**

    - `values`: Δ/σ at the voxels of the support (any shape; flattened).
    - `positive`, `negative`: peak rows (`DifferencePeaks.rows(labels)`: `height` in σ,
      `nearest_label` or `nearest_atom`, `distance` in Å), strongest first.
    - `threshold`: the peak threshold (σ).
    - `n_shown`: peaks shown per sign.

    **Returns:** a `matplotlib.figure.Figure`.
    """
    values = np.asarray(values, np.float64).ravel()
    fig = new_figure(11.0, 4.6)
    ax, bars = fig.subplots(1, 2, width_ratios=(1.0, 1.1))
    lo = min(float(values.min()) if values.size else 0.0, -threshold - 1.0)
    hi = max(float(values.max()) if values.size else 0.0, threshold + 1.0)
    edges = np.linspace(lo, hi, 121)
    counts, _ = np.histogram(values, edges)
    centres = 0.5 * (edges[1:] + edges[:-1])
    ax.step(centres, np.maximum(counts, 0.5), where="mid", color="k", lw=1.0, label=f"Δ/σ ({values.size:,} voxels)")
    normal = values.size * (edges[1] - edges[0]) * np.exp(-0.5 * centres**2) / math.sqrt(2 * math.pi)
    ax.plot(centres, normal, color="tab:blue", lw=1.0, ls="--", label="normal, same count")
    for sign, colour in ((1, "tab:green"), (-1, "tab:red")):
        beyond = int(np.count_nonzero(sign * values >= threshold))
        ax.axvline(sign * threshold, color=colour, lw=1.0, label=f"{'+' if sign > 0 else '−'}{threshold:g}σ: {beyond:,} voxels beyond")
    ax.set_yscale("log")
    ax.set_ylim(0.5, max(float(counts.max()) if counts.size else 1.0, 1.0) * 2.0)
    ax.set_xlabel("Δ/σ")
    ax.set_ylabel("voxels per bin")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("the difference map's values", fontsize=9)
    rows = [(r, "tab:green") for r in positive[:n_shown]] + [(r, "tab:red") for r in negative[:n_shown]]
    if rows:
        y = np.arange(len(rows))[::-1]
        heights = [r["height"] for r, _ in rows]
        bars.barh(y, heights, color=[c for _, c in rows], alpha=0.8)
        for yi, h in zip(y, heights):
            bars.text(h, yi, f" {h:.1f} ", va="center", ha="left" if h >= 0 else "right", fontsize=6)
        labels = []
        for r, _ in rows:
            name = r.get("nearest_label") or (f"atom {r['nearest_atom']}" if r.get("nearest_atom") is not None else "no atom")
            labels.append(f"{name}, {r['distance']:.1f} Å" if r.get("distance") is not None else name)
        bars.set_yticks(y, labels, fontsize=7)
        bars.axvline(0.0, color="k", lw=0.8)
        bars.margins(x=0.1)  # room for the values beside the bars
    else:
        bars.text(0.5, 0.5, f"no peak beyond ±{threshold:g}σ", ha="center", va="center", transform=bars.transAxes)
        bars.set_yticks([])
    bars.set_xlabel("peak height (σ)")
    bars.set_title(f"strongest peaks (up to {n_shown} of each sign) and their nearest atoms", fontsize=9)
    return fig
