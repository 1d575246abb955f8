"""`modelmap.plots`: each figure's panels and lines from small synthetic reports, PNGs written
atomically, the `--plot` option of `modelmap score`."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from modelmap import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _score_json() -> dict:
    """A score report's JSON form: an FSC falling through 0.5 and 0.143; chain A with a gap in its
    numbering (residues 1-20 and 30-39), chain B with 5 residues and one residue without CC."""
    s = np.linspace(0.0, 0.5, 51)
    fsc = 1.0 / (1.0 + np.exp((s - 0.25) / 0.02))
    residues, atoms = [], []
    rng = np.random.default_rng(0)
    for chain, numbers in (("A", list(range(1, 21)) + list(range(30, 40))), ("B", range(1, 6))):
        for n in numbers:
            q = float(rng.uniform(0.2, 0.8))
            residues.append({"chain": chain, "number": n, "icode": "", "name": "ALA", "cc": 0.8, "q": q,
                             "q_backbone": q, "q_side_chain": q})
            atoms += [{"chain": chain, "number": n, "icode": "", "residue": "ALA", "name": name, "altloc": "",
                       "q": q} for name in ("N", "CA", "C", "O", "CB")]
    residues[-1]["cc"] = None
    return {"summary": {"resolution": 4.0, "q_mean": 0.5, "q_sigma": 0.6, "q_variant": "mapq", "q_expected": 0.41,
                        "fsc_0.5": 4.0, "fsc_0.143": 1 / (0.25 + 0.02 * math.log(1 / 0.143 - 1))},
            "residues": residues, "atoms": atoms, "fsc": [{"s": a, "fsc": b} for a, b in zip(s, fsc)]}


def _refine_json() -> dict:
    """A refinement's JSON form: 11 steps in two macro-cycles (the second from step 6)."""
    step = np.arange(11.0)
    history = {"step": step, "loss": 100 - step, "map_loss": 0.5 - 0.01 * step, "geometry": 10 - 0.5 * step,
               "bond_rmsd": 0.03 - 0.001 * step, "angle_rmsd": 2.0 - 0.05 * step,
               "map_weight": np.where(step < 6, 2.0, 1.5), "cycle": (step >= 6).astype(float)}
    return {"loss": "ls", "history": {k: v.tolist() for k, v in history.items()},
            "before": {"cc_mask": 0.6, "q_mean": 0.3}, "after": {"cc_mask": 0.7, "q_mean": 0.4}}


def test_fsc_figure_has_the_curve_the_levels_and_the_crossings():
    fig = plots.fsc_figure(_score_json())
    (ax,) = fig.axes
    assert len(ax.lines) == 5  # curve, 0.5 and 0.143 levels, one vertical line per crossing
    levels = sorted(line.get_ydata()[0] for line in ax.lines[1:] if line.get_ydata()[0] == line.get_ydata()[1])
    assert levels == pytest.approx([0.143, 0.5])
    assert any("at 4.00 Å" in t.get_text() for t in ax.get_legend().get_texts())


def test_residue_figure_has_one_panel_per_chain_broken_at_gaps():
    fig = plots.residue_figure(_score_json())
    assert [len(ax.lines) for ax in fig.axes] == [3, 3]  # Q, CC, expected Q
    x = fig.axes[0].lines[0].get_xdata()
    assert len(x) == 31 and np.isnan(x[20])  # a break between residues 20 and 30
    assert fig.axes[0].get_xlabel() == "" and fig.axes[-1].get_xlabel() == "residue number"
    data = _score_json()
    data["summary"]["q_expected"] = None  # no MapQ fit for this σ: no expected-Q line
    assert [len(ax.lines) for ax in plots.residue_figure(data).axes] == [2, 2]


def test_q_histogram_counts_every_scored_atom():
    fig = plots.q_histogram_figure(_score_json())
    (ax,) = fig.axes
    assert len(ax.lines) == 2  # mean Q and expected Q
    assert sum(p.get_height() for p in ax.patches) == 35 * 5


def test_refine_figure_has_six_panels_limits_and_cycle_marks():
    fig = plots.refine_figure(_refine_json())
    assert len(fig.axes) == 6
    loss, map_loss, bond, angle, scores, weight = fig.axes
    assert len(loss.lines) == 3 and len(map_loss.lines) == 2 and len(weight.lines) == 2  # + one cycle mark
    assert len(bond.lines) == 3 and len(angle.lines) == 3  # rmsd, limit, cycle mark
    assert bond.lines[1].get_ydata()[0] == 0.02 and angle.lines[1].get_ydata()[0] == 2.5
    assert bond.lines[2].get_xdata()[0] == 6.0  # the second macro-cycle starts at step 6
    assert len(scores.lines) == 2 and "not computed per step" in scores.get_title(loc="left")


def test_save_png_writes_a_png_atomically(tmp_path):
    path = plots.save_png(plots.fsc_figure(_score_json()), tmp_path / "sub" / "fsc.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in path.parent.iterdir()] == ["fsc.png"]  # no temporary file left
    written = plots.write_refine_plots(_refine_json(), f"{tmp_path}/")
    assert written["refine"] == tmp_path / "refine.png" and written["refine"].read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="overwrite"):
        plots.save_png(plots.fsc_figure(_score_json()), path, protect=(path,))


def test_score_command_writes_the_plots(shared_data, tmp_path):
    from typer.testing import CliRunner

    from modelmap.cli import app

    folder = shared_data / "emd30342_7cec"
    result = CliRunner().invoke(app, ["score", str(folder / "390_emd_30342_A_z4.mrc.gz"),
                                      str(folder / "390_7cec_A100.cif"), "-d", "3.9", "--plot",
                                      str(tmp_path / "a100"), "--json", str(tmp_path / "a100.json")])
    assert result.exit_code == 0, result.output
    for name in ("fsc", "residues", "q_histogram"):
        png = tmp_path / f"a100_{name}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE and f"wrote {png}" in result.output
    # the figures from the JSON file are those of the report
    fig = plots.residue_figure(json.loads((tmp_path / "a100.json").read_text()))
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 3
