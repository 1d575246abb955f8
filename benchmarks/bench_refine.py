"""Benchmark: real-space refinement on 7CEC chain A (4308 atoms), CPU.

Cases (issue 6):

1. `xyz+b`: target = the Fourier map at 3 Å of the deposited model with its B, on the EMD-30342
   crop's grid; start = coordinates + N(0, 0.3 Å) per axis, B + N(0, 15²) clipped to [5, 300].
   Reports coordinate rmsd to the truth, B Pearson r and RMSE, bond and angle rmsd, time.
2. `b`: the same target, B alone from the same noisy B, unrestrained.
3. `occ`: every 10th residue at occupancy 0.5 in the target; per-atom occupancies refined from 1.
4. `res`: target by the shell renderer with residues 1-250 at 2.5 Å and the rest at 5 Å;
   per-atom resolution refined around 3.5 Å (± 2 Å), one per residue (`--res-groups residue`,
   default) or per atom (`atom`), started from a scan of uniform resolutions (`--res-start scan`,
   default: `refine`'s own default, `resolutions="scan"`) or by gradient alone from a uniform
   3.5 Å (`uniform`: `resolutions=3.5`).
5. `real`: xyz and B against the EMD-30342 crop at 3.9 Å with `refine`'s defaults: rows for the
   deposited model and the refined one, each with CC_mask, CC_box, mean Q (modelmap's scores), bond
   and angle rmsd (modelmap's restraints), heavy-atom contacts under 2.2 Å that are not 1-2 / 1-3
   pairs and atoms moved more than 3 Å (listed; `_servalcat.close_contacts`, `moved_atoms`: a bond
   graph of their own, not modelmap's restraints), and with `--servalcat` servalcat's FSCaverage
   of each model (`--ncycle 0`) and a servalcat row (`refine_spa_norefmac`, its defaults).
6. servalcat's B refinement on case 2's target in the same run, when `--servalcat` names its
   command (e.g. a venv's `servalcat`), for each of `--servalcat-cycles` (see `case_servalcat` for
   how the comparison is made like-for-like; unrestrained, so no monomer library is needed).
7. `b-flat` (issue 17): B alone from a flat start (every B = the mean, 145.5 Å²) against the Fourier
   map at 3.9 Å of the deposited model on the crop's grid; B r and RMSE. servalcat (20 cycles)
   without and with its ADP restraints.
8. `crambin` (issue 17): 1crn at 3 Å, xyz and B from coordinates + N(0, 0.3 Å) and noisy B against
   the Fourier map of the truth on a 1 Å grid: coordinate rmsd, B r; servalcat with the peptide
   links given (`--crambin-cycles`, e.g. 10,40).

servalcat runs from its own venv (`--servalcat PATH`) with a CCP4 monomer library (`--monlib PATH`,
the folder with list/mon_lib_list.cif); `_servalcat` writes its inputs (maps at a zero origin,
models moved with them) and reads its output back. A markdown table of the issue-17 rows is printed
at the end.

Times are wall-clock on this machine, compilation included ("total") and the first step's
compilation separated ("compile" = time to the first recorded step). Writes JSON with device,
versions and sizes.

    python benchmarks/bench_refine.py [--cases xyz+b,b,occ,res,real] [--out results/refine.json]
    python benchmarks/bench_refine.py --cases b-flat,real,crambin --servalcat /work/venvs/servalcat/bin/servalcat
        --monlib /work/venvs/monlib_coot/monomers --out benchmarks/results/servalcat.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import modelmap as mm
from modelmap import Atoms, IndependentAtomVolume, NufftRenderFn, ShellRenderFn
from modelmap.refine import build_restraints, refine
from modelmap.volumes import ShellDecompositionVolume

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MODELMAP_TEST_DATA", ROOT.parent / "shared" / "data"))
MODEL = DATA / "emd30342_7cec" / "390_7cec_A.cif.gz"
MAP = DATA / "emd30342_7cec" / "390_emd_30342_A_z4.mrc.gz"


def _rmsd(a, b):
    return float(np.sqrt(np.mean(np.sum((np.asarray(a) - np.asarray(b)) ** 2, -1))))


def _times(r, stamps):
    """Total time, time to the first reported step (setup + compilation + the start's value) and time
    per step from the callback's wall-clock stamps `(step, s)` (one per accepted step:
    `progress_every=1`); evaluations include the line search's trials."""
    n = len(stamps)
    per_step = (stamps[-1][1] - stamps[0][1]) / max(stamps[-1][0] - stamps[0][0], 1) if n > 1 else float("nan")
    return {"total_s": float(r.time), "compile_s": float(stamps[0][1]) if n else float("nan"),
            "per_step_s": float(per_step), "steps": int(r.n_steps), "evaluations": int(r.n_evaluations),
            "result": r.result}


def _run(check, *args, warm=True, **kwargs):
    """`refine(*args, **kwargs)` twice (cold: compilation included; warm: the same start again,
    compiled; only the cold run when `warm` is False), each with the wall time and the time at which
    `check(atoms, resolutions)` first held (the criteria met), from a callback at every step.
    Returns (result of the last run, timings dict)."""
    out = {}
    for label in ("cold", "warm") if warm else ("cold",):
        t0 = time.perf_counter()
        met, stamps = {}, []

        def callback(step, atoms, res):
            stamps.append((step, time.perf_counter() - t0))
            if "step" not in met and check(atoms, res):
                met["step"], met["s"] = step, time.perf_counter() - t0

        r = refine(*args, callback=callback, progress=False, progress_every=1, **kwargs)
        out[label] = {"wall_s": time.perf_counter() - t0, **_times(r, stamps),
                      "criteria_met_step": met.get("step"), "criteria_met_s": met.get("s")}
    if warm and _PLAIN:
        # the same run without the per-step callback, which costs time of its own (the atoms cross to
        # the host and the criteria are checked there at every step): the loop's own time per step,
        # setup included; once to compile (no callback is another compiled loop), then timed
        refine(*args, progress=False, **kwargs)
        t0 = time.perf_counter()
        plain = refine(*args, progress=False, **kwargs)
        wall = time.perf_counter() - t0
        out["plain"] = {"wall_s": wall, "steps": int(plain.n_steps), "evaluations": int(plain.n_evaluations),
                        "per_step_s": wall / max(int(plain.n_steps), 1)}
    return r, out


_PLAIN = False  # `--plain` adds the runs without callback


def _noisy_start(atoms, seed=0):
    rng = np.random.default_rng(seed)
    pos = np.asarray(atoms.positions) + rng.normal(0, 0.3, atoms.positions.shape)
    b = np.clip(np.asarray(atoms.b_factors) + rng.normal(0, 15, atoms.n_atoms), 5, 300)
    return pos, b


def case_xyz_b(model, density, steps):
    truth = model.atoms
    target = NufftRenderFn(density.grid)(IndependentAtomVolume.from_atoms(truth, 3.0))
    pos, b = _noisy_start(truth)
    start = model.replace(atoms=Atoms(pos, truth.atomic_numbers, b, truth.occupancies))
    restraints = build_restraints(model)
    bt = np.asarray(truth.b_factors)

    def check(atoms, _):
        b_ = np.asarray(atoms.b_factors)
        return (_rmsd(atoms.positions, truth.positions) <= 0.2 and np.corrcoef(b_, bt)[0, 1] >= 0.98
                and np.sqrt(np.mean((b_ - bt) ** 2)) <= 3.0 and float(restraints.bond_rmsd(atoms.positions)) <= 0.02
                and float(restraints.angle_rmsd(atoms.positions)) <= 2.5)

    r, timing = _run(check, start, target, 3.0, grid=density.grid, parameters=("xyz", "b"), restraints=restraints,
                     max_steps=steps)
    bb = np.asarray(r.atoms.b_factors)
    return {
        "case": "xyz+b", "atoms": truth.n_atoms, **timing,
        "xyz_rmsd_start": _rmsd(pos, truth.positions), "xyz_rmsd": _rmsd(r.atoms.positions, truth.positions),
        "b_r": float(np.corrcoef(bb, bt)[0, 1]), "b_rmse": float(np.sqrt(np.mean((bb - bt) ** 2))),
        "b_rmse_start": float(np.sqrt(np.mean((b - bt) ** 2))),
        "bond_rmsd": float(restraints.bond_rmsd(r.atoms.positions)),
        "angle_rmsd": float(restraints.angle_rmsd(r.atoms.positions)),
        "bond_rmsd_truth": float(restraints.bond_rmsd(truth.positions)),
        "angle_rmsd_truth": float(restraints.angle_rmsd(truth.positions)),
    }, target


def case_b(model, density, target, steps):
    truth = model.atoms
    _, b = _noisy_start(truth)
    start = Atoms(truth.positions, truth.atomic_numbers, b, truth.occupancies)
    bt = np.asarray(truth.b_factors)

    def check(atoms, _):
        b_ = np.asarray(atoms.b_factors)
        return np.corrcoef(b_, bt)[0, 1] >= 0.99 and np.sqrt(np.mean((b_ - bt) ** 2)) <= 2.0

    r, timing = _run(check, start, target, 3.0, grid=density.grid, parameters=("b",), restraints=False, max_steps=steps)
    bb = np.asarray(r.atoms.b_factors)
    return {"case": "b", "atoms": truth.n_atoms, **timing,
            "b_r": float(np.corrcoef(bb, bt)[0, 1]), "b_rmse": float(np.sqrt(np.mean((bb - bt) ** 2))),
            "b_rmse_start": float(np.sqrt(np.mean((b - bt) ** 2)))}


def case_occ(model, density, steps):
    """Per-atom occupancies, and one per residue (`occupancy_groups="residue"`), from 1: two rows."""
    truth = model.atoms
    # whole residues (every 10th) at occupancy 0.5: a pattern a 3 Å map resolves (single atoms at
    # B 72-312 Å² are not separable from their bonded neighbours at 3 Å)
    resn = np.asarray(model.labels.residue_number)
    half = resn % 10 == 0
    occ_true = np.where(half, 0.5, 1.0)
    target = NufftRenderFn(density.grid)(IndependentAtomVolume.from_atoms(
        Atoms(truth.positions, truth.atomic_numbers, truth.b_factors, occ_true), 3.0))
    residues = np.unique(resn)
    half_res = residues % 10 == 0

    def check(atoms, _):
        o = np.asarray(atoms.occupancies)
        return bool(np.all(np.abs(o[half] - 0.5) <= 0.1))

    rows = []
    for groups in (None, "residue"):
        r, timing = _run(check, model, target, 3.0, grid=density.grid, parameters=("occ",), max_steps=steps,
                         occupancy_groups=groups)
        occ = np.asarray(r.atoms.occupancies)
        mean = np.array([occ[resn == k].mean() for k in residues])  # per residue
        rows.append({
            "case": "occ" if groups is None else "occ residue groups", "atoms": truth.n_atoms,
            "occupancy_groups": groups or "atom", "parameters": int(r.atoms.n_atoms if groups is None else len(residues)),
            **timing,
            "half_within_0.1": float(np.mean(np.abs(occ[half] - 0.5) <= 0.1)),
            "full_within_0.1": float(np.mean(np.abs(occ[~half] - 1.0) <= 0.1)),
            "half_median": float(np.median(occ[half])), "full_median": float(np.median(occ[~half])),
            "half_max_err": float(np.max(np.abs(occ[half] - 0.5))),
            "half_residues_within_0.1": float(np.mean(np.abs(mean[half_res] - 0.5) <= 0.1)),
            "full_residues_within_0.1": float(np.mean(np.abs(mean[~half_res] - 1.0) <= 0.1)),
        })
    return rows


def case_res(model, density, steps, groups="residue", start="scan"):
    truth = model.atoms
    first = np.asarray(model.labels.residue_number) <= 250
    d_true = np.where(first, 2.5, 5.0).astype(np.float32)
    target = ShellRenderFn(density.grid)(ShellDecompositionVolume.from_atoms(truth, d_true))
    def check(_, res):
        e = np.abs(res - d_true)
        print(f"res: median |D - D_true| {np.median(e[first]):.3f} (2.5 Å), {np.median(e[~first]):.3f} (5 Å)",
              file=sys.stderr, flush=True)
        return np.median(e[first]) <= 0.3 and np.median(e[~first]) <= 0.3

    # one (cold) run: a map value and gradient costs ~16 s here (41³-voxel windows at D up to 5.5 Å)
    r, timing = _run(check, model, target, 3.5, grid=density.grid, parameters=("res",), max_steps=steps, warm=False,
                     resolution_groups=groups, resolutions="scan" if start == "scan" else 3.5)
    err = np.abs(r.resolution - d_true)
    return {"case": "res", "resolution_groups": groups, "start": start, "atoms": truth.n_atoms, **timing,
            "median_err_2.5": float(np.median(err[first])), "median_err_5": float(np.median(err[~first])),
            "median_d_2.5": float(np.median(r.resolution[first])), "median_d_5": float(np.median(r.resolution[~first]))}


def case_servalcat(command, model, density, target, ncycle=10):
    """servalcat's ADP-only refinement against the same synthetic target, from the same noisy B.

    Set up like-for-like with case 2:
    - servalcat (gemmi) places a map by NSTART and drops the MRC ORIGIN field, and this crop's
      origin is not a whole number of voxels (modelmap writes it to ORIGIN), so the map would not
      overlay the model. The model and the map are both translated by -origin (the map to a zero
      origin): the same physical object, rigidly moved.
    - `--no_mask`: modelmap fits the whole box; servalcat's default model mask (and trimming)
      cuts the tails of these high-B atoms out of the target.
    - `-s custom` with the ITC 4.3.2.2 electron table, the target's form factors (servalcat's
      default is Mott-Bethe from IT92, which shifts every B by about +3 Å² on this target).
    - `--adpr_weight 0`: `--unrestrained` drops only the positional restraints; case 2 has no B
      restraints either.
    - refined B are matched to the truth by chain/residue/atom name, not by file order.
    """
    import gemmi

    def _atom_keys(labels):
        return list(zip(labels.chain, labels.residue_number, labels.insertion_code, labels.atom_name,
                        labels.altloc))

    def _write_custom_sf_cif(pdb_in, cif_out):
        """`pdb_in` as mmCIF for `servalcat -s custom` (`_servalcat.write_custom_sf_cif`)."""
        from _servalcat import write_custom_sf_cif

        st = gemmi.read_structure(str(pdb_in))
        st.setup_entities()
        write_custom_sf_cif(st, cif_out)

    truth = model.atoms
    _, b = _noisy_start(truth)
    g = density.grid
    shift = np.asarray(g.origin, dtype=np.float64)
    grid0 = mm.Grid(g.shape, g.voxel_size, (0.0, 0.0, 0.0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = model.replace(atoms=Atoms(np.asarray(truth.positions, np.float64) - shift, truth.atomic_numbers, b,
                                          truth.occupancies))
        mm.write_model(tmp / "start.pdb", start)
        _write_custom_sf_cif(tmp / "start.pdb", tmp / "start.cif")
        mm.write_map(tmp / "target.mrc", mm.DensityMap(np.asarray(target), grid0))
        cmd = [command, "refine_spa_norefmac", "--model", "start.cif", "--map", "target.mrc", "-d", "3.0",
               "--fix_xyz", "--adp", "iso", "--unrestrained", "--adpr_weight", "0", "--no_mask", "-s", "custom",
               "--ncycle", str(ncycle), "-o", "sv"]
        row = {"case": "servalcat b", "command": " ".join(["servalcat"] + cmd[1:]), "ncycle": ncycle,
               "origin_shift": (-shift).tolist()}
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t
        out = tmp / "sv.mmcif"
        if proc.returncode != 0 or not out.exists():
            return {**row, "error": (proc.stderr or proc.stdout)[-800:]}
        refined = mm.read_model(out)
        b_out = dict(zip(_atom_keys(refined.labels), np.asarray(refined.atoms.b_factors, np.float64)))
        keys = _atom_keys(model.labels)
        missing = [k for k in keys if k not in b_out]
        if missing or len(b_out) != len(keys):
            return {**row, "error": f"{len(missing)} atoms missing, {len(b_out)} read vs {len(keys)}"}
        bb = np.array([b_out[k] for k in keys])
        bt = np.asarray(truth.b_factors, np.float64)
        fsc = None
        stats = tmp / "sv_stats.json"
        if stats.exists():
            fsc = json.loads(stats.read_text())[-1]["data"]["summary"].get("FSCaverage")
        offset = float(np.mean(bb - bt))
        return {**row, "wall_s": wall,
                "b_r": float(np.corrcoef(bb, bt)[0, 1]), "b_rmse": float(np.sqrt(np.mean((bb - bt) ** 2))),
                "b_rmse_start": float(np.sqrt(np.mean((b - bt) ** 2))),
                "b_mean_offset": offset,
                "b_rmse_offset_removed": float(np.sqrt(np.mean((bb - bt - offset) ** 2))),
                "fsc_average_final": fsc}


# ---- issue 17: servalcat beside modelmap (cases b-flat, real, crambin) --------------------------
#
# Each case gives one row per program with the same metrics. modelmap is called through the front
# that outlives the refine/ rewrite only: refine(model, DensityMap, D, refine=..., max_steps=...,
# progress=False). servalcat runs in its own venv (--servalcat), with a CCP4 monomer library
# (--monlib, given to it as --monlib and CLIBD_MON; never set in this process, where modelmap's
# build_restraints would read it). Inputs are translated to a zero map origin (_servalcat's docs).

CRAMBIN = DATA / "models" / "1crn.pdb"


def _fourier_target(atoms, grid, resolution):
    """modelmap's Fourier map of `atoms` at `resolution` on `grid` (electron table, values at the
    grid points: the map servalcat's Fc synthesis gives)."""
    return np.asarray(mm.render_model(atoms, grid, resolution, method="fourier", sampling="point"))


def _b_stats(b, bt) -> dict:
    b, bt = np.asarray(b, np.float64), np.asarray(bt, np.float64)
    return {"b_r": float(np.corrcoef(b, bt)[0, 1]), "b_rmse": float(np.sqrt(np.mean((b - bt) ** 2))),
            "b_mean_offset": float(np.mean(b - bt))}


class _Ref:
    """What the geometry metrics need of a model: keys, residue names, elements, the bond graph
    (1-2 and 1-3 pairs) guessed from the reference coordinates, and modelmap's restraints for the
    bond / angle rmsd."""

    def __init__(self, model, monlib=None, path=None):
        from _servalcat import bond_graph, bond_graph_check, label_keys

        lab = model.labels
        self.keys = label_keys(lab)
        self.resnames = np.asarray(lab.residue_name)
        self.elements = np.asarray(lab.element)
        self.positions = np.asarray(model.atoms.positions, np.float64)
        bonds, angles = bond_graph(self.keys, self.elements, self.positions)
        self.excluded = bonds | angles
        self.graph = {"method": "distance guess on the reference: d < r_cov,i + r_cov,j + 0.4 Å (gemmi radii)",
                      "bonds": len(bonds), "angles_1_3": len(angles)}
        if monlib and path:
            self.graph["check_vs_monlib"] = bond_graph_check(path, self.keys, bonds, monlib)
        self.restraints = build_restraints(model)

    def metrics(self, positions, start) -> dict:
        from _servalcat import close_contacts, moved_atoms

        contacts = close_contacts(self.keys, self.resnames, self.elements, positions, self.excluded)
        moved = moved_atoms(self.keys, self.resnames, start, positions)
        geo = self.restraints.summary(np.asarray(positions, np.float32))
        return {"bond_rmsd": geo["bond_rmsd"], "angle_rmsd": geo["angle_rmsd"],
                "contacts_lt_2.2": len(contacts), "moved_gt_3": len(moved),
                "backbone_moved_gt_3": sum(m["backbone"] for m in moved),
                "contacts": contacts, "moved": moved}


def _servalcat_inputs(tmp, path, grid, keys=None, positions=None, b=None, custom_sf=False, peptide_links=False):
    """`path` with the start put in, translated to the zero-origin frame, written to `tmp/start.cif`
    (with the electron table for `-s custom` when `custom_sf`; with the file's peptide bonds as
    explicit links when `peptide_links`); returns the shift."""
    from _servalcat import prepare_structure, write_custom_sf_cif

    shift = -np.asarray(grid.origin, np.float64)
    st = prepare_structure(path, shift, grid, keys, positions, b, peptide_links)
    if custom_sf:
        write_custom_sf_cif(st, tmp / "start.cif")
    else:
        st.make_mmcif_document().write_file(str(tmp / "start.cif"))
    return shift


def _write_zero_origin_map(path, data, grid):
    mm.write_map(path, mm.DensityMap(np.asarray(data, np.float32), mm.Grid(grid.shape, grid.voxel_size, (0.0, 0.0, 0.0))))


def case_b_flat(model, density, steps, sv=None, monlib=None, cycles=(20,)):
    """B alone from a flat start (every B = the mean B), unrestrained data: the Fourier map at 3.9 Å of
    the deposited 7CEC chain A on the EMD-30342 crop's grid. servalcat twice: without B restraints
    (`--adpr_weight 0`, as the issue's reference) and with its default ones (modelmap's default
    call keeps its B-similarity restraints), for each of `cycles`. `steps` <= 0: no modelmap row."""
    from _servalcat import read_result, run

    d = 3.9
    truth = model.atoms
    bt = np.asarray(truth.b_factors, np.float64)
    target = _fourier_target(truth, density.grid, d)
    b0 = np.full(truth.n_atoms, float(bt.mean()))
    start = model.replace(atoms=Atoms(truth.positions, truth.atomic_numbers, b0, truth.occupancies))
    common = {"case": "b-flat", "atoms": truth.n_atoms, "resolution": d, "b_start": float(bt.mean()),
              "b_rmse_start": float(np.sqrt(np.mean((b0 - bt) ** 2)))}
    rows = []
    if steps > 0:
        t = time.perf_counter()
        r = refine(start, mm.DensityMap(target, density.grid), d, parameters=("b",), max_steps=steps, progress=False)
        wall = time.perf_counter() - t
        rows.append({**common, "program": "modelmap", "wall_s": wall, "steps": int(r.n_steps), "max_steps": steps,
                     "call": f"refine(start, DensityMap(target, grid), {d}, parameters=('b',), max_steps={steps}, progress=False)",
                     **_b_stats(r.atoms.b_factors, bt)})
    if sv:
        from _servalcat import label_keys

        keys = label_keys(model.labels)
        for (label, extra), ncycle in itertools.product(
                (("servalcat adpr 0", ["--adpr_weight", "0"]), ("servalcat", [])), cycles):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                shift = _servalcat_inputs(tmp, MODEL, density.grid, keys, b=b0, custom_sf=True)
                _write_zero_origin_map(tmp / "target.mrc", target, density.grid)
                args = ["refine_spa_norefmac", "--model", "start.cif", "--map", "target.mrc", "-d", str(d), "--fix_xyz",
                        "--adp", "iso", "--unrestrained", *extra, "--no_mask", "-s", "custom", "--hydrogen", "no",
                        "--ncycle", str(ncycle), "-o", "sv"]
                res = run(sv, args, tmp, monlib)
                row = {**common, "program": label, "cycles": ncycle, "origin_shift": shift.tolist(), **res}
                if "error" not in res:
                    pos, b = read_result(tmp / "sv.mmcif", shift, keys)
                    row.update(_b_stats(b, bt))
                    row["max_xyz_change"] = float(np.max(np.linalg.norm(pos - np.asarray(truth.positions), axis=1)))
            rows.append(row)
    return rows


def case_real_sv(model, density, steps, sv=None, monlib=None, cycles=None):
    """xyz and B against the real EMD-30342 crop at 3.9 Å, defaults: rows for the deposited model, modelmap
    and servalcat, each with CC_mask / CC_box / mean Q (modelmap's scores), FSCaverage (servalcat's, of
    each model without refining it: `--ncycle 0`; servalcat's row also keeps the figure of its last
    cycle, `fsc_average_last_cycle`, which its final summary does not reproduce), bond / angle rmsd
    (modelmap's restraints, and servalcat's own), contacts under 2.2 Å and atoms moved more than
    3 Å (`_servalcat`). `steps` <= 0: no modelmap row."""
    from modelmap.cli._refine import before_after
    from _servalcat import evaluate, final_stats, read_result, run

    d = 3.9
    ref = _Ref(model, monlib, MODEL)
    atoms = model.atoms
    rows = []

    def scored(label, m, extra):
        row = {"case": "real", "program": label, "atoms": model.n_atoms, "resolution": d,
               **before_after(density, m, d, ref.restraints),
               **ref.metrics(np.asarray(m.atoms.positions, np.float64), ref.positions), **extra}
        return row

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _write_zero_origin_map(tmp / "map.mrc", density.data, density.grid)
        shift = -np.asarray(density.grid.origin, np.float64)

        def fsc_of(positions, b, name):
            if not sv:
                return {}
            from _servalcat import prepare_structure
            st = prepare_structure(MODEL, shift, density.grid, ref.keys, positions, b)
            st.make_mmcif_document().write_file(str(tmp / f"{name}.cif"))
            return evaluate(sv, f"{name}.cif", "map.mrc", d, tmp, monlib, prefix=f"eval_{name}")

        rows.append(scored("deposited", model, {"bond_graph": ref.graph,
                                                **fsc_of(ref.positions, atoms.b_factors, "deposited")}))
        if steps > 0:
            t = time.perf_counter()
            r = refine(model, density, d, parameters=("xyz", "b"), max_steps=steps, progress=False)
            wall = time.perf_counter() - t
            rows.append(scored("modelmap", r.model, {
                "wall_s": wall, "steps": int(r.n_steps), "max_steps": steps,
                "call": f"refine(model, density, {d}, parameters=('xyz', 'b'), max_steps={steps}, progress=False)",
                **fsc_of(r.atoms.positions, r.atoms.b_factors, "modelmap")}))
        if sv:
            _servalcat_inputs(tmp, MODEL, density.grid)
            args = ["refine_spa_norefmac", "--model", "start.cif", "--map", "map.mrc", "-d", str(d),
                    *(["--ncycle", str(cycles)] if cycles else []), "-o", "sv"]
            res = run(sv, args, tmp, monlib)
            row = {"origin_shift": shift.tolist(), **res}
            if "error" in res:
                rows.append({"case": "real", "program": "servalcat", **row})
            else:
                pos, b = read_result(tmp / "sv.mmcif", shift, ref.keys)
                refined = model.replace(atoms=Atoms(pos, atoms.atomic_numbers, b, atoms.occupancies))
                own = final_stats(tmp / "sv_stats.json")
                ev = evaluate(sv, "sv.mmcif", "map.mrc", d, tmp, monlib, prefix="eval_sv")
                rows.append(scored("servalcat", refined, {**row, **ev, "own_stats": own,
                                                          "fsc_average_last_cycle": own.get("fsc_average_final")}))
    return rows


def case_crambin(steps, sv=None, monlib=None, cycles=None, seed=0):
    """Crambin (1crn, 327 atoms) at 3 Å, xyz and B: target = the Fourier map of the true model on a
    1 Å grid with 10 Å of margin; start = coordinates + N(0, 0.3 Å) per axis and B + N(0, 15²) clipped
    to [5, 300] (`_noisy_start`, seed 0; crambin's own B are 3-29 Å²). servalcat with the model's
    peptide links given (`add_peptide_links`: from the true coordinates, as explicit links; gemmi
    takes 7 of the noisy start's 45 for chain breaks otherwise) and its disulfides (SSBOND), without
    hydrogens (the target has none), no mask, the target's electron table (`-s custom`). `steps` <= 0:
    no modelmap row."""
    from _servalcat import read_result, run

    d = 3.0
    model = mm.read_model(CRAMBIN)
    truth = model.atoms
    grid = mm.Grid.around_positions(np.asarray(truth.positions), 1.0, padding=10.0)
    target = _fourier_target(truth, grid, d)
    pos0, b0 = _noisy_start(truth, seed)
    start = model.replace(atoms=Atoms(pos0, truth.atomic_numbers, b0, truth.occupancies))
    ref = _Ref(model, monlib, CRAMBIN)
    bt = np.asarray(truth.b_factors, np.float64)
    tpos = np.asarray(truth.positions, np.float64)
    common = {"case": "crambin", "atoms": truth.n_atoms, "resolution": d, "grid": list(grid.shape),
              "xyz_rmsd_start": _rmsd(pos0, tpos), **{k + "_start": v for k, v in _b_stats(b0, bt).items()}}

    def scored(pos, b):
        return {"xyz_rmsd": _rmsd(pos, tpos), **_b_stats(b, bt), **ref.metrics(pos, pos0)}

    rows = []
    if steps > 0:
        t = time.perf_counter()
        r = refine(start, mm.DensityMap(target, grid), d, parameters=("xyz", "b"), max_steps=steps, progress=False)
        wall = time.perf_counter() - t
        rows.append({**common, "program": "modelmap", "wall_s": wall, "steps": int(r.n_steps), "max_steps": steps,
                     **scored(np.asarray(r.atoms.positions, np.float64), r.atoms.b_factors)})
    for ncycle in (cycles or [None]) if sv else []:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shift = _servalcat_inputs(tmp, CRAMBIN, grid, ref.keys, pos0, b0, custom_sf=True, peptide_links=True)
            _write_zero_origin_map(tmp / "target.mrc", target, grid)
            args = ["refine_spa_norefmac", "--model", "start.cif", "--map", "target.mrc", "-d", str(d),
                    "--no_mask", "-s", "custom", "--hydrogen", "no", *(["--ncycle", str(ncycle)] if ncycle else []),
                    "-o", "sv"]
            res = run(sv, args, tmp, monlib)
            row = {**common, "program": "servalcat", "cycles": ncycle, "origin_shift": shift.tolist(), **res}
            if "error" not in res:
                from _servalcat import final_stats

                pos, b = read_result(tmp / "sv.mmcif", shift, ref.keys)
                row.update(scored(pos, b))
                row["own_stats"] = final_stats(tmp / "sv_stats.json")
            rows.append(row)
    return rows


_TABLE = [("case", "case", "{}"), ("program", "program", "{}"), ("time s", "wall_s", "{:.1f}"),
          ("steps", "steps", "{}"), ("cycles", "cycles", "{}"), ("B r", "b_r", "{:.4f}"), ("B rmse", "b_rmse", "{:.2f}"),
          ("xyz rmsd", "xyz_rmsd", "{:.3f}"), ("CC_mask", "cc_mask", "{:.3f}"), ("Q", "q_mean", "{:.3f}"),
          ("FSCavg", "fsc_average", "{:.3f}"), ("bond", "bond_rmsd", "{:.4f}"), ("angle", "angle_rmsd", "{:.2f}"),
          ("<2.2 Å", "contacts_lt_2.2", "{}"), ("moved>3", "moved_gt_3", "{}"), ("bb>3", "backbone_moved_gt_3", "{}")]


def print_table(rows, file=sys.stdout):
    """A markdown table of the rows of the b-flat, real and crambin cases (blank: not measured)."""
    rows = [r for r in rows if "program" in r]
    if not rows:
        return
    cells = []
    for r in rows:
        line = []
        for _, key, fmt in _TABLE:
            v = r.get(key)
            if key == "cycles" and v is None and str(r.get("program")).startswith("servalcat"):
                v = (r.get("own_stats") or {}).get("cycles_run")
            line.append("" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v))
        cells.append(line)
    print("| " + " | ".join(h for h, _, _ in _TABLE) + " |", file=file)
    print("|" + "|".join("---" for _ in _TABLE) + "|", file=file)
    for line in cells:
        print("| " + " | ".join(line) + " |", file=file)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="xyz+b,b,occ,res,real",
                   help="any of xyz+b, b, occ, res, real, b-flat, crambin (comma-separated)")
    p.add_argument("--steps", type=int, default=250, help="steps of the xyz+b case")
    p.add_argument("--servalcat", default=None, help="servalcat command (a venv's bin/servalcat): adds its rows "
                   "to the b (one per --servalcat-cycles), b-flat, real and crambin cases")
    p.add_argument("--monlib", default=None, help="CCP4 monomer library folder for servalcat (the one holding "
                   "list/mon_lib_list.cif); given to it as --monlib and CLIBD_MON")
    p.add_argument("--res-groups", default="residue", help="resolution_groups of the res case (atom, residue)")
    p.add_argument("--res-steps", type=int, default=30, help="steps of the res case")
    p.add_argument("--res-start", default="scan", help="res case start: scan (resolutions='scan') or uniform (3.5 Å)")
    p.add_argument("--servalcat-cycles", default="10,40", help="servalcat runs of these many cycles (case b)")
    p.add_argument("--b-flat-steps", type=int, default=200, help="modelmap max_steps of the b-flat case (0: servalcat only)")
    p.add_argument("--b-flat-cycles", default="20", help="servalcat cycles of the b-flat case, one run per number")
    p.add_argument("--real-steps", type=int, default=200,
                   help="modelmap max_steps of the real case (refine's default; 0: servalcat only)")
    p.add_argument("--real-cycles", type=int, default=None, help="servalcat cycles of the real case (default: its own, 10)")
    p.add_argument("--crambin-steps", type=int, default=200, help="modelmap max_steps of the crambin case (0: servalcat only)")
    p.add_argument("--crambin-cycles", default=None,
                   help="servalcat cycles of the crambin case, one run per number (e.g. 10,40; default: its own, 10)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "refine.json"))
    p.add_argument("--plain", action="store_true", help="add a run without the per-step callback (compiled once, "
                   "then timed, setup included) to the xyz+b, b, occ and res cases")
    args = p.parse_args()
    global _PLAIN
    _PLAIN = args.plain
    cases = args.cases.split(",")
    known = {"xyz+b", "b", "occ", "res", "real", "b-flat", "crambin"}
    if set(cases) - known:
        p.error(f"unknown cases {sorted(set(cases) - known)}; known: {sorted(known)}")
    if os.environ.get("CLIBD_MON"):
        print(f"note: CLIBD_MON={os.environ['CLIBD_MON']} is set: modelmap's build_restraints reads it",
              file=sys.stderr)
    model = mm.read_model(MODEL)
    density = mm.read_map(MAP)
    rows = []
    target = None
    if "xyz+b" in cases or "b" in cases:
        truth = model.atoms
        target = NufftRenderFn(density.grid)(IndependentAtomVolume.from_atoms(truth, 3.0))
    if "xyz+b" in cases:
        row, target = case_xyz_b(model, density, args.steps)
        rows.append(row)
    if "b" in cases:
        rows.append(case_b(model, density, target, 40))
        if args.servalcat:
            for ncycle in (int(c) for c in args.servalcat_cycles.split(",")):
                rows.append(case_servalcat(args.servalcat, model, density, target, ncycle))
    if "b-flat" in cases:
        rows.extend(case_b_flat(model, density, args.b_flat_steps, args.servalcat, args.monlib,
                                [int(c) for c in args.b_flat_cycles.split(",")]))
    if "occ" in cases:
        rows.extend(case_occ(model, density, 200))
    if "res" in cases:
        for groups in args.res_groups.split(","):
            rows.append(case_res(model, density, args.res_steps, groups, args.res_start))
    if "real" in cases:
        rows.extend(case_real_sv(model, density, args.real_steps, args.servalcat, args.monlib, args.real_cycles))
    if "crambin" in cases:
        cycles = [int(c) for c in args.crambin_cycles.split(",")] if args.crambin_cycles else None
        rows.extend(case_crambin(args.crambin_steps, args.servalcat, args.monlib, cycles))
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k not in ("contacts", "moved", "log_notes")}))
    print_table(rows)
    meta = {
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "jax": jax.__version__, "modelmap": mm.__version__,
        "model": str(MODEL.name), "map": str(MAP.name), "grid": list(density.grid.shape),
        "voxel": list(density.grid.voxel_size), "cases": cases,
    }
    try:
        from _common import cpu_model

        meta["cpu"] = cpu_model()
    except ImportError:
        pass
    if args.servalcat:
        from _servalcat import version

        import gemmi
        import scipy

        meta.update({"servalcat_command": args.servalcat, "servalcat": version(args.servalcat), "gemmi": gemmi.__version__,
                     "scipy": scipy.__version__, "monlib": args.monlib, "monlib_version": _monlib_version(args.monlib)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


def _monlib_version(monlib):
    """`_lib.version` and `_lib.update` of the monomer library's list/mon_lib_list.cif."""
    if not monlib:
        return None
    path = Path(monlib) / "list" / "mon_lib_list.cif"
    try:
        head = path.read_text(errors="replace")[:2000].split()
    except OSError:
        return None
    info = {k: head[i + 1] for i, k in enumerate(head[:-1]) if k in ("_lib.version", "_lib.update")}
    return {"path": str(path), **info}


if __name__ == "__main__":
    main()
