"""Poses: RELION Euler angles, quaternions, rotation matrices and rotating positions.

References are scipy's `Rotation` and a literal transcription of RELION's `Euler_angles2matrix`
(src/euler.cpp). Float64 comparisons run inside `jax.enable_x64(True)`, float32 ones pass float32
arrays explicitly, so the tests hold whether or not x64 is switched on globally.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from modelmap._pose import (
    as_rotation_matrix,
    check_rotation,
    euler_to_matrix,
    matrix_to_euler,
    quaternion_to_matrix,
    rotate_positions,
)

def x64():
    return jax.enable_x64(True)


def _relion_euler_angles2matrix(rot, tilt, psi):
    """RELION src/euler.cpp Euler_angles2matrix, line by line, in float64 (degrees in)."""
    alpha, beta, gamma = math.radians(rot), math.radians(tilt), math.radians(psi)
    ca, sa = math.cos(alpha), math.sin(alpha)
    cb, sb = math.cos(beta), math.sin(beta)
    cg, sg = math.cos(gamma), math.sin(gamma)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = np.empty((3, 3))
    A[0, 0] = cg * cc - sg * sa
    A[0, 1] = cg * cs + sg * ca
    A[0, 2] = -cg * sb
    A[1, 0] = -sg * cc - cg * sa
    A[1, 1] = -sg * cs + cg * ca
    A[1, 2] = sg * sb
    A[2, 0] = sc
    A[2, 1] = ss
    A[2, 2] = cb
    return A


def _random_angles(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack(
        [rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)]
    )  # (3, n) float64 degrees


def _gimbal_angles():
    """Tilts at and near 0 and 180°, with arbitrary rot and psi, (3, m) degrees."""
    near = np.geomspace(1e-9, 1.0, 19)
    tilt = np.concatenate([[0.0, 180.0, 0.0, 180.0], near, 180.0 - near])
    rng = np.random.default_rng(7)
    return np.stack([rng.uniform(-180, 180, tilt.size), tilt, rng.uniform(-180, 180, tilt.size)])


# -- Euler angles ------------------------------------------------------------------------------------


def test_euler_is_relion_and_scipy_zyz_transposed():
    ang = _random_angles(500)
    with x64():
        A = np.asarray(euler_to_matrix(*(jnp.asarray(a, jnp.float64) for a in ang)))
    assert A.shape == (500, 3, 3) and A.dtype == np.float64
    relion = np.stack([_relion_euler_angles2matrix(*a) for a in ang.T])
    np.testing.assert_allclose(A, relion, rtol=0, atol=1e-12)
    zyz = Rotation.from_euler("ZYZ", ang.T, degrees=True)
    np.testing.assert_allclose(A, zyz.as_matrix().transpose(0, 2, 1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(A, zyz.inv().as_matrix(), rtol=0, atol=1e-12)
    ext = Rotation.from_euler("zyz", -ang.T, degrees=True)
    np.testing.assert_allclose(A, ext.as_matrix(), rtol=0, atol=1e-12)
    # and not the untransposed one (the tempting mistake)
    assert np.abs(A - zyz.as_matrix()).max() > 0.5


def test_euler_float32_radians_and_broadcasting():
    ang = _random_angles(50, seed=1)
    A32 = euler_to_matrix(*(jnp.asarray(a, jnp.float32) for a in ang))
    assert A32.dtype == jnp.float32
    relion = np.stack([_relion_euler_angles2matrix(*a) for a in ang.T])
    np.testing.assert_allclose(np.asarray(A32), relion, rtol=0, atol=2e-6)
    rad = euler_to_matrix(*(jnp.asarray(np.deg2rad(a), jnp.float32) for a in ang), degrees=False)
    np.testing.assert_allclose(np.asarray(rad), relion, rtol=0, atol=2e-6)
    # scalar rot, (4, 5) tilt, (5,) psi broadcast to (4, 5, 3, 3)
    tilt = np.float32(np.linspace(0, 180, 20).reshape(4, 5))
    psi = np.float32(np.linspace(-90, 90, 5))
    B = euler_to_matrix(np.float32(30.0), tilt, psi)
    assert B.shape == (4, 5, 3, 3)
    np.testing.assert_allclose(
        np.asarray(B[2, 3]), _relion_euler_angles2matrix(30.0, tilt[2, 3], psi[3]), atol=2e-6
    )


def test_euler_meaning_for_a_model():
    """A maps reference coordinates into the particle frame; the view is along its z."""
    rot, tilt, psi = 40.0, 70.0, -25.0
    A = np.asarray(euler_to_matrix(np.float32(rot), np.float32(tilt), np.float32(psi)))
    # the viewing direction, in reference coordinates, has azimuth rot and polar angle tilt
    r, t = math.radians(rot), math.radians(tilt)
    view = np.array([math.cos(r) * math.sin(t), math.sin(r) * math.sin(t), math.cos(t)])
    np.testing.assert_allclose(A.T @ [0, 0, 1], view, atol=1e-6)
    np.testing.assert_allclose(A @ view, [0, 0, 1], atol=1e-6)
    # tilt = 90°, rot = psi = 0: the reference is seen along +x, which becomes the particle's z
    side = np.asarray(euler_to_matrix(np.float32(0.0), np.float32(90.0), np.float32(0.0)))
    np.testing.assert_allclose(side @ [1, 0, 0], [0, 0, 1], atol=1e-7)
    np.testing.assert_allclose(side @ [0, 1, 0], [0, 1, 0], atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_euler_round_trip(dtype):
    ang = np.concatenate([_random_angles(500, seed=2), _gimbal_angles()], axis=1)
    tol = {"float32": 2e-6, "float64": 1e-14}[dtype]
    with jax.enable_x64(dtype == "float64"):
        A = euler_to_matrix(*(jnp.asarray(a, dtype) for a in ang))
        rot, tilt, psi = matrix_to_euler(A)
        assert rot.dtype == tilt.dtype == psi.dtype == jnp.dtype(dtype)
        A2 = euler_to_matrix(rot, tilt, psi)
        # matrix -> angles -> matrix is exact to rounding at every tilt, gimbal poses included
        np.testing.assert_allclose(np.asarray(A2), np.asarray(A), rtol=0, atol=tol)
        rot, tilt, psi = (np.asarray(v, np.float64) for v in (rot, tilt, psi))
        # RELION's ranges
        assert np.all((tilt >= 0) & (tilt <= 180))
        assert np.all((rot > -180) & (rot <= 180) & (psi > -180) & (psi <= 180))
        # away from the gimbal poses the angles come back as given
        n = 500
        ang_tol = {"float32": 2e-3, "float64": 1e-9}[dtype]
        np.testing.assert_allclose(np.stack([rot, tilt, psi])[:, :n], ang[:, :n], atol=ang_tol)
        # radians out
        r_rad = matrix_to_euler(A, degrees=False)
        np.testing.assert_allclose(np.rad2deg(np.asarray(r_rad[1], np.float64)), tilt, atol=ang_tol)


def test_gimbal_poses_follow_relion():
    """At tilt 0 only rot + psi is defined, at 180 only psi - rot: rot = 0 takes it all, as RELION."""
    ang = np.array([[30.0, 30.0], [0.0, 180.0], [50.0, 50.0]], np.float32)
    rot, tilt, psi = (np.asarray(v) for v in matrix_to_euler(euler_to_matrix(*ang)))
    np.testing.assert_array_equal(rot, [0.0, 0.0])
    np.testing.assert_array_equal(tilt, [0.0, 180.0])
    np.testing.assert_allclose(psi, [80.0, 20.0], atol=1e-4)


def test_matrix_to_euler_of_scipy_rotations():
    """Any rotation, not only ones built from angles, comes back through RELION's angles."""
    with x64():
        R = Rotation.random(200, random_state=3).as_matrix()
        A = euler_to_matrix(*matrix_to_euler(jnp.asarray(R)))
        np.testing.assert_allclose(np.asarray(A), R, rtol=0, atol=1e-14)
    A32 = euler_to_matrix(*matrix_to_euler(jnp.asarray(R, jnp.float32)))
    np.testing.assert_allclose(np.asarray(A32), R, rtol=0, atol=2e-6)


def test_matrix_to_euler_near_gimbal_with_rounded_matrices():
    """Products of float32 rotations carry absolute rounding; reading rot and psi off the third
    row and column alone (RELION) would rebuild them ~eps / sin(tilt) off, ~5e-3 at 1e-3°."""
    n = 100
    for tilt in (0.0, 1e-4, 1e-2, 1.0, 179.0, 180.0 - 1e-3, 180.0):
        ang = _random_angles(n, seed=11)
        ang[1] = tilt
        A = Rotation.from_euler("ZYZ", ang.T, degrees=True).as_matrix().transpose(0, 2, 1)
        B = Rotation.random(n, random_state=12).as_matrix()
        A32 = B.astype(np.float32) @ (B.transpose(0, 2, 1) @ A).astype(np.float32)
        back = np.asarray(euler_to_matrix(*matrix_to_euler(A32)))
        np.testing.assert_allclose(back, A32, rtol=0, atol=2e-6, err_msg=f"tilt {tilt}")


# -- quaternions and matrices ------------------------------------------------------------------------


def test_quaternion_matches_scipy_scalar_last():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(300, 4)) * rng.uniform(0.1, 10, size=(300, 1))  # (w, x, y, z), not unit
    ref = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()  # scipy: (x, y, z, w)
    with x64():
        R = quaternion_to_matrix(jnp.asarray(q))
        assert R.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(R), ref, rtol=0, atol=1e-14)
        np.testing.assert_allclose(np.asarray(quaternion_to_matrix(jnp.asarray(-q))), ref, atol=1e-14)
    R32 = quaternion_to_matrix(jnp.asarray(q, jnp.float32))
    assert R32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(R32), ref, rtol=0, atol=1e-6)
    # a 90° turn about z: (w, x, y, z) = (cos 45°, 0, 0, sin 45°) takes x to y
    c = math.sqrt(0.5)
    Rz = np.asarray(quaternion_to_matrix(np.array([c, 0, 0, c], np.float32)))
    np.testing.assert_allclose(Rz @ [1, 0, 0], [0, 1, 0], atol=1e-6)


def test_rotations_are_orthonormal_in_float32():
    ang = np.concatenate([_random_angles(1000, seed=5), _gimbal_angles()], axis=1)
    q = np.random.default_rng(5).normal(size=(1000, 4))
    for R in (
        euler_to_matrix(*(jnp.asarray(a, jnp.float32) for a in ang)),
        quaternion_to_matrix(jnp.asarray(q, jnp.float32)),
    ):
        R = np.asarray(R, np.float64)
        err = np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max()
        assert err < 1e-6
        np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-6)
        check_rotation(R.astype(np.float32))  # passes at the default tolerance


def test_as_rotation_matrix_decides_by_shape():
    R = euler_to_matrix(np.float32([10, 20]), np.float32([30, 40]), np.float32([50, 60]))
    np.testing.assert_array_equal(np.asarray(as_rotation_matrix(R)), np.asarray(R))
    assert as_rotation_matrix(R[0]).shape == (3, 3)
    q = np.float32([[1, 0, 0, 0], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]])
    np.testing.assert_allclose(np.asarray(as_rotation_matrix(q)), np.asarray(quaternion_to_matrix(q)))
    assert as_rotation_matrix(q[2]).shape == (3, 3)
    assert as_rotation_matrix(np.zeros((2, 5, 4)) + [1, 0, 0, 0]).shape == (2, 5, 3, 3)
    for shape in [(3,), (2, 2), (3, 3, 2), (5,), ()]:
        with pytest.raises(ValueError, match=r"a \(\.\.\., 3, 3\) matrix or a \(\.\.\., 4\) quaternion"):
            as_rotation_matrix(np.ones(shape, np.float32))


# -- rotating positions ------------------------------------------------------------------------------


def _positions(n=40, seed=6):
    return np.random.default_rng(seed).uniform(-20, 20, size=(n, 3)).astype(np.float32)


def test_rotate_positions_keeps_distances_and_center():
    pos = _positions()
    center = np.float32([3.0, -2.0, 5.0])
    R = euler_to_matrix(np.float32(33.0), np.float32(71.0), np.float32(-140.0))
    out = rotate_positions(pos, R, center)
    assert out.shape == pos.shape and out.dtype == jnp.float32
    out = np.asarray(out, np.float64)
    p64, c64, R64 = pos.astype(np.float64), center.astype(np.float64), np.asarray(R, np.float64)
    np.testing.assert_allclose(out, (p64 - c64) @ R64.T + c64, atol=1e-4)  # x' = R (x - c) + c
    d0 = np.linalg.norm(p64[:, None] - p64[None], axis=-1)
    d1 = np.linalg.norm(out[:, None] - out[None], axis=-1)
    np.testing.assert_allclose(d1, d0, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(rotate_positions(np.stack([center, pos[0]]), R, center))[0], center, atol=1e-6
    )
    # the same rotation as a quaternion gives the same positions
    qxyzw = Rotation.from_matrix(R64).as_quat()
    q = np.float32(qxyzw[[3, 0, 1, 2]])
    np.testing.assert_allclose(np.asarray(rotate_positions(pos, q, center)), out, atol=1e-4)
    with pytest.raises(ValueError, match="one rotation"):
        rotate_positions(pos, jnp.stack([R, R]), center)
    with pytest.raises(ValueError, match="center"):
        rotate_positions(pos, R, np.float32([0.0, 0.0]))


def test_vmap_over_poses_equals_loop():
    pos = _positions(25)
    center = np.float32([1.0, 2.0, 3.0])
    ang = np.float32(_random_angles(8, seed=8))

    def pose(rot, tilt, psi):
        return rotate_positions(pos, euler_to_matrix(rot, tilt, psi), center)

    batched = jax.jit(jax.vmap(pose))(*ang)
    looped = np.stack([np.asarray(pose(*a)) for a in ang.T])
    assert batched.shape == (8, 25, 3)
    np.testing.assert_allclose(np.asarray(batched), looped, atol=1e-5)
    # quaternions, with the check in the vmapped, jitted function
    q = np.random.default_rng(8).normal(size=(8, 4)).astype(np.float32)
    fq = jax.jit(jax.vmap(lambda qq: rotate_positions(pos, check_rotation(qq), center)))
    np.testing.assert_allclose(
        np.asarray(fq(q)), np.stack([np.asarray(rotate_positions(pos, qq, center)) for qq in q]), atol=1e-5
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradients_are_finite_and_right(dtype):
    pos = _positions(10).astype(dtype)
    center = np.array([0.5, -1.0, 2.0], dtype)
    target = _positions(10, seed=9).astype(dtype)

    def loss_euler(ang):
        return jnp.sum((rotate_positions(pos, euler_to_matrix(*ang), center) - target) ** 2)

    def loss_quat(q):
        return jnp.sum((rotate_positions(pos, check_rotation(q), center) - target) ** 2)

    def loss_back(ang):
        return jnp.sum(jnp.stack(matrix_to_euler(euler_to_matrix(*ang))) ** 2)

    with jax.enable_x64(dtype == "float64"):
        for loss, x0 in [
            (loss_euler, np.array([30.0, 60.0, -45.0], dtype)),
            (loss_euler, np.array([30.0, 0.0, -45.0], dtype)),  # gimbal pose
            (loss_quat, np.array([0.9, 0.1, -0.3, 0.2], dtype)),
            (loss_back, np.array([30.0, 0.0, -45.0], dtype)),
            (loss_back, np.array([30.0, 180.0, -45.0], dtype)),
            (loss_back, np.array([30.0, 60.0, -45.0], dtype)),
        ]:
            g = jax.jit(jax.grad(loss))(jnp.asarray(x0))
            assert g.dtype == jnp.dtype(dtype) and bool(jnp.all(jnp.isfinite(g))), (loss, x0, g)
        if dtype == "float64":  # against central differences, away from the gimbal cut
            for loss, x0 in [
                (loss_euler, np.array([30.0, 60.0, -45.0])),
                (loss_quat, np.array([0.9, 0.1, -0.3, 0.2])),
                (loss_back, np.array([30.0, 60.0, -45.0])),
            ]:
                g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x0)))
                h, f = 1e-6, jax.jit(loss)
                fd = [
                    (float(f(jnp.asarray(x0 + h * e))) - float(f(jnp.asarray(x0 - h * e)))) / (2 * h)
                    for e in np.eye(x0.size)
                ]
                np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-6)


# -- bad inputs --------------------------------------------------------------------------------------

_GOOD = np.asarray(euler_to_matrix(np.float32(10.0), np.float32(20.0), np.float32(30.0)))
_NAN_POSE = euler_to_matrix(np.float32(10.0), np.float32(np.nan), np.float32(30.0))
_SHEARED = _GOOD @ np.float32([[1, 0.01, 0], [0, 1, 0], [0, 0, 1]])
_REFLECTION = _GOOD @ np.diag(np.float32([1, 1, -1]))

_BAD = [
    ("nan pose", _NAN_POSE, "NaN or infinite"),
    ("inf matrix", np.where(np.eye(3, dtype=bool), np.float32(np.inf), _GOOD), "NaN or infinite"),
    ("sheared", _SHEARED, "not orthonormal"),
    ("scaled", 1.001 * _GOOD, "not orthonormal"),
    ("reflection", _REFLECTION, "determinant -1"),
    ("zero quaternion", np.zeros(4, np.float32), "quaternion is zero"),
    ("nan quaternion", np.float32([1, np.nan, 0, 0]), "NaN or infinite"),
    ("(3,) array", np.ones(3, np.float32), r"a \(\.\.\., 3, 3\) matrix or a \(\.\.\., 4\) quaternion"),
]


@pytest.mark.parametrize("name, bad, message", _BAD, ids=[b[0] for b in _BAD])
def test_check_rotation_refuses_concretely(name, bad, message):
    with pytest.raises(ValueError, match=message):
        check_rotation(bad)


@pytest.mark.parametrize("name, bad, message", _BAD, ids=[b[0] for b in _BAD])
def test_check_rotation_refuses_under_jit(name, bad, message):
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(jax.jit(check_rotation)(bad))


def test_check_rotation_names_the_bad_pose_and_passes_good_ones():
    batch = np.stack([_GOOD] * 4)
    out = check_rotation(batch)
    np.testing.assert_array_equal(np.asarray(out), batch)
    np.testing.assert_array_equal(np.asarray(jax.jit(check_rotation)(batch)), batch)
    batch[2] = _SHEARED
    with pytest.raises(ValueError, match=r"not orthonormal.*at index 2 of 4"):
        check_rotation(batch)
    with pytest.raises(Exception, match="not orthonormal"):  # one bad pose in a vmapped batch
        jax.block_until_ready(jax.jit(jax.vmap(check_rotation))(batch))
    # a looser tolerance lets a slightly sheared matrix through
    check_rotation(_GOOD @ np.float32([[1, 1e-3, 0], [0, 1, 0], [0, 0, 1]]), atol=1e-2)


def test_zero_quaternion_is_an_error_wherever_it_is_converted():
    zero = np.zeros(4, np.float32)
    pos, center = _positions(5), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="quaternion is zero"):
        quaternion_to_matrix(zero)
    with pytest.raises(ValueError, match="quaternion is zero"):
        rotate_positions(pos, zero, center)
    with pytest.raises(Exception, match="quaternion is zero"):
        jax.block_until_ready(jax.jit(quaternion_to_matrix)(zero))
    with pytest.raises(Exception, match="quaternion is zero"):
        jax.block_until_ready(jax.jit(rotate_positions)(pos, zero, center))
    q = np.float32([[1, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(Exception, match="quaternion is zero"):
        jax.block_until_ready(jax.jit(jax.vmap(quaternion_to_matrix))(q))
    # a (3,) "rotation" is refused while tracing too
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\) quaternion"):
        jax.jit(rotate_positions)(pos, np.ones(3, np.float32), center)
