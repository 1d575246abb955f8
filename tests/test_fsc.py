"""Fourier shell correlation: definition against a direct numpy reference, known cases, resolution
at a threshold, refusal of mismatched grids."""

from __future__ import annotations

import numpy as np
import pytest

import modelmap as mm
from modelmap.scores import fsc, fsc_resolution, shell_indices


def reference_fsc(a, b, voxel):
    """Full complex FFT, every coefficient visited in a plain loop over shells (no rfft, no weights)."""
    nz, ny, nx = a.shape
    vx, vy, vz = voxel
    ds = 1 / max(nx * vx, ny * vy, nz * vz)
    k_max = int(np.floor(0.5 / max(voxel) / ds + 1e-9))
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    s = np.sqrt(np.fft.fftfreq(nz, vz)[:, None, None] ** 2 + np.fft.fftfreq(ny, vy)[None, :, None] ** 2
                + np.fft.fftfreq(nx, vx)[None, None, :] ** 2)
    out = []
    for k in range(k_max + 1):
        r = s / ds  # shell k = [k - 1/2, k + 1/2) in units of ds; boundaries go up
        sel = (r >= k - 0.5 - 1e-9) & (r < k + 0.5 - 1e-9)
        num = np.sum(fa[sel] * np.conj(fb[sel])).real
        den = np.sqrt(np.sum(np.abs(fa[sel]) ** 2) * np.sum(np.abs(fb[sel]) ** 2))
        out.append(num / den)
    return np.arange(k_max + 1) * ds, np.array(out)


def _low_pass(a, voxel, s_cut):
    vx, vy, vz = voxel
    nz, ny, nx = a.shape
    s = np.sqrt(np.fft.fftfreq(nz, vz)[:, None, None] ** 2 + np.fft.fftfreq(ny, vy)[None, :, None] ** 2
                + np.fft.rfftfreq(nx, vx)[None, None, :] ** 2)
    return np.fft.irfftn(np.fft.rfftn(a) * (s <= s_cut), s=a.shape, axes=(0, 1, 2))


@pytest.mark.parametrize("shape, voxel", [((24, 24, 24), (1.0, 1.0, 1.0)),
                                          ((21, 26, 30), (0.9, 1.1, 1.3))])
def test_fsc_equals_direct_numpy_reference(shape, voxel):
    rng = np.random.default_rng(0)
    a = rng.normal(size=shape)
    b = _low_pass(a, voxel, 0.2) + 0.7 * rng.normal(size=shape)
    grid = mm.Grid(shape, voxel, (3.0, -2.0, 7.5))
    s, f = fsc(mm.DensityMap(a, grid), mm.DensityMap(b, grid))
    s_ref, f_ref = reference_fsc(a, b, voxel)
    np.testing.assert_allclose(s, s_ref, rtol=1e-12)
    np.testing.assert_allclose(f, f_ref, atol=1e-10)
    assert s[1] == pytest.approx(1 / max(n * v for n, v in zip(shape[::-1], voxel)))


def test_identical_maps_give_one_in_every_shell():
    rng = np.random.default_rng(1)
    grid = mm.Grid((20, 22, 24), 1.2)
    a = rng.normal(size=grid.shape)
    s, f = fsc(mm.DensityMap(a, grid), mm.DensityMap(a, grid))
    np.testing.assert_allclose(f, 1.0, atol=1e-12)
    assert s[-1] <= 0.5 / 1.2 + 1e-12 and len(s) == 13  # shells up to Nyquist, step 1/(24·1.2)
    _, f = fsc(mm.DensityMap(a, grid), mm.DensityMap(3.0 * a + 2.0, grid))
    np.testing.assert_allclose(f[1:], 1.0, atol=1e-12)  # scale and offset (DC only) do not matter
    _, f = fsc(mm.DensityMap(a, grid), mm.DensityMap(-a, grid))
    np.testing.assert_allclose(f, -1.0, atol=1e-12)


def test_signal_plus_independent_noise_gives_snr_over_one_plus_snr():
    """Half maps = signal + independent white noise: FSC = σ_s²/(σ_s² + σ_n²) in every shell."""
    rng = np.random.default_rng(2)
    grid = mm.Grid((48, 48, 48), 1.0)
    signal = rng.normal(size=grid.shape)
    for noise_sd, expected in ((1.0, 0.5), (0.5, 0.8)):
        h1 = signal + noise_sd * rng.normal(size=grid.shape)
        h2 = signal + noise_sd * rng.normal(size=grid.shape)
        s, f = fsc(mm.DensityMap(h1, grid), mm.DensityMap(h2, grid))
        k, w, _ = shell_indices(grid)
        n_coeff = np.bincount(k[k >= 0], w[k >= 0])
        sd = (1 - expected**2) / np.sqrt(n_coeff[3:])  # sampling sd of a correlation
        assert np.all(np.abs(f[3:] - expected) < 5 * sd), (noise_sd, f)
        assert abs(np.mean(f[3:]) - expected) < 0.01


def test_low_pass_filtered_copy_crosses_one_half_at_the_cutoff():
    rng = np.random.default_rng(3)
    voxel = (1.0, 1.0, 1.0)
    grid = mm.Grid((48, 48, 48), voxel)
    a = rng.normal(size=grid.shape)
    for s_cut in (0.125, 0.25, 0.3):
        b = _low_pass(a, voxel, s_cut)
        s, f = fsc(mm.DensityMap(a, grid), mm.DensityMap(b, grid))
        assert np.all(f[s < s_cut - 1 / 48] > 0.999) and np.all(np.abs(f[s > s_cut + 1 / 48]) < 1e-9)
        d05 = fsc_resolution(s, f, 0.5)
        assert abs(1 / d05 - s_cut) <= 0.5 / 48, (s_cut, 1 / d05)  # within half a shell
        assert fsc_resolution(s, f, 0.143) < d05


def test_mask_is_applied_to_both_maps():
    rng = np.random.default_rng(4)
    grid = mm.Grid((16, 18, 20), 1.0)
    a, b = rng.normal(size=(2,) + grid.shape)
    mask = np.zeros(grid.shape)
    mask[4:12, 5:13, 6:14] = 1.0
    s, f = fsc(mm.DensityMap(a, grid), mm.DensityMap(b, grid), mask=mask)
    _, ref = reference_fsc(a * mask, b * mask, grid.voxel_size)
    np.testing.assert_allclose(f, ref, atol=1e-10)
    _, f_arrays = fsc(a, b, mask=mask.astype(bool), grid=grid)
    np.testing.assert_allclose(f_arrays, ref, atol=1e-10)


def test_fsc_resolution_interpolates_linearly_at_the_first_crossing():
    s = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    f = np.array([1.0, 0.9, 0.6, 0.4, 0.55, 0.1])  # dips below 0.5 at 0.3, comes back at 0.4
    assert fsc_resolution(s, f, 0.5) == pytest.approx(1 / 0.25)
    assert fsc_resolution(s, f, 0.143) == pytest.approx(1 / (0.4 + 0.1 * (0.55 - 0.143) / 0.45))
    assert fsc_resolution(s, np.ones(6), 0.143) == pytest.approx(1 / 0.5)  # never crosses: Nyquist
    assert fsc_resolution(s, np.array([1.0, 0.1, 0, 0, 0, 0]), 0.5) == np.inf
    with pytest.raises(ValueError, match="increasing"):
        fsc_resolution(s[::-1], f, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        fsc_resolution(s, f, 1.5)


def test_fsc_refuses_maps_on_different_grids():
    rng = np.random.default_rng(5)
    g = mm.Grid((10, 10, 10), 1.0)
    a = rng.normal(size=g.shape)
    with pytest.raises(mm.ModelmapError, match="same grid"):
        fsc(mm.DensityMap(a, g), mm.DensityMap(a, mm.Grid((10, 10, 10), 1.1)))
    with pytest.raises(mm.ModelmapError, match="same grid"):
        fsc(mm.DensityMap(a, g), mm.DensityMap(a, mm.Grid((10, 10, 10), 1.0, (0.5, 0, 0))))
    with pytest.raises(mm.ModelmapError, match="same grid"):
        fsc(mm.DensityMap(a, g), mm.DensityMap(a[:, :, :9], mm.Grid((10, 10, 9), 1.0)))
    with pytest.raises(ValueError, match="grid"):
        fsc(a, a)
    bad = a.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(mm.ModelmapError, match="NaN"):
        fsc(mm.DensityMap(a, g), mm.DensityMap(bad, g))
    with pytest.raises(mm.ModelmapError, match="mask"):
        fsc(mm.DensityMap(a, g), mm.DensityMap(a, g), mask=np.zeros(g.shape))
