"""Real-space refinement: map terms, geometry restraints and the compiled refinement loop.

Ideal values come from the PDB Chemical Component Dictionary as biotite ships it (side chains,
ligands, nucleotides), Engh & Huber (1991) for the protein backbone and peptide link, or a CCP4
monomer library when one is given; see `modelmap.refine._library` (sources), `_build`
(`build_restraints`), `_restraints` (the energy) and `_neighbours` (contacts). The loop is
`modelmap.refine._solver` (L-BFGS with a strong-Wolfe line search, `_line_search`) run by
`modelmap.refine._refine`.
"""

from ._config import PARAMETERS as PARAMETERS, RefineConfig as RefineConfig
from ._line_search import StrongWolfe as StrongWolfe
from ._loss import (
    cc_loss as cc_loss,
    least_squares_loss as least_squares_loss,
    masked_cc as masked_cc,
    q_loss as q_loss,
)
from ._refine import refine as refine, refine_batch as refine_batch
from ._report import RefineResult as RefineResult, clashes as clashes
from ._build import build_restraints as build_restraints
from ._library import (
    ANGLE_SIGMA as ANGLE_SIGMA,
    BACKBONE_ANGLE_SIGMA as BACKBONE_ANGLE_SIGMA,
    BOND_SIGMA as BOND_SIGMA,
    CHIRAL_SIGMA as CHIRAL_SIGMA,
    PLANE_SIGMA as PLANE_SIGMA,
    ResidueTemplate as ResidueTemplate,
    RestraintsWarning as RestraintsWarning,
    residue_template as residue_template,
)
from ._restraints import Restraints as Restraints, RestraintWeights as RestraintWeights
from ._solver import LBFGS as LBFGS, minimise as minimise
