"""The figure of a refinement: objective, map term, bond and angle rmsd and map weight per step,
macro-cycle boundaries, and CC_mask and mean Q before and after."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ._save import new_figure, plot_path, save_png

__all__ = ["refine_figure", "write_refine_plots"]

_MAP_LOSS_LABELS = {"ls": "least-squares map loss (fitted scale, offset)", "cc": "map loss 1 − CC",
                    "q": "map loss 1 − mean Q"}


def _refine_parts(result, before, after, loss):
    """History (numpy arrays), before/after scores and loss name from a `RefineResult` or from the
    JSON dict `modelmap refine --json` writes (its `before`/`after`/`loss` unless given)."""
    if isinstance(result, dict):
        if "history" not in result:
            raise TypeError("the refine JSON has no 'history' (write it with modelmap refine --json)")
        history = result["history"]
        before = result.get("before") if before is None else before
        after = result.get("after") if after is None else after
        loss = result.get("loss") if loss is None else loss
    elif hasattr(result, "history"):
        history = result.history
    else:
        raise TypeError(f"expected a RefineResult or its JSON dict, got {type(result).__name__}")
    history = {k: np.asarray([math.nan if v is None else v for v in history[k]], np.float64) for k in history}
    return history, before, after, loss


def _cycle_starts(history) -> np.ndarray:
    """Steps at which a new macro-cycle (compiled run) begins."""
    cycle = history["cycle"]
    return history["step"][1:][np.diff(cycle) != 0]


def refine_figure(result, *, before: dict | None = None, after: dict | None = None, loss: str | None = None):
    """Six panels of a refinement, against the step: the objective and its geometry term (log
    scale), the unweighted map loss, bond rmsd with the 0.02 Å limit, angle rmsd with the 2.5°
    limit, the map weight; and CC_mask and mean Q before and after (they are not computed per step:
    the panel says so). Dotted vertical lines mark where each macro-cycle starts.

    **Arguments:**

    - `result`: a `RefineResult`, or the dict of `modelmap refine --json` (with `history`,
      `before`, `after`, `loss`).
    - `before`, `after`: dicts with `cc_mask` and `q_mean` (as `modelmap refine` reports them);
      taken from `result` when it is such a dict.
    - `loss`: `"ls"`, `"cc"` or `"q"`, for the map-loss label.

    **Returns:** a `Figure` with six axes.
    """
    from matplotlib.ticker import MaxNLocator

    from ..refine import RefineConfig

    h, before, after, loss = _refine_parts(result, before, after, loss)
    limits = RefineConfig()
    step, starts = h["step"], _cycle_starts(h)
    fig = new_figure(11.0, 9.0)
    axes = fig.subplots(3, 2)
    (ax_loss, ax_map), (ax_bond, ax_angle), (ax_scores, ax_weight) = axes

    ax_loss.plot(step, h["loss"], color="k", label="objective")
    ax_loss.plot(step, h["geometry"], color="tab:green", label="geometry term E_geom")
    if np.all(h["loss"][np.isfinite(h["loss"])] > 0) and np.all(h["geometry"][np.isfinite(h["geometry"])] > 0):
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("objective")
    ax_loss.set_title("objective = w·n·(map loss) + E_geom", fontsize=9, loc="left")

    ax_map.plot(step, h["map_loss"], color="tab:blue")
    ax_map.set_ylabel("map loss")
    ax_map.set_title(_MAP_LOSS_LABELS.get(loss, "map loss"), fontsize=9, loc="left")

    for ax, key, limit, unit, colour in ((ax_bond, "bond_rmsd", limits.max_bond_rmsd, "Å", "tab:purple"),
                                         (ax_angle, "angle_rmsd", limits.max_angle_rmsd, "°", "tab:brown")):
        ax.plot(step, h[key], color=colour, label=key.replace("_", " "))
        ax.axhline(limit, color="tab:red", ls="--", lw=1, label=f"limit {limit:g}{_space(unit)}")
        top = np.nanmax(np.append(h[key], limit)) if h[key].size else limit
        ax.set_ylim(0.0, 1.15 * top)
        ax.set_ylabel(f"{key.split('_')[0]} rmsd ({unit})")
        ax.set_title(f"{key.split('_')[0]} rmsd: {_first_last(h[key], unit)}", fontsize=9, loc="left")

    ax_weight.plot(step, h["map_weight"], color="tab:gray", drawstyle="steps-post")
    ax_weight.set_ylabel("map weight w")
    ax_weight.set_title("map weight per macro-cycle", fontsize=9, loc="left")

    for ax in (ax_loss, ax_map, ax_bond, ax_angle, ax_weight):
        for i, s in enumerate(starts):
            ax.axvline(s, color="0.5", ls=":", lw=1, label="macro-cycle start" if i == 0 else None)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")

    _before_after(ax_scores, before, after)
    fig.suptitle(f"refinement: {len(step) - 1 if len(step) else 0} steps in {len(starts) + 1 if len(step) else 0} "
                 "macro-cycles", fontsize=11)
    return fig


def _first_last(x: np.ndarray, unit: str) -> str:
    x = x[np.isfinite(x)]
    return f"{x[0]:.4g} → {x[-1]:.4g}{_space(unit)}" if x.size else "not recorded"


def _space(unit: str) -> str:
    """A unit as written after a number: "°" directly, others after a space."""
    return unit if unit == "°" else f" {unit}"


def _before_after(ax, before: dict | None, after: dict | None) -> None:
    """CC_mask and mean Q before and after, two points each joined by a line."""
    ax.set_title("CC_mask and mean Q: before and after only (not computed per step)", fontsize=9, loc="left")
    ax.set_xticks([0, 1], ["before", "after"])
    ax.set_xlim(-0.4, 1.4)
    ax.grid(alpha=0.3)
    if not before or not after:
        ax.text(0.5, 0.5, "not given", ha="center", va="center", transform=ax.transAxes)
        return
    for key, label, colour in (("cc_mask", "CC_mask", "tab:orange"), ("q_mean", "mean Q", "tab:blue")):
        y = [before[key], after[key]]
        ax.plot([0, 1], y, marker="o", color=colour, label=f"{label} {y[0]:.3f} → {y[1]:.3f}")
    ax.set_ylabel("CC_mask, mean Q")
    ax.legend(fontsize=8, loc="best")


def write_refine_plots(result, prefix: str | os.PathLike, *, before: dict | None = None, after: dict | None = None,
                       loss: str | None = None, protect: tuple = ()) -> dict[str, Path]:
    """Write `refine_figure` as `PREFIX_refine.png` (or `refine.png` inside `prefix` when it is a
    folder).

    **Arguments:** as `refine_figure`, plus `prefix` (see `plot_path`) and `protect` (input files
    that must never be overwritten).

    **Returns:** the path written, under `"refine"`.
    """
    fig = refine_figure(result, before=before, after=after, loss=loss)
    return {"refine": save_png(fig, plot_path(prefix, "refine"), protect=protect)}
