"""Geometry restraints: ideal values from the CCD (biotite) and Engh & Huber, energies, gradients."""

from __future__ import annotations

import time
import warnings

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("biotite")
import biotite.structure.info as info  # noqa: E402

from modelmap._peptide import ideal_peptide  # noqa: E402
from modelmap.io import model_from_structure, read_model  # noqa: E402
from modelmap.refine import (  # noqa: E402
    RestraintsWarning,
    build_restraints,
    residue_template,
)


def _structure(residues) -> gemmi.Structure:
    """A one-chain structure from [(residue name, {atom name: (element, xyz, altloc, occ)})]."""
    st = gemmi.Structure()
    model = gemmi.Model(1)
    chain = gemmi.Chain("A")
    for k, (name, atoms) in enumerate(residues):
        res = gemmi.Residue()
        res.name = name
        res.seqid = gemmi.SeqId(k + 1, " ")
        for atom_name, (el, xyz, alt, occ) in atoms:
            a = gemmi.Atom()
            a.name = atom_name
            a.element = gemmi.Element(el)
            a.pos = gemmi.Position(*map(float, xyz))
            a.altloc = alt or "\0"
            a.occ = occ
            a.b_iso = 20.0
            res.add_atom(a)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    return st


def _ccd_residues_model(names):
    """A model of residues placed at the CCD's ideal coordinates (heavy atoms), 30 Å apart."""
    residues = []
    for k, name in enumerate(names):
        comp = info.residue(name)
        keep = comp.element != "H"
        shift = np.array([30.0 * k, 0.0, 0.0])
        residues.append((name, [(str(n), (str(e), x + shift, "", 1.0)) for n, e, x in
                                zip(comp.atom_name[keep], comp.element[keep], comp.coord[keep])]))
    return model_from_structure(_structure(residues))


def _ccd_distance(name, a, b):
    comp = info.residue(name)
    xyz = dict(zip(comp.atom_name, comp.coord.astype(np.float64)))
    return float(np.linalg.norm(xyz[a] - xyz[b]))


# --------------------------------------------------------------------------------------------


def test_ideal_values_come_from_the_library():
    ala = residue_template("ALA")
    assert "CCD" in ala.source and "Engh & Huber" in ala.source
    # backbone: Engh & Huber (1991)
    assert ala.bond("N", "CA") == pytest.approx(1.458, abs=1e-4)
    assert ala.bond("CA", "C") == pytest.approx(1.525, abs=1e-4)
    assert ala.bond("C", "O") == pytest.approx(1.231, abs=1e-4)
    assert ala.angle("CA", "C", "O") == pytest.approx(120.1, abs=1e-3)
    assert ala.angle("N", "CA", "C") == pytest.approx(111.2, abs=1e-3)
    # side chains: measured on the CCD's ideal coordinates, independently of our parsing
    assert residue_template("SER").bond("CB", "OG") == pytest.approx(
        _ccd_distance("SER", "CB", "OG"), abs=1e-3)
    assert residue_template("PHE").bond("CG", "CD1") == pytest.approx(
        _ccd_distance("PHE", "CG", "CD1"), abs=1e-3)
    assert 1.37 < residue_template("PHE").bond("CE1", "CZ") < 1.40
    # without the Engh & Huber backbone everything is the CCD's
    assert residue_template("ALA", engh_huber=False).bond("N", "CA") == pytest.approx(
        _ccd_distance("ALA", "N", "CA"), abs=1e-3)
    # planes and chirality come from bond orders, aromatic flags and stereo configurations
    phe_planes = [set(p) for p, _ in residue_template("PHE").planes]
    assert {"CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ"} <= max(phe_planes, key=len)
    arg_planes = [set(p) for p, _ in residue_template("ARG").planes]
    assert any({"CD", "NE", "CZ", "NH1", "NH2"} <= p for p in arg_planes)
    chir = {c[0]: c for c in residue_template("ILE").chirals}
    assert set(chir) == {"CA", "CB"}
    assert 2.3 < abs(chir["CA"][4]) < 2.8
    assert residue_template("GLY").chirals == ()
    assert residue_template("ZZ9ZZ") is None


def test_energy_is_at_its_minimum_on_the_library_ideal_coordinates():
    names = ["PHE", "TRP", "HIS", "ILE", "THR", "ARG", "ASN", "PRO", "MET", "DA", "U"]
    model = _ccd_residues_model(names)
    r = build_restraints(model, engh_huber=False)
    x = model.atoms.positions
    terms = r.energy_terms(x)
    assert r.bond_index.shape[0] > 100 and r.plane_index.shape[0] >= 8 and r.chiral_index.shape[0] > 10
    assert r.torsion_index.shape[0] == 0  # far apart: no links
    # zero up to the 3-decimal rounding of the CCD's coordinates (~0.5 mÅ)
    for key in ("bond", "angle", "chirality", "nonbonded"):
        assert float(terms[key]) < 0.05, (key, float(terms[key]))
    s = r.summary(x)
    assert s["bond_rmsd"] < 1e-3 and s["angle_rmsd"] < 0.05
    assert s["planarity_rmsd"] < 3e-3  # the CCD's ideal rings are planar to a few mÅ
    planes = [set(model.labels.atom_name[np.asarray(i)[np.asarray(m)]])
              for i, m in zip(r.plane_index, r.plane_mask)]
    assert {"N1", "C2", "O2", "N3", "C4", "O4", "C5", "C6", "C1'"} in planes  # uracil: one plane
    # the Engh & Huber backbone is what differs from the free amino acid
    r_eh = build_restraints(model)
    assert float(r_eh.bond_rmsd(x)) > 0.005


def test_ideal_peptide_is_near_the_minimum():
    model = model_from_structure(ideal_peptide("AAGAAGA"))
    r = build_restraints(model)
    x = model.atoms.positions
    # ideal_peptide uses the general Engh & Huber values also for Gly and Ala CA-CB (≤ 0.009 Å off)
    assert float(r.bond_rmsd(x)) < 0.006
    assert float(r.angle_rmsd(x)) < 1.0
    assert r.torsion_index.shape[0] == 6  # one ω per peptide link
    assert float(r.energy_terms(x)["torsion"]) < 1e-4
    assert float(r.energy_terms(x)["chirality"]) < 0.5


@pytest.mark.x64
def test_gradient_matches_float64_finite_differences():
    model = model_from_structure(ideal_peptide("AGAA"), dtype=jnp.float64)
    r = build_restraints(model, dtype=jnp.float64)
    key = jax.random.key(1)
    k1, k2, k3 = jax.random.split(key, 3)
    x = model.atoms.positions + 0.15 * jax.random.normal(k1, model.atoms.positions.shape, jnp.float64)
    r = r.with_nonbonded(x)
    b = 20.0 + 5.0 * jax.random.normal(k2, (model.n_atoms,), jnp.float64)
    q = 0.9 + 0.2 * jax.random.uniform(k3, (model.n_atoms,), jnp.float64)
    res = jnp.linspace(0.5, 3.0, model.n_atoms)
    f = jax.jit(lambda x, b, q, d: r.energy(x, b, q, d))
    grads = jax.grad(f, argnums=(0, 1, 2, 3))(x, b, q, res)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    h = 1e-6
    for arg, g in zip(range(4), grads):
        args = [x, b, q, res]
        flat = np.asarray(args[arg]).ravel()
        for idx in np.random.default_rng(0).choice(flat.size, size=min(12, flat.size), replace=False):
            plus, minus = flat.copy(), flat.copy()
            plus[idx] += h
            minus[idx] -= h
            ap, am = list(args), list(args)
            ap[arg] = jnp.asarray(plus.reshape(args[arg].shape))
            am[arg] = jnp.asarray(minus.reshape(args[arg].shape))
            fd = (float(f(*ap)) - float(f(*am))) / (2 * h)
            an = float(np.asarray(g).ravel()[idx])
            assert an == pytest.approx(fd, rel=1e-5, abs=1e-5 * (1 + abs(fd))), (arg, idx)


def test_mirrored_ca_gives_a_large_chirality_penalty():
    st = ideal_peptide("AAAA")
    model = model_from_structure(st)
    r = build_restraints(model)
    x = np.asarray(model.atoms.positions, np.float64)
    before = float(r.energy_terms(jnp.asarray(x))["chirality"])
    names = model.labels.atom_name
    resnum = model.labels.residue_number
    pick = lambda nm: int(np.flatnonzero((names == nm) & (resnum == 2))[0])  # noqa: E731
    n, ca, c, cb = (pick(a) for a in ("N", "CA", "C", "CB"))
    normal = np.cross(x[n] - x[ca], x[c] - x[ca])
    normal /= np.linalg.norm(normal)
    mirrored = x.copy()
    mirrored[cb] -= 2 * ((x[cb] - x[ca]) @ normal) * normal  # D-alanine at residue 2
    after = float(r.energy_terms(jnp.asarray(mirrored))["chirality"])
    assert before < 0.5
    assert after > 100.0  # (2 × 2.5 Å³ / 0.2 Å³)² ≈ 600
    # bonds and angles alone barely notice the inversion
    assert float(r.bond_rmsd(jnp.asarray(mirrored))) < 0.01


def test_nonbonded_repulsion_only_below_contact():
    def waters(d):
        return model_from_structure(_structure([
            ("HOH", [("O", ("O", (0.0, 0.0, 0.0), "", 1.0))]),
            ("HOH", [("O", ("O", (d, 0.0, 0.0), "", 1.0))]),
        ]))

    close = waters(2.0)
    r = build_restraints(close)
    assert r.nonbonded_index.shape[0] == 1
    r0 = float(r.nonbonded_distance[0])
    assert r0 == pytest.approx(0.8 * 2 * 1.52)
    e_close = float(r.energy_terms(close.atoms.positions)["nonbonded"])
    assert e_close == pytest.approx(((r0 - 2.0) / 0.1) ** 2, rel=1e-4)  # harmonic, σ = 0.1 Å
    far = waters(5.0).atoms.positions
    assert float(r.energy_terms(far)["nonbonded"]) == 0.0
    g = jax.grad(lambda x: r.energy(x))(close.atoms.positions)
    assert float(g[0, 0]) > 0 and float(g[1, 0]) < 0  # pushes the two apart
    # a padded list keeps the shape fixed and adds nothing
    padded = r.with_nonbonded(close.atoms.positions, capacity=8)
    assert padded.nonbonded_index.shape == (8, 2)
    assert float(padded.energy_terms(close.atoms.positions)["nonbonded"]) == pytest.approx(e_close)
    with pytest.raises(ValueError, match="capacity"):
        r.with_nonbonded(close.atoms.positions, capacity=0)


def test_alternate_conformers_b_and_occupancy_terms():
    st = ideal_peptide("AAA")
    res = st[0]["A"][1]
    cb = res["CB"][0]
    cb.altloc = "A"
    cb.occ = 0.5
    other = cb.clone()
    other.altloc = "B"
    other.pos = gemmi.Position(cb.pos.x + 0.6, cb.pos.y, cb.pos.z)
    res.add_atom(other)
    model = model_from_structure(st)
    r = build_restraints(model)
    cbs = np.flatnonzero(model.labels.atom_name == "CB")
    alt = [int(i) for i in cbs if model.labels.altloc[i]]
    assert len(alt) == 2
    bonds = {tuple(sorted(map(int, p))) for p in np.asarray(r.bond_index)}
    assert tuple(sorted(alt)) not in bonds  # no bond between two conformers of one atom
    ca = int(np.flatnonzero((model.labels.atom_name == "CA") & (model.labels.residue_number == 2))[0])
    assert all(tuple(sorted((ca, a))) in bonds for a in alt)  # each conformer bonded to CA
    pairs = {tuple(sorted(map(int, p))) for p in np.asarray(r.nonbonded_index)}
    assert tuple(sorted(alt)) not in pairs
    assert r.alt_group_index.shape[0] == 1

    x = model.atoms.positions
    q = np.ones(model.n_atoms, np.float32)
    q[alt] = 0.5
    assert float(r.energy_terms(x, occupancies=jnp.asarray(q))["occupancy"]) == pytest.approx(0.0)
    q[alt] = 0.7  # conformers sum to 1.4
    assert float(r.energy_terms(x, occupancies=jnp.asarray(q))["occupancy"]) == pytest.approx(
        (0.4 / 0.01) ** 2, rel=1e-3)
    q[alt] = 0.5
    q[0] = 1.2  # out of [0, 1]
    assert float(r.energy_terms(x, occupancies=jnp.asarray(q))["occupancy"]) == pytest.approx(
        (0.2 / 0.01) ** 2, rel=1e-3)

    b = jnp.full(model.n_atoms, 30.0)
    assert float(r.energy_terms(x, b_factors=b)["b_similarity"]) == 0.0
    assert float(r.energy_terms(x, b_factors=b.at[ca].set(40.0))["b_similarity"]) > 4 * (10 / 5) ** 2 - 1e-3

    d = jnp.full(model.n_atoms, 3.0)
    assert float(r.energy_terms(x, resolution=d)["resolution"]) == 0.0
    assert float(r.energy_terms(x, resolution=d.at[0].set(0.5))["resolution"]) == pytest.approx(25.0)


def test_unknown_residue_warns_and_gets_no_restraints():
    st = ideal_peptide("AA")
    lig = gemmi.Residue()
    lig.name = "ZZ9ZZ"
    lig.seqid = gemmi.SeqId(10, " ")
    for k, el in enumerate(["C", "C", "O"]):
        a = gemmi.Atom()
        a.name = f"{el}{k}"
        a.element = gemmi.Element(el)
        a.pos = gemmi.Position(30.0 + 1.4 * k, 0, 0)
        a.occ = 1.0
        lig.add_atom(a)
    st[0]["A"].add_residue(lig)
    model = model_from_structure(st)
    with pytest.warns(RestraintsWarning, match="ZZ9ZZ"):
        r = build_restraints(model)
    lig_atoms = np.flatnonzero(model.labels.residue_name == "ZZ9ZZ")
    used = set(np.asarray(r.bond_index).ravel()) | set(np.asarray(r.angle_index).ravel())
    assert not used & set(lig_atoms.tolist())
    assert np.all(np.asarray(r.vdw_radius)[lig_atoms] == 0)
    assert any("ZZ9ZZ" in u for u in r.unrestrained)


@pytest.fixture(scope="module")
def cec(shared_data):
    model = read_model(shared_data / "emd30342_7cec" / "390_7cec_A.cif.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RestraintsWarning)  # every atom of 7CEC A has an entry
        r = build_restraints(model)
    return model, r


def test_deposited_7cec_geometry_is_close_to_ideal(cec):
    model, r = cec
    s = r.summary(model.atoms.positions)
    print("7CEC A deposited:", s)
    assert model.n_atoms == 4308
    assert s["bonds"] > 4300 and s["angles"] > 5900 and s["chirals"] > 500
    assert 0.003 < s["bond_rmsd"] < 0.02
    assert 0.8 < s["angle_rmsd"] < 2.5
    assert s["chirality_rmsd"] < 0.2  # every chiral centre has the library's hand
    assert s["worst_overlap"] < 0.6


@pytest.mark.slow
def test_restraint_only_minimisation_repairs_perturbed_7cec(cec):
    scipy_optimize = pytest.importorskip("scipy.optimize")
    model, r = cec
    x0 = model.atoms.positions
    xp = x0 + 0.3 * jax.random.normal(jax.random.key(0), x0.shape, x0.dtype)
    perturbed = r.summary(xp)
    assert perturbed["bond_rmsd"] > 0.2 and perturbed["angle_rmsd"] > 10.0
    r = r.with_nonbonded(xp)
    vg = jax.jit(jax.value_and_grad(lambda x: r.energy(x.reshape(-1, 3))))

    def fun(x):
        v, g = vg(jnp.asarray(x, jnp.float32))
        return float(v), np.asarray(g, np.float64)

    t0 = time.perf_counter()
    res = scipy_optimize.minimize(fun, np.asarray(xp, np.float64).ravel(), jac=True,
                                  method="L-BFGS-B", options={"maxiter": 200})
    elapsed = time.perf_counter() - t0
    x = jnp.asarray(res.x.reshape(-1, 3), jnp.float32)
    after = r.summary(x)
    print(f"7CEC A perturbed: {perturbed}\nafter {res.nit} L-BFGS steps ({elapsed:.1f} s): {after}")
    assert after["bond_rmsd"] <= 0.02
    assert after["angle_rmsd"] <= 2.5
    assert after["chirality_rmsd"] < 0.2
    v = np.asarray(r.chiral_volumes(x))
    assert np.all(np.sign(v) == np.sign(np.asarray(r.chiral_ideal)))


def test_shipped_ccd_rows_equal_biotites():
    """The CCD rows shipped for the common components (`_ccd_standard.json`) are biotite's own, so
    the restraints do not depend on which of the two a template was read from."""
    from modelmap.refine import _ccd

    for name in ("ALA", "PRO", "TRP", "MSE", "DG", "U", "HOH"):
        for category, columns in _ccd.COLUMNS.items():
            shipped, direct = _ccd.ccd_rows(category, name), _ccd._from_biotite(category, name)
            assert (shipped is None) == (direct is None), (name, category)
            if shipped is None:
                continue
            assert set(shipped) == set(direct), (name, category)
            for column, kind in columns.items():
                if column not in direct:
                    continue
                if kind is float:
                    np.testing.assert_array_equal(shipped[column], direct[column], err_msg=f"{name} {column}")
                else:
                    assert shipped[column].tolist() == direct[column].tolist(), (name, column)
    assert _ccd.ccd_rows("chem_comp_atom", "NOT_A_COMPONENT") is None
