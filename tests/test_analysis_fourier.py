"""The FFT building blocks of modelmap.analysis against direct (loop / numpy) references."""

import numpy as np
import pytest

from modelmap import Grid
from modelmap.analysis import (
    b_factor_filter,
    bandpass,
    local_correlation,
    local_mean,
    lowpass,
    radial_average,
    window_transfer,
)


def _direct_window(grid, radius, kernel):
    """The window as weights over periodic offsets, computed voxel by voxel."""
    nz, ny, nx = grid.shape
    v = grid.voxel_size[0]
    w = np.zeros(grid.shape)
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                d = np.array([min(k, nz - k), min(j, ny - j), min(i, nx - i)]) * v
                r2 = float(d @ d)
                w[k, j, i] = np.exp(-r2 / (2 * radius**2)) if kernel == "gaussian" else float(r2 <= radius**2)
    return w / w.sum()


@pytest.mark.parametrize("kernel", ["gaussian", "sphere"])
def test_local_mean_and_correlation_equal_direct_sums(kernel):
    grid = Grid((10, 9, 8), 1.0)
    rng = np.random.default_rng(1)
    a = rng.normal(size=grid.shape).astype(np.float32)
    b = (a + rng.normal(size=grid.shape)).astype(np.float32)
    w = _direct_window(grid, 2.0, kernel)
    transfer = window_transfer(grid, 2.0, kernel)
    # direct periodic convolution at three voxels
    for p in [(0, 0, 0), (3, 5, 7), (9, 8, 1)]:
        shifted = lambda f: np.roll(f, shift=(-p[0], -p[1], -p[2]), axis=(0, 1, 2))  # noqa: E731
        wm = lambda f: float((w * shifted(f)).sum())  # noqa: E731
        assert float(local_mean(a, transfer)[p]) == pytest.approx(wm(a), abs=1e-5)
        cov = wm(a * b) - wm(a) * wm(b)
        cc = cov / np.sqrt((wm(a * a) - wm(a) ** 2) * (wm(b * b) - wm(b) ** 2))
        assert float(local_correlation(a, b, transfer)[p]) == pytest.approx(cc, abs=1e-4)


def test_filters_match_numpy_fft():
    grid = Grid((16, 16, 16), 1.5)
    rng = np.random.default_rng(2)
    x = rng.normal(size=grid.shape)
    f = np.fft.fftn(x)
    fz, fy, fx = np.meshgrid(*[np.fft.fftfreq(16, 1.5)] * 3, indexing="ij")
    s = np.sqrt(fz**2 + fy**2 + fx**2)
    ref = np.fft.ifftn(f * (s <= 1 / 4.0)).real
    assert np.allclose(lowpass(x, grid, 4.0, width=0.0), ref, atol=1e-5)
    ref_band = np.fft.ifftn(f * ((s <= 1 / 4.0) & (s > 1 / 8.0))).real
    assert np.allclose(bandpass(x, grid, 8.0, 4.0, width=0.0), ref_band, atol=1e-5)
    ref_b = np.fft.ifftn(f * np.exp(-50.0 * s**2 / 4)).real
    assert np.allclose(b_factor_filter(x, grid, 50.0), ref_b, atol=1e-5)


def test_radial_average_of_a_gaussian_follows_its_transform():
    grid = Grid((32, 32, 32), 1.0)
    c = np.fft.fftfreq(32) * 32
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    sigma = 1.5
    s, amp = radial_average(np.exp(-r2 / (2 * sigma**2)), grid)
    expected = np.exp(-2 * np.pi**2 * sigma**2 * s**2)
    assert np.allclose(amp / amp[0], expected / expected[0], atol=0.02)


def test_bad_window_is_a_clear_error():
    with pytest.raises(ValueError, match="radius"):
        window_transfer(Grid((4, 4, 4), 1.0), 0.0)
    with pytest.raises(ValueError, match="kernel"):
        window_transfer(Grid((4, 4, 4), 1.0), 1.0, "box")
