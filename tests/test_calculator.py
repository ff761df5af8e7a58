"""MFCalculator behaviour: fidelity selection and switching, properties, state checks,
every-fidelity prediction, and clear errors on bad input."""

import numpy as np
import pytest
from ase.calculators.calculator import PropertyNotImplementedError, compare_atoms

from mfcalc import MFCalculator
from mfcalc.calculator import exact_changes


def test_properties_and_units(calc, ethanol):
    ethanol.calc = calc
    energy = ethanol.get_potential_energy()
    assert energy == pytest.approx(ethanol.get_potential_energy(force_consistent=True))
    assert ethanol.get_potential_energies().sum() == pytest.approx(energy, abs=1e-9)
    assert ethanol.get_forces().shape == (9, 3)
    np.testing.assert_allclose(ethanol.get_forces().sum(axis=0), 0.0, atol=1e-10)


def test_alias_and_default_fidelity(tiny_model):
    assert MFCalculator(tiny_model, device="cpu").fidelity == "high"
    assert MFCalculator(tiny_model, fidelity="LO", device="cpu").fidelity == "low"


def test_switching_fidelity_invalidates_results(calc, ethanol):
    ethanol.calc = calc
    e_high = ethanol.get_potential_energy()
    calc.fidelity = "low"
    assert calc.results == {}
    e_low = ethanol.get_potential_energy()
    reference = MFCalculator(calc.metadata["path"], fidelity="low", dtype="float64", device="cpu")
    atoms = ethanol.copy()
    atoms.calc = reference
    assert e_low == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
    assert e_low != pytest.approx(e_high, abs=1e-3)


def test_state_check_is_exact_and_keeps_ase_semantics(ethanol):
    other = ethanol.copy()
    assert exact_changes(ethanol, other) == []
    other.positions[3, 1] += 1e-14  # below ASE's default tolerance, still a change
    assert exact_changes(ethanol, other) == ["positions"]
    other = ethanol.copy()
    other.numbers[0] = 7
    other.cell = [5, 5, 5]
    other.pbc = True
    other.set_initial_charges([0.1] * len(other))
    assert sorted(exact_changes(ethanol, other)) == sorted(compare_atoms(ethanol, other))
    # velocities (momenta) and other per-atom arrays are not part of the state, as in ASE: an MD
    # integrator sets new momenta after every force call and must not trigger a second one
    moving = ethanol.copy()
    moving.set_momenta(np.ones((len(moving), 3)))
    moving.new_array("tags_like", np.arange(len(moving)))
    assert exact_changes(ethanol, moving) == compare_atoms(ethanol, moving) == []


def test_one_force_call_per_md_step(calc, ethanol):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    ethanol.calc = calc
    calls = []
    original = calc.calculate
    calc.calculate = lambda *a, **k: (calls.append(1), original(*a, **k))
    dyn = VelocityVerlet(ethanol, 0.5 * units.fs)
    dyn.run(10)
    assert len(calls) == 11  # the start, then one per step


def test_calculator_recomputes_only_when_needed(calc, ethanol):
    ethanol.calc = calc
    calls = []
    original = calc.calculate
    calc.calculate = lambda *a, **k: (calls.append(1), original(*a, **k))
    ethanol.get_potential_energy()
    ethanol.get_forces()
    ethanol.get_potential_energy()
    assert len(calls) == 1
    ethanol.positions[0, 0] += 0.01
    ethanol.get_forces()
    assert len(calls) == 2


def test_predict_all_fidelities_matches_one_by_one(calc, ethanol):
    pred = calc.predict_all_fidelities(ethanol)
    assert pred["fidelities"] == ["low", "mid", "high"]
    for k, fid in enumerate(pred["fidelities"]):
        single = MFCalculator(calc.metadata["path"], fidelity=fid, dtype="float64", device="cpu")
        atoms = ethanol.copy()
        atoms.calc = single
        assert pred["energy"][k] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(pred["forces"][k], atoms.get_forces(), atol=1e-9)
    assert pred["forces_spread"].shape == (len(ethanol),)
    assert pred["energy_spread"] > 0 and np.all(pred["forces_spread"] > 0)


def test_periodic_stress_and_molecule_without_stress(calc, silicon_small_cell, ethanol):
    silicon_small_cell.calc = calc
    assert silicon_small_cell.get_stress().shape == (6,)
    ethanol.calc = calc
    with pytest.raises(PropertyNotImplementedError, match="periodic cells only"):
        ethanol.get_stress()
    np.testing.assert_allclose(silicon_small_cell.get_stress(), silicon_small_cell.get_stress(voigt=True))


@pytest.mark.parametrize("backend", ["dense", "vesin", "auto"])
def test_backends_give_the_same_answer(tiny_model, silicon_small_cell, backend):
    ref = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu", neighbor_list="dense")
    calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu", neighbor_list=backend)
    a, b = silicon_small_cell.copy(), silicon_small_cell.copy()
    a.calc, b.calc = ref, calc
    assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(b.get_forces(), a.get_forces(), atol=1e-10)
    np.testing.assert_allclose(b.get_stress(), a.get_stress(), atol=1e-10)


def test_compiled_force_path_equals_the_model_file(tiny_model, silicon_small_cell, ethanol):
    """compile=True (energy + gradient compiled as one graph) gives the numbers of the TorchScript
    file: a molecule (forces) and a small triclinic cell (forces and stress), over MD-like moves
    and a changing number of atoms (no recompile per shape: dynamic shapes)."""
    ref = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu")
    fast = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu", compile=True)
    rng = np.random.default_rng(0)
    for atoms in (ethanol, silicon_small_cell, ethanol[:7]):
        for _ in range(2):
            atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
            a, b = atoms.copy(), atoms.copy()
            a.calc, b.calc = ref, fast
            assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-9)
            np.testing.assert_allclose(b.get_forces(), a.get_forces(), atol=1e-9)
            np.testing.assert_allclose(b.get_potential_energies(), a.get_potential_energies(), atol=1e-9)
            if atoms.pbc.any():
                np.testing.assert_allclose(b.get_stress(), a.get_stress(), atol=1e-9)


def test_md_with_the_compiled_force_path_follows_the_same_trajectory(tiny_model, tmp_path):
    """`mfcalc md --compile` (run_md(compile=True)): the Langevin run of the TorchScript path,
    frame for frame (same seed, same noise)."""
    import io

    from ase.io import read

    from mfcalc.workflows import run_md

    frames = []
    for compile in (False, True):
        out = tmp_path / f"md_{compile}.xyz"
        run_md("CH3CH2OH", model=str(tiny_model), fidelity="mid", steps=20, interval=10, out=str(out),
               dtype="float64", device="cpu", compile=compile, log=io.StringIO())
        frames.append(read(str(out), index=":"))
    assert len(frames[1]) == len(frames[0]) == 3
    for a, b in zip(*frames):
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-9)


def test_the_jit_executor_flag_is_left_as_it_was(tiny_model, ethanol):
    """The calculator runs TorchScript without the executor's optimisation passes (faster for small
    molecules) but leaves the process-wide flag as the user had it."""
    import torch

    before = torch._C._get_graph_executor_optimize()
    ethanol.calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu")
    ethanol.get_forces()
    assert torch._C._get_graph_executor_optimize() == before
