"""The shipped chno-mf model: loads by name with its fidelities and aliases, covers H/C/N/O, and
reproduces the held-out-molecule errors its card reports (a guard against a stale or damaged
model file), and its forces are the negative gradient of its energy on a held-out molecule."""

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule

from mfcalc import MFCalculator
from mfcalc.finetune import load_base
from mfcalc.recipe import load_datasets, read_recipe
from mfcalc.training import evaluate, to_graphs

ROOT = Path(__file__).resolve().parent.parent
CARD = json.loads((ROOT / "models" / "chno-mf" / "card.json").read_text())


def test_fidelities_aliases_and_elements():
    calc = MFCalculator("chno-mf", fidelity="CCSD(T)", device="cpu")
    assert calc.fidelity == "CCSD(T)/cc-pVDZ"
    assert {"GFN2-xTB", "PBE/def2-SVP", "MP2/cc-pVDZ", "CCSD(T)/cc-pVDZ", "CCSD(T)/cc-pVTZ"} <= set(calc.fidelities)
    assert calc.elements == [1, 6, 7, 8]
    with pytest.raises(ValueError, match=r"\[.Si.\] are not in this model; it knows \[.H., .C., .N., .O.\]"):
        atoms = molecule("SiH4")
        atoms.calc = calc
        atoms.get_potential_energy()


def test_it_is_the_default_model():
    calc = MFCalculator(fidelity="CCSD(T)", device="cpu")
    assert calc.metadata["checksum"] == MFCalculator("chno-mf", device="cpu").metadata["checksum"]
    assert calc.fidelity == "CCSD(T)/cc-pVDZ" and MFCalculator(fidelity="MP2", device="cpu").fidelity == "MP2/cc-pVDZ"


def test_held_out_molecules_match_the_card():
    """Every frame of the 30 test molecules at every data/chno fidelity, recomputed from the
    recipe's split, has the errors written in the card (same split, same weights), and so does
    each molecule on its own."""
    recipe_path = ROOT / "recipes" / "chno-mf.yaml"
    recipe = read_recipe(recipe_path)
    splits = load_datasets(recipe, recipe_path.parent, by_dataset=True)
    forcefield = load_base("chno-mf")[0].double()
    fidelities = forcefield.fidelities
    rows = {r["dataset"]: r for r in CARD["test_errors_by_dataset"]}
    for k, entry in enumerate(recipe["datasets"]):
        name = Path(entry["path"]).name
        if "split_by" not in entry or name not in rows:
            continue
        test = splits[f"test:{k}"]
        assert {s.group for s in test} <= set(recipe["held_out"]["test"])
        errors = evaluate(forcefield, to_graphs(test, fidelities, forcefield.cutoff), fidelities)[entry["fidelity"]]
        assert errors["n"] == rows[name]["n"]
        assert errors["energy_mae"] == pytest.approx(rows[name]["energy_mae"], rel=1e-3)
        if "forces_mae" in rows[name]:
            assert errors["forces_mae"] == pytest.approx(rows[name]["forces_mae"], rel=1e-3)
        molecules = [r for r in CARD["test_errors_by_molecule"] if r["dataset"] == name]
        assert sum(r["n"] for r in molecules) == errors["n"]
        weighted = sum(r["n"] * r["energy_mae"] for r in molecules) / errors["n"]
        assert weighted == pytest.approx(errors["energy_mae"], rel=1e-3)


@pytest.mark.parametrize("fidelity", ["GFN2-xTB", "PBE/def2-SVP", "CCSD(T)"])
def test_forces_match_finite_differences_on_a_held_out_molecule(fidelity):
    atoms = molecule("CH3CHO")  # acetaldehyde: a held-out test molecule
    atoms.rattle(0.03, seed=1)
    atoms.calc = MFCalculator("chno-mf", fidelity=fidelity, device="cpu", dtype="float64")
    forces = atoms.get_forces()
    h = 1e-4
    for i, c in [(0, 0), (3, 2), (6, 1)]:
        shifted = atoms.copy()
        shifted.calc = atoms.calc
        shifted.positions[i, c] += h
        e_plus = shifted.get_potential_energy()
        shifted.positions[i, c] -= 2 * h
        e_minus = shifted.get_potential_energy()
        assert forces[i, c] == pytest.approx(-(e_plus - e_minus) / (2 * h), abs=1e-5)
    assert np.isfinite(forces).all()


@pytest.mark.parametrize("formula", ["CH3CN", "C6H6"])
def test_every_ab_initio_fidelity_is_sane_on_a_molecule_outside_its_own_data(formula):
    """Fidelities trained on one molecule or reaction (PBE+TS, CCSD(T)/cc-pVTZ: ethanol; MP2/def2-TZVP:
    water; CCSD and wB97x: two Transition1x reactions) borrow the reference energies their data
    cannot determine from a broad fidelity: total energies of another molecule stay within the
    ~1 eV/atom that separates levels of theory (a minimum-norm fit put them ~200 eV/atom off)."""
    calc = MFCalculator("chno-mf", device="cpu", dtype="float64")
    atoms = molecule(formula)
    pred = calc.predict_all_fidelities(atoms)
    energy = dict(zip(pred["fidelities"], pred["energy"]))
    for fidelity, value in energy.items():
        if fidelity != "GFN2-xTB":  # semi-empirical: its own energy scale
            assert abs(value - energy["PBE/def2-SVP"]) / len(atoms) < 2.0, fidelity
