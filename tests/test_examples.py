"""Every example in examples/md runs from a clean checkout and prints what it promises."""

import subprocess
import sys
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "md"


def run(script, *args, timeout=300):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_langevin_nvt_writes_trajectory_and_plot(tmp_path):
    out = run("ethanol_langevin.py", "--steps", "400", "--out", str(tmp_path / "nvt.traj"))
    assert (tmp_path / "nvt.traj").exists() and (tmp_path / "nvt.png").stat().st_size > 10_000
    assert "ms per step" in out and "mean temperature" in out


def test_nve_drift_is_small():
    out = run("nve_drift.py", "--steps", "2000")
    drift = float(out.split("energy drift")[1].split()[0])
    assert abs(drift) < 1.0  # meV/atom/ps


def test_relax_and_vibrations_agree_between_ase_and_phonopy():
    out = run("relax_and_vibrations.py")
    assert out.count("| True |") == 4  # BFGS and FIRE converged at both fidelities
    worst = float(out.split("largest ase/phonopy difference:")[1].split()[0])
    stiff = float(out.split("largest ase/phonopy difference above 300 cm^-1:")[1].split()[0])
    assert stiff < 2.0  # cm^-1: every mode but the two soft torsions
    assert worst < 10.0  # the torsions: phonopy's value moves by ~6 cm^-1 with the displacement size


def test_all_fidelities_plot(tmp_path):
    out = run("all_fidelities.py", "--steps", "100", "--out", str(tmp_path / "all.png"))
    assert (tmp_path / "all.png").exists() and "CCSD(T)/cc-pVTZ" in out


def test_water_box_says_it_is_not_physical():
    out = run("water_box.py")
    assert "not physical" in out and "NPT (Berendsen)" in out and "pressure" in out


def test_pimd_ethanol_shows_nuclear_quantum_effects():
    import pytest

    pytest.importorskip("ipi")
    out = run("pimd_ethanol.py", "--steps", "300", timeout=240)
    ratio = float(out.split("quantum kinetic energy / classical 3N/2 kT:")[1].split()[0])
    assert 2.0 < ratio < 4.0  # zero-point motion: ~2.8x the classical kinetic energy of ethanol at 300 K
    assert "| H-O bond length" in out and "| C-H bond length" in out
