"""Smoke test of an installed wheel, run from a directory outside the checkout by .ci/run:
the default model loads from the package data, gives finite energy and forces for a molecule
that agree with -dE/dx by a central difference, and `mfcalc info` works."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from ase.build import molecule

import mfcalc
from mfcalc import MFCalculator
from mfcalc.modelfile import MODELS_DIR

here = Path.cwd().resolve()
package = Path(mfcalc.__file__).resolve()
assert "site-packages" in str(package), f"mfcalc imported from {package}, not from the installed wheel"
assert MODELS_DIR.is_relative_to(package.parent), f"models found in {MODELS_DIR}, not in the package"

atoms = molecule("CH3CH2OH")
atoms.calc = MFCalculator(fidelity="CCSD(T)", device="cpu", dtype="float64")
energy, forces = atoms.get_potential_energy(), atoms.get_forces()
assert np.isfinite(energy) and np.isfinite(forces).all()
h = 1e-4
plus, minus = atoms.copy(), atoms.copy()
plus.positions[2, 0] += h
minus.positions[2, 0] -= h
plus.calc = minus.calc = atoms.calc
numeric = -(plus.get_potential_energy() - minus.get_potential_energy()) / (2 * h)
assert abs(numeric - forces[2, 0]) < 1e-5, (numeric, forces[2, 0])
print(f"wheel {package.parent}: ethanol at {atoms.calc.fidelity}: E = {energy:.6f} eV, "
      f"|F|max = {np.abs(forces).max():.4f} eV/Å, finite-difference check passed")

info = subprocess.run(["mfcalc", "info", "chno-mf"], capture_output=True, text=True, cwd=here)
assert info.returncode == 0, info.stderr
assert str(MODELS_DIR) in info.stdout, info.stdout
print(info.stdout.splitlines()[0])
sys.exit(0)
