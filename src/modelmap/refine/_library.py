"""The chemical library of the restraints: residue templates and links, with their sources.

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
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from pathlib import Path

import numpy as np

from ._ccd import ccd_rows

__all__ = ["ANGLE_SIGMA", "BACKBONE_ANGLE_SIGMA", "BOND_SIGMA", "CHIRAL_SIGMA", "LINK_CUTOFF", "OMEGA_SIGMA",
           "PLANE_SIGMA", "ResidueTemplate", "RestraintsWarning", "residue_template"]

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
    atoms = ccd_rows("chem_comp_atom", name)
    if atoms is None:
        return None
    bonds = ccd_rows("chem_comp_bond", name)
    names = [str(n) for n in atoms["atom_id"]]
    elements = {n: str(e).upper() for n, e in zip(names, atoms["type_symbol"])}
    xyz = np.stack([atoms[f"pdbx_model_Cartn_{c}_ideal"] for c in "xyz"], 1) if (
        "pdbx_model_Cartn_x_ideal" in atoms) else np.full((len(names), 3), np.nan)
    source = "CCD ideal coordinates"
    if not np.all(np.isfinite(xyz)):
        model = np.stack([atoms[f"model_Cartn_{c}"] for c in "xyz"], 1)
        if np.all(np.isfinite(model)):
            xyz, source = model, "CCD model coordinates (no ideal coordinates)"
        elif len(names) > 1:
            return None
    pos = dict(zip(names, xyz))
    aromatic_atoms = {n for n, f in zip(names, atoms["pdbx_aromatic_flag"]) if f == "Y"}
    stereo = {n: s for n, s in zip(names, atoms["pdbx_stereo_config"]) if s in ("R", "S")}
    bonded: dict[str, set[str]] = {n: set() for n in names}
    bond_list, double = [], []
    if bonds is not None:
        for a, b, order in zip(bonds["atom_id_1"], bonds["atom_id_2"], bonds["value_order"]):
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
