"""`modelmap batch` jobs (issue 18): a 20-entry manifest from the shared models with 2 broken
entries, run in this process and on a local Ray (2 workers): the same maps to 1e-6, the broken
entries recorded, a resumed job doing only what is missing; the manifest's checks.

Timing (2 CPU cores, measured): the default tests ~45 s in all: the in-process run 15-17 s (mostly
compiling), Ray's 21-27 s with its start-up; the slow real-kill test another ~15 s."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gemmi
import numpy as np
import pytest

import modelmap as mm
from modelmap.batch import JobDefaults, ManifestError, read_manifest, run_job
from modelmap.cli import app

BOX, VOXEL, D = 40, 1.5, 4.0
CRN_RANGES = [(1, 12), (1, 20), (5, 25), (10, 30), (15, 35), (20, 40), (25, 46), (1, 30), (8, 38), (17, 46),
              (1, 46), (3, 44)]


def _crop(source: Path, first: int, last: int, path: Path) -> Path:
    """Residues first..last of a one-chain model, as a PDB file."""
    st = gemmi.read_structure(str(source))
    chain = st[0][0]
    for i in reversed(range(len(chain))):
        if not first <= chain[i].seqid.num <= last:
            del chain[i]
    st.write_pdb(str(path))
    return path


@pytest.fixture(scope="module")
def job(shared_data, tmp_path_factory):
    """The manifest (20 entries, 2 of them broken) and its in-process run."""
    folder = tmp_path_factory.mktemp("job")
    crn = shared_data / "models" / "1crn.pdb"
    a100 = shared_data / "emd30342_7cec" / "390_7cec_A100.cif"
    zone = shared_data / "emd30342_7cec" / "390_emd_30342_A_z4.mrc.gz"
    rows = [{"model": str(_crop(crn, a, b, folder / f"crn_{a}_{b}.pdb")), "name": f"crn_{a}_{b}"} for a, b in CRN_RANGES]
    rows += [
        {"model": str(crn)},
        {"model": str(crn), "name": "crn_d3", "resolution": 3.0},
        {"model": str(crn), "name": "crn_fourier", "method": "fourier"},
        {"model": str(crn), "name": "crn_padding", "padding": 4.0},
        {"model": str(a100), "name": "a100"},
        {"model": str(a100), "name": "a100_scored", "like": str(zone), "map": str(zone), "resolution": 3.9},
    ]
    (folder / "garbage.cif.gz").write_bytes(b"\x1f\x8b\x08\x00 cut short")  # a truncated download
    lines = crn.read_text().splitlines(keepends=True)
    first = next(i for i, t in enumerate(lines) if t.startswith("ATOM"))
    lines[first] = lines[first][:76] + "QQ" + lines[first][78:]
    (folder / "unknown_element.pdb").write_text("".join(lines))
    rows.insert(3, {"model": "garbage.cif.gz", "name": "broken_garbage"})
    rows.insert(11, {"model": "unknown_element.pdb", "name": "broken_element"})
    assert len(rows) == 20
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "name", "resolution", "method", "padding", "box", "like", "map"])
        w.writeheader()
        w.writerows(rows)
    defaults = JobDefaults(resolution=D, voxel_size=VOXEL, box=BOX)
    entries = read_manifest(manifest, defaults)
    t0 = time.perf_counter()
    report = run_job(entries, folder / "local", chunk_size=4)
    return {"folder": folder, "manifest": manifest, "entries": entries, "report": report, "defaults": defaults,
            "seconds": time.perf_counter() - t0}


def _maps(out: Path, entries) -> dict:
    return {e.name: mm.read_map(out / f"{e.name}.mrc") for e in entries if (out / f"{e.name}.mrc").exists()}


def test_in_process_job_records_broken_entries_and_goes_on(job):
    report, out = job["report"], job["folder"] / "local"
    by_name = {r["entry"]: r for r in report.results}
    failed = {n for n, r in by_name.items() if r["status"] == "failed"}
    assert failed == {"broken_garbage", "broken_element"}
    assert "cannot read it as a PDB or mmCIF model" in by_name["broken_garbage"]["error"]
    assert "unknown element" in by_name["broken_element"]["error"]
    assert report.count("ok") == 18
    # the results table, in the manifest's order, with atoms, seconds and the scores asked for
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["entry"] for r in rows] == [e.name for e in job["entries"]]
    assert json.loads((out / "results.json").read_text())["counts"] == {"ok": 18, "skipped": 0, "failed": 2, "not run": 0}
    scored = by_name["a100_scored"]
    assert scored["atoms"] == 100 and abs(scored["q_mean"] - 0.5197) < 2e-3 and 0.5 < scored["cc_mask"] < 0.8
    assert by_name["1crn"]["atoms"] == 327 and by_name["1crn"]["cc_mask"] is None
    # the maps: boxes centred on each model; the like= entry on the zone map's grid; padding its own
    maps = _maps(out, job["entries"])
    assert len(maps) == 18 and not any(out.glob(".*.tmp*"))
    assert maps["1crn"].grid.shape == (BOX,) * 3
    zone = mm.read_map(job["entries"][-1].like)
    assert maps["a100_scored"].grid.shape == zone.grid.shape
    assert np.allclose(maps["a100_scored"].grid.origin, zone.grid.origin, atol=1e-4)
    # the same map as `modelmap render` of the same model on the same grid (one idea, one home)
    crn = mm.read_model(job["entries"][12].model)
    alone = mm.render_model(crn.atoms, maps["1crn"].grid, D, sampling="point")
    peak = float(np.max(alone))
    assert np.max(np.abs(np.asarray(maps["1crn"].data) - np.asarray(alone))) <= 1e-4 * peak


def test_ray_job_gives_the_same_maps(job, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'modelmap[cluster]')")
    t0 = time.perf_counter()
    report = run_job(job["entries"], tmp_path, engine="ray", workers=2, chunk_size=4)
    seconds = time.perf_counter() - t0
    assert report.engine == "ray" and report.workers == 2
    assert {r["entry"] for r in report.results if r["status"] == "failed"} == {"broken_garbage", "broken_element"}
    assert report.count("ok") == 18
    local, remote = _maps(job["folder"] / "local", job["entries"]), _maps(tmp_path, job["entries"])
    assert local.keys() == remote.keys()
    for name in local:
        a, b = np.asarray(local[name].data), np.asarray(remote[name].data)
        assert local[name].grid == remote[name].grid, name
        assert np.max(np.abs(a - b)) <= 1e-6 * np.max(np.abs(a)), name
    by_name = {r["entry"]: r for r in report.results}
    local_rows = {r["entry"]: r for r in job["report"].results}
    assert by_name["a100_scored"]["q_mean"] == pytest.approx(local_rows["a100_scored"]["q_mean"], abs=1e-6)
    print(f"ray job (2 workers, start-up included): {seconds:.1f} s; in-process: {job['seconds']:.1f} s")


def test_resume_does_only_the_missing_entries(job, tmp_path):
    """A job killed midway (simulated: outputs and records of 5 entries gone, one output cut short
    by a kill mid-write, one record for another spec) reruns only those; --force redoes all."""
    out = tmp_path / "resumed"
    shutil.copytree(job["folder"] / "local", out)
    entries = job["entries"]
    gone = [entries[k].name for k in (0, 5, 9, 14, 19)]
    for name in gone[:3]:
        (out / f"{name}.mrc").unlink()
        (out / "records" / f"{name}.json").unlink()
    (out / f"{gone[3]}.mrc").unlink()  # killed between the map and its record: the record says ok, no map
    (out / f".{gone[3]}.mrc.x1y2.tmp.mrc").write_bytes(b"MAP cut short")  # a temporary file a kill left behind
    record = json.loads((out / "records" / f"{gone[4]}.json").read_text())
    (out / "records" / f"{gone[4]}.json").write_text(json.dumps({**record, "key": "another spec"}))
    report = run_job(entries, out)
    status = {r["entry"]: r["status"] for r in report.results}
    redone = {n for n, s in status.items() if s == "ok"}
    assert redone == set(gone) - {"broken_garbage", "broken_element"}
    assert {n for n, s in status.items() if s == "failed"} == {"broken_garbage", "broken_element"}  # retried
    assert report.count("skipped") == 20 - len(gone) - 2 + sum(n.startswith("broken") for n in gone)
    for name in gone:
        if not name.startswith("broken"):
            a = mm.read_map(out / f"{name}.mrc").data
            b = mm.read_map(job["folder"] / "local" / f"{name}.mrc").data
            assert np.array_equal(np.asarray(a), np.asarray(b)), name
    again = run_job(entries, out)
    assert again.count("ok") == 0 and again.count("skipped") == 18
    forced = run_job(entries[:4], out, force=True)  # the 4th is broken_garbage
    assert forced.count("ok") == 3 and forced.count("failed") == 1 and forced.count("skipped") == 0


def test_store_holds_one_box_per_entry_with_its_origin(job, tmp_path):
    zarr = pytest.importorskip("zarr", reason="zarr is not installed (pip install 'modelmap[store]')")
    entries = [e for e in job["entries"] if e.box is not None][:6]
    report = run_job(entries, tmp_path, store=True)
    root = zarr.open_group(str(tmp_path / "maps.zarr"), mode="r")
    assert root["maps"].shape == (6, BOX, BOX, BOX) and root["maps"].chunks == (1, BOX, BOX, BOX)
    assert root.attrs["entries"] == [e.name for e in entries]
    local = _maps(job["folder"] / "local", entries)
    for i, e in enumerate(entries):
        if e.name in local:
            assert np.array_equal(root["maps"][i], np.asarray(local[e.name].data))
            assert np.allclose(root["origin"][i], local[e.name].grid.origin, atol=1e-4)
            assert root["resolution"][i] == e.resolution and np.all(root["voxel_size"][i] == VOXEL)
        else:
            assert np.all(np.isnan(root["origin"][i]))  # failed: no map
    assert run_job(entries, tmp_path, store=True).count("skipped") == report.count("ok")
    with pytest.raises(ManifestError, match="one fixed box"):
        run_job(job["entries"], tmp_path / "mixed", store=True)


def test_grid_too_large_is_recorded(shared_data, tmp_path):
    manifest = tmp_path / "m.jsonl"
    crn = shared_data / "models" / "1crn.pdb"
    manifest.write_text(json.dumps({"model": str(crn), "resolution": 4, "box": 4000, "name": "huge"}) + "\n")
    report = run_job(read_manifest(manifest), tmp_path / "out")
    row = report.results[0]
    assert row["status"] == "failed" and "GiB" in row["error"] and "4000 x 4000 x 4000" in row["error"]


def test_manifest_errors_name_line_and_field(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("model,resolution,method,box,padding,like,name\n"
                        "a.pdb,3,gaussian,,,,\n"
                        "b.pdb,abc,gaussian,,,,\n"
                        ",3,nufft,,,,\n"
                        "c.pdb,3,gaussian,64,5,,\n"
                        "d.pdb,3,shells,,,e.mrc,\n"
                        "e.pdb,3,,,,,a\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest, JobDefaults(resolution=None))
    text = str(err.value)
    assert "line 3: field 'resolution': 'abc' is not a number" in text
    assert "line 4: field 'model': required" in text and "line 4: field 'method': 'nufft' is not one of" in text
    assert "line 5: field 'padding': a row with 'box'" in text
    assert "line 7: field 'name': 'a' is also the name of line 2" in text
    assert "line 6" not in text  # like= with the shell method is fine
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"model": "a.pdb", "resolution": 3, "colour": "red"}\nnot json\n')
    with pytest.raises(ManifestError, match=r"line 1: unknown field\(s\) 'colour'.*\n.*line 2: not a JSON object"):
        read_manifest(bad)


def test_cli_batch_without_ray_says_how_to_install(tmp_path, monkeypatch):
    """`--engine ray` without Ray: a clear message, exit code 2, no traceback, nothing run."""
    from typer.testing import CliRunner

    manifest = tmp_path / "m.csv"
    manifest.write_text("model,resolution\nmissing.pdb,3\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    result = CliRunner().invoke(app, ["batch", str(manifest), "-o", str(tmp_path / "out"), "--engine", "ray"])
    assert result.exit_code == 2
    assert "pip install 'modelmap[cluster]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_cli_batch_reports_failures_with_exit_code_1(shared_data, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"model,resolution,box,voxel_size\n{shared_data / 'emd30342_7cec' / '390_7cec_A100.cif'},4,40,1.5\n"
                        "missing.pdb,4,40,1.5\n")
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["batch", str(manifest), "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "2 entries: 1 done" in result.output and "1 failed" in result.output
    assert "missing.pdb: no such file" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_resume_after_a_killed_job(job, tmp_path):
    """A real kill: `modelmap batch` in a subprocess, SIGKILLed once 5 entries are recorded; the
    rerun does only the entries without a complete output (~20 s on 2 cores)."""
    import os
    import signal

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "modelmap.cli", "batch", str(job["manifest"]), "-o", str(out), "-d", str(D),
           "--voxel-size", str(VOXEL), "--box", str(BOX), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "records").glob("*.json"))) < 5 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = {p.stem for p in (out / "records").glob("*.json")}
    assert 5 <= len(before) < 20 and not (out / "results.csv").exists()
    report = run_job(job["entries"], out)
    status = {r["entry"]: r["status"] for r in report.results}
    ok_before = {n for n in before if json.loads((out / "records" / f"{n}.json").read_text())["status"] == "ok"}
    assert {n for n, s in status.items() if s == "skipped"} == ok_before  # a map is written before its record
    assert report.count("ok") == 18 - len(ok_before) and report.count("failed") == 2
