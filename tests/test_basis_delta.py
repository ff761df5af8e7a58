"""benchmarks/basis_delta.py: the small-basis forces it builds its bound from are -dE/dx in eV/Å
with Molpro's frozen core, and its table says what it measured."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from basis_delta import frozen_core_orbitals, table  # noqa: E402


def test_one_frozen_orbital_per_first_row_atom():
    assert frozen_core_orbitals([8, 1, 1]) == 1
    assert frozen_core_orbitals([6, 8, 8, 1, 1]) == 3
    assert frozen_core_orbitals([1, 1, 2]) == 0


def test_small_basis_forces_are_minus_the_energy_gradient_in_ev_per_angstrom():
    pytest.importorskip("pyscf")
    from basis_delta import small_basis_forces

    numbers = np.array([8, 1, 1])
    positions = np.array([[0.0, 0.0, 0.12], [0.0, 0.78, -0.47], [0.0, -0.74, -0.50]])
    f_mp2, f_cc, _, _ = small_basis_forces(numbers, positions, "sto-3g")
    h = 1e-3
    for i, c in [(0, 2), (1, 1)]:
        plus, minus = positions.copy(), positions.copy()
        plus[i, c] += h
        minus[i, c] -= h
        _, _, e_mp2_plus, e_cc_plus = small_basis_forces(numbers, plus, "sto-3g")
        _, _, e_mp2_minus, e_cc_minus = small_basis_forces(numbers, minus, "sto-3g")
        assert f_mp2[i, c] == pytest.approx(-(e_mp2_plus - e_mp2_minus) / (2 * h), abs=2e-4)
        assert f_cc[i, c] == pytest.approx(-(e_cc_plus - e_cc_minus) / (2 * h), abs=2e-4)
    assert np.abs(f_cc - f_mp2).max() > 1e-3  # two different methods, not one computed twice


def test_table_gives_the_ratio_to_the_gap():
    row = {"molecule": "h2co", "frames": [1, 2], "basis": "cc-pvdz", "gap_forces_meV_A": 40.0,
           "small_basis_gap_forces_meV_A": 30.0, "composite_forces_meV_A": 10.0, "gap_energy_spread_meV": 6.0,
           "composite_energy_spread_meV": 1.0, "cpu_seconds": 12.0}
    line = table([row]).splitlines()[-1]
    assert line == "| h2co | 2 | cc-pvdz | 40.0 | 30.0 | 10.0 | 0.25 | 6.00 / 1.00 | 12 |"
