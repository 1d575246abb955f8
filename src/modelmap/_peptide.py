"""Small peptides with ideal geometry, built from internal coordinates (for demos and tests).

Bond lengths and angles are the Engh & Huber (1991) values for the protein backbone; a helix uses
φ = -57°, ψ = -47°, ω = 180°. Only backbone atoms and CB are built (poly-alanine; glycine has no CB).
"""

from __future__ import annotations

import gemmi
import numpy as np

# Engh & Huber (1991), Acta Cryst. A47, 392-400
_N_CA, _CA_C, _C_N, _C_O, _CA_CB = 1.458, 1.525, 1.329, 1.231, 1.530
_N_CA_C, _CA_C_N, _C_N_CA, _CA_C_O, _N_CA_CB = 111.2, 116.2, 121.7, 120.1, 110.5


def _place(a, b, c, bond: float, angle: float, torsion: float) -> np.ndarray:
    """Position of d with |cd| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) = torsion (°)."""
    angle, torsion = np.radians(angle), np.radians(torsion)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d2 = bond * np.array([-np.cos(angle), np.sin(angle) * np.cos(torsion), np.sin(angle) * np.sin(torsion)])
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def ideal_peptide(
    sequence: str = "AAAAAAAAAAAA", phi: float = -57.0, psi: float = -47.0, b_factor: float = 20.0
) -> gemmi.Structure:
    """A peptide of alanines and glycines (`A`/`G`) with ideal geometry, as a gemmi Structure.

    **Arguments:**

    - `sequence`: one-letter codes, `A` or `G`.
    - `phi`, `psi`: backbone torsions in degrees (default: α-helix).
    - `b_factor`: B in Å² for every atom.

    **Returns:** a `gemmi.Structure` with one model, chain `A`, residues numbered from 1.
    """
    if not sequence or set(sequence) - {"A", "G"}:
        raise ValueError("sequence must be a non-empty string of A and G")
    n = np.array([0.0, 0.0, 0.0])
    ca = np.array([_N_CA, 0.0, 0.0])
    c = _place(np.array([0.0, 1.0, 0.0]), n, ca, _CA_C, _N_CA_C, 0.0)
    residues = []
    for i, code in enumerate(sequence):
        o = _place(n, ca, c, _C_O, _CA_C_O, psi + 180.0)
        atoms = {"N": n, "CA": ca, "C": c, "O": o}
        if code == "A":  # L-chirality: CB on the side given by the N-C-CA-CB improper of about +122.5°
            atoms["CB"] = _place(c, n, ca, _CA_CB, _N_CA_CB, -122.5)
        residues.append(("ALA" if code == "A" else "GLY", atoms))
        if i + 1 < len(sequence):
            n_next = _place(n, ca, c, _C_N, _CA_C_N, psi)
            ca_next = _place(ca, c, n_next, _N_CA, _C_N_CA, 180.0)
            c_next = _place(c, n_next, ca_next, _CA_C, _N_CA_C, phi)
            n, ca, c = n_next, ca_next, c_next
    st = gemmi.Structure()
    st.name = "ideal_peptide"
    model = gemmi.Model(1)
    chain = gemmi.Chain("A")
    for i, (name, atoms) in enumerate(residues):
        res = gemmi.Residue()
        res.name = name
        res.seqid = gemmi.SeqId(i + 1, " ")
        res.entity_type = gemmi.EntityType.Polymer
        for atom_name, xyz in atoms.items():
            atom = gemmi.Atom()
            atom.name = atom_name
            atom.element = gemmi.Element(atom_name[0])
            atom.pos = gemmi.Position(*xyz)
            atom.b_iso = b_factor
            atom.occ = 1.0
            res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    return st
