"""Physics on a chosen device: forces = -grad E, stress by finite strain, agreement with an
independent CPU path, batched == one-by-one, and NVE energy conservation.

The device comes from ``MFCALC_TEST_DEVICE`` (default ``cpu``), so the same tests guard the CPU in
every run and a GPU when one is there (``MFCALC_TEST_DEVICE=cuda pytest tests/test_device.py``,
which benchmarks/gpu_check.sh runs). On the CPU the "independent path" is the other neighbor-list
backend, so the comparison can fail there too.
"""

import os

import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.md.verlet import VelocityVerlet

from mfcalc import MFCalculator, predict
from mfcalc.workflows import thermalize

from helpers import numeric_forces, numeric_stress

DEVICE = os.environ.get("MFCALC_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"MFCALC_TEST_DEVICE={DEVICE} but this torch sees no CUDA device", allow_module_level=True)


def on_device(model, **kwargs):
    return MFCalculator(model, dtype="float64", device=DEVICE, **kwargs)


@pytest.mark.parametrize("structure", ["ethanol", "silicon_small_cell"])
def test_forces_are_minus_gradient_on_device(tiny_model, request, structure):
    atoms = request.getfixturevalue(structure)
    calc = on_device(tiny_model, fidelity="mid")
    atoms.calc = calc
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-3
    np.testing.assert_allclose(forces, numeric_forces(atoms, calc), atol=1e-7, rtol=1e-6)


def test_stress_is_finite_strain_derivative_on_device(tiny_model, silicon_small_cell):
    atoms = silicon_small_cell
    atoms.calc = on_device(tiny_model, fidelity="low")
    stress = atoms.get_stress(voigt=False)
    numeric = numeric_stress(atoms, on_device(tiny_model, fidelity="low"))
    assert np.abs(stress).max() > 1e-4
    np.testing.assert_allclose(stress, numeric, atol=1e-7)


@pytest.mark.parametrize("structure", ["ethanol", "silicon_small_cell"])
def test_device_agrees_with_an_independent_cpu_path(tiny_model, request, structure):
    atoms = request.getfixturevalue(structure)
    got = atoms.copy()
    got.calc = on_device(tiny_model, fidelity="high")
    ref = atoms.copy()
    other = "vesin" if DEVICE == "cpu" and not atoms.pbc.any() else "auto"  # the molecule's auto is dense
    ref.calc = MFCalculator(tiny_model, fidelity="high", dtype="float64", device="cpu", neighbor_list=other)
    assert got.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(got.get_forces(), ref.get_forces(), atol=1e-8)
    if atoms.pbc.any():
        np.testing.assert_allclose(got.get_stress(), ref.get_stress(), atol=1e-9)


def test_batched_equals_one_by_one_on_device(tiny_model, silicon_small_cell):
    structures = [molecule("CH3CH2OH"), molecule("H2O"), silicon_small_cell, molecule("CH4")]
    structures[0].rattle(0.05, seed=3)
    calc = on_device(tiny_model, fidelity="mid")
    batched = predict(calc, structures, max_atoms=12)  # several forward passes
    for atoms, b in zip(structures, batched):
        atoms.calc = on_device(tiny_model, fidelity="mid")
        assert b["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(b["forces"], atoms.get_forces(), atol=1e-8)


def test_nve_conserves_energy_with_the_shipped_model_on_device():
    """Velocity Verlet, 0.5 fs, 1000 steps (0.5 ps) of ethanol at 300 K with the shipped ethanol
    model: the total energy must not drift (a force that is not -grad E, or a discontinuity,
    shows up here as a drift or jumps)."""
    atoms = molecule("CH3CH2OH")
    atoms.calc = MFCalculator("ethanol-mf", dtype="float64", device=DEVICE)
    thermalize(atoms, 300, np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    totals = []
    dyn.attach(lambda: totals.append(atoms.get_total_energy()), interval=10)
    dyn.run(1000)
    totals = np.array(totals)
    kinetic = atoms.get_kinetic_energy()
    assert kinetic > 0.05  # it moved: 9 atoms at ~300 K carry ~0.3 eV
    drift = np.polyfit(np.arange(len(totals)) * 10 * 0.5e-3, totals, 1)[0]  # eV per ps
    assert abs(drift) < 2e-3, f"NVE drift {1000 * drift:.2f} meV/ps"
    assert np.ptp(totals) < 5e-3, f"total energy spread {1000 * np.ptp(totals):.2f} meV over 0.5 ps"
