"""IndependentAtomVolume + NufftRenderFn: the exact Fourier map, against independent references."""

import sys

import equinox as eqx
import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import modelmap as mm

from ._reference import assert_gradients_match_central_differences, cc, scattering_factor
from modelmap.scattering import atomic_image

pytest.importorskip("jax_finufft", reason="jax-finufft (the 'nufft' extra) is not installed")


# -- exact atomic images (spec §3.1) ----------------------------------------------------------------

@pytest.mark.parametrize(
    "z, values",
    [
        (6, {1: 3.13591, 2: 0.812519, 3: 0.304235, 4: 0.141754, 6: 0.0454365}),
        (1, {1: 0.67087, 2: 0.17283, 3: 0.06459, 4: 0.03004, 6: 0.00960}),
        (8, {1: 3.56725, 2: 0.76904, 3: 0.26560, 4: 0.11912, 6: 0.03698}),
        (26, {1: 8.84776, 2: 2.02501, 3: 0.77495, 4: 0.37255, 6: 0.12406}),
    ],
)
def test_exact_image_peak_heights_match_the_spec(z, values):
    for d, expected in values.items():
        # the spec prints 5-6 significant digits
        assert atomic_image(z, 0.0, d) == pytest.approx(expected, rel=6e-6, abs=5e-6)


def test_exact_image_integrates_to_f0_and_matches_its_limit():
    r = np.linspace(1e-6, 60.0, 60001)
    rho = atomic_image(6, r, 3.0, 20.0)
    # ∫ρ d³r = f(0): the truncated integrand decays as 1/r², so integrate with a generous range
    total = np.trapezoid(4 * np.pi * r**2 * rho, r)
    assert total == pytest.approx(float(scattering_factor(6, 0.0)), rel=2e-2)
    assert atomic_image(6, 1e-7, 3.0) == pytest.approx(atomic_image(6, 0.0, 3.0), rel=1e-9)


# -- the renderer ----------------------------------------------------------------------------------

def _direct_synthesis(render_fn, pos, z, b, occ, table="electron"):
    """Explicit Fourier sum over the same periodic (padded) box, numpy float64 (also when JAX is in
    float32)."""
    grid = render_fn.grid
    d = render_fn.resolution_range[0]
    (nz, ny, nx), (pz, py, px) = render_fn.padded_shape()
    vx, vy, vz = grid.voxel_size
    o = np.asarray(grid.origin) - np.array([px * vx, py * vy, pz * vz])
    period = np.array([nx * vx, ny * vy, nz * vz])
    axes = [np.arange(-(n // 2), n - n // 2) / p for n, p in zip((nx, ny, nz), period)]
    s = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    s2 = np.sum(s**2, axis=1)
    keep = s2 <= (1 + 1e-12) / d**2
    s, s2 = s[keep], s2[keep]
    f_total = np.zeros(len(s), complex)
    for j in range(len(z)):
        f = scattering_factor(int(z[j]), np.sqrt(s2), table)
        f_total += occ[j] * f * np.exp(-b[j] * s2 / 4) * np.exp(-2j * np.pi * s @ (pos[j] - o))
    pts = grid.coordinates().reshape(-1, 3) - o
    rho = (np.exp(2j * np.pi * pts @ s.T) @ f_total).real / period.prod()
    return rho.reshape(grid.shape)


@pytest.mark.x64
@pytest.mark.parametrize("table", ["electron", "xray"])
def test_equals_direct_fourier_synthesis(table):
    rng = np.random.default_rng(0)
    pos = rng.uniform(3, 9, (5, 3))
    z = np.array([6, 8, 16, 7, 26])
    b = np.array([5.0, 20.0, 40.0, 80.0, 150.0])
    occ = np.array([1.0, 0.7, 0.5, 1.0, 0.3])
    atoms = mm.Atoms(jnp.asarray(pos), z, jnp.asarray(b), jnp.asarray(occ))
    grid = mm.Grid((12, 13, 14), (0.8, 1.0, 0.9), (0.0, 0.5, 1.0))
    vol = mm.IndependentAtomVolume.from_atoms(atoms, 2.7, mm.get_table(table, dtype=jnp.float64))
    render_fn = mm.NufftRenderFn(grid, eps=1e-10, padding=6.0)
    ours = np.asarray(render_fn(vol))
    ref = _direct_synthesis(render_fn.with_plan(vol), pos, z, b, occ, table)
    assert np.max(np.abs(ours - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_float32_default_accuracy():
    rng = np.random.default_rng(1)
    pos = rng.uniform(3, 9, (6, 3))
    z, b, occ = np.array([6, 7, 8, 6, 16, 8]), rng.uniform(10, 90, 6), np.ones(6)
    grid = mm.Grid((12, 12, 12), 1.0)
    atoms32 = mm.Atoms(jnp.asarray(pos, jnp.float32), z, jnp.asarray(b, jnp.float32), jnp.asarray(occ, jnp.float32))
    render_fn = mm.NufftRenderFn(grid)
    ours = np.asarray(render_fn(mm.IndependentAtomVolume.from_atoms(atoms32, 3.0)))
    assert ours.dtype == np.float32
    ref = _direct_synthesis(render_fn.with_plan(mm.IndependentAtomVolume.from_atoms(atoms32, 3.0)), pos, z, b, occ)
    assert np.max(np.abs(ours - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.x64
def test_one_atom_radial_profile_is_the_exact_image():
    d, b = 3.0, 0.0
    grid = mm.Grid((48, 48, 48), 1.0, (-24.0, -24.0, -24.0))
    atoms = mm.Atoms(jnp.zeros((1, 3), jnp.float64), [6], jnp.asarray([b]), jnp.ones(1))
    render_fn = mm.NufftRenderFn(grid, eps=1e-10, padding=60.0)
    rho = np.asarray(render_fn(mm.IndependentAtomVolume.from_atoms(atoms, d, mm.get_table("electron", jnp.float64))))
    r = np.linalg.norm(grid.coordinates(), axis=-1)
    exact = atomic_image(6, r, d, b)
    assert rho[24, 24, 24] == pytest.approx(0.304235, rel=1e-3)  # spec §3.1, C at 3 Å
    # left over: the periodic images of the atom in the padded box (ripples ~ (r/D)^-2)
    near = r <= 15.0
    assert np.max(np.abs(rho - exact)[near]) <= 1e-3 * exact.max()
    # the first ripple is there: a negative minimum near r = 0.93 D (spec §3.1)
    line = rho[24, 24, 24:]
    assert np.argmin(line[:6]) == 3 and line[3] < 0


@pytest.mark.x64
def test_average_sampling_is_the_voxel_mean():
    grid = mm.Grid((16, 16, 16), 1.0, (-8.0, -8.0, -8.0))
    atoms = mm.Atoms(jnp.asarray([[0.2, -0.3, 0.1]], jnp.float64), [8], jnp.asarray([30.0]), jnp.ones(1))
    vol = mm.IndependentAtomVolume.from_atoms(atoms, 3.0, mm.get_table("electron", jnp.float64))
    # padding 21 Å makes both boxes 60 Å periodic, so both maps are the same periodic function
    avg = np.asarray(mm.NufftRenderFn(grid, sampling="average", eps=1e-10, padding=21.0)(vol))
    # mean over each voxel box of the point map on an 8x finer grid (Simpson's rule on each axis)
    fine = mm.Grid((129, 129, 129), 0.125, (-8.5, -8.5, -8.5))
    rho = np.asarray(mm.NufftRenderFn(fine, eps=1e-10, padding=21.0)(vol))
    w = np.array([1, 4, 2, 4, 2, 4, 2, 4, 1]) / 24
    box = np.einsum("i,j,k,abcijk->abc", w, w, w,
                    np.lib.stride_tricks.sliding_window_view(rho, (9, 9, 9))[::8, ::8, ::8])
    # Simpson's error at 0.125 Å steps on a 3 Å map is ~1e-5 of the peak
    assert np.max(np.abs(avg - box)) <= 1e-4 * np.max(np.abs(box))


def _gemmi_fourier_route(structure, render_fn, blur):
    """gemmi's route on the same padded box: DensityCalculatorE with blur, FFT, cut at D,
    un-blur, inverse FFT."""
    grid = render_fn.grid
    (nz, ny, nx), (pz, py, px) = render_fn.padded_shape()
    vx, vy, vz = grid.voxel_size
    o = np.asarray(grid.origin) - np.array([px * vx, py * vy, pz * vz])
    st = structure.clone()
    for model in st:
        for chain in model:
            for res in chain:
                for atom in res:
                    atom.pos = gemmi.Position(atom.pos.x - o[0], atom.pos.y - o[1], atom.pos.z - o[2])
    dc = gemmi.DensityCalculatorE()
    dc.grid.unit_cell = gemmi.UnitCell(nx * vx, ny * vy, nz * vz, 90, 90, 90)
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(nx, ny, nz)
    dc.blur = blur
    dc.cutoff = 1e-7
    dc.put_model_density_on_grid(st[0])
    arr = np.transpose(np.array(dc.grid, copy=False), (2, 1, 0)).astype(np.float64)  # (z, y, x)
    f = np.fft.rfftn(arr)
    sz = np.fft.fftfreq(nz, vz)[:, None, None]
    sy = np.fft.fftfreq(ny, vy)[None, :, None]
    sx = np.fft.rfftfreq(nx, vx)[None, None, :]
    s2 = sz**2 + sy**2 + sx**2
    d = render_fn.resolution_range[0]
    f *= np.exp(blur * s2 / 4) * (s2 <= (1 + 1e-12) / d**2)
    rho = np.fft.irfftn(f, s=(nz, ny, nx), axes=(0, 1, 2))
    gz, gy, gx = grid.shape
    return rho[pz : pz + gz, py : py + gy, px : px + gx]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_file, map_file, d, blur",
    [
        ("emd20026_apoferritin/3ajo_fitted_refined.pdb", "emd20026_apoferritin/emd20026_prot.mrc.gz", 1.75, 90.0),
        ("emd30342_7cec/390_7cec_A.cif.gz", "emd30342_7cec/390_emd_30342_A_z4.mrc.gz", 3.9, 30.0),
    ],
)
def test_agrees_with_gemmi_fft_route_on_real_maps(shared_data, model_file, map_file, d, blur):
    model = mm.read_model(shared_data / model_file)
    grid = mm.read_map(shared_data / map_file).grid
    volume = mm.IndependentAtomVolume.from_atoms(model.atoms, d)
    render_fn = mm.NufftRenderFn(grid).with_plan(volume)
    ours = np.asarray(render_fn(volume), np.float64)
    theirs = _gemmi_fourier_route(model.structure, render_fn, blur)
    cc = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    rel = np.max(np.abs(ours - theirs)) / np.max(theirs)
    assert cc >= 0.999 and rel <= 1e-3, (cc, rel)


@pytest.mark.x64
def test_gradients_equal_float64_central_differences():
    rng = np.random.default_rng(3)
    n = 6
    pos = rng.uniform(3, 8, (n, 3))
    atoms = mm.Atoms(jnp.asarray(pos), [6, 7, 8, 6, 16, 8], jnp.asarray(rng.uniform(10, 60, n)),
                     jnp.asarray(rng.uniform(0.5, 1.0, n)))
    table = mm.get_table("electron", dtype=jnp.float64)
    grid = mm.Grid((12, 12, 12), 0.9)
    render_fn = mm.NufftRenderFn(grid, eps=1e-12, padding=5.0).with_plan(
        mm.IndependentAtomVolume.from_atoms(atoms, 2.5, table), b_margin=1.0)
    shifted = eqx.tree_at(lambda a: a.positions, atoms, atoms.positions + rng.normal(0, 0.4, (n, 3)))
    target = render_fn(mm.IndependentAtomVolume.from_atoms(shifted, 2.5, table))

    def loss(a):
        return -cc(render_fn(mm.IndependentAtomVolume.from_atoms(a, 2.5, table)), target)

    assert_gradients_match_central_differences(
        loss,
        atoms,
        {"positions": [(0, 0), (2, 1), (5, 2)], "b_factors": [(1,), (4,)],
         "occupancies": [(0,), (3,)]},
    )


def test_b_outside_the_planned_range_is_an_error():
    atoms = mm.Atoms(jnp.asarray([[4.0, 4, 4]]), [6], jnp.asarray([20.0]), jnp.ones(1))
    render_fn = mm.NufftRenderFn(mm.Grid((8, 8, 8), 1.0)).with_plan(
        mm.IndependentAtomVolume.from_atoms(atoms, 3.0), b_margin=5.0)
    hot = eqx.tree_at(lambda a: a.b_factors, atoms, atoms.b_factors + 60.0)
    with pytest.raises(Exception, match="left the range"):
        render_fn(mm.IndependentAtomVolume.from_atoms(hot, 3.0)).block_until_ready()
    # a finer resolution than planned needs more frequencies: an error, not a wrong map
    with pytest.raises(Exception, match="finer than"):
        render_fn(mm.IndependentAtomVolume.from_atoms(atoms, 2.5)).block_until_ready()


def test_resolution_finer_than_nyquist_is_refused():
    atoms = mm.Atoms(jnp.asarray([[4.0, 4, 4]]), [6], jnp.asarray([20.0]), jnp.ones(1))
    with pytest.raises(ValueError, match="Nyquist"):
        mm.NufftRenderFn(mm.Grid((8, 8, 8), 1.0))(mm.IndependentAtomVolume.from_atoms(atoms, 1.5))


def test_missing_jax_finufft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_finufft", None)
    atoms = mm.Atoms(jnp.asarray([[4.0, 4, 4]]), [6], jnp.asarray([20.0]), jnp.ones(1))
    with pytest.raises(ImportError, match=r"pip install jax-finufft"):
        mm.NufftRenderFn(mm.Grid((8, 8, 8), 1.0, (0.1, 0.0, 0.0)))(mm.IndependentAtomVolume.from_atoms(atoms, 3.0))
