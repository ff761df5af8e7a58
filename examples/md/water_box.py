"""A periodic example: a box of water, stress, a short cell relaxation and NPT-like MD.

    python examples/md/water_box.py

No shipped model is trained on condensed-phase (periodic) data yet: ethanol-mf knows H and O but
has only seen ethanol, so the numbers below show the machinery (stress, cell filter, barostat,
phonopy on a periodic cell is skipped), not physical water. The script says so when it runs.
"""

import sys
from pathlib import Path

import numpy as np
from ase import units
from ase.filters import FrechetCellFilter
from ase.md.nptberendsen import NPTBerendsen
from ase.optimize import FIRE

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import water_box  # noqa: E402

from mfcalc import MFCalculator  # noqa: E402
from mfcalc.workflows import thermalize  # noqa: E402

print("NOTE: no periodic (condensed-phase) model is shipped yet; ethanol-mf is used only to show\n"
      "      the periodic machinery. Energies, stresses and densities here are not physical water.")
atoms = water_box(32)  # 96 atoms
atoms.calc = MFCalculator("ethanol-mf", fidelity="PBE/def2-SVP", dtype="float64")
stress = atoms.get_stress(voigt=False)
print(f"{len(atoms)} atoms, cell {atoms.cell.lengths().round(2)} Å, pressure {-np.trace(stress) / 3 / units.GPa:.3f} GPa")

opt = FIRE(FrechetCellFilter(atoms), logfile=None)
opt.run(fmax=0.05, steps=30)
print(f"after {opt.nsteps} FIRE steps on positions and cell: volume {atoms.get_volume():.1f} Å^3, "
      f"max stress {np.abs(atoms.get_stress()).max():.4f} eV/Å^3")

thermalize(atoms, 300, np.random.default_rng(0))
dyn = NPTBerendsen(atoms, 0.5 * units.fs, temperature_K=300, pressure_au=1.0 * units.bar,
                   taut=50 * units.fs, taup=500 * units.fs, compressibility_au=4.57e-5 / units.bar)
dyn.run(40)
print(f"NPT (Berendsen) 40 steps: T {atoms.get_temperature():.0f} K, volume {atoms.get_volume():.1f} Å^3")
print("phonopy on a periodic cell: skipped until a periodic model is available")
