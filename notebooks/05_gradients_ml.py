# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Gradients for machine learning: batches, poses and ensembles
#
# Two patterns a training loop needs, on small helices so that it runs in seconds:
#
# 1. a **batch** of structures, one map each (`mm.batch.plan_batch` + `render_stacked`), and the
#    gradient of a batch loss with respect to every atom's position and B (`jax.grad`);
# 2. an **ensemble** whose map is a weighted mean of its members, and the gradient with respect to
#    the weights (reweighting two conformations against a map).
#
# Poses (one structure in many orientations) work the same way: `mm.batch.render_poses(render_fn,
# volume, rotations)` renders them in one call, and `jax.vmap(jax.grad(...))` over rotation angles
# (`mm.euler_to_matrix`, RELION's convention) differentiates a per-pose score.

# %%
import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import modelmap as mm
from _common import helix, save

rng = np.random.default_rng(3)
base = helix().atoms
structures = []
for i in range(4):  # four copies in different orientations, with different B
    rot = mm.euler_to_matrix(*rng.uniform(0, 360, 3))
    pos = (np.asarray(base.positions) - np.asarray(base.positions).mean(0)) @ np.asarray(rot).T
    structures.append(mm.Atoms(pos.astype(np.float32), base.atomic_numbers,
                               np.full(base.b_factors.shape, 20.0 + 15 * i, np.float32), base.occupancies))

# %% [markdown]
# ## 1. A batch and its gradient
#
# `plan_batch` pads the structures to a bucket size with zero-occupancy atoms, puts each in its own
# 32³ box of 1 Å voxels and plans one render function for all of them. The loss is the mean squared
# difference between each structure's map and a target map (here: the maps of the same structures
# with B 10 Å² higher, standing in for data).

# %%
D = 3.0
groups = mm.batch.plan_batch(structures, D, method="gaussian", box=32, voxel_size=1.0, b_margin=20.0)
print(len(groups), "group(s), one per bucket size:",
      [(g.indices, g.volumes.positions.shape) for g in groups])


def batch_maps(volumes):
    """(4, 32, 32, 32): every group rendered, the maps put back in the structures' order."""
    rendered = [mm.batch.render_stacked(g.render_fn, v) for g, v in zip(groups, volumes)]
    return mm.batch.assemble(groups, rendered, len(structures))


volumes = [g.volumes for g in groups]
render_all = jax.jit(batch_maps)
maps = render_all(volumes)
targets = render_all([eqx.tree_at(lambda v: v.b_factors, v, v.b_factors + 10.0) for v in volumes])
print("maps", maps.shape, "targets", targets.shape)


@eqx.filter_jit
def batch_loss(volumes):
    return jnp.mean((batch_maps(volumes) - targets) ** 2)


loss, grads = eqx.filter_value_and_grad(batch_loss)(volumes)
print(f"loss {loss:.3e}")
for g, gr in zip(groups, grads):
    real = g.atom_index >= 0
    print(f"group {g.indices}: mean dL/dB over real atoms {np.asarray(gr.b_factors)[real].mean():.2e} (negative: "
          f"raising B lowers the loss); padding atoms' position gradient all zero: "
          f"{bool(np.all(np.asarray(gr.positions)[~real] == 0))}")

# %%
fig, axes = plt.subplots(1, 4, figsize=(12, 3), layout="constrained")
for i, ax in enumerate(axes):
    ax.imshow(np.asarray(maps[i]).sum(axis=0), origin="lower", cmap="gray_r")
    ax.set_title(f"structure {i}: B = {20 + 15 * i} Å², sum over z", fontsize=9)
    ax.set_xlabel("x (voxel)"), ax.set_ylabel("y (voxel)")
save(fig, "05_batch.png")

# %% [markdown]
# ## 2. Ensemble weights
#
# Two conformations (the helix and the same helix shifted by 2 Å along x) form an `Ensemble`; its
# map is `Σ w_m ρ_m / Σ w_m`. The target is the 30:70 mixture; 60 Adam steps (learning rate 0.1,
# which overshoots and rings around the answer) on the weights' logits recover it.

# %%
shifted = mm.Atoms(structures[0].positions + jnp.array([2.0, 0.0, 0.0]), structures[0].atomic_numbers,
                   structures[0].b_factors, structures[0].occupancies)
grid = mm.Grid((32, 32, 32), 1.0, origin=(-16.0, -16.0, -16.0))  # the helix is centred on 0
members = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), structures[0], shifted)
ens_fn = mm.GaussianMixtureRenderFn(grid).with_plan(mm.GaussianMixtureVolume.from_atoms(mm.Ensemble(members), D))


def ensemble_map(logits):
    return ens_fn(mm.GaussianMixtureVolume.from_atoms(mm.Ensemble(members, jax.nn.softmax(logits)), D))


target = ensemble_map(jnp.log(jnp.array([0.3, 0.7])))
opt = optax.adam(0.1)


@jax.jit
def step(logits, state):
    value, g = jax.value_and_grad(lambda lg: jnp.mean((ensemble_map(lg) - target) ** 2))(logits)
    updates, state = opt.update(g, state)
    return optax.apply_updates(logits, updates), state, value


logits = jnp.zeros(2)
state = opt.init(logits)
history = []
for i in range(60):
    logits, state, value = step(logits, state)
    history.append((float(value), *np.asarray(jax.nn.softmax(logits))))
print("recovered weights:", np.round(np.asarray(jax.nn.softmax(logits)), 3), "(target 0.3, 0.7)")

# %%
h = np.array(history)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.3), layout="constrained")
axes[0].semilogy(h[:, 0]), axes[0].set_xlabel("step"), axes[0].set_ylabel("MSE"), axes[0].set_title("ensemble loss")
axes[1].plot(h[:, 1], label="w₁ (helix)"), axes[1].plot(h[:, 2], label="w₂ (shifted)")
axes[1].axhline(0.3, color="C0", ls=":"), axes[1].axhline(0.7, color="C1", ls=":")
axes[1].set_xlabel("step"), axes[1].set_ylabel("weight"), axes[1].legend(), axes[1].set_title("weights (dotted: truth)")
save(fig, "05_ensemble.png")
