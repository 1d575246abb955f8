"""Map–model scores: the CC family as phenix.map_model_cc defines it, Q-score exactly as MapQ
computes it (and a differentiable variant), FSC, and the masks they use.

See `specs/scores.md` of the project and each function's docstring for the definitions followed.
"""

from ._cc import (
    MAIN_CHAIN_ATOMS as MAIN_CHAIN_ATOMS,
    LocalCC as LocalCC,
    MapModelCC as MapModelCC,
    ResidueCC as ResidueCC,
    carbon_image_radius as carbon_image_radius,
    cc_box as cc_box,
    cc_mask as cc_mask,
    cc_peaks as cc_peaks,
    cc_volume as cc_volume,
    local_cc as local_cc,
    local_cc_atom_radius as local_cc_atom_radius,
    map_model_cc as map_model_cc,
    pearson as pearson,
    peaks_selection as peaks_selection,
    volume_selection as volume_selection,
)
from ._fsc import fsc as fsc, fsc_resolution as fsc_resolution, shell_indices as shell_indices
from ._mask import (
    CCTBX_VDW_RADII as CCTBX_VDW_RADII,
    atom_neighbourhood_mask as atom_neighbourhood_mask,
    model_mask as model_mask,
    neighbourhood_indices as neighbourhood_indices,
    vdw_radii as vdw_radii,
)
from ._mapq import (
    estimated_resolution as estimated_resolution,
    expected_q as expected_q,
    mapq_min_max as mapq_min_max,
    mapq_regrid as mapq_regrid,
)
from ._probes import (
    QProbes as QProbes,
    mapq_radii as mapq_radii,
    select_probes as select_probes,
    spiral_points as spiral_points,
)
from ._q_aggregate import QScores as QScores, ResidueQ as ResidueQ
from ._qscore import q_score as q_score, q_score_differentiable as q_score_differentiable
from ._report import ScoreReport as ScoreReport, score_model as score_model
