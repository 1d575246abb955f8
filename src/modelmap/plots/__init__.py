"""Figures of scores and refinements (matplotlib `Figure`s made without pyplot, so a user's own
backend and figures are left alone) and PNGs written atomically."""

from ._diffmap import difference_figure as difference_figure
from ._refine import refine_figure as refine_figure, write_refine_plots as write_refine_plots
from ._save import plot_path as plot_path, save_png as save_png
from ._score import (
    fsc_figure as fsc_figure,
    q_histogram_figure as q_histogram_figure,
    residue_figure as residue_figure,
    write_score_plots as write_score_plots,
)
from ._sharpen import guinier_figure as guinier_figure
