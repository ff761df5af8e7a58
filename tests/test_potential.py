"""Potential: the loaded model between the model file and every consumer (calculator, batched
prediction, replica MD); MFCalculator as a thin ASE adapter over it."""

import ast
import dataclasses
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.calculator import compare_atoms

from mfcalc import MFCalculator, Potential, ReplicaMD, predict
from mfcalc.calculator import exact_changes
from mfcalc.replicas import predict_all_fidelities

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def potential(tiny_model):
    return Potential.load(tiny_model, device="cpu", dtype="float64")


def test_fidelity_names_aliases_and_default(potential):
    assert potential.fidelities == ["low", "mid", "high"]
    assert potential.fidelity_index("mid") == 1
    assert potential.fidelity_index("LO") == 0  # alias
    assert potential.fidelity_index() == 2 and potential.default_fidelity == "high"
    with pytest.raises(ValueError, match=r"unknown fidelity 'medium'.*Available fidelities: \['low', 'mid', 'high'\]"
                                         r"; aliases: 'HI' -> 'high', 'LO' -> 'low'"):
        potential.fidelity_index("medium")
    with pytest.raises(ValueError, match="out of range"):
        potential.evaluate(potential.prepare(molecule("H2O")), 3)


def test_prepare_is_immutable_checks_once_and_reuses_an_unchanged_system(potential, ethanol):
    first = potential.prepare(ethanol)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.backend = "vesin"
    assert first.n_atoms == len(ethanol) and first.backend == "dense" and not first.stress_defined
    np.testing.assert_array_equal(first.positions.numpy(), ethanol.positions - ethanol.positions[0])
    moved = ethanol.copy()
    moved.positions[1] += 0.01
    second = potential.prepare(moved, previous=first)
    assert second.numbers is first.numbers and second.cell is first.cell  # same system: reused
    np.testing.assert_array_equal(second.positions.numpy(), moved.positions - moved.positions[0])
    ethanol.numbers[0] = 17  # the caller's arrays change: the prepared structure does not
    assert first.arrays[0][0] != 17
    with pytest.raises(ValueError, match=r"element\(s\) \['Cl'\] are not in this model"):
        potential.prepare(ethanol, previous=first)  # a changed system is checked again


def test_prepare_refuses_what_the_calculator_refuses(potential, ethanol):
    ethanol.info["charge"] = -1
    with pytest.raises(ValueError, match=r"atoms.info\['charge'\] = -1"):
        potential.prepare(ethanol)
    lenient = potential.prepare(ethanol, allow_unsupported_state=True)
    assert "charge" in lenient.state_problem
    ethanol.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"positions of atom\(s\) \[2\] are NaN or infinite"):
        potential.prepare(ethanol, allow_unsupported_state=True)


def test_evaluate_equals_the_calculator(potential, tiny_model, ethanol):
    si = bulk("Si", "diamond", a=5.43).repeat((2, 1, 1))
    si.rattle(0.05, seed=2)
    for atoms in (ethanol, si):
        prepared = potential.prepare(atoms)
        out = potential.evaluate(prepared, potential.fidelity_index("mid"), stress=prepared.stress_defined)
        ref = atoms.copy()
        ref.calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu")
        assert out["energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(out["forces"], ref.get_forces(), atol=1e-10)
        np.testing.assert_allclose(out["energies"], ref.get_potential_energies(), atol=1e-10)
        if atoms.pbc.any():
            np.testing.assert_allclose(ref.get_stress(voigt=False), out["stress"], atol=1e-10)
        energy_only = potential.evaluate(prepared, 1, forces=False)
        assert "forces" not in energy_only and energy_only["energy"] == pytest.approx(out["energy"], abs=1e-10)


def test_batched_entry_points_take_a_potential(potential, tiny_model):
    structures = [molecule("CH3CH2OH"), molecule("H2O"), bulk("Si", "diamond", a=5.43)]
    calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu")
    by_potential = predict(potential, structures, fidelity="mid")
    by_calculator = calc.batch(structures)
    for a, b in zip(by_potential, by_calculator):
        assert a["energy"] == b["energy"]
        np.testing.assert_array_equal(a["forces"], b["forces"])
    spread = predict_all_fidelities(potential, structures[0])
    np.testing.assert_array_equal(spread["energy"], calc.predict_all_fidelities(structures[0])["energy"])
    replicas = [molecule("CH3CH2OH") for _ in range(2)]
    md_p = ReplicaMD(potential, replicas, fidelity="mid", friction=0.0)
    md_c = ReplicaMD(calc, replicas, friction=0.0)  # the calculator's fidelity
    md_p.run(3)
    md_c.run(3)
    torch.testing.assert_close(md_p.positions, md_c.positions, rtol=0, atol=0)


def test_predict_leaves_the_calculator_state_alone(calc, ethanol):
    """predict / batch / predict_all_fidelities go through the potential: the calculator's cached
    structure and results stay those of its own last calculation, not the batch's last."""
    ethanol.calc = calc
    e, f = ethanol.get_potential_energy(), ethanol.get_forces()
    atoms_before, fidelity = calc.atoms.copy(), calc.fidelity
    others = [molecule("H2O"), bulk("Si", "diamond", a=5.43), molecule("CH4")]
    calc.batch(others)
    predict(calc, others, fidelity="low")
    calc.predict_all_fidelities(others[-1])
    assert calc.fidelity == fidelity  # predict(calc, fidelity=...) does not switch the calculator
    assert calc.check_state(ethanol) == [] and compare_atoms(calc.atoms, atoms_before) == []
    assert calc.results["energy"] == e and np.array_equal(calc.get_forces(ethanol), f)
    # the next MD-like step of the calculator's own structure is computed for that structure
    ethanol.positions[0] += 0.02
    fresh = ethanol.copy()
    fresh.calc = MFCalculator(calc.metadata["path"], fidelity=fidelity, dtype="float64", device="cpu")
    assert ethanol.get_potential_energy() == pytest.approx(fresh.get_potential_energy(), abs=1e-12)


def test_check_state_honours_tol(calc, ethanol):
    ethanol.calc = calc
    ethanol.get_potential_energy()
    nudged = ethanol.copy()
    nudged.positions[3, 1] += 1e-10
    assert calc.check_state(nudged) == ["positions"]  # ASE's default tol 1e-15
    for tol in (1e-15, 1e-11, 1e-9):
        assert calc.check_state(nudged, tol=tol) == compare_atoms(calc.atoms, nudged, tol=tol)
    assert calc.check_state(nudged, tol=1e-9) == []
    assert exact_changes(ethanol, nudged) == ["positions"]  # exact by default
    assert exact_changes(ethanol, nudged, tol=1e-9) == []
    moved_cell = ethanol.copy()
    moved_cell.cell = [[10, 0, 0], [0, 10, 0], [0, 0, 10 + 1e-12]]
    ethanol.cell = [[10, 0, 0], [0, 10, 0], [0, 0, 10]]
    assert exact_changes(ethanol, moved_cell) == ["cell"] and exact_changes(ethanol, moved_cell, tol=1e-9) == []


def test_a_calculator_over_a_loaded_potential(potential, ethanol):
    a = MFCalculator(potential, fidelity="low")
    b = MFCalculator(potential, fidelity="high")
    assert a.potential is b.potential is potential and a.module is potential.module
    x, y = ethanol.copy(), ethanol.copy()
    x.calc, y.calc = a, b
    assert x.get_potential_energy() != y.get_potential_energy()  # one model, two fidelities
    with pytest.raises(ValueError, match="belong to the potential already loaded"):
        MFCalculator(potential, dtype="float32")
    copy = pickle.loads(pickle.dumps(a))
    assert copy.fidelity == "low" and copy.potential is not potential
    assert copy.results["energy"] == x.get_potential_energy()


def test_a_potential_pickles_as_its_load_arguments(potential, ethanol):
    copy = pickle.loads(pickle.dumps(potential))
    assert copy.load_arguments() == potential.load_arguments() and copy.dtype == torch.float64
    p = potential.prepare(ethanol)
    assert copy.evaluate(copy.prepare(ethanol), 0)["energy"] == potential.evaluate(p, 0)["energy"]


# ----------------------------------------------------------------- the import graph
def _imports(path: Path):
    """(module names imported at module level, inside functions) of a source file."""
    tree = ast.parse(path.read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            (top if node in tree.body else nested).add(node.module)
    return top, nested


def test_no_import_cycle_between_calculator_and_replicas():
    package = ROOT / "mfcalc"
    replicas_top, replicas_nested = _imports(package / "replicas.py")
    potential_top, potential_nested = _imports(package / "potential.py")
    assert "calculator" not in replicas_top | replicas_nested
    assert not {"calculator", "replicas"} & (potential_top | potential_nested)
    calculator_top, calculator_nested = _imports(package / "calculator.py")
    assert calculator_nested == set()  # sibling modules are imported where the reader sees them


@pytest.mark.parametrize("path", ["mfcalc/replicas.py", "mfcalc/calculator.py", "mfcalc/sampling.py",
                                  "benchmarks/md_speed.py", "benchmarks/replicas.py"])
def test_no_private_reach_ins(path):
    """No module reads another object's private attributes (calc._x, potential._x, ...)."""
    source = (ROOT / path).read_text()
    reach_ins = [m.group(0) for m in re.finditer(r"\b(?!self\b|cls\b|torch\b|np\b)[A-Za-z_][A-Za-z0-9_]*"
                                                r"(?:\.(?!_)[A-Za-z0-9_]+)*\._[a-z][A-Za-z0-9_]*", source)]
    assert reach_ins == []
