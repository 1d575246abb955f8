"""What a new user meets: the install, the demo, the defaults, the command line's messages and files."""

import ast
import builtins
import os
import re
import stat
import sys
import tomllib

import numpy as np
import pytest
from typer.testing import CliRunner

import modelmap as mm
from modelmap.cli import app

from .conftest import REPO

runner = CliRunner()


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_default_install_has_every_feature_and_ci_runs_the_readme_command():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert {"jax-finufft", "biotite", "matplotlib"} <= names
    assert set(project["optional-dependencies"]) <= {"tests", "docs", "cluster", "store"}  # heavy, optional parts
    readme = re.search(r"Run the tests.*?```bash\n(.*?)\n```", _readme(), re.S).group(1)
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [readme]


def test_fourier_without_jax_finufft_says_so_and_the_other_methods_work(tmp_path, monkeypatch):
    from modelmap._peptide import ideal_peptide

    model = tmp_path / "pep.pdb"
    ideal_peptide("AG").write_pdb(str(model))
    monkeypatch.setitem(sys.modules, "jax_finufft", None)  # `import jax_finufft` raises ImportError
    result = runner.invoke(app, ["render", str(model), "-d", "3", "--method", "fourier", "-o", str(tmp_path / "f.mrc")])
    assert result.exit_code == 2 and "needs jax-finufft: pip install jax-finufft" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["render", str(model), "-d", "3", "-o", str(tmp_path / "g.mrc")])
    assert result.exit_code == 0, result.output


def test_demo_renders_scores_and_refines_with_readable_files(tmp_path):
    """The README's first command: render, score and refine on the demo's own data; every file it
    writes is readable by others as umask 022 says (0644), not private (0600)."""
    out = tmp_path / "demo"
    old = os.umask(0o022)
    try:
        result = runner.invoke(app, ["demo", "-o", str(out)])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for step in ("model:", "target:", "render:", "score:", "refine:"):
        assert step in result.output
    model = mm.read_model(out / "helix.pdb")
    assert model.n_atoms == 59  # 12 residues: 11 Ala x 5 atoms + 1 Gly x 4 atoms
    density = mm.read_map(out / "helix_model_map.mrc")
    # the map integrates to the model's total f(0) (point samples of a map this smooth: to 1e-4)
    f0 = float(np.sum(np.asarray(mm.get_table("electron").f0(model.atoms.atomic_numbers))))
    total = float(np.sum(np.asarray(density.data, np.float64))) * density.grid.voxel_volume
    assert abs(total - f0) < 1e-4 * f0
    script = (out / "helix_model_map.cxc").read_text()
    assert 'open "helix.pdb"' in script and 'open "helix_model_map.mrc"' in script and "level" in script
    # refinement brings the model to the target: CC_mask and the distance to the true positions
    rows = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^  (\S.*?)\s+(-?[\d.]+)\s+(-?[\d.]+)$", result.output, re.M)}
    assert rows["CC_mask"][1] > rows["CC_mask"][0] + 0.02
    assert rows["rmsd to the true (Å)"][1] < rows["rmsd to the true (Å)"][0]
    assert abs(rows["mean B (Å², true 40)"][1] - 40.0) < 5.0  # B moves beside the coordinates
    written = sorted(p.name for p in out.iterdir())
    assert {"target.mrc", "score.json", "score.cxc", "score_qscore.defattr", "helix_refined.pdb",
            "helix_refined_shift.defattr", "refine.json", "refine.cxc"} <= set(written)
    modes = {name: stat.S_IMODE((out / name).stat().st_mode) for name in written}
    assert set(modes.values()) == {0o644}, modes


def test_atomic_writes_follow_the_umask_and_keep_an_existing_mode(tmp_path):
    grid = mm.Grid((4, 4, 4), 1.0)
    old = os.umask(0o027)
    try:
        path = mm.write_map(tmp_path / "a.mrc.gz", np.ones((4, 4, 4), np.float32), grid)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        path.chmod(0o604)
        mm.write_map(path, np.zeros((4, 4, 4), np.float32), grid)
        assert stat.S_IMODE(path.stat().st_mode) == 0o604
    finally:
        os.umask(old)


@pytest.mark.parametrize("method", ["gaussian", "fourier"])
def test_default_sampling_fits_an_experimental_map_at_least_as_well(shared_data, tmp_path, method):
    """EMD-2566 in its zone around 3J6B chain 9 at 3.2 Å: the default (point samples) correlates at
    least as well as voxel averages (measured: fourier 0.542 vs 0.526, gaussian 0.492 vs 0.479)."""
    folder = shared_data / "emd2566_3j6b_chain9"
    target = mm.read_map(folder / "2566_3J6B_9.mrc")
    data = np.asarray(target.data)
    zone = data != 0
    cc = {}
    for sampling in (None, "average"):
        out = tmp_path / f"{sampling}.mrc"
        args = ["render", str(folder / "3J6B_9.pdb"), "-d", "3.2", "--method", method, "--like",
                str(folder / "2566_3J6B_9.mrc"), "--no-cxc", "-o", str(out)]
        result = runner.invoke(app, args + (["--sampling", sampling] if sampling else []))
        assert result.exit_code == 0, result.output
        cc[sampling] = np.corrcoef(np.asarray(mm.read_map(out).data)[zone], data[zone])[0, 1]
    assert cc[None] >= cc["average"], cc
    assert cc[None] > 0.45


def test_score_warns_when_atoms_lie_outside_the_map(shared_data, tmp_path):
    """The first 60 atoms of chains A and B of 7CEC against the crop around chain A: chain B lies
    outside; the warning says how much, per chain, in one line."""
    import gemmi

    folder = shared_data / "emd30342_7cec"
    st = gemmi.read_structure(str(folder / "390_7cec.cif.gz"))
    for chain in list(st[0]):
        if chain.name not in ("A", "B"):
            st[0].remove_chain(chain.name)
    for chain in st[0]:
        while len(chain) > 8:
            del chain[len(chain) - 1]
    st.setup_entities()
    model = tmp_path / "ab.cif"
    st.make_mmcif_document().write_file(str(model))
    result = runner.invoke(app, ["score", str(folder / "390_emd_30342_A_z4.mrc.gz"), str(model), "-d", "3.9"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("warning:"))
    assert re.search(r"lie inside the map's box.*A 100 %, B 0 %", line), line
    assert "UserWarning" not in result.output and "warnings.warn" not in result.output


def _peptide(tmp_path, name="pep.pdb"):
    from modelmap._peptide import ideal_peptide

    path = tmp_path / name
    ideal_peptide("AAA").write_pdb(str(path))
    return path


def test_clashing_outputs_bad_suffixes_and_sizes_are_refused_before_any_work(tmp_path, shared_data):
    model = _peptide(tmp_path)
    folder = shared_data / "emd30342_7cec"
    map_path, model_path = folder / "390_emd_30342_A_z4.mrc.gz", folder / "390_7cec_A100.cif"
    same = tmp_path / "x.json"
    result = runner.invoke(app, ["score", str(map_path), str(model_path), "-d", "3.9", "--json", str(same), "--cxc", str(same)])
    assert result.exit_code == 2 and "--json and --cxc both name" in result.output and not same.exists()
    result = runner.invoke(app, ["render", str(model), "-d", "3", "-o", str(tmp_path / "x.txt")])
    assert result.exit_code == 2 and "ends in .mrc, .map, .ccp4" in result.output
    assert not (tmp_path / "x.txt").exists()
    for value in ("0", "-1", "nan", "inf"):
        result = runner.invoke(app, ["render", str(model), "-d", "3", "--voxel-size", value, "-o", str(tmp_path / "v.mrc")])
        assert result.exit_code == 2 and "--voxel-size" in result.output and "finite number above 0" in result.output
        assert "RuntimeWarning" not in result.output and "Traceback" not in result.output
    # an output onto an input is refused before the model is even read (the model file is not one)
    result = runner.invoke(app, ["render", str(tmp_path / "missing.pdb"), "-d", "3", "--like", str(map_path),
                                 "-o", str(map_path)])
    assert result.exit_code == 2 and "refusing to overwrite the input file" in result.output
    result = runner.invoke(app, ["refine", str(map_path), str(model_path), "-d", "3.9", "-o", str(tmp_path / "r.txt")])
    assert result.exit_code == 2 and ".pdb or .cif" in result.output
    result = runner.invoke(app, ["render", str(model), "-d", "3", "--method", "shells", "--sampling", "average",
                                 "-o", str(tmp_path / "s.mrc")])
    assert result.exit_code == 2 and "grid points only" in result.output


def test_warnings_are_one_line_and_bad_atoms_are_named(tmp_path, shared_data):
    like = shared_data / "emd30342_7cec" / "390_emd_30342_A_z4.mrc.gz"  # a crop: its origin is off the grid
    model = _peptide(tmp_path)
    result = runner.invoke(app, ["render", str(model), "-d", "3", "--like", str(like), "-o", str(tmp_path / "m.mrc")])
    assert result.exit_code == 0, result.output
    assert re.search(r"^warning: \S+m\.mrc: the origin \(145\.825, 112\.825, 120\.517\) Å is not a whole number",
                     result.output, re.M), result.output
    assert "UserWarning" not in result.output and "warnings.warn" not in result.output
    # the peptide lies far outside that crop: said, and the map written is empty
    assert re.search(r"^warning: 0 of \d+ atoms lie inside \S+'s box; the map is empty", result.output, re.M)
    assert not np.any(mm.read_map(tmp_path / "m.mrc").data)
    text = model.read_text().splitlines()
    k = next(i for i, line in enumerate(text) if line.startswith("ATOM") and line[12:26] == " CA  ALA A   2")
    text[k] = text[k][:30] + "     nan" + text[k][38:]
    bad = tmp_path / "nan.pdb"
    bad.write_text("\n".join(text) + "\n")
    result = runner.invoke(app, ["render", str(bad), "-d", "3", "-o", str(tmp_path / "n.mrc")])
    assert result.exit_code == 2 and "A/ALA 2/CA" in result.output, result.output


def test_help_at_80_columns_shows_every_option_whole():
    import typer

    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert result.exit_code == 0, result.output
        assert max(len(line) for line in result.output.splitlines()) <= 80
        for param in sub.params:
            for opt in param.opts + param.secondary_opts:
                if opt.startswith("--"):
                    assert re.search(rf"(^|[\s,/]){re.escape(opt)}([\s,=]|$)", result.output, re.M), (name, opt)
    assert set(command.commands) >= {"render", "score", "refine", "demo"}


def test_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"modelmap {version('modelmap')}"


def test_multi_model_file_reports_models_times_atoms(tmp_path):
    import gemmi

    model = _peptide(tmp_path)
    st = gemmi.read_structure(str(model))
    for _ in range(2):
        st.add_model(st[0].clone())
    st.renumber_models()
    ens = tmp_path / "ens.pdb"
    st.write_pdb(str(ens))
    result = runner.invoke(app, ["render", str(ens), "-d", "3", "--no-cxc", "-o", str(tmp_path / "e.mrc")])
    assert result.exit_code == 0, result.output
    assert "3 models × 15 atoms = 45 atoms; rendering the mean map of 3 models" in result.output
    result = runner.invoke(app, ["render", str(ens), "-d", "3", "--no-cxc", "--models", "2", "-o", str(tmp_path / "f.mrc")])
    assert result.exit_code == 0 and "3 models × 15 atoms = 45 atoms; rendering one model (--models 2)" in result.output


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_blocks_define_what_they_use_and_call_only_callables():
    """Each README Python block names only what it defines or imports (no `target` from nowhere),
    calls only callables of modelmap (`mm.render` is a module), and no path outside a clone."""
    text = _readme()
    assert "shared/specs" not in text
    blocks = _python_blocks(text)
    assert len(blocks) >= 4
    for block in blocks:
        tree = ast.parse(block)
        defined = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.Lambda)):
                defined |= {a.arg for a in node.args.args}
                if isinstance(node, ast.FunctionDef):
                    defined.add(node.name)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert used <= defined, (used - defined, block)
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            chain, node = [], call.func
            while isinstance(node, ast.Attribute):
                chain.insert(0, node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id == "mm" and chain:
                obj = mm
                for attr in chain:
                    obj = getattr(obj, attr)
                    if isinstance(obj, type):
                        break
                assert callable(obj), ("mm." + ".".join(chain), "is not callable")


def test_readme_render_block_runs_as_written(shared_data, tmp_path, monkeypatch):
    import shutil

    shutil.copy(shared_data / "emd30342_7cec" / "390_7cec_A100.cif", tmp_path / "model.cif")
    monkeypatch.chdir(tmp_path)
    block = next(b for b in _python_blocks(_readme()) if "mm.write_map(\"model_map.mrc\"" in b)
    exec(compile(block, "README.md", "exec"), {})
    assert mm.read_map(tmp_path / "model_map.mrc").grid.shape[0] > 10
