"""benchmarks/gpu_check.py --cpu: the device check's dry run writes the JSON the device run will write,
and survives a measurement that fails.

Runs the script in a subprocess on the CPU with one renderer, no 317k assembly and one injected error
(about 55 s on 2 cores: compilation dominates). It is in the default run, so that CI catches a change
that would break the device run: a lent GPU's minutes go to measuring, not to mending the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def test_gpu_check_cpu_dry_run(shared_data, tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    injected = "render/gaussian/small/value_and_grad"
    cmd = [sys.executable, str(SCRIPT), "--cpu", "--out", str(out), "--data", str(shared_data),
           "--renderers", "gaussian", "--skip-large", "--budget-s", "150", "--inject-error", injected]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    doc = json.loads(out.read_text())
    for key in ("schema", "created", "mode", "complete", "device", "versions", "settings", "inputs",
                "measurements", "targets", "elapsed_s", "batch_api"):
        assert key in doc, key
    assert doc["schema"] == "modelmap-gpu-check/1"
    assert doc["mode"] == "cpu" and doc["complete"] is True
    assert doc["device"]["platform"] == "cpu"
    for name in ("jax", "jaxlib", "equinox", "modelmap", "modelmap_src_sha256"):
        assert doc["versions"][name], name
    small = doc["inputs"]["small"]
    assert small["n_atoms"] == 1654 and len(small["grid_shape_zyx"]) == 3

    m = doc["measurements"]
    expected = {"render/gaussian/small/forward", injected, "batch/gaussian/stacked_forward",
                "batch/gaussian/stacked_value_and_grad", "batch/gaussian/render_batch", "refine/7cec_A/xyz_b"}
    assert expected <= set(m), sorted(m)
    for name, entry in m.items():
        assert entry["status"] in ("ok", "error", "skipped"), (name, entry["status"])
        assert (entry["error"] is None) == (entry["status"] == "ok"), name
    # the injected failure is recorded, and the run went on past it
    assert m[injected]["status"] == "error" and "injected" in m[injected]["error"]
    assert m["refine/7cec_A/xyz_b"]["status"] in ("ok", "error")
    for key in ("forward_26k_gaussian_le_20ms", "batch_maps_per_s_ge_2000", "value_and_grad_le_3x_forward_gaussian"):
        assert set(doc["targets"][key]) == {"value", "target", "met"}

    if doc["batch_api"] != "ok":
        # before the render/batch API refactor lands, the new-API calls fail and are recorded as errors
        assert "modelmap.batch" in m["batch/gaussian/stacked_forward"]["error"]
        return
    fwd = m["render/gaussian/small/forward"]
    assert fwd["status"] == "ok", fwd["error"]
    for key in ("setup_s", "lower_s", "compile_s", "first_run_s", "median_s", "times_s", "repeats"):
        assert key in fwd, key
    assert fwd["repeats"] == len(fwd["times_s"]) >= 1 and fwd["median_s"] > 0
    for name in ("batch/gaussian/stacked_forward", "batch/gaussian/stacked_value_and_grad"):
        assert m[name]["status"] == "ok", m[name]["error"]
        assert m[name]["maps_per_s"] > 0
    assert m["refine/7cec_A/xyz_b"]["status"] == "ok", m["refine/7cec_A/xyz_b"]["error"]
