import numpy as np
from typer.testing import CliRunner

import modelmap as mm
from modelmap.cli import app

runner = CliRunner()


def test_render_like_a_map_uses_its_grid(shared_data, tmp_path):
    like = shared_data / "emd2566_3j6b_chain9" / "2566_3J6B_9.mrc"
    model = shared_data / "emd2566_3j6b_chain9" / "3J6B_9.pdb"
    out = tmp_path / "chain9.mrc"
    result = runner.invoke(app, ["render", str(model), "-d", "3.2", "--like", str(like), "-o", str(out)])
    assert result.exit_code == 0, result.output
    ours, theirs = mm.read_map(out), mm.read_map(like)
    assert ours.grid.shape == theirs.grid.shape
    np.testing.assert_allclose(ours.grid.origin, theirs.grid.origin, atol=1e-4)
    np.testing.assert_allclose(ours.grid.voxel_size, theirs.grid.voxel_size, rtol=1e-6)
    cc = np.corrcoef(np.asarray(ours.data).ravel(), np.asarray(theirs.data).ravel())[0, 1]
    assert cc > 0.5  # the model map sits on the experimental density, not somewhere else
    assert (tmp_path / "chain9.cxc").exists()


def test_render_errors_are_clear_and_inputs_safe(tmp_path):
    bad = tmp_path / "bad.pdb"
    bad.write_text(
        "ATOM      1  QQ  ALA A   1       1.000   2.000   3.000  1.00 20.00          QQ\n"
    )
    result = runner.invoke(app, ["render", str(bad), "-d", "3", "-o", str(tmp_path / "x.mrc")])
    assert result.exit_code == 2 and "unknown element" in result.output
    result = runner.invoke(app, ["render", str(tmp_path / "missing.pdb"), "-d", "3"])
    assert result.exit_code == 2 and "no such file" in result.output
    from modelmap._peptide import ideal_peptide

    model = tmp_path / "pep.pdb"
    ideal_peptide("AAA").write_pdb(str(model))
    result = runner.invoke(app, ["render", str(model), "-d", "3", "-o", str(model)])
    assert result.exit_code == 2 and "input" in result.output
    assert mm.read_model(model).n_atoms == 15


def test_render_fourier_method(tmp_path):
    import pytest

    pytest.importorskip("jax_finufft")
    from modelmap._peptide import ideal_peptide
    from modelmap.scattering import atomic_image

    model = tmp_path / "one.pdb"
    ideal_peptide("G").write_pdb(str(model))
    out = tmp_path / "f.mrc"
    result = runner.invoke(app, ["render", str(model), "-d", "3", "--method", "fourier", "--sampling", "point",
                                 "--voxel-size", "1.0", "--padding", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    density = mm.read_map(out)
    m = mm.read_model(model)
    # the Fourier map has negative ripples (a Gaussian map never goes below 0)
    assert float(np.min(np.asarray(density.data))) < 0
    # and its peak is about the sum of the exact 3 Å images at the atom nearest the maximum
    pos = np.asarray(m.atoms.positions, np.float64)
    z = np.asarray(m.atoms.atomic_numbers)
    b = np.asarray(m.atoms.b_factors, np.float64)
    peak = np.unravel_index(np.argmax(np.asarray(density.data)), density.grid.shape)
    x = density.grid.coordinates()[peak]
    expected = sum(atomic_image(int(z[i]), np.linalg.norm(pos[i] - x), 3.0, b[i]) for i in range(len(z)))
    assert float(np.asarray(density.data)[peak]) == pytest.approx(expected, rel=2e-2)


def test_render_shells_with_per_atom_resolution(tmp_path):
    """--method shells from a constant, from the B column and from a local-resolution map give the
    same map when they carry the same resolutions; bad per-atom values are refused."""
    from modelmap._peptide import ideal_peptide

    st = ideal_peptide("GAG", b_factor=3.0)
    model = tmp_path / "pep.pdb"
    st.write_pdb(str(model))
    common = ["--method", "shells", "--voxel-size", "0.8", "--padding", "6", "--no-cxc"]
    const = tmp_path / "const.mrc"
    result = runner.invoke(app, ["render", str(model), "-d", "3", "-o", str(const)] + common)
    assert result.exit_code == 0, result.output
    # the B column holds 3.0, read as D = 3 Å; with --atom-b 3 the atoms are those of the constant render
    from_b = tmp_path / "from_b.mrc"
    result = runner.invoke(app, ["render", str(model), "--resolution-from-b", "--atom-b", "3", "-o", str(from_b)] + common)
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(mm.read_map(from_b).data, mm.read_map(const).data, rtol=0,
                               atol=1e-6 * float(np.max(mm.read_map(const).data)))
    # a local-resolution map of 3 Å everywhere
    grid = mm.read_map(const).grid
    locres = tmp_path / "locres.mrc"
    mm.write_map(locres, np.full(grid.shape, 3.0, np.float32), grid)
    from_map = tmp_path / "from_map.mrc"
    result = runner.invoke(app, ["render", str(model), "--local-resolution", str(locres), "-o", str(from_map)] + common)
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(mm.read_map(from_map).data, mm.read_map(const).data, rtol=0,
                               atol=1e-6 * float(np.max(mm.read_map(const).data)))
    # out-of-range values are named, never clipped
    mm.write_map(locres, np.full(grid.shape, 14.0, np.float32), grid, overwrite=True)
    result = runner.invoke(app, ["render", str(model), "--local-resolution", str(locres), "-o", str(tmp_path / "x.mrc")] + common)
    assert result.exit_code == 2 and "outside [1, 10] Å" in result.output
    result = runner.invoke(app, ["render", str(model), "-o", str(tmp_path / "y.mrc")] + common)
    assert result.exit_code == 2 and "resolution" in result.output


def test_score_writes_json_and_a_chimerax_script_with_mapq_values(shared_data, tmp_path):
    """`modelmap score` end to end on the first 100 atoms of 7CEC chain A: the JSON's per-atom Q are
    MapQ's own (single-process run, σ = 0.6) and its CCs are those of the library functions."""
    import json

    import gemmi

    folder = shared_data / "emd30342_7cec"
    map_path, model_path = folder / "390_emd_30342_A_z4.mrc.gz", folder / "390_7cec_A100.cif"
    out_json, out_cxc = tmp_path / "scores.json", tmp_path / "scores.cxc"
    result = runner.invoke(app, ["score", str(map_path), str(model_path), "-d", "3.9",
                                 "--json", str(out_json), "--cxc", str(out_cxc)])
    assert result.exit_code == 0, result.output
    assert "CC_mask" in result.output and "Q-score" in result.output
    report = json.loads(out_json.read_text())
    block = gemmi.cif.read(str(folder / "390_7cec_A100__Q__390_emd_30342_A_z4.cif")).sole_block()
    ref = {(r[0], int(r[1]), r[2]): float(r[3])
           for r in block.find("_atom_site.", ["auth_asym_id", "auth_seq_id", "auth_atom_id", "Q_score"])}
    ours = {(a["chain"], a["number"], a["name"]): a["q"] for a in report["atoms"]}
    assert ours.keys() == ref.keys()
    assert max(abs(ours[k] - ref[k]) for k in ref) <= 1e-3
    assert abs(report["summary"]["q_mean"] - 0.5197) <= 5e-4
    density, model = mm.read_map(map_path), mm.read_model(model_path)
    cc = mm.scores.map_model_cc(density, model, 3.9)
    assert abs(report["summary"]["cc_mask"] - cc.cc_mask) < 1e-6
    assert abs(report["summary"]["q_expected"] - (-0.1775 * 3.9 + 1.1192)) < 1e-9
    # the script opens model, map and the Q attribute file, and colours by it
    script = out_cxc.read_text().splitlines()
    assert 'open "scores_qscore.defattr"' in script
    assert any(line.startswith("color byattribute a:qscore #1") for line in script)
    lines = (tmp_path / "scores_qscore.defattr").read_text().splitlines()
    assert "attribute: qscore" in lines and len([x for x in lines if x.startswith("\t")]) == 100
    first = lines[4].split("\t")
    assert first[1] == "/A:1@N" and abs(float(first[2]) - ref[("A", 1, "N")]) <= 1e-3


def test_score_refuses_bad_input(shared_data, tmp_path):
    folder = shared_data / "emd30342_7cec"
    map_path, model_path = folder / "390_emd_30342_A_z4.mrc.gz", folder / "390_7cec_A100.cif"
    result = runner.invoke(app, ["score", str(map_path), str(model_path), "-d", "0"])
    assert result.exit_code == 2 and "resolution" in result.output
    result = runner.invoke(app, ["score", str(tmp_path / "none.mrc"), str(model_path), "-d", "3.9"])
    assert result.exit_code == 2 and "no such file" in result.output
