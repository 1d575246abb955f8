"""The refined parameters: scaled units, groups, and the atoms they build.

The optimiser sees every parameter in units of comparable effect (a diagonal preconditioner):
1 Å for coordinates and rigid-body translations, 1 Å at the chain's radius of gyration for
rotations, 10 Å² for B, 0.1 for occupancies and 0.3 Å for resolutions, each scaled per atom by the
Gauss-Newton curvature of the map term (`units`). Occupancies and resolutions are refined per atom
or per group (`parameter_groups`: residues, or any ids): one shift per group, added to the starting
value of each of its atoms, in a unit that gives every group the map curvature of a median atom
(`group_units`). B and resolutions are clipped into their bounds where the atoms are built
(`build`); the objective's bound penalty brings them back (`modelmap.refine._objective`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._arrays import put

if TYPE_CHECKING:
    from ._objective import Args

__all__ = ["UNITS", "build", "group_units", "parameter_groups", "rigid_groups", "rotation", "shifted", "units"]

UNITS = {"xyz": 1.0, "b": 10.0, "occ": 0.1, "res": 0.3}


def rotation(v: Float[Array, "g 3"]) -> Float[Array, "g 3 3"]:
    """Rodrigues' rotation matrices of rotation vectors `v` (radians), smooth at 0."""
    theta2 = jnp.sum(v * v, -1)
    safe = jnp.where(theta2 > 1e-12, theta2, 1.0)
    theta = jnp.sqrt(safe)
    a = jnp.where(theta2 > 1e-12, jnp.sin(theta) / theta, 1.0 - theta2 / 6)
    b = jnp.where(theta2 > 1e-12, (1 - jnp.cos(theta)) / safe, 0.5 - theta2 / 24)
    z = jnp.zeros_like(v[:, 0])
    k = jnp.stack([
        jnp.stack([z, -v[:, 2], v[:, 1]], -1),
        jnp.stack([v[:, 2], z, -v[:, 0]], -1),
        jnp.stack([-v[:, 1], v[:, 0], z], -1),
    ], -2)
    eye = jnp.eye(3, dtype=v.dtype)
    return eye + a[:, None, None] * k + b[:, None, None] * (k @ k)


def shifted(u: dict, args: "Args") -> dict:
    """The refined B, occupancies and resolutions before any clip: start + shift × unit (one shift
    per group for occupancies and resolutions), in the model's dtype (an optimiser's line search
    may step in float64 under x64)."""
    u = {k: v.astype(args.positions.dtype) for k, v in u.items()}
    out = {}
    if "b" in u:
        out["b"] = args.b_factors + u["b"] * args.unit_b
    if "occ" in u:
        out["occ"] = args.occupancies + (u["occ"] * args.unit_occ_group)[args.occ_groups]
    if "res" in u:
        out["res"] = args.resolutions + (u["res"] * args.unit_res_group)[args.res_groups]
    return out


def build(u: dict, args: "Args"):
    """(positions, B, occupancies, resolutions) from the scaled parameters `u`."""
    pos, b, occ, res = args.positions, args.b_factors, args.occupancies, args.resolutions
    raw = shifted(u, args)
    u = {k: v.astype(pos.dtype) for k, v in u.items()}
    if "xyz" in u:
        pos = pos + u["xyz"] * args.unit_xyz[:, None]
    if "rigid" in u:
        rot = rotation(u["rigid"][:, :3] / args.radii[:, None])
        shift = u["rigid"][:, 3:]
        c = args.centres[args.groups]
        pos = jnp.einsum("nij,nj->ni", rot[args.groups], pos - c) + c + shift[args.groups]
    if "b" in raw:
        b = jnp.clip(raw["b"], args.b_lo, args.b_hi)
    if "occ" in raw:
        # not clipped: most occupancies sit at their bound 1, where a clip's kink stalls L-BFGS; the
        # bound penalty keeps them within [0, 1] instead
        occ = raw["occ"]
    if "res" in raw:
        res = jnp.clip(raw["res"], args.d_lo, args.d_hi)
    return pos, b, occ, res


def units(b0: np.ndarray, atomic_numbers: np.ndarray, resolution: float, table, dtype):
    """Per-atom units of coordinates, B and occupancy: a diagonal preconditioner.

    Each unit is 1/√(curvature) of the least-squares map term in that parameter, for an atom alone
    in the Fourier map at resolution D (the Gauss-Newton diagonal). By Parseval the curvature is an
    integral over the kept sphere of the atom's transform g(s) = f(s) exp(−B s²/4) (f the
    scattering factor of its element) times the parameter's factor squared:

        xyz: ∫ (2π s)²/3 g² d³s,  B: ∫ (s²/4)² g² d³s,  occupancy: ∫ g² d³s,  |s| <= 1/D,

    (1-D radial quadrature, 129 nodes). Sharp atoms and heavy elements get small units, blurred and
    light ones large, so one L-BFGS step moves them alike. Normalized to 1 Å, 10 Å² and 0.1 at the
    median atom; factors kept in [0.1, 10].
    """
    s = np.linspace(0.0, 1.0 / resolution, 129)
    w = np.full(s.shape, s[1] - s[0])
    w[0] = w[-1] = 0.5 * w[0]  # trapezoid
    z = np.asarray(atomic_numbers)
    a, bk = (np.asarray(x, np.float64)[z] for x in (table.a, table.b))  # (n, K)
    f = np.einsum("nk,nks->ns", a, np.exp(-bk[:, :, None] * s**2 / 4.0))
    g2 = (f * np.exp(-np.maximum(b0, 0.0)[:, None] * s**2 / 4.0)) ** 2 * (4.0 * math.pi * s**2 * w)
    curvatures = {"xyz": g2 @ (4.0 * math.pi**2 * s**2 / 3.0), "b": g2 @ (s**2 / 4.0) ** 2, "occ": g2.sum(1)}
    out = []
    for key in ("xyz", "b", "occ"):
        u = 1.0 / np.sqrt(np.maximum(curvatures[key], 1e-300))
        out.append(put(UNITS[key] * np.clip(u / np.median(u), 0.1, 10.0), dtype))
    return tuple(out)


def rigid_groups(labels, n: int, groups):
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"rigid_groups must have one entry per atom ({n}), got {g.shape}")
        _, inv = np.unique(g, return_inverse=True)
        return inv.astype(np.int32)
    if labels is None:
        return np.zeros(n, np.int32)
    _, inv = np.unique(np.asarray(labels.chain), return_inverse=True)
    return inv.astype(np.int32)


def parameter_groups(labels, n: int, groups, option: str) -> np.ndarray | None:
    """(n,) group index of every atom from 0 for `option` (`occupancy_groups` or
    `resolution_groups`), or None for one parameter per atom."""
    if groups is None or (isinstance(groups, str) and groups == "atom"):
        return None
    if isinstance(groups, str):
        if groups != "residue":
            raise ValueError(f"{option} must be None, 'atom', 'residue' or one group id per atom, got {groups!r}")
        if labels is None:
            raise ValueError(f"{option}='residue' needs an AtomicModel (chain, residue number and insertion "
                             "code of every atom); with bare Atoms give one group id per atom")
        # one group per residue and alternate conformer (a residue's shared atoms are one more)
        from .._residues import residue_groups

        return residue_groups(labels)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"{option} must have one entry per atom ({n}), got shape {g.shape}")
    _, inv = np.unique(g, return_inverse=True)
    return inv.reshape(-1).astype(np.int32)


def group_units(positions: np.ndarray, b0: np.ndarray, resolution: float, groups: np.ndarray) -> np.ndarray:
    """The unit of each group's shift relative to a single median atom's (multiply by 0.1 for
    occupancy, 0.3 Å for resolution): the shift of all its atoms whose map curvature equals that of
    one median atom's.

    Each atom is a Gaussian of total width β = B + 4 D² (variance σ² = β / 8π² per axis, the
    resolution as a blur, as in `units`); the curvature of a group's shift is then proportional to
    Σ_ij ∫ρ_i ρ_j = Σ_ij (2π (σ_i² + σ_j²))^(-3/2) exp(−r_ij² / 2 (σ_i² + σ_j²)) over its atoms
    (elements ignored, as in `units`). For a single atom this is `units`' β^(3/4) law; for g well
    separated atoms the unit is 1/√g of theirs, and for g overlapping ones nearer 1/g. Resolution
    shifts use the same overlaps (∂ρ/∂D of neighbouring atoms overlap as their densities do).
    """
    from scipy.spatial import cKDTree

    var = (np.maximum(b0, 0.0) + 4.0 * resolution**2) / (8.0 * math.pi**2)
    ref = (4.0 * math.pi * np.median(var)) ** -1.5  # a median atom's ∫ρ²
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    total = np.empty(int(groups.max()) + 1)
    cut = 4.0 * math.sqrt(2.0 * var.max())  # pairs farther than 4σ of their sum add < e^-8
    for idx in np.split(order, bounds):
        v = var[idx]
        s = float(np.sum((4.0 * math.pi * v) ** -1.5))
        if len(idx) > 1:
            pairs = cKDTree(positions[idx]).query_pairs(cut, output_type="ndarray")
            if len(pairs):
                i, j = pairs[:, 0], pairs[:, 1]
                vv = v[i] + v[j]
                r2 = np.sum((positions[idx][i] - positions[idx][j]) ** 2, -1)
                s += 2.0 * float(np.sum((2.0 * math.pi * vv) ** -1.5 * np.exp(-r2 / (2.0 * vv))))
        total[groups[idx[0]]] = s
    return np.clip(np.sqrt(ref / total), 1e-3, 10.0)
