"""Langevin MD of ethanol at the CCSD(T) level of theory with the shipped ethanol-mf model.

    python examples/md/ethanol_langevin.py            # 1000 steps of 0.5 fs at 300 K
    python examples/md/ethanol_langevin.py --steps 200 --temperature 500 --fidelity PBE+TS

Writes the trajectory (every 10th step) to examples/md/output/ethanol_langevin.traj and prints
ms per step. Open the trajectory with `ase gui` or ase.io.read.
"""

import argparse
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.build import molecule
from ase.io import Trajectory
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

from mfcalc import MFCalculator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--temperature", type=float, default=300.0, help="K")
parser.add_argument("--fidelity", default="CCSD(T)")
parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
parser.add_argument("--out", default=str(Path(__file__).parent / "output" / "ethanol_langevin.traj"))
args = parser.parse_args()

atoms = molecule("CH3CH2OH")
atoms.calc = MFCalculator("ethanol-mf", fidelity=args.fidelity, dtype=args.dtype)
print(f"fidelity {atoms.calc.fidelity}, dtype {args.dtype}, device {atoms.calc.device}")

rng = np.random.default_rng(0)
MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=rng)
Stationary(atoms)
ZeroRotation(atoms)
dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=args.temperature, friction=0.01 / units.fs, rng=rng)

Path(args.out).parent.mkdir(parents=True, exist_ok=True)
with Trajectory(args.out, "w", atoms) as traj:
    dyn.attach(traj.write, interval=10)
    dyn.attach(
        lambda: print(f"step {dyn.nsteps:5d}  T {atoms.get_temperature():6.1f} K  "
                      f"Epot {atoms.get_potential_energy():.4f} eV"),
        interval=max(1, args.steps // 10),
    )
    start = time.perf_counter()
    dyn.run(args.steps)
    elapsed = time.perf_counter() - start

print(f"{args.steps} steps in {elapsed:.1f} s: {1000 * elapsed / args.steps:.2f} ms per step")
print(f"trajectory: {args.out}")
