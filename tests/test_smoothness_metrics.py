"""The measures of benchmarks/smoothness.py (Reptile vs joint pretraining, issue 16) on curves whose
answer is known: a Morse bond has no extrema beyond its minimum and a flat tail; a bump, a
discontinuity and a ripple show up in the measure made for them."""

import sys
from pathlib import Path

import numpy as np
from ase.build import molecule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from smoothness import SCAN, extrema, scan_metrics, scanned_bonds  # noqa: E402


def morse(r, depth=4.5, a=1.9, r0=1.09):
    return depth * (1 - np.exp(-a * (r - r0))) ** 2


def test_a_morse_curve_is_smooth():
    m = scan_metrics(morse(SCAN))
    assert m["r_min"] == 1.09
    assert m["extrema"] == 0
    assert abs(m["plateau"] - 4.5) < 0.01
    assert m["tail_curvature"] < 1.0
    assert m["largest_step"] < 0.1  # at most |dE/dr| x 0.01 Å


def test_a_bump_a_jump_and_a_ripple_are_each_caught():
    smooth = scan_metrics(morse(SCAN))
    bump = morse(SCAN) - 0.2 * np.exp(-((SCAN - 3.0) / 0.2) ** 2)  # a spurious well at 3 Å
    assert extrema(bump[np.argmin(bump):]) == 2
    jump = morse(SCAN) + 0.3 * (SCAN > 5.0)  # a pair crossing the cutoff without an envelope
    assert scan_metrics(jump)["largest_step"] > 0.29 > smooth["largest_step"]
    ripple = morse(SCAN) + 4e-4 * np.sin(60 * SCAN)  # under the 1 meV turn: not an extremum
    assert scan_metrics(ripple)["extrema"] == 0
    assert scan_metrics(ripple)["tail_curvature"] > 1.2 > 1.0 > smooth["tail_curvature"]


def test_one_scan_per_heavy_element_bonded_to_hydrogen():
    bonds = scanned_bonds(molecule("CH3CH2OH"))
    assert [label for label, _, _ in bonds] == ["C-H", "O-H"]
    atoms = molecule("CH3CH2OH")
    for label, h, partner in bonds:
        assert atoms.get_chemical_symbols()[h] == "H" and atoms.get_distance(h, partner) < 1.2
