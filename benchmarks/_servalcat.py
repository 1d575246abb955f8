"""servalcat beside modelmap (issue 17): its input files, its runs, and model metrics that do not use
modelmap's restraint code (imported by bench_refine.py as `_servalcat`; the scripts run from
benchmarks/).

**Frames.** servalcat (gemmi) places a map by NSTART and ignores the MRC ORIGIN field, and the
EMD-30342 crop's origin is not a whole number of voxels (modelmap keeps it in ORIGIN). Every map
given to servalcat is therefore written with a zero origin and every model translated by -origin:
the same physical object, rigidly moved. Its output is translated back before any metric.

**Models** are written from the original file with gemmi (entities, sequence, SSBOND / struct_conn
kept, so that servalcat finds the peptide links and disulfides), with the coordinates and B of the
start put in by atom (matched by chain, residue number, insertion code, atom name, altloc), the cell
set to the map's box and the space group to P 1. Connections whose partners are not in the file
(the chain-A extract of 7CEC keeps all 74 of the whole entry) are dropped.

**Metrics** (`close_contacts`, `moved_atoms`): heavy atoms only; the bond graph is guessed from the
*reference* (deposited / true) coordinates: two atoms are bonded when closer than the sum of their
covalent radii (gemmi's) + 0.4 Å, different altlocs excepted; 1-3 pairs are those with a common
bonded neighbour. Taking it from the reference, not from the refined model, means a refinement that
pulls two non-bonded atoms together cannot hide the contact by "bonding" them. `bond_graph_check`
compares the guess with gemmi's topology from a monomer library (bonds of the residues and of the
links: peptide, disulfide) where one is given.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import gemmi
import numpy as np
from scipy.spatial import cKDTree

BACKBONE = ("N", "CA", "C", "O")


# ---- atoms and keys ------------------------------------------------------------------------------

def atom_key(chain, resnum, icode, name, altloc) -> tuple:
    """(chain, residue number, insertion code, atom name, altloc), blanks as ''."""
    icode = "" if icode in ("\0", " ", "?", ".", None) else str(icode).strip()
    altloc = "" if altloc in ("\0", " ", "?", ".", None) else str(altloc).strip()
    return (str(chain), int(resnum), icode, str(name), altloc)


def label_keys(labels) -> list[tuple]:
    """Keys of modelmap `AtomLabels`."""
    return [atom_key(*k) for k in zip(labels.chain, labels.residue_number, labels.insertion_code,
                                       labels.atom_name, labels.altloc)]


def structure_atoms(st: gemmi.Structure) -> dict:
    """key -> (position (3,), B, residue name, element) of the first model's atoms."""
    out = {}
    for ch in st[0]:
        for res in ch:
            for at in res:
                k = atom_key(ch.name, res.seqid.num, res.seqid.icode, at.name, at.altloc)
                out[k] = (np.array(at.pos.tolist()), float(at.b_iso), res.name, at.element.name)
    return out


def box_cell(grid) -> gemmi.UnitCell:
    nx, ny, nz = grid.shape[2], grid.shape[1], grid.shape[0]
    vx, vy, vz = grid.voxel_size
    return gemmi.UnitCell(nx * vx, ny * vy, nz * vz, 90, 90, 90)


def add_peptide_links(st: gemmi.Structure, max_cn: float = 2.0) -> int:
    """Give every peptide bond of `st` (consecutive amino acids of a chain whose C(i)-N(i+1) is under
    `max_cn` Å *in `st` as read*: call it before putting in a noisy start) as an explicit
    struct_conn link, TRANS / PTRANS (before PRO), or CIS / PCIS where |ω| < 30°.

    gemmi (and so servalcat) finds peptide links by distance: a start with 0.3 Å noise per axis
    pulls some C-N pairs apart far enough to be taken for chain breaks (7 of crambin's 45 with seed
    0, each then refined without its peptide restraints). Returns the number of links added."""
    n = 0
    for ch in st[0]:
        for i in range(len(ch) - 1):
            a, b = ch[i], ch[i + 1]
            c_at, n_at = a.find_atom("C", "*"), b.find_atom("N", "*")
            if c_at is None or n_at is None or c_at.pos.dist(n_at.pos) >= max_cn:
                continue
            ca1, ca2 = a.find_atom("CA", "*"), b.find_atom("CA", "*")
            cis = ca1 is not None and ca2 is not None and abs(
                np.degrees(gemmi.calculate_dihedral(ca1.pos, c_at.pos, n_at.pos, ca2.pos))) < 30
            con = gemmi.Connection()
            con.name = f"pept{n + 1}"
            con.type = gemmi.ConnectionType.Covale
            con.link_id = ("P" if b.name == "PRO" else "") + ("CIS" if cis else "TRANS")
            con.partner1 = gemmi.make_address(ch, a, c_at)
            con.partner2 = gemmi.make_address(ch, b, n_at)
            con.asu = gemmi.Asu.Same
            st.connections.append(con)
            n += 1
    return n


def prepare_structure(path, shift, grid, keys=None, positions=None, b=None, peptide_links=False) -> gemmi.Structure:
    """The model of `path` with `positions` and `b` (arrays in `keys`' order, the original frame)
    put in by atom, translated by `shift` (Å), in the map's box cell, P 1 (see the module docs).
    `peptide_links`: the peptide bonds of the file's own coordinates given as links
    (`add_peptide_links`)."""
    st = gemmi.read_structure(str(path))
    st.remove_empty_chains()
    if len(st) > 1:
        for i in range(len(st) - 1, 0, -1):
            del st[i]
    keep = gemmi.ConnectionList()
    for c in st.connections:
        if st[0].find_cra(c.partner1).atom and st[0].find_cra(c.partner2).atom:
            keep.append(c)
    st.connections = keep
    if peptide_links:
        add_peptide_links(st)
    if keys is not None:
        index = {k: i for i, k in enumerate(keys)}
        seen = 0
        for ch in st[0]:
            for res in ch:
                for at in res:
                    i = index.get(atom_key(ch.name, res.seqid.num, res.seqid.icode, at.name, at.altloc))
                    if i is None:
                        raise KeyError(f"{ch.name}/{res.name} {res.seqid}/{at.name} is not in the start")
                    if positions is not None:
                        at.pos = gemmi.Position(*map(float, positions[i]))
                    if b is not None:
                        at.b_iso = float(b[i])
                    seen += 1
        if seen != len(keys):
            raise ValueError(f"{seen} atoms in {path}, {len(keys)} in the start")
    st[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*map(float, shift))))
    st.cell = box_cell(grid)
    st.spacegroup_hm = "P 1"
    st.setup_entities()
    return st


def write_custom_sf_cif(st: gemmi.Structure, cif_out) -> None:
    """`st` as mmCIF for `servalcat -s custom`: each atom's `_atom_site.scat_id` is its atomic number
    and `_lmb_scat_coef` holds the ITC 4.3.2.2 (Peng 1996) 5-Gaussian electron coefficients, gemmi's
    `c4322`, the same table as modelmap's `"electron"` (the synthetic targets')."""
    doc = st.make_mmcif_document()
    block = doc[0]
    block.find_mmcif_category("_atom_site.").loop.add_columns(["_atom_site.scat_id"], "?")
    elements = set()
    for row in block.find("_atom_site.", ["type_symbol", "scat_id"]):
        z = gemmi.Element(row[0]).atomic_number
        row[1] = str(z)
        elements.add(z)
    coef = block.init_loop("_lmb_scat_coef.", ["scat_id"] + [f"coef_{k}{i}" for k in "ab" for i in range(1, 6)])
    for z in sorted(elements):
        c = gemmi.Element(z).c4322
        coef.add_row([str(z)] + [repr(float(x)) for x in list(c.a) + list(c.b)])
    doc.write_file(str(cif_out))


# ---- running servalcat ---------------------------------------------------------------------------

def version(command) -> str | None:
    try:
        out = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=120)
        return " ".join((out.stdout + out.stderr).split()) or None
    except (OSError, subprocess.SubprocessError):
        return None


_NOTES = ("Link confirmed", "links found", "Monomer library loaded", "WARNING", "Will use weight", "FSCaverage(full)",
          "bond lengths:", "bond  angles:")


def run(command, args: list[str], cwd, monlib=None) -> dict:
    """`command args...` in `cwd`; wall time, the command line (as 'servalcat ...'), return code,
    and the end of the log on failure. `monlib` also goes to CLIBD_MON of the child only (modelmap's
    `build_restraints` reads $CLIBD_MON, so it is never set in this process). `log_notes`: the log's
    lines about links, the monomer library, warnings, the weight and the final summary."""
    env = dict(os.environ)
    if monlib:
        env["CLIBD_MON"] = str(monlib)
        args = [*args, "--monlib", str(monlib)]
    t = time.perf_counter()
    proc = subprocess.run([command, *args], cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    lines = proc.stdout.splitlines()
    unknown_type = sum("unknown chemical type" in ln for ln in lines)  # --unrestrained: one per atom
    links: dict[str, int] = {}
    notes = []
    for ln in lines:
        if "Link confirmed: id=" in ln:  # one per link: counted by link id
            link = ln.split("id=", 1)[1].split()[0]
            links[link] = links.get(link, 0) + 1
        elif any(w in ln for w in _NOTES) and "unknown chemical type" not in ln:
            notes.append(ln.strip())
    notes = [f"links confirmed: {links}"] * bool(links) + list(dict.fromkeys(notes))[:40]
    out = {"command": " ".join(["servalcat", *args]), "wall_s": wall, "returncode": proc.returncode,
           "log_notes": notes}
    if unknown_type:
        out["log_notes"].append(f"({unknown_type} warnings 'unknown chemical type ... Will use default type')")
    if proc.returncode != 0:
        out["error"] = (proc.stderr or proc.stdout)[-1500:]
    return out


def final_stats(stats_json) -> dict:
    """FSCaverage and servalcat's own bond / angle rmsd (non-H) at the first and last cycle."""
    p = Path(stats_json)
    if not p.exists():
        return {}
    s = json.loads(p.read_text())
    out = {"cycles_run": int(s[-1].get("Ncyc", len(s) - 1))}
    for label, e in (("start", s[0]), ("final", s[-1])):
        out[f"fsc_average_{label}"] = e.get("data", {}).get("summary", {}).get("FSCaverage")
        rmsd = e.get("geom", {}).get("summary", {}).get("r.m.s.d.", {})
        if rmsd:
            out[f"sv_bond_rmsd_{label}"] = rmsd.get("Bond distances, non H")
            out[f"sv_angle_rmsd_{label}"] = rmsd.get("Bond angles, non H")
    n = s[0].get("geom", {}).get("summary", {}).get("N restraints", {})
    if n:
        out["n_bonds_non_h"] = n.get("Bond distances, non H")
        out["n_angles_non_h"] = n.get("Bond angles, non H")
    if "weight" in s[-1]:
        out["weight_final"] = s[-1]["weight"]
    return out


def read_result(path, shift, keys) -> tuple[np.ndarray, np.ndarray]:
    """Positions (translated back by -shift) and B of servalcat's output model, in `keys`' order."""
    atoms = structure_atoms(gemmi.read_structure(str(path)))
    missing = [k for k in keys if k not in atoms]
    if missing:
        raise KeyError(f"{len(missing)} atoms missing from {path}, e.g. {missing[:3]}")
    pos = np.stack([atoms[k][0] for k in keys]) - np.asarray(shift, np.float64)
    b = np.array([atoms[k][1] for k in keys])
    return pos, b


def evaluate(command, model_cif, map_path, resolution, cwd, monlib, prefix="eval", extra=()) -> dict:
    """servalcat's own scores of a model without refining it (`--ncycle 0`): FSCaverage and bond /
    angle rmsd, as its refinement reports them (default mask and trimming, from this model)."""
    r = run(command, ["refine_spa_norefmac", "--model", str(model_cif), "--map", str(map_path), "-d",
                      str(resolution), "--ncycle", "0", *extra, "-o", prefix], cwd, monlib)
    st = final_stats(Path(cwd) / f"{prefix}_stats.json")
    return {"fsc_average": st.get("fsc_average_final"), "sv_bond_rmsd": st.get("sv_bond_rmsd_final"),
            "sv_angle_rmsd": st.get("sv_angle_rmsd_final"), "eval_wall_s": r["wall_s"],
            **({"eval_error": r["error"]} if "error" in r else {})}


# ---- metrics (independent of modelmap's restraints) ----------------------------------------------

def _covalent_radius(element: str) -> float:
    return gemmi.Element(element).covalent_r


def bond_graph(keys, elements, reference_positions, tolerance=0.4):
    """1-2 and 1-3 pairs (sets of sorted index pairs) of the heavy atoms, bonds guessed from the
    reference coordinates (module docs). Hydrogens are left out (no pairs)."""
    pos = np.asarray(reference_positions, np.float64)
    heavy = np.array([e.upper() not in ("H", "D") for e in elements])
    idx = np.flatnonzero(heavy)
    radii = np.array([_covalent_radius(e) for e in elements])
    tree = cKDTree(pos[idx])
    bonds = set()
    for a, b in tree.query_pairs(2 * radii[idx].max() + tolerance):
        i, j = idx[a], idx[b]
        if keys[i][4] and keys[j][4] and keys[i][4] != keys[j][4]:
            continue
        if np.linalg.norm(pos[i] - pos[j]) < radii[i] + radii[j] + tolerance:
            bonds.add((min(i, j), max(i, j)))
    neighbours: dict[int, set[int]] = {}
    for i, j in bonds:
        neighbours.setdefault(i, set()).add(j)
        neighbours.setdefault(j, set()).add(i)
    angles = set()
    for centre, nb in neighbours.items():
        nb = sorted(nb)
        for a in range(len(nb)):
            for b in range(a + 1, len(nb)):
                angles.add((nb[a], nb[b]))
    return bonds, angles - bonds


def bond_graph_check(structure_path, keys, bonds, monlib) -> dict:
    """The distance-guessed bonds against gemmi's topology from the monomer library `monlib`
    (residues' bonds and links): counts of bonds in one and not the other (heavy atoms)."""
    st = gemmi.read_structure(str(structure_path))
    st.setup_entities()
    st.assign_serial_numbers()
    serial = {at.serial: atom_key(ch.name, res.seqid.num, res.seqid.icode, at.name, at.altloc)
              for ch in st[0] for res in ch for at in res}
    lib = gemmi.MonLib()
    lib.read_monomer_lib(str(monlib), sorted({r.name for ch in st[0] for r in ch}))
    topo = gemmi.prepare_topology(st, lib, h_change=gemmi.HydrogenChange.NoChange, ignore_unknown_links=True)
    index = {k: i for i, k in enumerate(keys)}
    lib_bonds = set()
    for bond in topo.bonds:
        if any(at.is_hydrogen() for at in bond.atoms):
            continue
        k = [index.get(serial.get(at.serial)) for at in bond.atoms]
        if None not in k:
            lib_bonds.add((min(k), max(k)))
    return {"guessed": len(bonds), "monlib": len(lib_bonds), "guessed_only": len(bonds - lib_bonds),
            "monlib_only": len(lib_bonds - bonds),
            "examples_guessed_only": [_pair_label(keys, p) for p in sorted(bonds - lib_bonds)[:5]],
            "examples_monlib_only": [_pair_label(keys, p) for p in sorted(lib_bonds - bonds)[:5]]}


def _pair_label(keys, pair):
    return " - ".join(f"{keys[i][0]}/{keys[i][1]}{keys[i][2]}/{keys[i][3]}" for i in pair)


def close_contacts(keys, resnames, elements, positions, excluded, cutoff=2.2) -> list[dict]:
    """Heavy-atom pairs closer than `cutoff` Å that are not 1-2 / 1-3 pairs (`excluded`) nor
    different altlocs, with their labels and distance, closest first."""
    pos = np.asarray(positions, np.float64)
    heavy = np.flatnonzero([e.upper() not in ("H", "D") for e in elements])
    tree = cKDTree(pos[heavy])
    out = []
    for a, b in tree.query_pairs(cutoff):
        i, j = sorted((int(heavy[a]), int(heavy[b])))
        if (i, j) in excluded:
            continue
        if keys[i][4] and keys[j][4] and keys[i][4] != keys[j][4]:
            continue
        d = float(np.linalg.norm(pos[i] - pos[j]))
        out.append({"atom1": _label(keys, resnames, i), "atom2": _label(keys, resnames, j), "distance": round(d, 3)})
    return sorted(out, key=lambda r: r["distance"])


def _label(keys, resnames, i) -> str:
    c, n, ic, name, alt = keys[i]
    return f"{c}/{resnames[i]} {n}{ic}/{name}{'.' + alt if alt else ''}"


def moved_atoms(keys, resnames, start, end, cutoff=3.0) -> list[dict]:
    """Atoms that moved more than `cutoff` Å between `start` and `end` (same order), farthest first:
    chain, residue number, residue name, atom name, distance, backbone (N, CA, C, O)."""
    d = np.linalg.norm(np.asarray(end, np.float64) - np.asarray(start, np.float64), axis=1)
    rows = []
    for i in np.flatnonzero(d > cutoff):
        c, n, ic, name, alt = keys[i]
        rows.append({"chain": c, "resnum": f"{n}{ic}", "resname": str(resnames[i]), "atom": name + (f".{alt}" if alt else ""),
                     "distance": round(float(d[i]), 3), "backbone": name in BACKBONE})
    return sorted(rows, key=lambda r: -r["distance"])
