"""Geometry restraints (bonds, angles, planes, chirality, non-bonded repulsion) and bounds on B,
occupancy and resolution: the `Restraints` module and its energy, pure JAX.

Ideal values and σ come from `modelmap.refine._library` (built by `build_restraints`,
`modelmap.refine._build`); the non-bonded pair list from `modelmap.refine._neighbours`.

## The terms (all in units of σ², summed; each has a weight)

- bond: ((d − d0)/σ)²; angle: ((θ − θ0)/σ)², θ = atan2(|u × v|, u · v) for stable gradients;
- plane: Σ_k (n · (x_k − x̄))² / σ² with n the normal of the least-squares plane (smallest eigenvector
  of the scatter matrix, held fixed in the gradient: exact by the envelope theorem);
- torsion (peptide ω): (wrap(ω − ω0)/σ)², wrap to (−π, π];
- chirality: ((V − V0)/σ)² with V = (x_a − x_c) · ((x_b − x_c) × (x_d − x_c)) around the centre c; V0
  has the magnitude implied by the ideal bonds and angles and the sign of the CCD ideal coordinates;
- non-bonded: ((r0 − d)/σ)² for d < r0, σ = 0.1 Å: the harmonic van der Waals repulsion of Refmac
  and servalcat (gemmi's restraints; they use σ = 0.2 Å, with riding hydrogens that carry much of
  the repulsion: without hydrogens 0.2 Å left 30 heavy-atom contacts under 2.2 Å where 0.1 Å left 2,
  7CEC chain A against EMD-30342); r0 = 0.8 × (R_i + R_j) with Bondi (1964) van der Waals radii
  (0.7 × for 1-4 pairs); 1-2 and 1-3 pairs, atoms of different alternate conformations and atoms
  without a dictionary entry are excluded (`modelmap.refine._neighbours`). Pairs come from a
  neighbour list (`scipy.spatial.cKDTree`); rebuild it with `Restraints.with_nonbonded` after the
  atoms have moved by more than half the list's `buffer` (`refine` does). Phenix's "prolsq" form
  c_rep · (r0 − d)⁴ (c_rep = 16 Å⁻⁴) was used before: at 0.3 Å of overlap it is 70 times softer,
  and real-map refinement left 140 heavy-atom contacts under 2.2 Å;
- B similarity along bonds: ((B_i − B_j)/σ_B)², σ_B = 5 Å² by default;
- occupancy: ((max(0, −q) + max(0, q − 1))/σ_q)² per atom, and ((Σ_alt q − 1)/σ_q)² per group of
  alternate conformers of one atom, σ_q = 0.01;
- resolution: ((max(0, D_lo − D) + max(0, D − D_hi))/σ_D)² per atom, σ_D = 0.1 Å.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._arrays import put
from ._neighbours import NONBONDED_SIGMA, nonbonded_pairs

__all__ = ["Restraints", "RestraintWeights"]


class RestraintWeights(eqx.Module):
    """Weights of the restraint terms (multiply each term's sum of (Δ/σ)²). All default to 1."""

    bond: float = 1.0
    angle: float = 1.0
    plane: float = 1.0
    chirality: float = 1.0
    torsion: float = 1.0
    nonbonded: float = 1.0
    b_similarity: float = 1.0
    occupancy: float = 1.0
    resolution: float = 1.0


def _dihedral(p0, p1, p2, p3):
    """Dihedral angle p0-p1-p2-p3 in radians, by atan2 (IUPAC sign)."""
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = jnp.cross(b1, b2), jnp.cross(b2, b3)
    m1 = jnp.cross(n1, b2) / _norm(b2)[..., None]
    return jnp.arctan2(jnp.sum(m1 * n2, -1), jnp.sum(n1 * n2, -1))


def _norm(v: Array) -> Array:
    """|v| along the last axis with a finite gradient at v = 0."""
    sq = jnp.sum(v * v, axis=-1)
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


class Restraints(eqx.Module):
    """Geometry restraints of one model, as static-shaped index arrays; pure JAX energy functions.

    Build it with `build_restraints`. Every method is jit-able and differentiable in positions, B,
    occupancy and resolution; pass `(n, 3)` positions (use `jax.vmap` for an ensemble). The module
    docstring lists the terms, the ideal-value sources and the σ.

    **Fields (per restraint):**

    - `bond_index` `(nb, 2)`, `bond_ideal` Å, `bond_sigma` Å.
    - `angle_index` `(na, 3)` (vertex in the middle), `angle_ideal` and `angle_sigma` in radians.
    - `plane_index` `(npl, k)` padded with 0, `plane_mask` `(npl, k)`, `plane_sigma` `(npl,)` Å.
    - `chiral_index` `(nc, 4)` (centre, a, b, c), `chiral_ideal` Å³, `chiral_sigma` Å³.
    - `torsion_index` `(nt, 4)`, `torsion_ideal`, `torsion_sigma` in radians (peptide ω).
    - `nonbonded_index` `(nn, 2)`, `nonbonded_distance` r0 in Å (0 for padding).
    - `alt_group_index` `(ng, k)` padded, `alt_group_mask`: alternate conformers of one atom.
    - `vdw_radius` `(n,)` Å (0: no non-bonded term), `altloc_code` `(n,)` (0: no altloc),
      used to rebuild the neighbour list.
    - `weights`: `RestraintWeights`; `b_sigma` Å², `occupancy_sigma`, `resolution_bounds` (Å),
      `resolution_sigma` Å, `nonbonded_sigma` Å, `nonbonded_buffer` Å.
    - `library`: where the ideal values came from (a CCP4 monomer library's folder, or the CCD).
    """

    bond_index: Int[Array, "nb 2"]
    bond_ideal: Float[Array, " nb"]
    bond_sigma: Float[Array, " nb"]
    angle_index: Int[Array, "na 3"]
    angle_ideal: Float[Array, " na"]
    angle_sigma: Float[Array, " na"]
    plane_index: Int[Array, "npl k"]
    plane_mask: Bool[Array, "npl k"]
    plane_sigma: Float[Array, " npl"]
    chiral_index: Int[Array, "nc 4"]
    chiral_ideal: Float[Array, " nc"]
    chiral_sigma: Float[Array, " nc"]
    torsion_index: Int[Array, "nt 4"]
    torsion_ideal: Float[Array, " nt"]
    torsion_sigma: Float[Array, " nt"]
    nonbonded_index: Int[Array, "nn 2"]
    nonbonded_distance: Float[Array, " nn"]
    alt_group_index: Int[Array, "ng g"]
    alt_group_mask: Bool[Array, "ng g"]
    vdw_radius: Float[Array, " n"]
    altloc_code: Int[Array, " n"]
    weights: RestraintWeights = RestraintWeights()
    b_sigma: float = eqx.field(static=True, default=5.0)
    occupancy_sigma: float = eqx.field(static=True, default=0.01)
    resolution_bounds: tuple[float, float] = eqx.field(static=True, default=(1.0, 30.0))
    resolution_sigma: float = eqx.field(static=True, default=0.1)
    nonbonded_sigma: float = eqx.field(static=True, default=NONBONDED_SIGMA)
    nonbonded_buffer: float = eqx.field(static=True, default=2.0)
    unrestrained: tuple[str, ...] = eqx.field(static=True, default=())
    library: str = eqx.field(static=True, default="CCD (biotite) + Engh & Huber")

    @property
    def n_atoms(self) -> int:
        return self.vdw_radius.shape[0]

    # ---- geometry -------------------------------------------------------------------------

    def bond_lengths(self, positions: Float[Array, "n 3"]) -> Float[Array, " nb"]:
        """Bond lengths d in Å, in the order of `bond_index`."""
        i, j = self.bond_index[:, 0], self.bond_index[:, 1]
        return _norm(positions[i] - positions[j])

    def angles(self, positions: Float[Array, "n 3"]) -> Float[Array, " na"]:
        """Angles θ in radians (atan2(|u × v|, u · v)), in the order of `angle_index`."""
        a, b, c = (self.angle_index[:, k] for k in range(3))
        u = positions[a] - positions[b]
        v = positions[c] - positions[b]
        return jnp.arctan2(_norm(jnp.cross(u, v)), jnp.sum(u * v, axis=-1))

    def chiral_volumes(self, positions: Float[Array, "n 3"]) -> Float[Array, " nc"]:
        """Signed chiral volumes V in Å³, in the order of `chiral_index`."""
        o, a, b, c = (positions[self.chiral_index[:, k]] for k in range(4))
        return jnp.sum((a - o) * jnp.cross(b - o, c - o), axis=-1)

    def plane_deviations(self, positions: Float[Array, "n 3"]) -> Float[Array, "npl k"]:
        """Distance in Å of each plane atom from its least-squares plane (0 where padded)."""
        pts = positions[self.plane_index]
        m = self.plane_mask.astype(positions.dtype)[..., None]
        centroid = jnp.sum(pts * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        c = (pts - centroid[:, None, :]) * m
        scatter = jnp.einsum("pki,pkj->pij", c, c)
        _, vecs = jnp.linalg.eigh(jax.lax.stop_gradient(scatter))
        normal = vecs[..., 0]  # smallest eigenvalue first; fixed in the gradient (envelope theorem)
        return jnp.sum(c * normal[:, None, :], axis=-1)

    def torsions(self, positions: Float[Array, "n 3"]) -> Float[Array, " nt"]:
        """Dihedral angles in radians in (−π, π], in the order of `torsion_index`."""
        p0, p1, p2, p3 = (positions[self.torsion_index[:, k]] for k in range(4))
        return _dihedral(p0, p1, p2, p3)

    def nonbonded_distances(self, positions: Float[Array, "n 3"]) -> Float[Array, " nn"]:
        i, j = self.nonbonded_index[:, 0], self.nonbonded_index[:, 1]
        return _norm(positions[i] - positions[j])

    def bond_rmsd(self, positions: Float[Array, "n 3"]) -> Float[Array, ""]:
        """Root-mean-square deviation of bond lengths from ideal, in Å."""
        d = self.bond_lengths(positions) - self.bond_ideal.astype(positions.dtype)
        return jnp.sqrt(jnp.mean(d * d))

    def angle_rmsd(self, positions: Float[Array, "n 3"]) -> Float[Array, ""]:
        """Root-mean-square deviation of bond angles from ideal, in degrees."""
        d = self.angles(positions) - self.angle_ideal.astype(positions.dtype)
        return jnp.degrees(jnp.sqrt(jnp.mean(d * d)))

    # ---- energies -------------------------------------------------------------------------

    def energy_terms(
        self,
        positions: Float[Array, "n 3"],
        b_factors: Float[Array, " n"] | None = None,
        occupancies: Float[Array, " n"] | None = None,
        resolution: Float[Array, " n"] | None = None,
    ) -> dict[str, Float[Array, ""]]:
        """Each restraint term, weighted, as a dict of scalars (dimensionless, sums of (Δ/σ)²).

        Keys: `bond`, `angle`, `plane`, `chirality`, `torsion`, `nonbonded`, and `b_similarity`,
        `occupancy`, `resolution` when B, occupancies or per-atom resolutions (Å) are given.
        """
        dt = positions.dtype
        w = self.weights
        terms = {}
        r = (self.bond_lengths(positions) - self.bond_ideal.astype(dt)) / self.bond_sigma.astype(dt)
        terms["bond"] = w.bond * jnp.sum(r * r)
        r = (self.angles(positions) - self.angle_ideal.astype(dt)) / self.angle_sigma.astype(dt)
        terms["angle"] = w.angle * jnp.sum(r * r)
        if self.plane_index.shape[0]:
            r = self.plane_deviations(positions) / self.plane_sigma.astype(dt)[:, None]
            terms["plane"] = w.plane * jnp.sum(r * r)
        else:
            terms["plane"] = jnp.zeros((), dt)
        r = (self.chiral_volumes(positions) - self.chiral_ideal.astype(dt)) / self.chiral_sigma.astype(dt)
        terms["chirality"] = w.chirality * jnp.sum(r * r)
        delta = self.torsions(positions) - self.torsion_ideal.astype(dt)
        delta = jnp.arctan2(jnp.sin(delta), jnp.cos(delta))  # wrapped to (−π, π]
        r = delta / self.torsion_sigma.astype(dt)
        terms["torsion"] = w.torsion * jnp.sum(r * r)
        overlap = jnp.maximum(self.nonbonded_distance.astype(dt) - self.nonbonded_distances(positions), 0.0)
        terms["nonbonded"] = w.nonbonded * jnp.sum((overlap / self.nonbonded_sigma) ** 2)
        if b_factors is not None:
            i, j = self.bond_index[:, 0], self.bond_index[:, 1]
            r = (b_factors[i] - b_factors[j]) / self.b_sigma
            terms["b_similarity"] = w.b_similarity * jnp.sum(r * r)
        if occupancies is not None:
            q = occupancies
            out = (jnp.maximum(-q, 0.0) + jnp.maximum(q - 1.0, 0.0)) / self.occupancy_sigma
            total = jnp.sum(q[self.alt_group_index] * self.alt_group_mask, axis=1)
            alt = (total - 1.0) / self.occupancy_sigma
            terms["occupancy"] = w.occupancy * (jnp.sum(out * out) + jnp.sum(alt * alt))
        if resolution is not None:
            lo, hi = self.resolution_bounds
            out = (jnp.maximum(lo - resolution, 0.0) + jnp.maximum(resolution - hi, 0.0))
            terms["resolution"] = w.resolution * jnp.sum((out / self.resolution_sigma) ** 2)
        return terms

    def energy(
        self,
        positions: Float[Array, "n 3"],
        b_factors: Float[Array, " n"] | None = None,
        occupancies: Float[Array, " n"] | None = None,
        resolution: Float[Array, " n"] | None = None,
    ) -> Float[Array, ""]:
        """The total restraint energy: the sum of `energy_terms` (dimensionless).

        **Arguments:**

        - `positions`: `(n, 3)` in Å.
        - `b_factors`: `(n,)` B in Å² (adds B similarity along bonds), optional.
        - `occupancies`: `(n,)` (adds bounds [0, 1] and alternate conformers summing to 1), optional.
        - `resolution`: `(n,)` per-atom resolution in Å (adds `resolution_bounds`), optional.

        **Returns:** a scalar.
        """
        terms = self.energy_terms(positions, b_factors, occupancies, resolution)
        return functools.reduce(jnp.add, terms.values())

    def summary(self, positions) -> dict[str, float]:
        """Counts and rmsds (bond Å, angle °, chirality Å³, planarity Å, worst clash Å) as floats."""
        values = _summary_values(self, jnp.asarray(positions))
        return {
            "bonds": int(self.bond_index.shape[0]),
            "angles": int(self.angle_index.shape[0]),
            "planes": int(self.plane_index.shape[0]),
            "chirals": int(self.chiral_index.shape[0]),
            "nonbonded_pairs": int(np.sum(np.asarray(self.nonbonded_distance) > 0)),
            **{k: float(v) for k, v in values.items()},
        }

    # ---- neighbour list -------------------------------------------------------------------

    def with_nonbonded(
        self, positions, *, capacity: int | None = None, headroom: float | None = None
    ) -> "Restraints":
        """A copy with the non-bonded pair list rebuilt around `positions` (concrete, `(n, 3)` Å).

        Pairs closer than the largest contact distance plus `nonbonded_buffer` are kept. With
        `capacity`, the list is padded (r0 = 0: no contribution) to that many pairs so that a jitted
        function does not retrace; a ValueError says when more pairs were found. With `headroom`
        (and no `capacity`) the capacity is `headroom` × the pairs found, plus 64.
        """
        index, r0 = nonbonded_pairs(
            np.asarray(positions, np.float64), np.asarray(self.vdw_radius, np.float64),
            np.asarray(self.altloc_code), np.asarray(self.bond_index), self.nonbonded_buffer,
        )
        if capacity is None and headroom is not None:
            capacity = int(headroom * len(r0)) + 64
        if capacity is not None:
            if len(r0) > capacity:
                raise ValueError(
                    f"the neighbour list has {len(r0)} pairs, more than capacity={capacity}; "
                    "rebuild with a larger capacity"
                )
            index = np.concatenate([index, np.zeros((capacity - len(r0), 2), index.dtype)])
            r0 = np.concatenate([r0, np.zeros(capacity - len(r0))])
        dt = self.bond_ideal.dtype
        return eqx.tree_at(
            lambda r: (r.nonbonded_index, r.nonbonded_distance), self,
            (put(index, np.int32), put(r0, dt)),
        )


@eqx.filter_jit
def _summary_values(restraints: Restraints, pos: Float[Array, "n 3"]) -> dict:
    """`Restraints.summary`'s rmsds in one compiled call (op by op, each is a compilation of its own)."""
    r = restraints
    zero = jnp.zeros((), pos.dtype)
    dev = r.plane_deviations(pos) if r.plane_index.shape[0] else jnp.zeros((0,), pos.dtype)
    return {
        "bond_rmsd": r.bond_rmsd(pos),
        "angle_rmsd": r.angle_rmsd(pos),
        "chirality_rmsd": jnp.sqrt(jnp.mean((r.chiral_volumes(pos) - r.chiral_ideal) ** 2))
        if r.chiral_index.shape[0] else zero,
        "planarity_rmsd": jnp.sqrt(jnp.sum(dev**2) / jnp.maximum(jnp.sum(r.plane_mask), 1))
        if r.plane_index.shape[0] else zero,
        "worst_overlap": jnp.max(r.nonbonded_distance - r.nonbonded_distances(pos), initial=0.0),
    }
