"""Geometry restraints (bonds, angles, planes, chirality, non-bonded repulsion) and bounds on B,
occupancy and resolution, with ideal values from a chemical library.

## Where the ideal values come from

1. **Residue topology and side-chain geometry: the PDB Chemical Component Dictionary (CCD)**, the
   subset that `biotite` ships (`biotite.structure.info`, file `components.bcif`; Westbrook et al.
   2015, *Bioinformatics* 31, 1274). For every component the atoms, bonds, bond orders, aromatic
   flags and stereo configurations come from `chem_comp_atom` / `chem_comp_bond`; ideal bond
   lengths and angles are measured on the component's *ideal* coordinates
   (`pdbx_model_Cartn_{x,y,z}_ideal`), never on the model being restrained. Components without ideal
   coordinates fall back to the CCD's model coordinates (`model_Cartn_*`), and are named in a warning.
2. **Protein backbone and peptide link: Engh & Huber (1991)**, *Acta Cryst.* A47, 392-400 (the values
   behind the CCP4 monomer library and Phenix). The CCD ideal coordinates are those of the free amino
   acid (a carboxylic acid with a pyramidal amino group: CA-C 1.505 Å, C=O 1.207 Å, N-CA-C 109.5°),
   which is wrong for a residue inside a chain, and its ionisable groups are neutral (ASP/GLU
   carboxylic acids, an ARG with one C=N), so for the 20 standard amino acids (and MSE) these are
   replaced by Engh & Huber's values: the bonds N-CA, CA-C, C-O, CA-CB, the angles N-CA-C, CA-C-O,
   N-CA-CB, C-CA-CB, CA-CB-CG (CA-CB-SG), the proline ring, and the carboxylate, amide and
   guanidinium groups of ASP, GLU, ASN, GLN, ARG. The peptide link C(i)-N(i+1): C-N 1.329 Å
   (1.341 before Pro), CA-C-N 116.2° (116.9° before Pro), O-C-N 123.0° (122.0°), C-N-CA 121.7°
   (120.6° to Gly, 122.6° to Pro), C-N-CD(Pro) 125.0°, the planes CA(i), C(i), O(i), N(i+1) and
   C(i), N(i+1), CA(i+1) (+CD of Pro), and ω = CA(i)-C(i)-N(i+1)-CA(i+1) at 180° (trans) or 0°
   (cis), σ 5° (Phenix's default); cis or trans is the class of the input's ω (|ω| < 90°: cis),
   a discrete choice, not a value taken from the model.
3. **Nucleic-acid link** O3'(i)-P(i+1) 1.607 Å, C3'-O3'-P 119.7°, O3'-P-O5' 104.0° (Parkinson et al.
   1996, *Acta Cryst.* D52, 57-64). **Disulfide** SG-SG 2.031 Å, CB-SG-SG 104.2° (the CCP4 monomer
   library's `SS` link, as Phenix uses it).
4. If a CCP4 monomer library is given (`monomer_library=`; never taken from `$CLIBD_MON` behind the
   caller's back: pass `os.environ["CLIBD_MON"]` to use it), the bonds, angles,
   planes and chiral centres of every residue it knows are taken from it instead (gemmi reads it),
   with the library's own σ.

## Sigmas (σ) used with the CCD

- bonds σ = 0.020 Å (Engh & Huber's σ are 0.014-0.033 Å; Phenix's usual target for a refined model's
  bond rmsd is below 0.01-0.02 Å);
- angles σ = 2.0° for backbone and link angles (Engh & Huber: 1.5-2.8°), 3.0° for angles measured on
  CCD ideal coordinates (side chains, ligands);
- planes σ = 0.020 Å per atom (peptide groups, aromatic rings, sp2 groups: amide, carboxylate,
  guanidinium, nucleobases);
- chirality σ = 0.2 Å³ on the chiral volume (the CCP4/Phenix convention).

## The terms (all in units of σ², summed; each has a weight)

- bond: ((d − d0)/σ)²; angle: ((θ − θ0)/σ)², θ = atan2(|u × v|, u · v) for stable gradients;
- plane: Σ_k (n · (x_k − x̄))² / σ² with n the normal of the least-squares plane (smallest eigenvector
  of the scatter matrix, held fixed in the gradient: exact by the envelope theorem);
- torsion (peptide ω): (wrap(ω − ω0)/σ)², wrap to (−π, π];
- chirality: ((V − V0)/σ)² with V = (x_a − x_c) · ((x_b − x_c) × (x_d − x_c)) around the centre c; V0
  has the magnitude implied by the ideal bonds and angles and the sign of the CCD ideal coordinates;
- non-bonded: ((r0 − d)/σ)² for d < r0, σ = 0.1 Å: the harmonic van der Waals repulsion of Refmac
  and servalcat (gemmi's restraints; they use σ = 0.2 Å, with riding hydrogens that carry much of
  the repulsion: without hydrogens 0.2 Å left 30 heavy-atom contacts under 2.2 Å where 0.1 Å left 2,
  7CEC chain A against EMD-30342); r0 = 0.8 × (R_i + R_j) with Bondi (1964) van der Waals radii
  (0.7 × for 1-4 pairs); 1-2 and 1-3 pairs, atoms of different alternate conformations and atoms
  without a dictionary entry are excluded (`modelmap.refine._neighbours`). Pairs come from a
  neighbour list (`scipy.spatial.cKDTree`); rebuild it with `Restraints.with_nonbonded` after the
  atoms have moved by more than half the list's `buffer` (`refine` does). Phenix's "prolsq" form
  c_rep · (r0 − d)⁴ (c_rep = 16 Å⁻⁴) was used before: at 0.3 Å of overlap it is 70 times softer,
  and real-map refinement left 140 heavy-atom contacts under 2.2 Å;
- B similarity along bonds: ((B_i − B_j)/σ_B)², σ_B = 5 Å² by default;
- occupancy: ((max(0, −q) + max(0, q − 1))/σ_q)² per atom, and ((Σ_alt q − 1)/σ_q)² per group of
  alternate conformers of one atom, σ_q = 0.01;
- resolution: ((max(0, D_lo − D) + max(0, D − D_hi))/σ_D)² per atom, σ_D = 0.1 Å.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._errors import ModelmapError
from .._residues import residue_kind
from ._neighbours import NONBONDED_SIGMA, VDW_RADII, nonbonded_pairs

__all__ = [
    "Restraints",
    "RestraintWeights",
    "ResidueTemplate",
    "RestraintsWarning",
    "build_restraints",
    "residue_template",
    "BOND_SIGMA",
    "ANGLE_SIGMA",
    "BACKBONE_ANGLE_SIGMA",
    "PLANE_SIGMA",
    "CHIRAL_SIGMA",
]

BOND_SIGMA = 0.020  # Å
ANGLE_SIGMA = 3.0  # degrees, angles measured on CCD ideal coordinates
BACKBONE_ANGLE_SIGMA = 2.0  # degrees, Engh & Huber backbone and link angles
PLANE_SIGMA = 0.020  # Å
CHIRAL_SIGMA = 0.2  # Å³
LINK_CUTOFF = 2.5  # Å: C(i)-N(i+1), O3'(i)-P(i+1) and SG-SG distances that make a link

# the residues Engh & Huber (1991) tabulate backbone values for (a narrower set than "protein",
# `modelmap._residues`)
_ENGH_HUBER_RESIDUES = frozenset(
    "ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE LEU LYS MET PHE PRO SER THR TRP TYR VAL MSE".split()
)


class RestraintsWarning(UserWarning):
    """Some atoms get no restraints (no dictionary entry), or a component's geometry is uncertain."""


# --------------------------------------------------------------------------------------------
# Residue templates
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResidueTemplate:
    """Ideal geometry of one chemical component, by atom name.

    **Fields:**

    - `name`: component id (`"ALA"`).
    - `atoms`: atom names; `elements`: their element symbols (upper case).
    - `bonds`: `(a, b, d0 [Å], σ [Å])`.
    - `angles`: `(a, b, c, θ0 [°], σ [°])` with `b` the vertex.
    - `planes`: `(names, σ [Å])`.
    - `chirals`: `(centre, a, b, c, V0 [Å³], σ [Å³])`, V0 signed (see the module docstring).
    - `ideal_coordinates`: `(n, 3)` coordinates the values were measured on (Å), or None.
    - `source`: where the values come from, in words.
    """

    name: str
    atoms: tuple[str, ...]
    elements: tuple[str, ...]
    bonds: tuple[tuple[str, str, float, float], ...]
    angles: tuple[tuple[str, str, str, float, float], ...]
    planes: tuple[tuple[tuple[str, ...], float], ...]
    chirals: tuple[tuple[str, str, str, str, float, float], ...]
    ideal_coordinates: np.ndarray | None
    source: str

    def bond(self, a: str, b: str) -> float:
        """Ideal length of the bond a-b in Å (either order); KeyError if there is none."""
        for x, y, d0, _ in self.bonds:
            if {x, y} == {a, b}:
                return d0
        raise KeyError(f"{self.name}: no bond {a}-{b}")

    def angle(self, a: str, b: str, c: str) -> float:
        """Ideal angle a-b-c in degrees (b the vertex); KeyError if there is none."""
        for x, y, z, t0, _ in self.angles:
            if y == b and {x, z} == {a, c}:
                return t0
        raise KeyError(f"{self.name}: no angle {a}-{b}-{c}")


# Engh & Huber (1991), Acta Cryst. A47, 392-400, Table 3 (bond Å, angle °)
def _engh_huber_bonds(res: str) -> dict[tuple[str, str], float]:
    bonds = {("N", "CA"): 1.458, ("CA", "C"): 1.525, ("C", "O"): 1.231, ("CA", "CB"): 1.530}
    if res == "GLY":
        bonds.update({("N", "CA"): 1.451, ("CA", "C"): 1.516})
        del bonds[("CA", "CB")]
    elif res == "ALA":
        bonds[("CA", "CB")] = 1.521
    elif res in ("ILE", "THR", "VAL"):
        bonds[("CA", "CB")] = 1.540
    elif res == "PRO":
        bonds.update({("N", "CA"): 1.466, ("N", "CD"): 1.473, ("CB", "CG"): 1.492,
                      ("CG", "CD"): 1.503})
    # charged and conjugated groups: the CCD component is the neutral acid / free base
    if res == "ASP":
        bonds.update({("CG", "OD1"): 1.249, ("CG", "OD2"): 1.249})
    elif res == "GLU":
        bonds.update({("CD", "OE1"): 1.249, ("CD", "OE2"): 1.249})
    elif res == "ARG":
        bonds.update({("CD", "NE"): 1.460, ("NE", "CZ"): 1.329, ("CZ", "NH1"): 1.326,
                      ("CZ", "NH2"): 1.326})
    elif res == "ASN":
        bonds.update({("CG", "OD1"): 1.231, ("CG", "ND2"): 1.328})
    elif res == "GLN":
        bonds.update({("CD", "OE1"): 1.231, ("CD", "NE2"): 1.328})
    return bonds


def _engh_huber_angles(res: str) -> dict[tuple[str, str, str], float]:
    angles = {("N", "CA", "C"): 111.2, ("CA", "C", "O"): 120.1, ("N", "CA", "CB"): 110.5,
              ("C", "CA", "CB"): 110.1}
    if res == "GLY":
        angles = {("N", "CA", "C"): 112.5, ("CA", "C", "O"): 120.6}
    elif res == "ALA":
        angles.update({("N", "CA", "CB"): 110.4, ("C", "CA", "CB"): 110.5})
    elif res in ("ILE", "THR", "VAL"):
        angles.update({("N", "CA", "CB"): 111.5, ("C", "CA", "CB"): 109.1})
    elif res == "PRO":
        angles.update({("N", "CA", "C"): 111.8, ("N", "CA", "CB"): 103.0, ("CA", "CB", "CG"): 104.5,
                       ("CB", "CG", "CD"): 106.1, ("CG", "CD", "N"): 103.2,
                       ("CD", "N", "CA"): 112.0})
    # CA-CB-XG: the CCD's ideal coordinates are close to tetrahedral (109.5°), E&H's are wider
    xg = {"LEU": 116.3, "LYS": 114.1, "GLU": 114.1, "GLN": 114.1, "ARG": 114.1, "MET": 114.1,
          "PHE": 113.8, "TYR": 113.8, "HIS": 113.8, "TRP": 113.6, "ASP": 112.6, "ASN": 112.6}
    if res in xg:
        angles[("CA", "CB", "CG")] = xg[res]
    elif res == "CYS":
        angles[("CA", "CB", "SG")] = 114.4
    if res == "ASP":
        angles.update({("CB", "CG", "OD1"): 118.4, ("CB", "CG", "OD2"): 118.4,
                       ("OD1", "CG", "OD2"): 123.3})
    elif res == "GLU":
        angles.update({("CG", "CD", "OE1"): 118.4, ("CG", "CD", "OE2"): 118.4,
                       ("OE1", "CD", "OE2"): 123.3})
    elif res == "ARG":
        angles.update({("CD", "NE", "CZ"): 124.2, ("NE", "CZ", "NH1"): 120.0,
                       ("NE", "CZ", "NH2"): 120.0, ("NH1", "CZ", "NH2"): 120.0})
    return angles


def _angle_deg(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
    u, v = a - b, c - b
    return float(np.degrees(np.arctan2(np.linalg.norm(np.cross(u, v)), u @ v)))


def _chiral_volume_magnitude(d: tuple[float, float, float], ang: tuple[float, float, float]) -> float:
    """|V| of the tetrahedron (centre; a, b, c) from the lengths centre-a, -b, -c and the angles
    (b-centre-c, a-centre-c, a-centre-b), in degrees."""
    ca, cb, cc = (math.cos(math.radians(t)) for t in ang)
    g = 1.0 - ca * ca - cb * cb - cc * cc + 2.0 * ca * cb * cc
    return d[0] * d[1] * d[2] * math.sqrt(max(g, 0.0))


def _sp2_planes(names, elements, bonded, aromatic, double) -> list[tuple[str, ...]]:
    """Planar groups: aromatic ring systems and the atoms around non-aromatic double bonds."""
    planes = []
    # aromatic ring systems (connected components of aromatic atoms) plus their neighbours
    arom = [n for n in names if n in aromatic]
    seen: set[str] = set()
    for start in arom:
        if start in seen:
            continue
        comp, stack = set(), [start]
        while stack:
            a = stack.pop()
            if a in comp:
                continue
            comp.add(a)
            stack.extend(b for b in bonded[a] if b in aromatic and b not in comp)
        seen |= comp
        group = set(comp)
        for a in comp:
            group |= bonded[a]
        planes.append(group)
    # double bonds outside rings: both ends, their neighbours, and neighbours of conjugated N
    for a, b in double:
        if a in aromatic and b in aromatic:
            continue
        if elements[a] not in ("C", "N", "O") or elements[b] not in ("C", "N", "O"):
            continue  # P=O, S=O: tetrahedral, not planar
        group = {a, b} | bonded[a] | bonded[b]
        for x in list(group - {a, b}):
            if elements[x] == "N" and (x in bonded[a] or x in bonded[b]):
                group |= bonded[x]
        planes.append(group)
    merged = True  # conjugated groups that share three atoms are one plane (e.g. uracil)
    while merged:
        merged = False
        for i, j in itertools.combinations(range(len(planes)), 2):
            if len(planes[i] & planes[j]) >= 3:
                planes[i] = planes[i] | planes.pop(j)
                merged = True
                break
    order = {n: i for i, n in enumerate(names)}
    out = []
    for g in planes:
        t = tuple(sorted(g, key=order.__getitem__))
        if t not in out:
            out.append(t)
    return out


def _template_from_ccd(name: str, engh_huber: bool) -> ResidueTemplate | None:
    try:
        import biotite.structure.info as info
    except ImportError as err:  # pragma: no cover - biotite is a dependency of refine
        raise ImportError(
            "modelmap.refine needs biotite for the Chemical Component Dictionary: pip install "
            "'modelmap[refine]' (or pip install biotite)"
        ) from err
    try:
        atoms = info.get_from_ccd("chem_comp_atom", name)
        bonds = info.get_from_ccd("chem_comp_bond", name)
    except Exception:
        return None
    if atoms is None:
        return None
    names = [str(n) for n in atoms["atom_id"].as_array()]
    elements = {n: str(e).upper() for n, e in zip(names, atoms["type_symbol"].as_array())}
    xyz = np.stack(
        [atoms[f"pdbx_model_Cartn_{c}_ideal"].as_array(np.float64, masked_value=np.nan) for c in "xyz"], 1
    ) if "pdbx_model_Cartn_x_ideal" in atoms else np.full((len(names), 3), np.nan)
    source = "CCD ideal coordinates"
    if not np.all(np.isfinite(xyz)):
        model = np.stack(
            [atoms[f"model_Cartn_{c}"].as_array(np.float64, masked_value=np.nan) for c in "xyz"], 1
        )
        if np.all(np.isfinite(model)):
            xyz, source = model, "CCD model coordinates (no ideal coordinates)"
        elif len(names) > 1:
            return None
    pos = dict(zip(names, xyz))
    aromatic_atoms = {n for n, f in zip(names, atoms["pdbx_aromatic_flag"].as_array()) if f == "Y"}
    stereo = {n: s for n, s in zip(names, atoms["pdbx_stereo_config"].as_array()) if s in ("R", "S")}
    bonded: dict[str, set[str]] = {n: set() for n in names}
    bond_list, double = [], []
    if bonds is not None:
        for a, b, order in zip(bonds["atom_id_1"].as_array(), bonds["atom_id_2"].as_array(),
                               bonds["value_order"].as_array()):
            a, b = str(a), str(b)
            bonded[a].add(b)
            bonded[b].add(a)
            bond_list.append((a, b))
            if str(order).upper().startswith("DOUB"):
                double.append((a, b))
    is_aa = engh_huber and name in _ENGH_HUBER_RESIDUES
    eh_bonds = _engh_huber_bonds(name) if is_aa else {}
    eh_angles = _engh_huber_angles(name) if is_aa else {}
    eh_bonds = {frozenset(k): v for k, v in eh_bonds.items()}
    eh_angles = {(frozenset((k[0], k[2])), k[1]): v for k, v in eh_angles.items()}

    d0 = {}
    out_bonds = []
    for a, b in bond_list:
        key = frozenset((a, b))
        d = eh_bonds.get(key, float(np.linalg.norm(pos[a] - pos[b])))
        d0[key] = d
        out_bonds.append((a, b, round(d, 4), BOND_SIGMA))
    t0 = {}
    out_angles = []
    for centre in names:
        nb = sorted(bonded[centre], key=names.index)
        for a, c in itertools.combinations(nb, 2):
            key = (frozenset((a, c)), centre)
            if key in eh_angles:
                t, s = eh_angles[key], BACKBONE_ANGLE_SIGMA
            else:
                t, s = _angle_deg(pos[a], pos[centre], pos[c]), ANGLE_SIGMA
            t0[key] = t
            out_angles.append((a, centre, c, round(t, 3), s))
    planes = _sp2_planes(names, elements, bonded, aromatic_atoms, double)
    if name in _ENGH_HUBER_RESIDUES:  # the carbonyl plane inside a chain is the peptide link's
        planes = [p for p in planes if not ({"C", "O"} <= set(p))] + [
            p for p in planes if {"C", "O", "OXT"} <= set(p)
        ]
    out_planes = tuple((p, PLANE_SIGMA) for p in planes)
    chirals = []
    for centre in stereo:
        heavy = [n for n in sorted(bonded[centre], key=names.index) if elements[n] not in ("H", "D")]
        if len(heavy) < 3:
            continue
        a, b, c = heavy[:3]
        o = pos[centre]
        sign = np.sign((pos[a] - o) @ np.cross(pos[b] - o, pos[c] - o))
        dist = tuple(d0[frozenset((centre, x))] for x in (a, b, c))
        angs = tuple(t0[(frozenset(p), centre)] for p in ((b, c), (a, c), (a, b)))
        chirals.append((centre, a, b, c, round(float(sign) * _chiral_volume_magnitude(dist, angs), 4),
                        CHIRAL_SIGMA))
    src = f"PDB CCD ({source}, via biotite)" + (", backbone Engh & Huber 1991" if is_aa else "")
    return ResidueTemplate(
        name, tuple(names), tuple(elements[n] for n in names), tuple(out_bonds), tuple(out_angles),
        out_planes, tuple(chirals), xyz, src,
    )


def _template_from_monlib(name: str, path: str) -> ResidueTemplate | None:
    """A template from a CCP4 monomer library through gemmi, or None when it lacks `name`."""
    import gemmi

    cif = Path(path) / name[0].lower() / f"{name}.cif"
    if not cif.exists():
        return None
    doc = gemmi.cif.read(str(cif))
    block = doc.find_block(f"comp_{name}")
    if block is None:
        return None
    cc = gemmi.make_chemcomp_from_block(block)
    names = [a.id for a in cc.atoms]
    elements = tuple(a.el.name.upper() for a in cc.atoms)
    rt = cc.rt
    bonds = tuple((b.id1.atom, b.id2.atom, b.value, b.esd) for b in rt.bonds)
    angles = tuple((a.id1.atom, a.id2.atom, a.id3.atom, a.value, a.esd) for a in rt.angles)
    planes = tuple((tuple(i.atom for i in p.ids), p.esd) for p in rt.planes)
    d0 = {frozenset((b[0], b[1])): b[2] for b in bonds}
    t0 = {(frozenset((a[0], a[2])), a[1]): a[3] for a in angles}
    chirals = []
    for ch in rt.chirs:
        c, a, b, d = ch.id_ctr.atom, ch.id1.atom, ch.id2.atom, ch.id3.atom
        if ch.sign == gemmi.ChiralityType.Both:
            continue
        try:
            mag = _chiral_volume_magnitude(
                tuple(d0[frozenset((c, x))] for x in (a, b, d)),
                tuple(t0[(frozenset(p), c)] for p in ((b, d), (a, d), (a, b))),
            )
        except KeyError:
            continue
        sign = 1.0 if ch.sign == gemmi.ChiralityType.Positive else -1.0
        chirals.append((c, a, b, d, sign * mag, CHIRAL_SIGMA))
    return ResidueTemplate(name, tuple(names), elements, bonds, angles, planes, tuple(chirals), None,
                           f"CCP4 monomer library {path}")


@functools.lru_cache(maxsize=512)
def residue_template(
    name: str, *, engh_huber: bool = True, monomer_library: str | None = None
) -> ResidueTemplate | None:
    """The ideal geometry of component `name`, or None if no dictionary knows it.

    **Arguments:**

    - `name`: component id, e.g. `"ALA"`, `"DA"`, `"HEM"`.
    - `engh_huber`: replace the backbone values of the standard amino acids measured on the CCD's
      free-amino-acid ideal coordinates by Engh & Huber (1991) (see the module docstring).
    - `monomer_library`: a CCP4 monomer library folder (`$CLIBD_MON`); tried first when given.

    **Returns:** a `ResidueTemplate` (cached), or None.
    """
    if monomer_library:
        t = _template_from_monlib(name, monomer_library)
        if t is not None:
            return t
    return _template_from_ccd(name, engh_huber)


# --------------------------------------------------------------------------------------------
# Links between residues
# --------------------------------------------------------------------------------------------


def _peptide_link(next_res: str):
    bond = 1.341 if next_res == "PRO" else 1.329
    ca_c_n = 116.9 if next_res == "PRO" else 116.2
    o_c_n = 122.0 if next_res == "PRO" else 123.0
    c_n_ca = {"GLY": 120.6, "PRO": 122.6}.get(next_res, 121.7)
    s = BACKBONE_ANGLE_SIGMA
    bonds = [((0, "C"), (1, "N"), bond, BOND_SIGMA)]
    angles = [((0, "CA"), (0, "C"), (1, "N"), ca_c_n, s), ((0, "O"), (0, "C"), (1, "N"), o_c_n, s),
              ((0, "C"), (1, "N"), (1, "CA"), c_n_ca, s)]
    plane_c = [(0, "CA"), (0, "C"), (0, "O"), (1, "N")]
    plane_n = [(0, "C"), (1, "N"), (1, "CA")]
    if next_res == "PRO":
        angles.append(((0, "C"), (1, "N"), (1, "CD"), 125.0, s))
        plane_n.append((1, "CD"))
    return bonds, angles, [(plane_c, PLANE_SIGMA), (plane_n, PLANE_SIGMA)]


def _nucleic_link():
    bonds = [((0, "O3'"), (1, "P"), 1.607, BOND_SIGMA)]
    angles = [((0, "C3'"), (0, "O3'"), (1, "P"), 119.7, ANGLE_SIGMA),
              ((0, "O3'"), (1, "P"), (1, "O5'"), 104.0, ANGLE_SIGMA)]
    return bonds, angles, []


OMEGA_SIGMA = 5.0  # degrees


def _disulfide_link():
    bonds = [((0, "SG"), (1, "SG"), 2.031, BOND_SIGMA)]
    angles = [((0, "CB"), (0, "SG"), (1, "SG"), 104.2, ANGLE_SIGMA),
              ((0, "SG"), (1, "SG"), (1, "CB"), 104.2, ANGLE_SIGMA)]
    return bonds, angles, []


# --------------------------------------------------------------------------------------------
# The restraints module
# --------------------------------------------------------------------------------------------


class RestraintWeights(eqx.Module):
    """Weights of the restraint terms (multiply each term's sum of (Δ/σ)²). All default to 1."""

    bond: float = 1.0
    angle: float = 1.0
    plane: float = 1.0
    chirality: float = 1.0
    torsion: float = 1.0
    nonbonded: float = 1.0
    b_similarity: float = 1.0
    occupancy: float = 1.0
    resolution: float = 1.0


def _dihedral(p0, p1, p2, p3):
    """Dihedral angle p0-p1-p2-p3 in radians, by atan2 (IUPAC sign)."""
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = jnp.cross(b1, b2), jnp.cross(b2, b3)
    m1 = jnp.cross(n1, b2) / _norm(b2)[..., None]
    return jnp.arctan2(jnp.sum(m1 * n2, -1), jnp.sum(n1 * n2, -1))


def _norm(v: Array) -> Array:
    """|v| along the last axis with a finite gradient at v = 0."""
    sq = jnp.sum(v * v, axis=-1)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


class Restraints(eqx.Module):
    """Geometry restraints of one model, as static-shaped index arrays; pure JAX energy functions.

    Build it with `build_restraints`. Every method is jit-able and differentiable in positions, B,
    occupancy and resolution; pass `(n, 3)` positions (use `jax.vmap` for an ensemble). The module
    docstring lists the terms, the ideal-value sources and the σ.

    **Fields (per restraint):**

    - `bond_index` `(nb, 2)`, `bond_ideal` Å, `bond_sigma` Å.
    - `angle_index` `(na, 3)` (vertex in the middle), `angle_ideal` and `angle_sigma` in radians.
    - `plane_index` `(npl, k)` padded with 0, `plane_mask` `(npl, k)`, `plane_sigma` `(npl,)` Å.
    - `chiral_index` `(nc, 4)` (centre, a, b, c), `chiral_ideal` Å³, `chiral_sigma` Å³.
    - `torsion_index` `(nt, 4)`, `torsion_ideal`, `torsion_sigma` in radians (peptide ω).
    - `nonbonded_index` `(nn, 2)`, `nonbonded_distance` r0 in Å (0 for padding).
    - `alt_group_index` `(ng, k)` padded, `alt_group_mask`: alternate conformers of one atom.
    - `vdw_radius` `(n,)` Å (0: no non-bonded term), `altloc_code` `(n,)` (0: no altloc),
      used to rebuild the neighbour list.
    - `weights`: `RestraintWeights`; `b_sigma` Å², `occupancy_sigma`, `resolution_bounds` (Å),
      `resolution_sigma` Å, `nonbonded_sigma` Å, `nonbonded_buffer` Å.
    - `library`: where the ideal values came from (a CCP4 monomer library's folder, or the CCD).
    """

    bond_index: Int[Array, "nb 2"]
    bond_ideal: Float[Array, " nb"]
    bond_sigma: Float[Array, " nb"]
    angle_index: Int[Array, "na 3"]
    angle_ideal: Float[Array, " na"]
    angle_sigma: Float[Array, " na"]
    plane_index: Int[Array, "npl k"]
    plane_mask: Bool[Array, "npl k"]
    plane_sigma: Float[Array, " npl"]
    chiral_index: Int[Array, "nc 4"]
    chiral_ideal: Float[Array, " nc"]
    chiral_sigma: Float[Array, " nc"]
    torsion_index: Int[Array, "nt 4"]
    torsion_ideal: Float[Array, " nt"]
    torsion_sigma: Float[Array, " nt"]
    nonbonded_index: Int[Array, "nn 2"]
    nonbonded_distance: Float[Array, " nn"]
    alt_group_index: Int[Array, "ng g"]
    alt_group_mask: Bool[Array, "ng g"]
    vdw_radius: Float[Array, " n"]
    altloc_code: Int[Array, " n"]
    weights: RestraintWeights = RestraintWeights()
    b_sigma: float = eqx.field(static=True, default=5.0)
    occupancy_sigma: float = eqx.field(static=True, default=0.01)
    resolution_bounds: tuple[float, float] = eqx.field(static=True, default=(1.0, 30.0))
    resolution_sigma: float = eqx.field(static=True, default=0.1)
    nonbonded_sigma: float = eqx.field(static=True, default=NONBONDED_SIGMA)
    nonbonded_buffer: float = eqx.field(static=True, default=2.0)
    unrestrained: tuple[str, ...] = eqx.field(static=True, default=())
    library: str = eqx.field(static=True, default="CCD (biotite) + Engh & Huber")

    @property
    def n_atoms(self) -> int:
        return self.vdw_radius.shape[0]

    # ---- geometry -------------------------------------------------------------------------

    def bond_lengths(self, positions: Float[Array, "n 3"]) -> Float[Array, " nb"]:
        """Bond lengths d in Å, in the order of `bond_index`."""
        i, j = self.bond_index[:, 0], self.bond_index[:, 1]
        return _norm(positions[i] - positions[j])

    def angles(self, positions: Float[Array, "n 3"]) -> Float[Array, " na"]:
        """Angles θ in radians (atan2(|u × v|, u · v)), in the order of `angle_index`."""
        a, b, c = (self.angle_index[:, k] for k in range(3))
        u = positions[a] - positions[b]
        v = positions[c] - positions[b]
        return jnp.arctan2(_norm(jnp.cross(u, v)), jnp.sum(u * v, axis=-1))

    def chiral_volumes(self, positions: Float[Array, "n 3"]) -> Float[Array, " nc"]:
        """Signed chiral volumes V in Å³, in the order of `chiral_index`."""
        o, a, b, c = (positions[self.chiral_index[:, k]] for k in range(4))
        return jnp.sum((a - o) * jnp.cross(b - o, c - o), axis=-1)

    def plane_deviations(self, positions: Float[Array, "n 3"]) -> Float[Array, "npl k"]:
        """Distance in Å of each plane atom from its least-squares plane (0 where padded)."""
        pts = positions[self.plane_index]
        m = self.plane_mask.astype(positions.dtype)[..., None]
        centroid = jnp.sum(pts * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        c = (pts - centroid[:, None, :]) * m
        scatter = jnp.einsum("pki,pkj->pij", c, c)
        _, vecs = jnp.linalg.eigh(jax.lax.stop_gradient(scatter))
        normal = vecs[..., 0]  # smallest eigenvalue first; fixed in the gradient (envelope theorem)
        return jnp.sum(c * normal[:, None, :], axis=-1)

    def torsions(self, positions: Float[Array, "n 3"]) -> Float[Array, " nt"]:
        """Dihedral angles in radians in (−π, π], in the order of `torsion_index`."""
        p0, p1, p2, p3 = (positions[self.torsion_index[:, k]] for k in range(4))
        return _dihedral(p0, p1, p2, p3)

    def nonbonded_distances(self, positions: Float[Array, "n 3"]) -> Float[Array, " nn"]:
        i, j = self.nonbonded_index[:, 0], self.nonbonded_index[:, 1]
        return _norm(positions[i] - positions[j])

    def bond_rmsd(self, positions: Float[Array, "n 3"]) -> Float[Array, ""]:
        """Root-mean-square deviation of bond lengths from ideal, in Å."""
        d = self.bond_lengths(positions) - self.bond_ideal.astype(positions.dtype)
        return jnp.sqrt(jnp.mean(d * d))

    def angle_rmsd(self, positions: Float[Array, "n 3"]) -> Float[Array, ""]:
        """Root-mean-square deviation of bond angles from ideal, in degrees."""
        d = self.angles(positions) - self.angle_ideal.astype(positions.dtype)
        return jnp.degrees(jnp.sqrt(jnp.mean(d * d)))

    # ---- energies -------------------------------------------------------------------------

    def energy_terms(
        self,
        positions: Float[Array, "n 3"],
        b_factors: Float[Array, " n"] | None = None,
        occupancies: Float[Array, " n"] | None = None,
        resolution: Float[Array, " n"] | None = None,
    ) -> dict[str, Float[Array, ""]]:
        """Each restraint term, weighted, as a dict of scalars (dimensionless, sums of (Δ/σ)²).

        Keys: `bond`, `angle`, `plane`, `chirality`, `torsion`, `nonbonded`, and `b_similarity`,
        `occupancy`, `resolution` when B, occupancies or per-atom resolutions (Å) are given.
        """
        dt = positions.dtype
        w = self.weights
        terms = {}
        r = (self.bond_lengths(positions) - self.bond_ideal.astype(dt)) / self.bond_sigma.astype(dt)
        terms["bond"] = w.bond * jnp.sum(r * r)
        r = (self.angles(positions) - self.angle_ideal.astype(dt)) / self.angle_sigma.astype(dt)
        terms["angle"] = w.angle * jnp.sum(r * r)
        if self.plane_index.shape[0]:
            r = self.plane_deviations(positions) / self.plane_sigma.astype(dt)[:, None]
            terms["plane"] = w.plane * jnp.sum(r * r)
        else:
            terms["plane"] = jnp.zeros((), dt)
        r = (self.chiral_volumes(positions) - self.chiral_ideal.astype(dt)) / self.chiral_sigma.astype(dt)
        terms["chirality"] = w.chirality * jnp.sum(r * r)
        delta = self.torsions(positions) - self.torsion_ideal.astype(dt)
        delta = jnp.arctan2(jnp.sin(delta), jnp.cos(delta))  # wrapped to (−π, π]
        r = delta / self.torsion_sigma.astype(dt)
        terms["torsion"] = w.torsion * jnp.sum(r * r)
        overlap = jnp.maximum(self.nonbonded_distance.astype(dt) - self.nonbonded_distances(positions), 0.0)
        terms["nonbonded"] = w.nonbonded * jnp.sum((overlap / self.nonbonded_sigma) ** 2)
        if b_factors is not None:
            i, j = self.bond_index[:, 0], self.bond_index[:, 1]
            r = (b_factors[i] - b_factors[j]) / self.b_sigma
            terms["b_similarity"] = w.b_similarity * jnp.sum(r * r)
        if occupancies is not None:
            q = occupancies
            out = (jnp.maximum(-q, 0.0) + jnp.maximum(q - 1.0, 0.0)) / self.occupancy_sigma
            total = jnp.sum(q[self.alt_group_index] * self.alt_group_mask, axis=1)
            alt = (total - 1.0) / self.occupancy_sigma
            terms["occupancy"] = w.occupancy * (jnp.sum(out * out) + jnp.sum(alt * alt))
        if resolution is not None:
            lo, hi = self.resolution_bounds
            out = (jnp.maximum(lo - resolution, 0.0) + jnp.maximum(resolution - hi, 0.0))
            terms["resolution"] = w.resolution * jnp.sum((out / self.resolution_sigma) ** 2)
        return terms

    def energy(
        self,
        positions: Float[Array, "n 3"],
        b_factors: Float[Array, " n"] | None = None,
        occupancies: Float[Array, " n"] | None = None,
        resolution: Float[Array, " n"] | None = None,
    ) -> Float[Array, ""]:
        """The total restraint energy: the sum of `energy_terms` (dimensionless).

        **Arguments:**

        - `positions`: `(n, 3)` in Å.
        - `b_factors`: `(n,)` B in Å² (adds B similarity along bonds), optional.
        - `occupancies`: `(n,)` (adds bounds [0, 1] and alternate conformers summing to 1), optional.
        - `resolution`: `(n,)` per-atom resolution in Å (adds `resolution_bounds`), optional.

        **Returns:** a scalar.
        """
        terms = self.energy_terms(positions, b_factors, occupancies, resolution)
        return functools.reduce(jnp.add, terms.values())

    def summary(self, positions) -> dict[str, float]:
        """Counts and rmsds (bond Å, angle °, chirality Å³, planarity Å, worst clash Å) as floats."""
        pos = jnp.asarray(positions)
        dev = self.plane_deviations(pos) if self.plane_index.shape[0] else jnp.zeros((0,))
        nb = self.nonbonded_distance - self.nonbonded_distances(pos)
        return {
            "bonds": int(self.bond_index.shape[0]),
            "angles": int(self.angle_index.shape[0]),
            "planes": int(self.plane_index.shape[0]),
            "chirals": int(self.chiral_index.shape[0]),
            "nonbonded_pairs": int(np.sum(np.asarray(self.nonbonded_distance) > 0)),
            "bond_rmsd": float(self.bond_rmsd(pos)),
            "angle_rmsd": float(self.angle_rmsd(pos)),
            "chirality_rmsd": float(jnp.sqrt(jnp.mean((self.chiral_volumes(pos) - self.chiral_ideal) ** 2)))
            if self.chiral_index.shape[0] else 0.0,
            "planarity_rmsd": float(jnp.sqrt(jnp.sum(dev**2) / jnp.maximum(jnp.sum(self.plane_mask), 1)))
            if self.plane_index.shape[0] else 0.0,
            "worst_overlap": float(jnp.max(nb, initial=0.0)),
        }

    # ---- neighbour list -------------------------------------------------------------------

    def with_nonbonded(
        self, positions, *, capacity: int | None = None, headroom: float | None = None
    ) -> "Restraints":
        """A copy with the non-bonded pair list rebuilt around `positions` (concrete, `(n, 3)` Å).

        Pairs closer than the largest contact distance plus `nonbonded_buffer` are kept. With
        `capacity`, the list is padded (r0 = 0: no contribution) to that many pairs so that a jitted
        function does not retrace; a ValueError says when more pairs were found. With `headroom`
        (and no `capacity`) the capacity is `headroom` × the pairs found, plus 64.
        """
        index, r0 = nonbonded_pairs(
            np.asarray(positions, np.float64), np.asarray(self.vdw_radius, np.float64),
            np.asarray(self.altloc_code), np.asarray(self.bond_index), self.nonbonded_buffer,
        )
        if capacity is None and headroom is not None:
            capacity = int(headroom * len(r0)) + 64
        if capacity is not None:
            if len(r0) > capacity:
                raise ValueError(
                    f"the neighbour list has {len(r0)} pairs, more than capacity={capacity}; "
                    "rebuild with a larger capacity"
                )
            index = np.concatenate([index, np.zeros((capacity - len(r0), 2), index.dtype)])
            r0 = np.concatenate([r0, np.zeros(capacity - len(r0))])
        dt = self.bond_ideal.dtype
        return eqx.tree_at(
            lambda r: (r.nonbonded_index, r.nonbonded_distance), self,
            (jnp.asarray(index, jnp.int32), jnp.asarray(r0, dt)),
        )


# --------------------------------------------------------------------------------------------
# Building restraints from a model
# --------------------------------------------------------------------------------------------


def _resolve(tuples, residues, n_atoms_altloc):
    """All atom-index tuples for named atoms `[(residue slot, name), ...]`, one per consistent
    combination of alternate conformers (altlocs: blank or all the same)."""
    altloc = n_atoms_altloc
    choices = []
    for slot, name in tuples:
        cands = residues[slot].get(name)
        if not cands:
            return []
        choices.append(cands)
    out = []
    for combo in itertools.product(*choices):
        alts = {altloc[i] for i in combo if altloc[i]}
        if len(alts) <= 1 and len(set(combo)) == len(combo):
            out.append(combo)
    return out


def build_restraints(
    model,
    *,
    monomer_library: str | os.PathLike | None = None,
    engh_huber: bool = True,
    weights: RestraintWeights | None = None,
    b_sigma: float = 5.0,
    occupancy_sigma: float = 0.01,
    resolution_bounds: tuple[float, float] = (1.0, 30.0),
    resolution_sigma: float = 0.1,
    nonbonded: bool = True,
    nonbonded_buffer: float = 2.0,
    dtype=jnp.float32,
) -> Restraints:
    """Restraints for an `AtomicModel` from a chemical library (never from the model's geometry).

    Residues are matched to dictionary components by residue name; restraints are made for the atoms
    present (a truncated side chain loses the terms that need its missing atoms). Consecutive
    residues of one chain are linked (peptide, nucleic acid) when C(i)-N(i+1) (O3'(i)-P(i+1)) is
    shorter than 2.5 Å in the input; CYS pairs with SG-SG < 2.5 Å get a disulfide. Alternate
    conformers: each restraint is made once per consistent combination of altlocs (blank atoms are
    shared), no non-bonded term between different altlocs, and the occupancies of the conformers of
    an atom are restrained to sum to 1.

    **Arguments:**

    - `model`: an `AtomicModel` (`read_model`); an ensemble uses its first member for the links and
      the neighbour list.
    - `monomer_library`: a CCP4 monomer library folder; default `$CLIBD_MON` if set. Components it
      lacks come from the CCD (biotite).
    - `engh_huber`: Engh & Huber (1991) backbone values for amino acids (see the module docstring).
    - `weights`: `RestraintWeights`.
    - `b_sigma` (Å²), `occupancy_sigma`, `resolution_bounds` (Å), `resolution_sigma` (Å): see
      `Restraints.energy_terms`.
    - `nonbonded`: build the non-bonded neighbour list; `nonbonded_buffer` (Å) its margin.
    - `dtype`: float dtype of the ideal values.

    **Returns:** `Restraints`. Warns (`RestraintsWarning`) naming the residues without dictionary
    entry and atoms that their component does not have; those atoms get no restraints and no
    non-bonded term.
    """
    if monomer_library is not None and not Path(monomer_library).is_dir():
        raise ModelmapError(f"monomer library {monomer_library}: no such folder")
    lib = str(monomer_library) if monomer_library else None
    labels = model.labels
    pos = np.asarray(model.atoms.positions, np.float64)
    if pos.ndim == 3:
        pos = pos[0]
    n = len(labels)
    if n == 0:
        raise ModelmapError("the model has no atoms")
    alt_codes = {a: k + 1 for k, a in enumerate(sorted({str(a) for a in labels.altloc if a}))}
    altloc = np.array([alt_codes.get(str(a), 0) for a in labels.altloc], np.int32)

    # group atoms into residues, in file order
    res_keys: list[tuple] = []
    residues: list[dict[str, list[int]]] = []
    key_to_slot: dict[tuple, int] = {}
    for i in range(n):
        key = (str(labels.chain[i]), int(labels.residue_number[i]), str(labels.insertion_code[i]),
               str(labels.residue_name[i]))
        if key not in key_to_slot:
            key_to_slot[key] = len(res_keys)
            res_keys.append(key)
            residues.append(defaultdict(list))
        residues[key_to_slot[key]][str(labels.atom_name[i])].append(i)

    bonds, angles, planes, chirals, torsions = {}, {}, {}, {}, {}
    restrained = np.zeros(n, bool)
    unknown_res, unknown_atoms = [], []

    def add(kind, store, named, values, slots):
        rs = [residues[s] for s in slots]
        for combo in _resolve([(k, nm) for k, nm in named], rs, altloc):
            if kind == "plane":
                key = tuple(sorted(combo))
            elif kind == "chiral":
                key = combo
            else:
                key = combo if combo[0] < combo[-1] else combo[::-1]
            store.setdefault(key, values)
            restrained[list(combo)] = True

    templates: list[ResidueTemplate | None] = []
    for slot, key in enumerate(res_keys):
        t = residue_template(key[3], engh_huber=engh_huber, monomer_library=lib)
        templates.append(t)
        if t is None:
            unknown_res.append(f"{key[0]}/{key[3]} {key[1]}{key[2]}")
            continue
        names = set(t.atoms)
        for nm, idx in residues[slot].items():
            if nm not in names:
                unknown_atoms += [labels.atom_id(i) for i in idx]
        s = [slot]
        for a, b, d0, sg in t.bonds:
            add("bond", bonds, [(0, a), (0, b)], (d0, sg), s)
        for a, b, c, t0, sg in t.angles:
            add("angle", angles, [(0, a), (0, b), (0, c)], (t0, sg), s)
        for names_, sg in t.planes:
            present = [(0, x) for x in names_ if x in residues[slot]]
            if len(present) >= 4:
                add("plane", planes, present, sg, s)
        for c, a, b, d, v0, sg in t.chirals:
            add("chiral", chirals, [(0, c), (0, a), (0, b), (0, d)], (v0, sg), s)
        if len(t.atoms) == 1:  # a single-atom component (ion, water O) is known but has no terms
            for idx in residues[slot].values():
                restrained[idx] = True
        if residue_kind(key[3]) == "water":
            for idx in residues[slot].values():
                restrained[idx] = True

    def close(slot_a, name_a, slot_b, name_b) -> bool:
        ia, ib = residues[slot_a].get(name_a, []), residues[slot_b].get(name_b, [])
        return any(np.linalg.norm(pos[i] - pos[j]) < LINK_CUTOFF for i in ia for j in ib)

    def add_link(link, slots, omega=False):
        lb, la, lp = link
        if omega:  # cis or trans as in the input (a class, not a value taken from the model)
            named = [(0, "CA"), (0, "C"), (1, "N"), (1, "CA")]
            for combo in _resolve(named, [residues[s] for s in slots], altloc):
                w = float(_dihedral(*(np.asarray(pos[i]) for i in combo)))
                torsions.setdefault(combo, (180.0 if abs(w) > math.pi / 2 else 0.0, OMEGA_SIGMA))
        for x, y, d0, sg in lb:
            add("bond", bonds, [x, y], (d0, sg), slots)
        for atoms3, t0, sg in ((x[:3], x[3], x[4]) for x in la):
            add("angle", angles, list(atoms3), (t0, sg), slots)
        for atoms_, sg in lp:
            present = [(k, x) for k, x in atoms_ if x in residues[slots[k]]]
            if len(present) >= 4:
                add("plane", planes, present, sg, slots)

    for slot in range(len(res_keys) - 1):
        a, b = res_keys[slot], res_keys[slot + 1]
        ta, tb = templates[slot], templates[slot + 1]
        if a[0] != b[0] or ta is None or tb is None:
            continue
        if {"N", "CA", "C"} <= set(ta.atoms) and {"N", "CA"} <= set(tb.atoms) and close(slot, "C", slot + 1, "N"):
            add_link(_peptide_link(b[3]), [slot, slot + 1], omega=True)
        elif "O3'" in ta.atoms and "P" in tb.atoms and close(slot, "O3'", slot + 1, "P"):
            add_link(_nucleic_link(), [slot, slot + 1])
    cys = [s for s, k in enumerate(res_keys) if k[3] == "CYS" and "SG" in residues[s]]
    for x, y in itertools.combinations(cys, 2):
        if close(x, "SG", y, "SG"):
            add_link(_disulfide_link(), [x, y])

    unrestrained = tuple(unknown_res) + tuple(unknown_atoms)
    if unknown_res or unknown_atoms:
        parts = []
        if unknown_res:
            parts.append(f"{len(unknown_res)} residue(s) without a dictionary entry: "
                         + ", ".join(unknown_res[:20]) + (" ..." if len(unknown_res) > 20 else ""))
        if unknown_atoms:
            parts.append(f"{len(unknown_atoms)} atom(s) not in their component: "
                         + ", ".join(unknown_atoms[:20]) + (" ..." if len(unknown_atoms) > 20 else ""))
        warnings.warn("no restraints for " + "; ".join(parts), RestraintsWarning, stacklevel=2)

    # alternate conformer groups (atoms with the same residue and name, all with an altloc)
    groups = []
    for slot, res in enumerate(residues):
        for idx in res.values():
            if len(idx) > 1 and all(altloc[i] for i in idx):
                groups.append(idx)
    gk = max((len(g) for g in groups), default=1)
    alt_index = np.zeros((len(groups), gk), np.int32)
    alt_mask = np.zeros((len(groups), gk), bool)
    for r, g in enumerate(groups):
        alt_index[r, : len(g)] = g
        alt_mask[r, : len(g)] = True

    def arr(store, width):
        keys = list(store)
        return np.asarray(keys, np.int32).reshape(-1, width), [store[k] for k in keys]

    bi, bv = arr(bonds, 2)
    ai, av = arr(angles, 3)
    ci, cv = arr(chirals, 4)
    ti, tv = arr(torsions, 4)
    pk = max((len(p) for p in planes), default=1)
    pi = np.zeros((len(planes), pk), np.int32)
    pm = np.zeros((len(planes), pk), bool)
    for r, p in enumerate(planes):
        pi[r, : len(p)] = p
        pm[r, : len(p)] = True
    ps = np.asarray(list(planes.values()), np.float64)

    elements = [str(e).upper() for e in labels.element]
    radius = np.array([VDW_RADII.get(e, 0.0) if restrained[i] else 0.0 for i, e in enumerate(elements)])

    f = lambda x: jnp.asarray(np.asarray(x, np.float64), dtype)  # noqa: E731
    r = Restraints(
        bond_index=jnp.asarray(bi, jnp.int32),
        bond_ideal=f([v[0] for v in bv]),
        bond_sigma=f([v[1] for v in bv]),
        angle_index=jnp.asarray(ai, jnp.int32),
        angle_ideal=f(np.radians([v[0] for v in av])),
        angle_sigma=f(np.radians([v[1] for v in av])),
        plane_index=jnp.asarray(pi, jnp.int32),
        plane_mask=jnp.asarray(pm),
        plane_sigma=f(ps),
        chiral_index=jnp.asarray(ci, jnp.int32),
        chiral_ideal=f([v[0] for v in cv]),
        chiral_sigma=f([v[1] for v in cv]),
        torsion_index=jnp.asarray(ti, jnp.int32),
        torsion_ideal=f(np.radians([v[0] for v in tv])),
        torsion_sigma=f(np.radians([v[1] for v in tv])),
        nonbonded_index=jnp.zeros((0, 2), jnp.int32),
        nonbonded_distance=f(np.zeros(0)),
        alt_group_index=jnp.asarray(alt_index),
        alt_group_mask=jnp.asarray(alt_mask),
        vdw_radius=f(radius),
        altloc_code=jnp.asarray(altloc),
        weights=weights if weights is not None else RestraintWeights(),
        b_sigma=float(b_sigma),
        occupancy_sigma=float(occupancy_sigma),
        resolution_bounds=(float(resolution_bounds[0]), float(resolution_bounds[1])),
        resolution_sigma=float(resolution_sigma),
        nonbonded_buffer=float(nonbonded_buffer),
        unrestrained=unrestrained,
        library=(f"CCP4 monomer library {lib}, then the CCD (biotite)" if lib
                 else "CCD (biotite)" + (" with Engh & Huber backbone" if engh_huber else "")),
    )
    if nonbonded:
        r = r.with_nonbonded(pos)
    return r
