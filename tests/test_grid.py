import numpy as np
import pytest

import modelmap as mm


def test_around_positions_covers_padding_with_whole_voxel_origin():
    rng = np.random.default_rng(0)
    pos = rng.uniform(-20, 30, size=(50, 3))
    grid = mm.Grid.around_positions(pos, voxel_size=(1.1, 0.9, 1.3), padding=4.0)
    x, y, z = grid.axes()
    for ax, coords in enumerate((x, y, z)):
        assert coords[0] <= pos[:, ax].min() - 4.0 + 1e-9
        assert coords[-1] >= pos[:, ax].max() + 4.0 - grid.voxel_size[ax] - 1e-9
        n = grid.origin[ax] / grid.voxel_size[ax]
        assert abs(n - round(n)) < 1e-9
    assert grid.shape == (len(z), len(y), len(x))


def test_index_position_round_trip_and_axis_order():
    grid = mm.Grid((4, 5, 6), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0))
    coords = grid.coordinates()
    # voxel (k, j, i) is the point origin + (i vx, j vy, k vz)
    np.testing.assert_allclose(coords[3, 2, 1], [10.0 + 1.0, 20.0 + 4.0, 30.0 + 9.0])
    idx = grid.to_index(coords)
    np.testing.assert_allclose(idx[3, 2, 1], [1, 2, 3])
    np.testing.assert_allclose(grid.to_position(idx), coords)


def test_grid_too_large_is_refused_before_allocation():
    grid = mm.Grid((20000, 20000, 20000), 1.0)
    with pytest.raises(mm.GridTooLargeError, match="GiB"):
        grid.check_fits_in_memory()
    with pytest.raises(mm.GridTooLargeError):
        mm.Grid.around_positions(np.array([[0.0, 0, 0], [9000.0, 9000, 9000]]), 0.5, 5.0)


@pytest.mark.parametrize("bad", [(0, 4, 4), (4, 4)])
def test_bad_shape(bad):
    with pytest.raises(ValueError):
        mm.Grid(bad, 1.0)


def test_bad_voxel():
    with pytest.raises(ValueError, match="positive"):
        mm.Grid((4, 4, 4), (1.0, 0.0, 1.0))


def test_same_as_tolerates_header_rounding_only():
    grid = mm.Grid((4, 5, 6), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0))
    assert grid.same_as(mm.Grid((4, 5, 6), (1.0 + 1e-7, 2.0, 3.0), (10.0 + 1e-5, 20.0, 30.0)))
    assert not grid.same_as(mm.Grid((4, 5, 7), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0)))
    assert not grid.same_as(mm.Grid((4, 5, 6), (1.001, 2.0, 3.0), (10.0, 20.0, 30.0)))
    assert not grid.same_as(mm.Grid((4, 5, 6), (1.0, 2.0, 3.0), (10.01, 20.0, 30.0)))


def test_memory_check_compares_with_a_fixed_limit(monkeypatch):
    from modelmap._grid import MEMORY_LIMIT_ENV, memory_limit_bytes

    grid = mm.Grid((64, 64, 64), 1.0)  # 1 MiB a copy
    grid.check_fits_in_memory(limit=4 * 2**20)
    with pytest.raises(mm.GridTooLargeError, match=r"64 x 64 x 64 .* needs about 4.0 MiB .*of 1.0 MiB.*limit is 4.0 MiB .the given limit"):
        grid.check_fits_in_memory(limit=4 * 2**20 - 1)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "3M")
    assert memory_limit_bytes() == (3 * 2**20, f"${MEMORY_LIMIT_ENV}")
    with pytest.raises(mm.GridTooLargeError, match=MEMORY_LIMIT_ENV):
        grid.check_fits_in_memory()
    grid.check_fits_in_memory(copies=2)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=MEMORY_LIMIT_ENV):
        memory_limit_bytes()
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    # without the variable: the device's or the machine's memory, the same number every time
    import jax

    first = memory_limit_bytes(jax.devices()[0])
    assert first[0] > 0 and first == memory_limit_bytes(jax.devices()[0])
