"""Poses: rotations of a model as RELION writes them, as quaternions and as matrices.

Conventions (fixed across modelmap, see DESIGN.md):

- Positions are `(..., 3)` x, y, z in Å; a rotation acts on them as column vectors, `x' = R x`, so an
  array of positions is rotated as `positions @ R.T`.
- A rotation is given either as a `(..., 3, 3)` matrix `R` or as a `(..., 4)` quaternion in
  **(w, x, y, z)** order (scalar first; `scipy.spatial.transform.Rotation` uses scalar last).
- Euler angles are RELION's `(rot, tilt, psi)` (`_rlnAngleRot`, `_rlnAngleTilt`, `_rlnAnglePsi`), in
  degrees unless `degrees=False`. `euler_to_matrix` gives RELION's matrix `A`, which maps reference
  coordinates into the particle's frame, `x' = A x`; the particle image is the projection of the
  rotated reference along the particle frame's z. In scipy terms
  `A = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T`.

All functions are pure and work under `jax.jit`, `jax.vmap` and `jax.grad`, in float32 and float64.
None of them checks that a matrix is a rotation; `check_rotation` does, once, where poses come in.

References: RELION `src/euler.cpp` (`Euler_angles2matrix`, `Euler_matrix2angles`); Heymann, Chagoyen
& Belnap (2005) J. Struct. Biol. 151, 196–207 (the ZYZ convention of RELION, Spider and Xmipp);
Shoemake (1985) SIGGRAPH '85, 245–254 (quaternions).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

__all__ = [
    "as_rotation_matrix",
    "check_rotation",
    "euler_to_matrix",
    "matrix_to_euler",
    "quaternion_to_matrix",
    "rotate_positions",
]


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _float_dtype(*values):
    # float32 stays float32, float64 stays float64; ints and Python numbers give the default float
    return jnp.result_type(*values, float)


def _safe_atan2(y, x):
    """`atan2(y, x)`, with 0 (and a finite gradient) at `y = x = 0` instead of a NaN gradient."""
    zero = (y == 0) & (x == 0)
    return jnp.where(zero, 0.0, jnp.arctan2(jnp.where(zero, 0.0, y), jnp.where(zero, 1.0, x)))


def _safe_norm(x, y):
    """`sqrt(x² + y²)`, with 0 (and a finite gradient) at `x = y = 0`."""
    n2 = x * x + y * y
    return jnp.where(n2 > 0, jnp.sqrt(jnp.where(n2 > 0, n2, 1.0)), 0.0)


def _wrap_pi(angle):
    """Angles in radians brought into (-π, π]."""
    angle = jnp.where(angle > jnp.pi, angle - 2 * jnp.pi, angle)
    return jnp.where(angle <= -jnp.pi, angle + 2 * jnp.pi, angle)


# -- Euler angles ------------------------------------------------------------------------------------


def euler_to_matrix(
    rot: Float[ArrayLike, "..."],
    tilt: Float[ArrayLike, "..."],
    psi: Float[ArrayLike, "..."],
    degrees: bool = True,
) -> Float[Array, "... 3 3"]:
    """RELION's rotation matrix `A` of the Euler angles `(rot, tilt, psi)`.

    Exactly RELION's `Euler_angles2matrix` (`src/euler.cpp`): with `(ca, sa)`, `(cb, sb)`, `(cg, sg)`
    the cosine and sine of `rot`, `tilt` and `psi`,

    ```
    A = [[ cg cb ca - sg sa,   cg cb sa + sg ca,  -cg sb],
         [-sg cb ca - cg sa,  -sg cb sa + cg ca,   sg sb],
         [ sb ca,              sb sa,              cb   ]]
    ```

    that is `A = Rz(psi) Ry(tilt) Rz(rot)` in the passive (frame-rotating) sense, or, with active
    right-handed rotations, `A = Rz(-psi) Ry(-tilt) Rz(-rot)`. With
    `scipy.spatial.transform.Rotation` (checked to 1e-15 for random angles):

    ```
    A == Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_matrix().T
      == Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).inv().as_matrix()
      == Rotation.from_euler("zyz", [-rot, -tilt, -psi], degrees=True).as_matrix()
    ```

    Meaning for a model: the particle that RELION assigns `(rot, tilt, psi)` is the reference with
    its coordinates mapped `x' = A x` (about the box centre), projected along z of that frame; so
    `rotate_positions(positions, A, center)` puts a model into the particle's pose. The viewing
    direction in reference coordinates is `Aᵀ ẑ = (cos rot sin tilt, sin rot sin tilt, cos tilt)`:
    `rot` is its azimuth and `tilt` its polar angle; `psi` is the in-plane rotation that follows.
    Reference: Heymann, Chagoyen & Belnap (2005) J. Struct. Biol. 151, 196–207.

    **Arguments:**

    - `rot`, `tilt`, `psi`: Euler angles, arrays of any shapes that broadcast to `(...)`; degrees,
      or radians with `degrees=False`.
    - `degrees`: whether the angles are in degrees (RELION's STAR files) or radians.

    **Returns:** `(..., 3, 3)` rotation matrices, in the angles' float dtype (float32 stays float32;
    integers and Python numbers give JAX's default float).
    """
    dtype = _float_dtype(rot, tilt, psi)
    a, b, g = jnp.broadcast_arrays(*(jnp.asarray(v, dtype) for v in (rot, tilt, psi)))
    if degrees:
        a, b, g = jnp.deg2rad(a), jnp.deg2rad(b), jnp.deg2rad(g)
    ca, sa = jnp.cos(a), jnp.sin(a)
    cb, sb = jnp.cos(b), jnp.sin(b)
    cg, sg = jnp.cos(g), jnp.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = (
        (cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb),
        (-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb),
        (sc, ss, cb),
    )
    return jnp.stack([jnp.stack(row, axis=-1) for row in rows], axis=-2)


def matrix_to_euler(
    matrix: Float[ArrayLike, "... 3 3"], degrees: bool = True
) -> tuple[Float[Array, "..."], Float[Array, "..."], Float[Array, "..."]]:
    """RELION Euler angles `(rot, tilt, psi)` of rotation matrices: the inverse of `euler_to_matrix`.

    The angles are in RELION's ranges: `tilt` in [0, 180]°, `rot` and `psi` in (-180, 180]°, so
    `euler_to_matrix(*matrix_to_euler(A)) == A` for every rotation `A`, to rounding (the angles
    themselves come back as given when they were in these ranges and away from tilt = 0 and 180°).

    Method: RELION's `Euler_matrix2angles` (`src/euler.cpp`) reads `rot = atan2(A₂₁, A₂₀)`,
    `psi = atan2(A₁₂, -A₀₂)` off the third row and column, where they are multiplied by `sin tilt`,
    so for a matrix whose entries carry rounding ε (a product of rotations, say) each has an error
    ~ε / sin tilt near tilt = 0 or 180°, while the matrix depends on their sum (difference) with
    weight ~2: the rebuilt matrix is off by ~ε / sin tilt (5e-3 at tilt = 1e-3° in float32). Here the
    well-defined combination is taken from the upper-left 2×2 block instead, where
    `(cos, sin)(rot + psi)` appears multiplied by `1 + cos tilt` and `(cos, sin)(psi - rot)` by
    `1 - cos tilt` (the idea of Bernardes & Viollet (2022) PLoS ONE 17, e0276302): `rot + psi`
    from the block and `psi - rot` from the third row and column when `cos tilt >= 0`, the other
    way round otherwise. `tilt = atan2(sin tilt, A₂₂)`, with `sin tilt` the norm of `(A₀₂, A₁₂)`
    and `(A₂₀, A₂₁)`. The rebuilt matrix then matches to a few ε at every tilt.

    Gimbal poses: when `sin tilt` is below 4 ε of the dtype (tilt within 5e-7 rad of 0 or 180° in
    float32, 9e-16 rad in float64) only `rot + psi` (tilt = 0) or `psi - rot` (tilt = 180°) is
    defined; then, as RELION does, `tilt` is set to exactly 0 or 180°, `rot = 0` and the whole
    in-plane angle goes to `psi`.

    The matrix is not checked to be a rotation (see `check_rotation`).

    **Arguments:**

    - `matrix`: `(..., 3, 3)` rotation matrices, as `euler_to_matrix` gives them (RELION's `A`).
    - `degrees`: return degrees (RELION's STAR files) or radians.

    **Returns:** `(rot, tilt, psi)`, three arrays of shape `(...)`, in the matrix's float dtype.
    """
    m = jnp.asarray(matrix, _float_dtype(matrix))
    if m.ndim < 2 or m.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_euler needs (..., 3, 3) matrices, got shape {m.shape}")
    a00, a01, a02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    a10, a11, a12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    a20, a21, a22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # sin tilt >= 0, and rot, psi as RELION reads them (each ~ε / sin tilt accurate)
    sb = 0.5 * (_safe_norm(a02, a12) + _safe_norm(a20, a21))
    rot_direct = _safe_atan2(a21, a20)
    psi_direct = _safe_atan2(a12, -a02)
    # (1 + cos tilt) (cos, sin)(rot + psi) and (1 - cos tilt) (cos, sin)(psi - rot)
    sum_block = _safe_atan2(a01 - a10, a00 + a11)
    dif_block = _safe_atan2(a01 + a10, a11 - a00)
    upper = a22 >= 0
    s = jnp.where(upper, sum_block, psi_direct + rot_direct)
    d = jnp.where(upper, psi_direct - rot_direct, dif_block)
    rot, psi = 0.5 * (s - d), 0.5 * (s + d)  # known up to adding π to both: take rot near RELION's
    flip = jnp.cos(rot - rot_direct) < 0
    rot = _wrap_pi(jnp.where(flip, rot + jnp.pi, rot))
    psi = _wrap_pi(jnp.where(flip, psi + jnp.pi, psi))
    tilt = jnp.arctan2(sb, a22)
    gimbal = sb < 4 * jnp.finfo(m.dtype).eps
    rot = jnp.where(gimbal, 0.0, rot)
    tilt = jnp.where(gimbal, jnp.where(upper, 0.0, jnp.pi), tilt)
    psi = jnp.where(gimbal, jnp.where(upper, sum_block, dif_block), psi)  # rot + psi, psi - rot
    if degrees:
        return jnp.rad2deg(rot), jnp.rad2deg(tilt), jnp.rad2deg(psi)
    return rot, tilt, psi


# -- quaternions and matrices ------------------------------------------------------------------------


def quaternion_to_matrix(quaternion: Float[ArrayLike, "... 4"]) -> Float[Array, "... 3 3"]:
    """Rotation matrices of quaternions in **(w, x, y, z)** order (scalar first).

    The quaternion is normalised first, so any non-zero multiple of a unit quaternion gives the same
    rotation, and `q` and `-q` give the same matrix. For a unit `q = (w, x, y, z)` (Shoemake 1985):

    ```
    R = [[1 - 2(y² + z²),  2(xy - wz),      2(xz + wy)    ],
         [2(xy + wz),      1 - 2(x² + z²),  2(yz - wx)    ],
         [2(xz - wy),      2(yz + wx),      1 - 2(x² + y²)]]
    ```

    the active rotation by angle `2 acos(w)` about the axis `(x, y, z)` (right-handed), which acts
    on positions as `x' = R x`. scipy stores quaternions scalar **last**, so
    `R == Rotation.from_quat(q[..., [1, 2, 3, 0]]).as_matrix()`
    (`== Rotation.from_quat(q, scalar_first=True).as_matrix()` with scipy ≥ 1.14).

    **Arguments:**

    - `quaternion`: `(..., 4)` quaternions `(w, x, y, z)`, not necessarily of unit norm.

    **Returns:** `(..., 3, 3)` rotation matrices, in the quaternion's float dtype.

    **Raises:** `ValueError` for a zero or non-finite quaternion (inside `jax.jit`/`vmap`/`grad`,
    the same message from `equinox.error_if`, which surfaces as a runtime error when run).
    """
    q = jnp.asarray(quaternion, _float_dtype(quaternion))
    if q.ndim < 1 or q.shape[-1] != 4:
        raise ValueError(f"a quaternion is a (..., 4) array (w, x, y, z), got shape {q.shape}")
    q = _check_quaternion(q)
    norm2 = jnp.sum(q * q, axis=-1, keepdims=True)
    q = q / jnp.sqrt(jnp.where(norm2 > 0, norm2, 1.0))
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)),
    )
    return jnp.stack([jnp.stack(row, axis=-1) for row in rows], axis=-2)


def _kind(shape: tuple[int, ...]) -> str:
    if len(shape) >= 2 and shape[-2:] == (3, 3):
        return "matrix"
    if len(shape) >= 1 and shape[-1] == 4:
        return "quaternion"
    raise ValueError(
        "a rotation is a (..., 3, 3) matrix or a (..., 4) quaternion (w, x, y, z), "
        f"got an array of shape {tuple(shape)}"
    )


def as_rotation_matrix(
    rotation: Float[ArrayLike, "... 3 3"] | Float[ArrayLike, "... 4"],
) -> Float[Array, "... 3 3"]:
    """Rotation matrices of rotations given as matrices or as quaternions.

    The kind is read from the shape: last two axes `(3, 3)` is a matrix (returned as is, as a float
    array), last axis `4` a quaternion in (w, x, y, z) order (converted by `quaternion_to_matrix`).
    A matrix is not checked to be a rotation (see `check_rotation`).

    **Arguments:**

    - `rotation`: `(..., 3, 3)` matrices acting as `x' = R x`, or `(..., 4)` quaternions
      `(w, x, y, z)`, scalar first.

    **Returns:** `(..., 3, 3)` rotation matrices.

    **Raises:** `ValueError` for any other shape, and for a zero quaternion.
    """
    shape = np.shape(rotation)
    if _kind(shape) == "quaternion":
        return quaternion_to_matrix(rotation)
    return jnp.asarray(rotation, _float_dtype(rotation))


def rotate_positions(
    positions: Float[ArrayLike, "n 3"],
    rotation: Float[ArrayLike, "3 3"] | Float[ArrayLike, "4"],
    center: Float[ArrayLike, "3"],
) -> Float[Array, "n 3"]:
    """Positions rotated by `R` about `center`: `x' = R (x - c) + c`.

    Computed as `center + (positions - center) @ R.T`. With RELION's `A = euler_to_matrix(rot,
    tilt, psi)` and `center` the box centre (RELION rotates about the centre of the box, voxel
    `n // 2` along each axis), this puts a model fitted in the reference map into the pose of the
    particle that RELION assigned `(rot, tilt, psi)`; the image is then the projection along z.
    Distances between positions are kept and `center` stays fixed.

    One rotation; use `jax.vmap` over poses for a batch. The rotation is not checked to be a
    rotation (call `check_rotation` once on the poses).

    **Arguments:**

    - `positions`: `(n, 3)` x, y, z in Å (any leading shape `(..., 3)` works).
    - `rotation`: one `(3, 3)` matrix or one `(4,)` quaternion `(w, x, y, z)`.
    - `center`: `(3,)` x, y, z in Å of the point that stays fixed.

    **Returns:** the rotated positions in Å, shape and float dtype of `positions`.
    """
    dtype = _float_dtype(positions)
    pos = jnp.asarray(positions, dtype)
    r = as_rotation_matrix(rotation)
    if r.shape != (3, 3):
        raise ValueError(
            f"rotate_positions takes one rotation ((3, 3) or (4,)), got shape {np.shape(rotation)}; "
            "use jax.vmap over a batch of poses"
        )
    c = jnp.asarray(center, dtype)
    if c.shape != (3,):
        raise ValueError(f"center must be (3,) x, y, z in Å, got shape {c.shape}")
    if pos.ndim < 1 or pos.shape[-1] != 3:
        raise ValueError(f"positions must be (n, 3) x, y, z in Å, got shape {pos.shape}")
    return c + (pos - c) @ r.astype(dtype).T


# -- checks ------------------------------------------------------------------------------------------

_MSG_NONFINITE = "rotation has NaN or infinite entries"
_MSG_ZERO_QUAT = "quaternion is zero (or too small to normalise); a rotation needs |q| > 0"
_MSG_NOT_ORTHONORMAL = "rotation matrix is not orthonormal (|R Rᵀ - I| > {atol:g})"
_MSG_REFLECTION = "rotation matrix has determinant -1 (a reflection), not +1"


def _bad_indices(bad: np.ndarray) -> str:
    idx = [tuple(int(i) for i in t) for t in np.argwhere(bad)]
    if not idx or idx[0] == ():
        return ""
    shown = ", ".join(str(t[0] if len(t) == 1 else t) for t in idx[:5])
    more = f" and {len(idx) - 5} more" if len(idx) > 5 else ""
    return f" (at index {shown}{more} of {bad.size})"


def _check_quaternion(q: Array) -> Array:
    """`q` with zero / non-finite quaternions reported: `ValueError` when concrete, `error_if` when traced."""
    if not _is_traced(q):
        qn = np.asarray(q, np.float64)
        nonfinite = ~np.all(np.isfinite(qn), axis=-1)
        if np.any(nonfinite):
            raise ValueError(f"quaternion: {_MSG_NONFINITE}{_bad_indices(nonfinite)}")
        zero = ~(np.sum(qn * qn, axis=-1) > np.finfo(np.dtype(q.dtype)).tiny)
        if np.any(zero):
            raise ValueError(f"{_MSG_ZERO_QUAT}{_bad_indices(zero)}")
        return q
    q = eqx.error_if(q, ~jnp.all(jnp.isfinite(q)), f"quaternion: {_MSG_NONFINITE}")
    tiny = jnp.finfo(q.dtype).tiny
    return eqx.error_if(q, jnp.any(~(jnp.sum(q * q, axis=-1) > tiny)), _MSG_ZERO_QUAT)


def check_rotation(
    rotation: Float[ArrayLike, "... 3 3"] | Float[ArrayLike, "... 4"], atol: float = 1e-4
) -> Float[Array, "... 3 3"] | Float[Array, "... 4"]:
    """Check that rotations are rotations; return them unchanged.

    A matrix must be finite, orthonormal (`max |R Rᵀ - I| <= atol`) and proper (`det R = +1`, not
    a reflection); a quaternion `(w, x, y, z)` must be finite and non-zero (it is normalised where
    used). The default `atol = 1e-4` passes float32 matrices built from angles or quaternions (their
    rounding is ~1e-7) and refuses anything visibly sheared or scaled (a 0.1 % scale gives 2e-3).

    For concrete arrays this raises `ValueError` at once, naming the problem and the first bad
    indices. For traced arrays (inside `jax.jit`, `vmap` or `grad`) the same messages are attached
    with `equinox.error_if`, which raises when the computation runs (an `EqxRuntimeError` whose
    message contains the text); use the returned array so the check stays in the graph.

    **Arguments:**

    - `rotation`: `(..., 3, 3)` matrices or `(..., 4)` quaternions (w, x, y, z).
    - `atol`: largest allowed entry of `|R Rᵀ - I|` and of `|det R - 1|`.

    **Returns:** `rotation` as a float array, with the checks attached when traced.

    **Raises:** `ValueError` for a shape that is neither, and for a rotation that fails a check.
    """
    kind = _kind(np.shape(rotation))
    r = jnp.asarray(rotation, _float_dtype(rotation))
    if kind == "quaternion":
        return _check_quaternion(r)
    msg_ortho = _MSG_NOT_ORTHONORMAL.format(atol=atol)
    if not _is_traced(r):
        rn = np.asarray(r, np.float64)
        nonfinite = ~np.all(np.isfinite(rn), axis=(-2, -1))
        if np.any(nonfinite):
            raise ValueError(f"{_MSG_NONFINITE}{_bad_indices(nonfinite)}")
        err = np.max(np.abs(rn @ np.swapaxes(rn, -1, -2) - np.eye(3)), axis=(-2, -1))
        if np.any(err > atol):
            raise ValueError(f"{msg_ortho}: max deviation {err.max():.3g}{_bad_indices(err > atol)}")
        det = np.linalg.det(rn)
        if np.any(np.abs(det - 1) > atol):
            raise ValueError(f"{_MSG_REFLECTION}{_bad_indices(np.abs(det - 1) > atol)}")
        return r
    r = eqx.error_if(r, ~jnp.all(jnp.isfinite(r)), _MSG_NONFINITE)
    rrt = r @ jnp.swapaxes(r, -1, -2)
    r = eqx.error_if(r, jnp.any(jnp.abs(rrt - jnp.eye(3, dtype=r.dtype)) > atol), msg_ortho)
    return eqx.error_if(r, jnp.any(jnp.abs(jnp.linalg.det(r) - 1) > atol), _MSG_REFLECTION)
