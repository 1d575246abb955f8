"""The README's Python examples run as written."""

import gzip
import re
import shutil

from .conftest import REPO


def _block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README block {marker} not found"
    return match.group(1)


def test_readme_refinement_loop_runs_and_raises_the_cc(shared_data, tmp_path, monkeypatch, capsys):
    folder = shared_data / "emd30342_7cec"
    shutil.copy(folder / "390_7cec_A100.cif", tmp_path / "model.cif")
    with gzip.open(folder / "390_emd_30342_A_z4.mrc.gz") as src, open(tmp_path / "map.mrc", "wb") as dst:
        shutil.copyfileobj(src, dst)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_block("readme-loop"), "README.md", "exec"), namespace)  # exactly the README's code
    mm, eqx = namespace["mm"], namespace["eqx"]
    start = float(mm.scores.pearson(namespace["render_fn"](namespace["volume"]), namespace["target"].data))
    end = -float(namespace["value"])
    assert end > start + 0.01, (start, end)
    assert re.search(r"CC 0\.\d{4}", capsys.readouterr().out)
    # the refined parameters are back in a volume of the same kind
    refined = eqx.tree_at(namespace["fields"], namespace["volume"], namespace["params"])
    assert refined.positions.shape == namespace["volume"].positions.shape
