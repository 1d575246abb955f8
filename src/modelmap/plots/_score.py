"""Figures of a score report: the map-model FSC, per-residue Q and CC along each chain, the Q
histogram. Each takes a `ScoreReport` or its JSON form (`ScoreReport.to_json()`, or the file
`modelmap score --json` writes) and returns a `matplotlib.figure.Figure`."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ._save import new_figure, plot_path, save_png

__all__ = ["fsc_figure", "residue_figure", "q_histogram_figure", "write_score_plots"]

# colours used for one meaning throughout
_Q, _CC, _EXPECTED = "tab:blue", "tab:orange", "tab:red"
_RESOLUTION_TICKS = (50.0, 20.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.2, 1.0)


def _score_json(report) -> dict:
    """The JSON form of a score report: from a `ScoreReport`, or such a dict as given."""
    if hasattr(report, "to_json"):
        return report.to_json()
    if isinstance(report, dict) and {"summary", "fsc"} <= set(report):
        return report
    raise TypeError(f"expected a ScoreReport or its JSON dict, got {type(report).__name__}")


def _value(v) -> float:
    return math.nan if v is None else float(v)


def fsc_figure(report):
    """The map vs model-map FSC (inside the model mask) against spatial frequency, with the 0.5 and
    0.143 levels and the resolutions where the curve crosses them.

    **Arguments:**

    - `report`: a `ScoreReport` or its JSON dict.

    **Returns:** a `Figure` with one axes: the curve, two horizontal lines (0.5, 0.143) and one
    vertical line per crossing; a top axis in Å.
    """
    data = _score_json(report)
    summary = data["summary"]
    s = np.asarray([p["s"] for p in data["fsc"]], np.float64)
    f = np.asarray([_value(p["fsc"]) for p in data["fsc"]], np.float64)
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    ax.plot(s, f, color="k", lw=1.5, label="map vs model")
    for level, key, colour in ((0.5, "fsc_0.5", "tab:blue"), (0.143, "fsc_0.143", "tab:red")):
        ax.axhline(level, color=colour, ls="--", lw=1)
        d = _value(summary.get(key))
        if math.isfinite(d) and d > 0:
            ax.axvline(1.0 / d, color=colour, ls=":", lw=1.2, label=f"FSC = {level:g} at {d:.2f} Å")
    resolution = _value(summary.get("resolution"))
    ax.set_xlim(0.0, s.max() if s.size else 0.5)
    if math.isfinite(resolution) and 1.0 / resolution < ax.get_xlim()[1]:
        ax.axvspan(1.0 / resolution, ax.get_xlim()[1], color="0.9", zorder=0,
                   label=f"beyond the map's resolution ({resolution:g} Å)")
    lo = min(0.0, float(np.nanmin(f))) if f.size else 0.0
    ax.set_ylim(lo - 0.05, 1.05)
    ax.set_xlabel("spatial frequency s (Å⁻¹)")
    ax.set_ylabel("FSC")
    top = ax.secondary_xaxis("top")  # same s scale, ticks labelled with d = 1/s
    ticks = [d for d in _RESOLUTION_TICKS if 1.0 / d <= ax.get_xlim()[1]]
    top.set_xticks([1.0 / d for d in ticks], [f"{d:g}" for d in ticks])
    top.set_xlabel("resolution (Å)")
    ax.set_title("map vs model map FSC, inside the model mask", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    return fig


def _chain_residues(data: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per chain: residue numbers, residue Q and CC, with NaN rows inserted at numbering gaps so
    that lines break there."""
    chains: dict[str, list] = {}
    for r in data["residues"]:
        chains.setdefault(r["chain"], []).append((r["number"], _value(r.get("q")), _value(r.get("cc"))))
    out = {}
    for chain, rows in chains.items():
        rows.sort(key=lambda row: row[0])
        num, q, cc = (np.asarray(x, np.float64) for x in zip(*rows))
        gaps = np.flatnonzero(np.diff(num) > 1) + 1
        out[chain] = {"number": np.insert(num, gaps, np.nan), "q": np.insert(q, gaps, np.nan),
                      "cc": np.insert(cc, gaps, np.nan)}
    return out


def _mean(x: np.ndarray) -> str:
    x = x[np.isfinite(x)]
    return f"{x.mean():.3f}" if x.size else "n/a"


def residue_figure(report):
    """Per-residue Q (mean over the residue's atoms) and local CC along each chain, one panel per
    chain with the residue number on x; MapQ's expected Q at the resolution as a dashed line.
    Lines break at gaps in the numbering.

    **Arguments:**

    - `report`: a `ScoreReport` or its JSON dict.

    **Returns:** a `Figure` with one axes per chain, each with a Q line, a CC line and (when MapQ
    has a fit for the σ) the expected-Q line.
    """
    from matplotlib.ticker import MaxNLocator

    data = _score_json(report)
    summary = data["summary"]
    expected = _value(summary.get("q_expected"))
    chains = _chain_residues(data)
    fig = new_figure(10.0, 0.6 + 2.1 * max(len(chains), 1))
    axes = fig.subplots(max(len(chains), 1), 1, squeeze=False)[:, 0]
    for ax, (chain, c) in zip(axes, chains.items()):
        ax.plot(c["number"], c["q"], color=_Q, lw=0.9, label=f"Q per residue (mean {_mean(c['q'])})")
        ax.plot(c["number"], c["cc"], color=_CC, lw=0.9, label=f"local CC per residue (mean {_mean(c['cc'])})")
        if math.isfinite(expected):
            ax.axhline(expected, color=_EXPECTED, ls="--", lw=1, label=f"expected Q at {summary['resolution']:g} Å "
                       f"({expected:.2f})")
        finite = np.concatenate([c["q"][np.isfinite(c["q"])], c["cc"][np.isfinite(c["cc"])], [0.0]])
        ax.set_ylim(min(0.0, finite.min()) - 0.05, 1.02)
        ax.set_title(f"chain {chain} ({int(np.isfinite(c['number']).sum())} residues)", fontsize=9, loc="left")
        ax.set_ylabel("Q, CC")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=3, frameon=False,
                  borderaxespad=0.1)
    axes[-1].set_xlabel("residue number")
    return fig


def q_histogram_figure(report):
    """Histogram of the per-atom Q-scores with their mean and MapQ's expected Q at the resolution.

    **Arguments:**

    - `report`: a `ScoreReport` or its JSON dict.

    **Returns:** a `Figure` with one axes: the histogram, the mean-Q line and (when MapQ has a fit
    for the σ) the expected-Q line.
    """
    data = _score_json(report)
    summary = data["summary"]
    q = np.asarray([_value(a["q"]) for a in data["atoms"]], np.float64)
    q = q[np.isfinite(q)]
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    lo = math.floor(min(q.min(initial=0.0), 0.0) * 10) / 10
    ax.hist(q, bins=np.arange(lo, 1.0 + 1e-9, 0.025), color=_Q, alpha=0.75)
    mean, expected = _value(summary.get("q_mean")), _value(summary.get("q_expected"))
    ax.axvline(mean, color="k", lw=1.5, label=f"mean Q {mean:.3f}")
    if math.isfinite(expected):
        ax.axvline(expected, color=_EXPECTED, ls="--", lw=1.5,
                   label=f"expected Q at {summary['resolution']:g} Å (MapQ) {expected:.3f}")
    ax.set_xlabel("Q-score")
    ax.set_ylabel("atoms")
    ax.set_title(f"Q-score of {q.size} atoms (σ = {_value(summary.get('q_sigma')):g} Å, {summary.get('q_variant')})",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return fig


def write_score_plots(report, prefix: str | os.PathLike, *, protect: tuple = ()) -> dict[str, Path]:
    """Write the three score figures as PNGs: `PREFIX_fsc.png`, `PREFIX_residues.png` and
    `PREFIX_q_histogram.png` (or `fsc.png`, ... inside `prefix` when it is a folder).

    **Arguments:**

    - `report`: a `ScoreReport` or its JSON dict.
    - `prefix`: path prefix or folder (see `plot_path`).
    - `protect`: input files that must never be overwritten.

    **Returns:** the paths written, by figure name.
    """
    data = _score_json(report)
    figures = {"fsc": fsc_figure, "residues": residue_figure, "q_histogram": q_histogram_figure}
    return {name: save_png(make(data), plot_path(prefix, name), protect=protect) for name, make in figures.items()}
