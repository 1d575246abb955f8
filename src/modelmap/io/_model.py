"""Reading and writing atomic models (PDB, mmCIF, and their .gz) through gemmi."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

import gemmi
import jax.numpy as jnp
import numpy as np

from .._atoms import AtomLabels, Atoms, validate_atoms
from .._errors import ModelFileError, UnknownElementError
from ._atomic_write import atomic_path

__all__ = ["AtomicModel", "read_model", "write_model", "model_from_structure"]


@dataclasses.dataclass(frozen=True)
class AtomicModel:
    """An atomic model: the `Atoms` pytree, per-atom labels and the gemmi structure it came from.

    **Fields:**

    - `atoms`: `Atoms` (positions in Å, atomic numbers, B in Å², occupancies); stacked with a
      leading model axis for a multi-model file (an ensemble).
    - `labels`: `AtomLabels` (numpy arrays, one entry per atom).
    - `structure`: the source `gemmi.Structure`, untouched; `write_model` copies it.
    - `path`: the file it was read from, if any.
    - `model_indices`: which models of `structure` the leading axis of an ensemble refers to.
    """

    atoms: Atoms
    labels: AtomLabels
    structure: gemmi.Structure
    path: Path | None = None
    model_indices: tuple[int, ...] = (0,)

    @property
    def n_atoms(self) -> int:
        return self.atoms.n_atoms

    @property
    def is_ensemble(self) -> bool:
        return self.atoms.is_ensemble

    def replace(self, **changes) -> "AtomicModel":
        return dataclasses.replace(self, **changes)


def _select_atoms(
    model: gemmi.Model, hydrogens: bool, waters: bool, altloc: str
) -> list[tuple[int, int, int, gemmi.Atom, gemmi.Residue, str, float]]:
    """(chain idx, residue idx, atom idx, atom, residue, chain name, occupancy) of the kept atoms."""
    kept = []
    for ci, chain in enumerate(model):
        for ri, res in enumerate(chain):
            if not waters and res.is_water():
                continue
            first_alt = None
            totals: dict[str, float] = {}
            if altloc == "first":
                for atom in res:
                    if atom.altloc != "\0":
                        first_alt = first_alt or atom.altloc
                        totals[atom.name] = totals.get(atom.name, 0.0) + atom.occ
            for ai, atom in enumerate(res):
                if not hydrogens and atom.is_hydrogen():
                    continue
                occ = atom.occ
                if altloc == "first" and atom.altloc != "\0":
                    if atom.altloc != first_alt:
                        continue
                    occ = min(totals[atom.name], 1.0)
                kept.append((ci, ri, ai, atom, res, chain.name, occ))
    return kept


def model_from_structure(
    structure: gemmi.Structure,
    *,
    hydrogens: bool = True,
    waters: bool = True,
    altloc: Literal["all", "first"] = "all",
    models: Literal["first", "all"] = "all",
    path: Path | None = None,
    dtype=jnp.float32,
) -> AtomicModel:
    """Build an `AtomicModel` from a `gemmi.Structure` (see `read_model` for the options)."""
    what = str(path) if path is not None else "structure"
    if altloc not in ("all", "first"):
        raise ValueError(f"altloc must be 'all' or 'first', got {altloc!r}")
    if len(structure) == 0:
        raise ModelFileError(f"{what}: the file holds no model (is it empty or not a model file?)")
    model_ids = range(len(structure)) if models == "all" else range(1)
    per_model = [_select_atoms(structure[i], hydrogens, waters, altloc) for i in model_ids]
    if not per_model[0]:
        raise ModelFileError(
            f"{what}: no atoms" + ("" if hydrogens and waters else " left after dropping "
            + " and ".join(w for w, keep in (("hydrogens", hydrogens), ("waters", waters)) if not keep))
        )
    sel = per_model[0]
    for m, other in zip(model_ids, per_model):
        if len(other) != len(sel) or any(
            (a[3].name, a[4].seqid.num) != (b[3].name, b[4].seqid.num) for a, b in zip(sel, other)
        ):
            raise ModelFileError(
                f"{what}: model {structure[m].num} has different atoms from model "
                f"{structure[0].num}; an ensemble needs the same atoms in every model"
            )
    z = np.array([a[3].element.atomic_number for a in sel], np.int32)
    if (z == 0).any():
        i = int(np.flatnonzero(z == 0)[0])
        ci, ri, ai, atom, res, chain, _ = sel[i]
        raise UnknownElementError(
            f"{what}: atom {chain}/{res.name} {res.seqid.num}/{atom.name} has an unknown element "
            f"({atom.element.name!r}); fix the element column (PDB columns 77-78)"
        )
    labels = AtomLabels(
        chain=np.array([a[5] for a in sel]),
        residue_name=np.array([a[4].name for a in sel]),
        residue_number=np.array([a[4].seqid.num for a in sel], np.int64),
        insertion_code=np.array([a[4].seqid.icode.strip() for a in sel]),
        atom_name=np.array([a[3].name for a in sel]),
        altloc=np.array([a[3].altloc.strip("\0") for a in sel]),
        element=np.array([a[3].element.name for a in sel]),
        is_hetero=np.array([a[4].het_flag == "H" for a in sel]),
        source_index=np.array([a[:3] for a in sel], np.int64),
    )
    pos = np.array([[[a[3].pos.x, a[3].pos.y, a[3].pos.z] for a in m] for m in per_model])
    b = np.array([[a[3].b_iso for a in m] for m in per_model])
    occ = np.array([[a[6] for a in m] for m in per_model])
    if len(per_model) == 1:
        pos, b, occ = pos[0], b[0], occ[0]
        zz = z
    else:
        zz = np.broadcast_to(z, b.shape)
    atoms = Atoms(jnp.asarray(pos, dtype), zz, jnp.asarray(b, dtype), jnp.asarray(occ, dtype))
    validate_atoms(
        Atoms(pos, zz, b, occ), what, labels
    )  # on float64 numpy copies, so the message does not depend on dtype
    return AtomicModel(atoms, labels, structure, path, tuple(model_ids))


def read_model(
    path: str | os.PathLike,
    *,
    hydrogens: bool = True,
    waters: bool = True,
    altloc: Literal["all", "first"] = "all",
    models: Literal["first", "all"] = "all",
    assembly: str | None = None,
    dtype=jnp.float32,
) -> AtomicModel:
    """Read a PDB or mmCIF file (optionally gzipped) into an `AtomicModel`.

    **Arguments:**

    - `path`: `.pdb`, `.ent`, `.cif`, `.mmcif` (and `.gz` of these).
    - `hydrogens`: keep hydrogen (and deuterium) atoms.
    - `waters`: keep water residues.
    - `altloc`: `"all"` keeps every alternate conformer with its own occupancy (so each is weighted
      by its occupancy); `"first"` keeps only the first conformer of each residue and gives it the
      summed occupancy of the conformers of that atom (capped at 1).
    - `models`: `"all"` stacks every model of a multi-model file into an ensemble (leading axis);
      `"first"` reads only the first model.
    - `assembly`: the name of a biological assembly of the file (mmCIF `_pdbx_struct_assembly.id`,
      PDB REMARK 350 `BIOMOLECULE`, e.g. `"1"`): the model becomes that assembly, built by
      `gemmi.make_assembly` (every operator applied to its chains; copied chains are named by
      appending the copy's number, e.g. `A` → `A2`); `structure` is then the assembly's, and
      `write_model` writes the assembly. An unknown name is an error naming those available.
      `None`: the file's coordinates as they are (often the asymmetric unit).
    - `dtype`: float dtype of positions, B and occupancies.

    **Returns:** an `AtomicModel`.

    Raises `ModelFileError` (missing, unreadable, empty), `UnknownElementError`, `InvalidAtomsError`
    (NaN/infinite coordinates, negative occupancy).
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: the file is empty")
    try:
        structure = gemmi.read_structure(str(path), merge_chain_parts=False)
    except Exception as err:  # gemmi raises RuntimeError/ValueError with a parser message
        raise ModelFileError(f"{path}: cannot read it as a PDB or mmCIF model ({err})") from err
    structure.setup_entities()
    if assembly is not None:
        structure = _assembly(structure, str(assembly), path)
    return model_from_structure(
        structure, hydrogens=hydrogens, waters=waters, altloc=altloc, models=models, path=path,
        dtype=dtype,
    )


def _assembly(structure: gemmi.Structure, name: str, path: Path) -> gemmi.Structure:
    """A structure holding the biological assembly `name` of `structure`'s models (gemmi)."""
    names = [a.name for a in structure.assemblies]
    if name not in names:
        have = ", ".join(repr(n) for n in names) if names else "none (the file defines no assembly)"
        raise ModelFileError(f"{path}: no assembly {name!r}; the assemblies defined are: {have}")
    how = gemmi.HowToNameCopiedChain.AddNumber
    out = structure.clone()
    out.assemblies.clear()  # its coordinates are the assembly now
    for i in range(len(out) - 1, -1, -1):
        del out[i]
    for m in structure:
        out.add_model(gemmi.make_assembly(structure.assemblies[names.index(name)], m, how))
    out.setup_entities()
    return out


def _source_cif_document(model: AtomicModel):
    """The input's mmCIF document, if the model was read from an mmCIF file gemmi can reparse."""
    if model.path is None or model.structure.input_format != gemmi.CoorFormat.Mmcif:
        return None
    try:
        return gemmi.cif.read(str(model.path))
    except Exception:  # the file changed or went away: fall back to a fresh document
        return None


def check_model_path(path: str | os.PathLike) -> Path:
    """Refuse a model file name `write_model` cannot write (it writes .pdb, .ent, .cif, .mmcif).

    **Returns:** the path.
    """
    path = Path(path)
    if path.suffix.lower() not in (".pdb", ".ent", ".cif", ".mmcif"):
        raise ValueError(f"{path}: choose a .pdb or .cif output file name")
    return path


def write_model(path: str | os.PathLike, model: AtomicModel) -> Path:
    """Write `model` to PDB or mmCIF (by the suffix; `.gz` is not written), atomically.

    Positions, B-factors and occupancies of the atoms in `model.atoms` are written back into a copy
    of the source structure; every other record of the input (other atoms, cell, headers, ...) is
    kept. An ensemble writes one model per member. The input file is never overwritten.

    **Returns:** the path written.
    """
    path = check_model_path(path)
    suffix = path.suffix.lower()
    atoms = model.atoms
    pos = np.asarray(atoms.positions, np.float64)
    b = np.asarray(atoms.b_factors, np.float64)
    occ = np.asarray(atoms.occupancies, np.float64)
    validate_atoms(Atoms(pos, np.asarray(atoms.atomic_numbers), b, occ), f"writing {path}", model.labels)
    if pos.ndim == 2:
        pos, b, occ = pos[None], b[None], occ[None]
    if pos.shape[0] != len(model.model_indices):
        raise ValueError(
            f"the model has {pos.shape[0]} members but its structure maps {len(model.model_indices)}"
        )
    st = model.structure.clone()
    for member, mi in enumerate(model.model_indices):
        gm = st[mi]
        for n, (ci, ri, ai) in enumerate(model.labels.source_index):
            atom = gm[int(ci)][int(ri)][int(ai)]
            atom.pos = gemmi.Position(*pos[member, n])
            if atom.aniso.nonzero() and abs(atom.b_iso - b[member, n]) > 1e-3:
                # an anisotropic U that no longer matches the changed B would be stale
                atom.aniso = gemmi.SMat33f(0, 0, 0, 0, 0, 0)
            atom.b_iso = float(b[member, n])
            atom.occ = float(occ[member, n])
    with atomic_path(path, protect=(model.path,)) as tmp:
        if suffix in (".cif", ".mmcif"):
            doc = _source_cif_document(model)
            if doc is None:
                doc = st.make_mmcif_document()
            else:  # keep every category of the input, replace only the atom sites
                groups = gemmi.MmcifOutputGroups(False, atoms=True, group_pdb=True, auth_all=True)
                st.update_mmcif_block(doc.sole_block(), groups)
            doc.write_file(str(tmp))
        else:
            st.write_pdb(str(tmp))
    return path
