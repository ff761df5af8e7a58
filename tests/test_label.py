"""A new molecule from a few points: PySCF labels (resumable), fine-tuning on them, MD with
the result - the short path, end to end, in seconds (tiny basis)."""

import subprocess
import sys

import numpy as np
import pytest
from ase import units
from ase.build import molecule
from ase.io import write
from ase.md.verlet import VelocityVerlet

pyscf = pytest.importorskip("pyscf")

from mfcalc import MFCalculator  # noqa: E402
from mfcalc.data import read_extxyz  # noqa: E402
from mfcalc.finetune import finetune, save_finetuned  # noqa: E402
from mfcalc.label import compute, label, parse_method  # noqa: E402
from mfcalc.training import TrainSettings  # noqa: E402


def waters(n):
    out = []
    for k in range(n):
        atoms = molecule("H2O")
        atoms.rattle(0.05, seed=k)
        out.append(atoms)
    return out


def test_methods_are_checked_before_any_work():
    assert parse_method("CCSD(T)/cc-pVDZ") == ("CCSD(T)", "cc-pVDZ")
    with pytest.raises(ValueError, match="METHOD/BASIS"):
        parse_method("CCSD(T)")
    with pytest.raises(ValueError, match="basis set 'cc-pVQQ'"):
        parse_method("MP2/cc-pVQQ")
    with pytest.raises(ValueError, match="'PBEX' is neither"):
        parse_method("PBEX/sto-3g")


def test_forces_are_minus_the_energy_gradient_in_ev_per_angstrom():
    atoms = waters(1)[0]
    result = compute(atoms, "MP2/sto-3g", forces=True)
    h = 1e-4
    shifted = atoms.copy()
    shifted.positions[1, 0] += h
    e_plus = compute(shifted, "MP2/sto-3g")["energy"]
    shifted.positions[1, 0] -= 2 * h
    e_minus = compute(shifted, "MP2/sto-3g")["energy"]
    assert result["forces"][1, 0] == pytest.approx(-(e_plus - e_minus) / (2 * h), abs=1e-4)


def test_density_fitting_is_close_to_the_exact_coulomb_term_and_recorded(tmp_path):
    atoms = waters(1)[0]
    exact = compute(atoms, "PBE/def2-SVP", forces=True)
    fitted = compute(atoms, "PBE/def2-SVP", forces=True, density_fit=True)
    assert fitted["energy"] != exact["energy"]  # it is really a different integral path
    assert fitted["energy"] == pytest.approx(exact["energy"], abs=5e-3)  # RI-J error: ~meV
    assert np.abs(fitted["forces"] - exact["forces"]).max() < 5e-3
    frames = label([atoms], "PBE/def2-SVP", tmp_path / "df.xyz", density_fit=True, progress=None)
    assert frames[0].info["density_fit"] is True
    with pytest.raises(ValueError, match="DFT functionals and MP2"):
        label([atoms], "CCSD(T)/sto-3g", tmp_path / "cc.xyz", density_fit=True, progress=None)
    with pytest.raises(ValueError, match="energies only"):
        label([atoms], "MP2/cc-pVDZ", tmp_path / "mp2.xyz", forces=True, density_fit=True, progress=None)


def test_density_fitted_mp2_is_close_to_canonical_mp2():
    """RI-MP2 on an RI-JK reference: a different integral path, within a few meV for water."""
    atoms = waters(1)[0]
    exact = compute(atoms, "MP2/cc-pVDZ")["energy"]
    fitted = compute(atoms, "MP2/cc-pVDZ", density_fit=True)["energy"]
    assert fitted != exact
    assert fitted == pytest.approx(exact, abs=5e-3)


def test_label_is_resumable_and_records_provenance(tmp_path):
    out = tmp_path / "labels.xyz"
    structures = waters(5)
    label(structures[:3], "CCSD(T)/sto-3g", out, progress=None)
    frames = label(structures, "CCSD(T)/sto-3g", out, progress=None)  # only two new points
    assert sorted(a.info["label_index"] for a in frames) == [0, 1, 2, 3, 4]
    assert all(a.info["program"] == f"PySCF {pyscf.__version__}" for a in frames)
    assert frames[0].info["method"] == "CCSD(T)" and frames[0].info["basis"] == "sto-3g"
    direct = compute(structures[4], "CCSD(T)/sto-3g")["energy"]
    assert [a for a in frames if a.info["label_index"] == 4][0].get_potential_energy() == pytest.approx(direct, abs=1e-8)


def test_new_molecule_from_a_few_points_to_md(tmp_path):
    """label -> finetune (new fidelity on ethanol-mf, energy-only points) -> MD."""
    structures_path = tmp_path / "water.xyz"
    write(str(structures_path), waters(8))
    run = subprocess.run(
        [sys.executable, "-m", "mfcalc.cli", "label", str(structures_path), "--method", "CCSD(T)/sto-3g",
         "--out", str(tmp_path / "cc.xyz")], capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    data = read_extxyz(tmp_path / "cc.xyz")
    assert {s.fidelity for s in data} == {"CCSD(T)/sto-3g"} and data[0].forces is None
    settings = TrainSettings(epochs=5, steps_per_epoch=5, batch_size=4, lr=1e-3, weight_decay=0.0, seed=0)
    result = finetune("ethanol-mf", data, "CCSD(T)/sto-3g", new_fidelity=True, strategy="readout",
                      settings=settings, log=lambda *a: None)
    path = save_finetuned(result, tmp_path / "water-cc")
    atoms = molecule("H2O")
    atoms.calc = MFCalculator(path, fidelity="CCSD(T)/sto-3g", dtype="float64", device="cpu")
    assert set(atoms.calc.fidelities) >= {"CCSD(T)/cc-pVTZ", "CCSD(T)/sto-3g"}
    assert abs(atoms.get_potential_energy() - np.mean([s.energy for s in data])) < 1.0
    VelocityVerlet(atoms, 0.25 * units.fs).run(20)
    assert np.isfinite(atoms.positions).all()
