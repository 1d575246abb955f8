import numpy as np
import pytest

from modelmap._atoms import AtomLabels
from modelmap._residues import group_members, is_nucleic, is_protein, is_water, residue_groups, residue_kind


@pytest.mark.parametrize(
    "name, kind",
    [("ALA", "protein"), ("mse", "protein"), ("SEP", "protein"), ("UNK", "protein"), ("HSD", "protein"),
     ("CYX", "protein"), ("DA", "nucleic"), ("U", "nucleic"), ("T", "nucleic"), ("ADE", "nucleic"),
     ("HOH", "water"), ("WAT", "water"), ("HEM", "other"), ("ZN", "other"), ("XYZ1", "other"), ("", "other")],
)
def test_residue_kind_is_gemmis_table_plus_force_field_names(name, kind):
    assert residue_kind(name) == kind


def test_kind_masks():
    names = np.array(["ALA", "HOH", "DG", "NAG", "ALA"])
    np.testing.assert_array_equal(is_protein(names), [True, False, False, False, True])
    np.testing.assert_array_equal(is_nucleic(names), [False, False, True, False, False])
    np.testing.assert_array_equal(is_water(names), [False, True, False, False, False])


def _labels(rows):
    chain, number, icode, name, altloc = (np.array(c) for c in zip(*rows))
    n = len(rows)
    return AtomLabels(chain, name, number.astype(np.int64), icode, np.array(["CA"] * n), altloc,
                      np.array(["C"] * n), np.zeros(n, bool), np.zeros((n, 3), np.int64))


def test_residue_groups_in_order_of_appearance_with_altlocs_and_insertion_codes():
    labels = _labels([
        ("B", 10, "", "SER", ""), ("B", 10, "", "SER", "A"), ("B", 10, "", "SER", "B"),
        ("A", 2, "", "GLY", ""), ("A", 2, "A", "GLY", ""), ("B", 10, "", "THR", "B"), ("A", 2, "", "GLY", ""),
    ])
    np.testing.assert_array_equal(residue_groups(labels), [0, 1, 2, 3, 4, 2, 3])
    np.testing.assert_array_equal(residue_groups(labels, altloc=False), [0, 0, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(residue_groups(labels, altloc=False, name=True), [0, 0, 0, 1, 2, 3, 1])
    assert residue_groups(labels).dtype == np.int32
    members = group_members(residue_groups(labels, altloc=False))
    assert [m.tolist() for m in members] == [[0, 1, 2, 5], [3, 6], [4]]
    assert [m.tolist() for m in group_members(residue_groups(labels), [6, 5, 0])] == [[0], [5], [6]]
    assert group_members(residue_groups(labels), []) == []
