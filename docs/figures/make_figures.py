"""Draws the figures of the documentation (PNG files beside this script).

Every figure is computed here from package-built data (an ideal α-helix from
`modelmap._peptide.ideal_peptide`, single atoms, the shipped shell tables), so the script runs
anywhere modelmap installs, in about a minute on two CPU cores. The benchmark figure reads the
JSON that `benchmarks/bench_batch.py --out` wrote (`--bench-results`, default
`benchmarks/results/`); without it that figure is left as it is.

    python docs/figures/make_figures.py                 # all figures
    python docs/figures/make_figures.py grid volumes    # only some (names: see FIGURES)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import modelmap as mm  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "notebooks"))
from _common import helix, with_atoms  # noqa: E402  (the notebooks' package-built helix)
DPI = 90
CARBON = 6


def extent_xy(grid: mm.Grid) -> list[float]:
    """imshow extent (x left/right, y bottom/top) of a z section, voxel centres at the grid points."""
    x, y, _ = grid.axes()
    vx, vy, _ = grid.voxel_size
    return [x[0] - vx / 2, x[-1] + vx / 2, y[0] - vy / 2, y[-1] + vy / 2]


def save(fig, name: str) -> None:
    path = HERE / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path.relative_to(HERE.parent.parent)} ({path.stat().st_size / 1024:.0f} kB)")


# ---------------------------------------------------------------------------------------------
def fig_grid() -> None:
    """Grid conventions: grid points, voxel boxes, origin, index order vs position order."""
    grid = mm.Grid((3, 4, 5), voxel_size=(1.5, 1.0, 1.0), origin=(2.0, -1.0, 0.0))  # (nz, ny, nx)
    x, y, _ = grid.axes()
    vx, vy, _ = grid.voxel_size
    fig, ax = plt.subplots(layout="constrained", figsize=(7.2, 4.6))
    for i, xi in enumerate(x):
        for j, yj in enumerate(y):
            ax.add_patch(plt.Rectangle((xi - vx / 2, yj - vy / 2), vx, vy, fill=False, ec="0.7", lw=1))
            ax.plot(xi, yj, "o", color="C0", ms=5)
            ax.annotate(f"[k, {j}, {i}]", (xi, yj), xytext=(0, -13), textcoords="offset points",
                        ha="center", fontsize=7, color="C0")
    ax.plot(*grid.origin[:2], "o", color="C3", ms=9, zorder=3)
    ax.annotate("origin = position of grid point (0, 0, 0)\n= MRC ORIGIN, or NSTART × voxel size",
                grid.origin[:2], xytext=(45, -42), textcoords="offset points", color="C3", fontsize=8,
                ha="left", arrowprops=dict(arrowstyle="->", color="C3"))
    ax.annotate("", (x[1], y[-1] + 0.75), (x[0], y[-1] + 0.75), arrowprops=dict(arrowstyle="<->"))
    ax.text((x[0] + x[1]) / 2, y[-1] + 0.85, "vx = 1.5 Å", ha="center", va="bottom", fontsize=8)
    i, j = 3, 2
    ax.plot(x[i], y[j], "s", color="C2", ms=10, mfc="none", mew=2)
    ax.annotate(f"density[k, j, i] = density[k, {j}, {i}] sits at\n"
                f"x = {grid.origin[0]:g} + {i}·{vx:g} = {x[i]:g} Å, y = {grid.origin[1]:g} + {j}·{vy:g} = {y[j]:g} Å",
                (x[i], y[j]), xytext=(30, 75), textcoords="offset points", fontsize=8, color="C2",
                arrowprops=dict(arrowstyle="->", color="C2"))
    ax.text(x[-1] + vx / 2 + 0.2, y[0] - vy / 2,
            "arrays: (nz, ny, nx), index [k, j, i]\npositions: (n, 3) in x, y, z\n"
            "voxel box: one voxel centred\non its grid point\n(what 'average' sampling integrates)",
            fontsize=8, va="bottom")
    ax.set_xlim(x[0] - vx, x[-1] + 4.3)
    ax.set_ylim(y[0] - 2.0, y[-1] + 2.2)
    ax.set_aspect("equal")
    ax.set_xlabel("x (Å)  — array axis 2 (i, fastest)")
    ax.set_ylabel("y (Å)  — array axis 1 (j)")
    ax.set_title("A z section of Grid(shape=(3, 4, 5), voxel_size=(1.5, 1, 1), origin=(2, -1, 0))", fontsize=9)
    save(fig, "grid_conventions.png")


# ---------------------------------------------------------------------------------------------
def three_maps(model, resolution: float, grid):
    return {
        "Gaussian mixture (blur B = 4 D²)": np.asarray(mm.render_model(model.atoms, grid, resolution, method="gaussian", sampling="point")),
        "Fourier map (|s| ≤ 1/D)": np.asarray(mm.render_model(model.atoms, grid, resolution, method="fourier", sampling="point")),
        "shell decomposition (K = 6)": np.asarray(mm.render_model(model.atoms, grid, resolution, method="shells", sampling="point")),
    }


def fig_demo() -> None:
    """Getting started: the demo helix's model map, projections and a section with the atoms."""
    model = helix()
    grid = mm.Grid.around_positions(model.atoms.positions, voxel_size=1.0, padding=5.0)
    rho = np.asarray(mm.render_model(model.atoms, grid, 3.0, method="gaussian", sampling="average"))
    pos = np.asarray(model.atoms.positions)
    x, y, z = grid.axes()
    fig, axes = plt.subplots(1, 3, layout="constrained", figsize=(10, 3.6))
    for ax, axis, (a, b), (la, lb), title in [
        (axes[0], 0, (x, y), ("x", "y"), "sum over z (projection)"),
        (axes[1], 1, (x, z), ("x", "z"), "sum over y (projection)"),
    ]:
        proj = rho.sum(axis=axis)
        ax.imshow(proj, origin="lower", cmap="gray_r", extent=[a[0] - .5, a[-1] + .5, b[0] - .5, b[-1] + .5])
        ax.plot(pos[:, "xyz".index(la)], pos[:, "xyz".index(lb)], ".", color="C3", ms=3)
        ax.set_xlabel(f"{la} (Å)"), ax.set_ylabel(f"{lb} (Å)"), ax.set_title(title, fontsize=9)
    k = int(np.argmax(rho.sum(axis=(1, 2))))
    im = axes[2].imshow(rho[k], origin="lower", cmap="viridis", extent=extent_xy(grid))
    near = np.abs(pos[:, 2] - z[k]) < 1.0
    axes[2].plot(pos[near, 0], pos[near, 1], "o", mfc="none", color="w", ms=6)
    axes[2].set_xlabel("x (Å)"), axes[2].set_ylabel("y (Å)")
    axes[2].set_title(f"section z = {z[k]:.0f} Å (○: atoms within 1 Å)", fontsize=9)
    fig.colorbar(im, ax=axes[2], label="Å⁻²", shrink=0.8)
    fig.suptitle("modelmap demo: ideal α-helix (59 atoms, B = 20 Å²), Gaussian model map at 3 Å, 1 Å voxels", fontsize=10)
    save(fig, "demo_map.png")


def fig_volumes() -> None:
    """The three volumes on the helix at 3 Å: sections and differences."""
    model = helix()
    grid = mm.Grid.around_positions(model.atoms.positions, voxel_size=0.5, padding=6.0)
    maps = three_maps(model, 3.0, grid)
    k = grid.shape[0] // 2
    vmax = max(float(m[k].max()) for m in maps.values())
    fig, axes = plt.subplots(2, 3, layout="constrained", figsize=(10, 6.4))
    for ax, (name, m) in zip(axes[0], maps.items()):
        im = ax.imshow(m[k], origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax, extent=extent_xy(grid))
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[0][2], label="Å⁻²", shrink=0.9)
    ref = maps["Fourier map (|s| ≤ 1/D)"]
    diffs = {
        "Gaussian − Fourier": maps["Gaussian mixture (blur B = 4 D²)"] - ref,
        "shells − Fourier": maps["shell decomposition (K = 6)"] - ref,
    }
    lim = max(float(np.abs(d[k]).max()) for d in diffs.values())
    for ax, (name, d) in zip(axes[1], diffs.items()):
        im2 = ax.imshow(d[k], origin="lower", cmap="PuOr_r", vmin=-lim, vmax=lim, extent=extent_xy(grid))
        cc = np.corrcoef(ref.ravel(), (d + ref).ravel())[0, 1]
        ax.set_title(f"{name}\n(whole-box CC with Fourier {cc:.4f})", fontsize=9)
    fig.colorbar(im2, ax=axes[1][1], label="Å⁻²", shrink=0.9)
    ax = axes[1][2]
    line = {n: m[k, grid.shape[1] // 2] for n, m in maps.items()}
    xs = grid.axes()[0]
    for n, v in line.items():
        ax.plot(xs, v, label=n.split(" (")[0])
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("x (Å)"), ax.set_ylabel("Å⁻²"), ax.legend(fontsize=7)
    ax.set_title("one line through the section", fontsize=9)
    for a in list(axes[0]) + list(axes[1][:2]):
        a.set_xlabel("x (Å)"), a.set_ylabel("y (Å)")
    fig.suptitle(f"The helix at D = 3 Å, section z = {grid.axes()[2][k]:.1f} Å, point samples on a 0.5 Å grid", fontsize=10)
    save(fig, "three_volumes.png")


def shell_profile(z: int, r: np.ndarray, resolution: float, b_factor: float, n_terms: int) -> tuple[np.ndarray, list]:
    """One atom's shell-decomposition image and its terms, from the volume's own parameters."""
    from modelmap.shells._omega import omega

    atoms = mm.Atoms(np.zeros((1, 3), np.float32), np.array([z]), np.array([b_factor], np.float32), np.ones(1, np.float32))
    vol = mm.ShellDecompositionVolume.from_atoms(atoms, resolution, n_terms=n_terms)
    radii, widths, amps = (np.asarray(p, np.float64)[0] for p in vol.shell_parameters())
    terms = [a * omega(r, R, B, xp=np) for R, B, a in zip(radii, widths, amps)]
    return np.sum(terms, axis=0), [(R, B, a, t) for R, B, a, t in zip(radii, widths, amps, terms)]


def gaussian_profile(z: int, r: np.ndarray, resolution: float, b_factor: float) -> np.ndarray:
    atoms = mm.Atoms(np.zeros((1, 3), np.float32), np.array([z]), np.array([b_factor], np.float32), np.ones(1, np.float32))
    vol = mm.GaussianMixtureVolume.from_atoms(atoms, resolution)
    a = np.asarray(vol.gaussian_amplitudes(), np.float64)[0]
    v = np.asarray(vol.gaussian_variances(), np.float64)[0]
    return np.sum(a[:, None] * (2 * np.pi * v[:, None]) ** -1.5 * np.exp(-r[None] ** 2 / (2 * v[:, None])), axis=0)


def fig_profiles() -> None:
    """Radial profiles of one carbon atom: Fourier (exact), Gaussian blur, shells; several D."""
    r = np.linspace(0, 12, 1201)
    fig, axes = plt.subplots(1, 3, layout="constrained", figsize=(11, 3.6))
    b = 20.0
    d = 3.0
    exact = mm.scattering.atomic_image(CARBON, r, d, b)
    gauss = gaussian_profile(CARBON, r, d, b)
    shells, _ = shell_profile(CARBON, r, d, b, 6)
    ax = axes[0]
    ax.plot(r, exact, "k", lw=2, label="Fourier map (exact image)")
    ax.plot(r, shells, "C1--", label="shells, K = 6")
    ax.plot(r, gauss, "C0", label="Gaussian, B + 4 D²")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlim(0, 8), ax.set_xlabel("r (Å)"), ax.set_ylabel("ρ(r) (Å⁻²)")
    ax.set_title(f"carbon, D = {d:g} Å, B = {b:g} Å²", fontsize=9), ax.legend(fontsize=8)
    ax = axes[1]
    ax.semilogy(r, np.abs(exact) / exact[0], "k", lw=2, label="Fourier |ρ|/ρ(0)")
    ax.semilogy(r, np.abs(shells) / exact[0], "C1--", label="shells, K = 6")
    ax.semilogy(r, gauss / gauss[0], "C0", label="Gaussian")
    ax.set_ylim(1e-5, 1.5), ax.set_xlim(0, 12), ax.set_xlabel("r (Å)")
    ax.set_title("|ρ| on a log scale: ripples fall as 1/r²", fontsize=9), ax.legend(fontsize=8)
    ax = axes[2]
    for i, dd in enumerate((2.0, 3.0, 4.0, 6.0)):
        e = mm.scattering.atomic_image(CARBON, r, dd, 0.0)
        g = gaussian_profile(CARBON, r, dd, 0.0)
        ax.plot(r / dd, e / e[0], color=f"C{i}", label=f"D = {dd:g} Å Fourier")
        ax.plot(r / dd, g / g[0], color=f"C{i}", ls=":", lw=1)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlim(0, 3), ax.set_ylim(-0.15, 1.05), ax.set_xlabel("r / D"), ax.set_ylabel("ρ / ρ(0)")
    ax.set_title("B = 0; dotted: Gaussian blur 4 D²", fontsize=9), ax.legend(fontsize=7)
    save(fig, "radial_profiles.png")


def fig_shells() -> None:
    """The shell decomposition of one carbon image: terms and their sum."""
    r = np.linspace(0, 14, 1401)
    d, b = 3.0, 0.0
    exact = mm.scattering.atomic_image(CARBON, r, d, b)
    fig, axes = plt.subplots(1, 2, layout="constrained", figsize=(10, 3.8))
    ax = axes[0]
    total, terms = shell_profile(CARBON, r, d, b, 6)
    for m, (R, B, a, t) in enumerate(terms):
        ax.plot(r, t, lw=1, label=f"m = {m}: R = {R:.2f} Å, B = {B:.1f} Å²")
    ax.plot(r, exact, "k", lw=2, label="exact image")
    ax.plot(r, total, "r--", lw=1.5, label="sum of the 6 terms")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlim(0, 12), ax.set_ylim(-0.06, 0.33)
    ax.set_xlabel("r (Å)"), ax.set_ylabel("ρ (Å⁻²)")
    ax.set_title(f"carbon at D = {d:g} Å, B = 0: the terms C_m Ω(r; R_m, B_m)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, k in enumerate((3, 6, 12, 16)):
        total, _ = shell_profile(CARBON, r, d, b, k)
        ax.plot(r, (total - exact) / exact[0], color=f"C{i}", label=f"K = {k}: max {np.abs(total - exact).max() / exact[0]:.2%}")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlim(0, 14), ax.set_xlabel("r (Å)"), ax.set_ylabel("(shells − exact) / ρ(0)")
    ax.set_title("truncation error: dropping the ripples beyond R ≈ (K/2)·D", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "shell_terms.png")


def fig_local_resolution() -> None:
    """Per-atom resolution: one helix, residues 1-8 at 2.5 Å, 9-16 at 4 Å, 17-24 at 6 Å."""
    model = helix("AAAAGAAAAAAA" * 2)
    res_number = np.asarray(model.labels.residue_number)
    d = np.where(res_number <= 8, 2.5, np.where(res_number <= 16, 4.0, 6.0)).astype(np.float32)
    grid = mm.Grid.around_positions(model.atoms.positions, voxel_size=0.7, padding=6.0)
    local = np.asarray(mm.render_model(model.atoms, grid, d, method="shells", sampling="point"))
    uniform = np.asarray(mm.render_model(model.atoms, grid, 4.0, method="shells", sampling="point"))
    x, y, z = grid.axes()
    fig, axes = plt.subplots(1, 3, layout="constrained", figsize=(10.5, 4.6), gridspec_kw=dict(width_ratios=[1, 1, 1.1]))
    for ax, m, title in [(axes[0], uniform, "every atom at 4 Å"), (axes[1], local, "per-atom D: 2.5 / 4 / 6 Å")]:
        proj = m.sum(axis=1)  # (nz, nx): a projection along y
        ax.imshow(proj, origin="lower", cmap="gray_r", extent=[x[0], x[-1], z[0], z[-1]])
        ax.set_xlabel("x (Å)"), ax.set_ylabel("z (Å)  (helix axis)"), ax.set_title(title + ", sum over y", fontsize=9)
    pos = np.asarray(model.atoms.positions)
    sc = axes[2].scatter(res_number, pos[:, 2], c=d, cmap="viridis_r", s=12)
    axes[2].set_xlabel("residue"), axes[2].set_ylabel("z (Å)"), axes[2].set_title("atoms coloured by D", fontsize=9)
    fig.colorbar(sc, ax=axes[2], label="D (Å)")
    save(fig, "local_resolution.png")


def fig_score_refine() -> None:
    """Getting started: score a perturbed helix against a synthetic map, refine it, plot both."""
    from modelmap.refine import refine

    truth = helix("AAAAGAAAAAAA" * 2)
    n = truth.atoms.positions.shape[0]
    rng = np.random.default_rng(0)
    b_true = np.linspace(15.0, 80.0, n)
    truth = with_atoms(truth, b_factors=b_true)
    grid = mm.Grid.around_positions(truth.atoms.positions, voxel_size=1.0, padding=5.0)
    target = mm.DensityMap(mm.render_model(truth.atoms, grid, 3.0, method="fourier", sampling="point"), grid)
    start = with_atoms(truth, positions=np.asarray(truth.atoms.positions) + rng.normal(0, 0.3, (n, 3)),
                       b_factors=np.full(n, 40.0))
    before = mm.score_model(target, start, 3.0)
    result = refine(start, target, 3.0, parameters=("xyz", "b"), max_steps=60, progress=False)
    after = mm.score_model(target, result.model, 3.0)

    fig, axes = plt.subplots(1, 3, layout="constrained", figsize=(11, 3.4))
    for rep, label in [(before, "start"), (after, "refined")]:
        q = rep.q.per_residue()
        axes[0].plot([k[1] for k in q], [v.residue for v in q.values()], "o-", ms=3, label=f"Q, {label}")
        axes[0].plot([r.residue_number for r in rep.local.residues], [r.cc for r in rep.local.residues],
                     "s--", ms=3, label=f"local CC, {label}")
    axes[0].axhline(before.expected_q, color="0.5", ls=":", label="MapQ expected Q at 3 Å")
    axes[0].set_xlabel("residue"), axes[0].set_ylabel("score"), axes[0].set_ylim(0.45, 1.02)
    axes[0].legend(fontsize=7, ncol=2, loc="lower center")
    axes[0].set_title("per residue (modelmap score --json)", fontsize=9)
    axes[1].plot(before.fsc_s, before.fsc_values, label="start")
    axes[1].plot(after.fsc_s, after.fsc_values, label="refined")
    for t in (0.5, 0.143):
        axes[1].axhline(t, color="0.6", lw=0.8, ls=":")
    axes[1].axvline(1 / 3.0, color="0.6", lw=0.8)
    axes[1].set_xlabel("s (Å⁻¹)"), axes[1].set_ylabel("FSC"), axes[1].set_ylim(-0.1, 1.02)
    axes[1].set_title("map–model FSC (the map stops at 1/D)", fontsize=9), axes[1].legend(fontsize=8)
    h = result.history
    ax = axes[2]
    ax.semilogy(h["step"], h["map_loss"], label="map loss")
    ax.set_xlabel("step"), ax.set_ylabel("map loss")
    ax2 = ax.twinx()
    ax2.plot(h["step"], h["bond_rmsd"], "C1", label="bond rmsd (Å)")
    ax2.set_ylabel("bond rmsd (Å)", color="C1")
    ax.set_title("refine --refine xyz,b: history", fontsize=9)
    save(fig, "score_refine.png")
    print("score before:", {k: round(v, 3) for k, v in before.summary().items() if isinstance(v, float)})
    print("score after:", {k: round(v, 3) for k, v in after.summary().items() if isinstance(v, float)})
    print("refine:", result.summary())


def _newest_batch_run(results: Path) -> Path | None:
    """The newest `bench_batch_cpu*.json` (by its `created` time) of those that ran the most methods."""
    runs = []
    for path in results.glob("bench_batch_cpu*.json"):
        d = json.loads(path.read_text())
        runs.append((len(d.get("modelmap", {})), d.get("created", ""), path))
    return max(runs)[2] if runs else None


def fig_benchmarks(results: Path) -> None:
    """Batch throughput (maps/s) against batch size, from bench_batch.py's newest full run."""
    path = _newest_batch_run(results)
    if path is None:
        print(f"no bench_batch_cpu*.json in {results}: benchmark figure left as it is")
        return
    print(f"bench_batch.png from {path}")
    d = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 2, layout="constrained", figsize=(10, 3.6), sharey=True)
    for ax, what in zip(axes, ("forward", "value_and_grad")):
        for i, (method, res) in enumerate(d["modelmap"].items()):
            sizes, rate = [], []
            for b, v in res["batches"].items():
                if v[what]["status"] == "ok":
                    sizes.append(int(b)), rate.append(v[what]["maps_per_s"])
            ax.plot(sizes, rate, "o-", color=f"C{i}", label=f"modelmap {method} (D = {res['resolution']:g} Å)")
        if what == "forward":
            g = d["gemmi"]["batches"]
            ax.plot([int(b) for b in g], [v["maps_per_s"] for v in g.values()], "ks--", label="gemmi loop (1 core)")
        cj = [(int(b), row[what]["maps_per_s"]) for b, row in d.get("cryojax", {}).get("results", {}).items()
              if row.get(what, {}).get("status") == "ok"]
        if cj:
            ax.plot(*zip(*cj), "^:", color="0.4", label="cryoJAX 0.6 (vmapped)")
        ax.set_xscale("log", base=2), ax.set_yscale("log")
        ax.set_xlabel("structures per batch"), ax.set_title(what, fontsize=9)
    axes[0].set_ylabel("maps / s"), axes[0].legend(fontsize=7)
    dev = d["device"]
    fig.suptitle(f"bench_batch.py: 300-3,000-atom regions of 7CEC into 64³ boxes of 1.5 Å; "
                 f"{dev['cpu']} {dev['cpu_count']} CPUs, {d['created'][:10]}, git {d['versions']['modelmap_git']}", fontsize=9)
    save(fig, "bench_batch.png")


FIGURES = {
    "grid": fig_grid,
    "demo": fig_demo,
    "volumes": fig_volumes,
    "profiles": fig_profiles,
    "shells": fig_shells,
    "local": fig_local_resolution,
    "score": fig_score_refine,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"figures to draw (default all): {', '.join(FIGURES)}, bench")
    parser.add_argument("--bench-results", type=Path, default=HERE.parent.parent / "benchmarks" / "results")
    args = parser.parse_args()
    names = args.names or [*FIGURES, "bench"]
    for name in names:
        if name == "bench":
            fig_benchmarks(args.bench_results)
        else:
            FIGURES[name]()


if __name__ == "__main__":
    main()
