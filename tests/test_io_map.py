import gzip

import gemmi
import mrcfile
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

import modelmap as mm


def _z_score(density: mm.DensityMap, positions) -> float:
    data = np.asarray(density.data, np.float64)
    values = np.asarray(mm.interpolate_map(data, density.grid, np.asarray(positions, np.float64)))
    return float(np.mean((values - data.mean()) / data.std()))


@pytest.mark.x64
def test_trilinear_matches_scipy():
    rng = np.random.default_rng(3)
    data = rng.normal(size=(6, 7, 8))
    grid = mm.Grid(data.shape, (0.9, 1.1, 1.3), (-2.0, 1.0, 3.0))
    pos = grid.to_position(rng.uniform(0, 5, size=(40, 3)))
    ijk = np.asarray(grid.to_index(pos))
    expected = map_coordinates(data, ijk[:, ::-1].T, order=1)
    np.testing.assert_allclose(np.asarray(mm.interpolate_map(data, grid, pos)), expected, atol=1e-12)
    outside = grid.to_position(np.array([[-0.5, 1, 1], [1, 1, 6.5]]))
    np.testing.assert_array_equal(np.asarray(mm.interpolate_map(data, grid, outside)), 0.0)


def test_origin_field_map_7cec_crop(shared_data, tmp_path):
    d = mm.read_map(shared_data / "emd30342_7cec" / "390_emd_30342_A_z4.mrc.gz")
    assert d.data.shape == (63, 81, 89)
    np.testing.assert_allclose(d.grid.voxel_size, 1.113, atol=1e-5)
    np.testing.assert_allclose(d.grid.origin, (145.825, 112.825, 120.517), atol=1e-3)
    model = mm.read_model(shared_data / "emd30342_7cec" / "390_7cec_A.cif.gz")
    z = _z_score(d, model.atoms.positions)
    assert z == pytest.approx(3.0, abs=0.05)
    # round trip: the origin is not a whole number of voxels -> ORIGIN field
    out = tmp_path / "crop.mrc"
    with pytest.warns(UserWarning, match="ORIGIN field"):
        mm.write_map(out, d)
    back = mm.read_map(out)
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(d.data))
    np.testing.assert_allclose(back.grid.voxel_size, d.grid.voxel_size, rtol=1e-6)
    np.testing.assert_allclose(back.grid.origin, d.grid.origin, atol=1e-4)
    with mrcfile.open(out) as mrc:  # mrcfile users see the same header
        assert tuple(float(v) for v in mrc.header.origin.item()) == pytest.approx(d.grid.origin, abs=1e-4)


def test_nstart_map_emd5168(shared_data, tmp_path):
    d = mm.read_map(shared_data / "emd5168_actin" / "emd_5168.map.gz")
    assert d.data.shape == (100, 100, 100)
    np.testing.assert_allclose(d.grid.origin, (-50 * 1.742,) * 3, atol=1e-3)
    model = mm.read_model(shared_data / "emd5168_actin" / "3MFP.pdb")
    assert _z_score(d, model.atoms.positions) == pytest.approx(2.36, abs=0.05)
    out = tmp_path / "actin.mrc.gz"
    mm.write_map(out, d)
    back = mm.read_map(out)
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(d.data))
    np.testing.assert_allclose(back.grid.origin, d.grid.origin, atol=1e-4)
    np.testing.assert_allclose(back.grid.voxel_size, d.grid.voxel_size, rtol=1e-6)
    with mrcfile.open(out) as mrc:
        assert (int(mrc.header.nxstart), int(mrc.header.nystart), int(mrc.header.nzstart)) == (-50, -50, -50)
        assert tuple(mrc.header.origin.item()) == (0.0, 0.0, 0.0)


def test_written_map_reopens_at_the_same_place_in_gemmi(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((12, 14, 16)).astype(np.float32)
    grid = mm.Grid(data.shape, (0.8, 0.9, 1.0), (-8 * 0.8, 3 * 0.9, 5 * 1.0))
    out = tmp_path / "m.mrc"
    mm.write_map(out, data, grid)
    ccp4 = gemmi.read_ccp4_map(str(out))
    ccp4.setup(float("nan"))
    pos = grid.to_position(rng.uniform(1, 9, size=(30, 3)))
    ours = np.asarray(mm.interpolate_map(data.astype(np.float64), grid, pos))
    theirs = np.array([ccp4.grid.interpolate_value(gemmi.Position(*p)) for p in pos])
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)
    # and in mrcfile's own terms: nstart * voxel is the origin
    with mrcfile.open(out) as mrc:
        nstart = np.array([mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart])
        np.testing.assert_allclose(nstart * np.array(mrc.voxel_size.item()), grid.origin, atol=1e-5)


def _write_raw(path, data_file_order, *, axes=(1, 2, 3), voxel=1.0, cellb=(90.0, 90.0, 90.0)):
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(data_file_order.astype(np.float32))
        mrc.voxel_size = voxel
        mrc.header.mapc, mrc.header.mapr, mrc.header.maps = axes
        mrc.header.cellb = cellb


@pytest.mark.parametrize("axes", [(3, 2, 1), (2, 3, 1), (3, 1, 2)])
def test_permuted_axis_order_is_transposed(tmp_path, axes):
    rng = np.random.default_rng(1)
    zyx = rng.random((5, 6, 7))  # nz, ny, nx
    # the file's array is (sections, rows, columns) = axes (maps, mapr, mapc) of x=1, y=2, z=3
    file_order = np.transpose(zyx, [3 - axes[2], 3 - axes[1], 3 - axes[0]])
    path = tmp_path / "perm.mrc"
    _write_raw(path, file_order, axes=axes, voxel=(1.0, 1.0, 1.0))
    d = mm.read_map(path)
    np.testing.assert_allclose(np.asarray(d.data), zyx, rtol=1e-6)


def test_bad_axis_order_is_refused(tmp_path):
    path = tmp_path / "bad.mrc"
    _write_raw(path, np.zeros((4, 4, 4)), axes=(1, 1, 3))
    with pytest.raises(mm.MapAxisOrderError, match="not a permutation"):
        mm.read_map(path)


def test_non_orthogonal_cell_is_refused(tmp_path):
    path = tmp_path / "tri.mrc"
    _write_raw(path, np.zeros((4, 4, 4)), cellb=(90.0, 100.0, 90.0))
    with pytest.raises(mm.MapFileError, match="non-orthogonal"):
        mm.read_map(path)


def test_missing_empty_garbage_and_huge_maps(tmp_path):
    with pytest.raises(mm.MapFileError, match="no such file"):
        mm.read_map(tmp_path / "nope.mrc")
    (tmp_path / "empty.mrc").write_bytes(b"")
    with pytest.raises(mm.MapFileError, match="empty"):
        mm.read_map(tmp_path / "empty.mrc")
    (tmp_path / "junk.mrc").write_bytes(b"not a map" * 200)
    with pytest.raises(mm.MapFileError):
        mm.read_map(tmp_path / "junk.mrc")
    # a header that promises 30000^3 voxels: refused from the header, before reading any data
    path = tmp_path / "huge.mrc"
    _write_raw(path, np.zeros((2, 2, 2)))
    with mrcfile.open(str(path), mode="r+", permissive=True) as mrc:
        mrc.header.nx = mrc.header.ny = mrc.header.nz = 30000
        mrc.header.mx = mrc.header.my = mrc.header.mz = 30000
    with pytest.raises(mm.GridTooLargeError, match="GiB"):
        mm.read_map(path)


def test_truncated_data_is_an_error(tmp_path):
    path = tmp_path / "short.mrc"
    _write_raw(path, np.zeros((4, 4, 4)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])
    with pytest.raises(mm.MapFileError):
        mm.read_map(path)


def test_write_is_atomic_and_protects_inputs(tmp_path):
    grid = mm.Grid((4, 4, 4), 1.0)
    out = tmp_path / "keep.mrc"
    mm.write_map(out, np.ones((4, 4, 4)), grid)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="NaN"):
        mm.write_map(out, np.full((4, 4, 4), np.nan), grid)
    with pytest.raises(ValueError, match="overwrite the input"):
        mm.write_map(out, np.zeros((4, 4, 4)), grid, protect=(out,))
    with pytest.raises(FileExistsError):
        mm.write_map(out, np.zeros((4, 4, 4)), grid, overwrite=False)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mrc"]  # no temporary left behind


def test_write_map_copies_by_chunks_and_its_header_stats_are_float64_exact(tmp_path, monkeypatch):
    from modelmap.io import _map

    monkeypatch.setattr(_map, "_CHUNK_VALUES", 7 * 9)  # chunks of one z-plane: 11 of them
    rng = np.random.default_rng(3)
    data = (rng.normal(size=(11, 9, 7)) * 3 + 1).astype(np.float32)
    grid = mm.Grid(data.shape, (1.0, 1.5, 2.0), (2.0, -3.0, 4.0))
    path = mm.write_map(tmp_path / "m.mrc", data, grid)
    assert mrcfile.validate(str(path), print_file=open(tmp_path / "log", "w"))
    with mrcfile.open(str(path)) as mrc:
        np.testing.assert_array_equal(mrc.data, data)
        h = mrc.header
        ref = data.astype(np.float64)
        assert (float(h.dmin), float(h.dmax)) == (float(data.min()), float(data.max()))
        np.testing.assert_allclose([float(h.dmean), float(h.rms)], [ref.mean(), ref.std()], rtol=1e-6)
    back = mm.read_map(path)
    np.testing.assert_array_equal(np.asarray(back.data), data)
    assert back.grid.same_as(grid)
    # nothing of the map's size is allocated while writing (numpy reports to tracemalloc)
    import tracemalloc

    monkeypatch.setattr(_map, "_CHUNK_VALUES", 96 * 96 * 4)
    big = np.ones((96, 96, 96), np.float32)
    tracemalloc.start()
    try:
        mm.write_map(tmp_path / "big.mrc", big, mm.Grid(big.shape, 1.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < big.nbytes / 4, f"write_map allocated {peak} bytes for a map of {big.nbytes}"
    np.testing.assert_array_equal(np.asarray(mm.read_map(tmp_path / "big.mrc").data), big)


def test_gz_output_is_gzip(tmp_path):
    grid = mm.Grid((3, 4, 5), 1.5, (3.0, 0.0, -1.5))
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    out = mm.write_map(tmp_path / "a.mrc.gz", data, grid)
    with gzip.open(out) as f:
        assert f.read(256)[208:211] == b"MAP"
    np.testing.assert_array_equal(np.asarray(mm.read_map(out).data), data)


def test_interpolation_variants_share_the_blend_and_differ_only_in_their_rules():
    from modelmap._interpolate import interpolate_map_chimera, interpolate_map_numpy

    rng = np.random.default_rng(3)
    grid = mm.Grid((5, 6, 7), (1.1, 0.9, 1.3), (-2.0, 3.0, 1.5))
    data = rng.normal(size=grid.shape)
    lo, hi = np.asarray(grid.origin), np.asarray(grid.origin) + (np.array(grid.shape[::-1]) - 1) * grid.voxel_size
    pos = rng.uniform(lo - 1, hi + 1, size=(400, 3))
    ref = interpolate_map_numpy(data, grid, pos)
    assert ref.dtype == np.float64
    np.testing.assert_allclose(np.asarray(mm.interpolate_map(data.astype(np.float32), grid, pos.astype(np.float32))),
                               ref, atol=1e-5)
    chimera = interpolate_map_chimera(data, grid, pos)
    assert chimera.dtype == np.float32
    inner = np.all((pos >= lo) & (pos < hi - 1e-3), axis=-1)  # Chimera: the last plane is outside
    np.testing.assert_allclose(chimera[inner], ref[inner], atol=1e-5)
    assert np.all(chimera[~inner & ~np.all((pos >= lo) & (pos <= hi), axis=-1)] == 0)
    # a position on the last grid plane: inside for ours, outside for Chimera's rule
    corner = hi[None]
    assert interpolate_map_numpy(data, grid, corner)[0] == data[-1, -1, -1]
    assert interpolate_map_chimera(data, grid, corner)[0] == 0


def test_density_map_is_a_pytree_with_a_static_grid():
    import jax
    import jax.numpy as jnp

    grid = mm.Grid((3, 4, 5), 1.5, (1.0, 2.0, 3.0))
    density = mm.DensityMap(jnp.arange(60.0, dtype=jnp.float32).reshape(3, 4, 5), grid)
    leaves, treedef = jax.tree_util.tree_flatten(density)
    assert len(leaves) == 1 and leaves[0] is density.data

    @jax.jit
    def scaled(m: mm.DensityMap, factor) -> mm.DensityMap:
        return mm.DensityMap(m.data * factor, m.grid)

    out = scaled(density, 2.0)
    assert isinstance(out, mm.DensityMap) and out.grid == grid
    np.testing.assert_allclose(np.asarray(out.data), 2 * np.asarray(density.data))
    # values and gradients flow through the map; the grid is not traced
    g = jax.grad(lambda m: jnp.sum(mm.interpolate_map(m.data, m.grid, jnp.array([[2.5, 3.5, 4.0]]))))(density)
    assert isinstance(g, mm.DensityMap) and g.grid == grid and float(jnp.sum(g.data)) == pytest.approx(1.0)
    stacked = jax.vmap(lambda f: scaled(density, f))(jnp.array([1.0, 3.0]))
    assert stacked.data.shape == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="does not match"):
        mm.DensityMap(jnp.zeros((2, 2, 2)), grid)
