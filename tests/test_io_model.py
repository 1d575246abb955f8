import gzip
import math

import gemmi
import numpy as np
import pytest

import modelmap as mm
from modelmap._peptide import ideal_peptide
from modelmap.io import model_from_structure


def test_read_pdb_positions_labels_match_gemmi(shared_data):
    path = shared_data / "models" / "1crn.pdb"
    m = mm.read_model(path)
    st = gemmi.read_structure(str(path))
    atoms = [(ch.name, r, a) for ch in st[0] for r in ch for a in r]
    assert m.n_atoms == len(atoms) == 327
    pos = np.asarray(m.atoms.positions)
    for i in (0, 100, 326):
        ch, r, a = atoms[i]
        np.testing.assert_allclose(pos[i], a.pos.tolist(), atol=1e-5)
        assert float(m.atoms.b_factors[i]) == pytest.approx(a.b_iso, abs=1e-4)
        assert m.labels.atom_name[i] == a.name and m.labels.residue_name[i] == r.name
        assert m.labels.residue_number[i] == r.seqid.num and m.labels.chain[i] == ch
        assert int(m.atoms.atomic_numbers[i]) == a.element.atomic_number
    assert m.labels.atom_id(1) == "A/THR 1/CA"


def test_read_mmcif_gz(shared_data):
    m = mm.read_model(shared_data / "emd30342_7cec" / "390_7cec_A.cif.gz")
    assert m.n_atoms == 4308
    assert set(m.labels.chain) == {"A"}


def test_filters_hydrogens_waters_altlocs(shared_data):
    h = shared_data / "emd2566_3j6b_chain9" / "3J6B_9.pdb"
    assert mm.read_model(h).n_atoms == 2865
    no_h = mm.read_model(h, hydrogens=False)
    assert no_h.n_atoms == 2865 - 1437 and not np.any(np.asarray(no_h.atoms.atomic_numbers) == 1)
    w = shared_data / "emd20026_apoferritin" / "3ajo_fitted_refined.pdb"
    assert mm.read_model(w).n_atoms - mm.read_model(w, waters=False).n_atoms == 229
    alt = shared_data / "emd5168_actin" / "1J6Z.pdb"
    all_conf = mm.read_model(alt)
    first = mm.read_model(alt, altloc="first")
    n_alt = int(np.sum(all_conf.labels.altloc != ""))
    assert n_alt > 0 and first.n_atoms == all_conf.n_atoms - n_alt // 2
    # the kept conformer carries the site's total occupancy; the others weigh by theirs
    kept = first.labels.altloc != ""
    np.testing.assert_allclose(np.asarray(first.atoms.occupancies)[kept], 1.0)
    occ = np.asarray(all_conf.atoms.occupancies)[all_conf.labels.altloc != ""]
    assert np.all(occ < 1)


def _two_model_structure():
    st = ideal_peptide("AAGA")
    m2 = st[0].clone()
    m2.num = 2
    for r in m2["A"]:
        for a in r:
            a.pos = gemmi.Position(a.pos.x + 1.0, a.pos.y, a.pos.z)
    st.add_model(m2)
    return st


def test_multi_model_file_is_an_ensemble(tmp_path):
    path = tmp_path / "ens.pdb"
    _two_model_structure().write_pdb(str(path))
    m = mm.read_model(path)
    assert m.is_ensemble and m.atoms.positions.shape == (2, 19, 3)
    np.testing.assert_allclose(
        np.asarray(m.atoms.positions[1] - m.atoms.positions[0]), [[1.0, 0, 0]] * 19, atol=2e-3
    )
    assert mm.read_model(path, models="first").atoms.positions.shape == (19, 3)


@pytest.mark.parametrize("suffix", [".cif", ".pdb"])
def test_write_model_round_trip_keeps_the_rest(shared_data, tmp_path, suffix):
    src = shared_data / "emd30342_7cec" / "390_7cec_A100.cif"
    m = mm.read_model(src, hydrogens=False)
    rng = np.random.default_rng(1)
    atoms = m.atoms
    new = mm.Atoms(
        atoms.positions + rng.normal(0, 0.5, atoms.positions.shape),
        atoms.atomic_numbers,
        atoms.b_factors + 3.0,
        atoms.occupancies * 0.5,
    )
    out = tmp_path / f"out{suffix}"
    mm.write_model(out, m.replace(atoms=new))
    back = mm.read_model(out, hydrogens=False)
    np.testing.assert_allclose(np.asarray(back.atoms.positions), np.asarray(new.positions), atol=1e-3)
    np.testing.assert_allclose(np.asarray(back.atoms.b_factors), np.asarray(new.b_factors), atol=1e-2)
    np.testing.assert_allclose(np.asarray(back.atoms.occupancies), np.asarray(new.occupancies), atol=1e-2)
    np.testing.assert_array_equal(back.labels.atom_name, m.labels.atom_name)
    st_in, st_out = gemmi.read_structure(str(src)), gemmi.read_structure(str(out))
    assert st_out.cell.a == pytest.approx(st_in.cell.a)
    if suffix == ".cif":  # every other category of the input is still there
        blk_in, blk_out = gemmi.cif.read(str(src)).sole_block(), gemmi.cif.read(str(out)).sole_block()
        cats_in = set(blk_in.get_mmcif_category_names())
        assert cats_in <= set(blk_out.get_mmcif_category_names())


def test_write_model_never_overwrites_input(tmp_path):
    path = tmp_path / "in.pdb"
    ideal_peptide("AA").write_pdb(str(path))
    before = path.read_bytes()
    m = mm.read_model(path)
    with pytest.raises(ValueError, match="overwrite the input"):
        mm.write_model(path, m)
    assert path.read_bytes() == before


# -- bad input: each its own error ------------------------------------------------------------------

def test_missing_empty_and_garbage_files(tmp_path):
    with pytest.raises(mm.ModelFileError, match="no such file"):
        mm.read_model(tmp_path / "nope.pdb")
    (tmp_path / "empty.pdb").write_text("")
    with pytest.raises(mm.ModelFileError, match="empty"):
        mm.read_model(tmp_path / "empty.pdb")
    (tmp_path / "junk.cif").write_text("this is not a model\n")
    with pytest.raises(mm.ModelFileError, match="cannot read"):
        mm.read_model(tmp_path / "junk.cif")
    (tmp_path / "noatoms.pdb").write_text("HEADER    NOTHING\nEND\n")
    with pytest.raises(mm.ModelFileError, match="no atoms"):
        mm.read_model(tmp_path / "noatoms.pdb")
    with gzip.open(tmp_path / "hdr.pdb.gz", "wt") as f:
        f.write("REMARK nothing here\n")
    with pytest.raises(mm.ModelFileError):
        mm.read_model(tmp_path / "hdr.pdb.gz")


def _pdb_line(name="CA", element=" C", occ=1.0, x=1.0):
    return (
        f"ATOM      1  {name:<3} ALA A   1    {x:8.3f}   2.000   3.000{occ:6.2f} 20.00          {element}\n"
    )


def test_unknown_element(tmp_path):
    p = tmp_path / "x.pdb"
    p.write_text(_pdb_line(name="QQ", element="QQ"))
    with pytest.raises(mm.UnknownElementError, match="unknown element"):
        mm.read_model(p)


def test_negative_occupancy(tmp_path):
    p = tmp_path / "occ.pdb"
    p.write_text(_pdb_line(occ=-0.5))
    with pytest.raises(mm.InvalidAtomsError, match="negative occupancy"):
        mm.read_model(p)


def test_nan_and_infinite_coordinates(tmp_path):
    st = ideal_peptide("AA")
    st[0]["A"][0]["CA"][0].pos = gemmi.Position(math.nan, 0, 0)
    with pytest.raises(mm.InvalidAtomsError, match="NaN or infinite coordinates"):
        model_from_structure(st)
    atoms = mm.Atoms(np.array([[0.0, 0, 0], [np.inf, 0, 0]]), np.array([6, 6]))
    with pytest.raises(mm.InvalidAtomsError, match="NaN or infinite"):
        mm.render_model(atoms, mm.Grid((8, 8, 8), 1.0))


def test_ensemble_with_different_atoms_is_refused(tmp_path):
    st = _two_model_structure()
    st[1]["A"][0].remove_atom("CB", "\0")
    with pytest.raises(mm.ModelFileError, match="same atoms"):
        model_from_structure(st)
