"""The Guinier plot of a sharpening run: ln|F| against s² for the map, the sharpened maps and the model
map, with the fitted line and its range."""

from __future__ import annotations

import math

import numpy as np

from ._save import new_figure

__all__ = ["guinier_figure"]

_TICKS = (20.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5)


def guinier_figure(fit, curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, *, resolution: float | None = None):
    """A Guinier plot: ln(mean |F| per shell) against s² (Å⁻²).

    **Arguments:**

    - `fit`: a `modelmap.analysis.GuinierFit` (the map's curve, the fitted line, the range used).
    - `curves`: more `(s, ln|F|)` curves by label (sharpened maps, the model map), each shifted to
      start at the map's value in the first fitted shell so that the slopes compare.
    - `resolution`: D (Å), shaded beyond.

    **Returns:** a `matplotlib.figure.Figure`.
    """
    s2 = fit.s**2
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    ax.plot(s2, fit.log_amplitude, color="k", lw=1.5, label="map")
    first = int(np.flatnonzero(fit.used)[0])
    for (label, (s, log_amp)), colour in zip((curves or {}).items(), ("tab:blue", "tab:green", "tab:purple",
                                                                         "tab:brown", "tab:gray")):
        log_amp = np.asarray(log_amp, float)
        k = int(np.argmin(np.abs(np.asarray(s) - fit.s[first])))
        ax.plot(np.asarray(s) ** 2, log_amp - log_amp[k] + fit.log_amplitude[first], color=colour, lw=1.2,
                label=f"{label} (shifted)")
    ax.plot(s2[fit.used], fit.curve[fit.used], color="tab:red", lw=2, ls="--",
            label=f"fit {fit.d_low:g}-{fit.d_high:g} Å: B = {fit.b:.1f} Å²")
    ax.axvspan(1.0 / fit.d_low**2, 1.0 / fit.d_high**2, color="tab:red", alpha=0.07, zorder=0)
    if resolution is not None and math.isfinite(resolution):
        ax.axvspan(1.0 / resolution**2, s2.max(), color="0.9", zorder=0, label=f"beyond {resolution:g} Å")
    ax.set_xlim(0.0, s2.max())
    finite = fit.log_amplitude[np.isfinite(fit.log_amplitude)]
    if finite.size:  # a low-passed curve plunges beyond D: keep the map's range in view
        ax.set_ylim(finite.min() - 3.0, finite.max() + 0.5)
    ax.set_xlabel("s² (Å⁻²)")
    ax.set_ylabel("ln mean |F|")
    top = ax.secondary_xaxis("top")
    ticks = [d for d in _TICKS if 1.0 / d**2 <= s2.max()]
    top.set_xticks([1.0 / d**2 for d in ticks], [f"{d:g}" for d in ticks])
    top.set_xlabel("resolution (Å)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig
