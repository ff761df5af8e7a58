"""NVE (Velocity Verlet) of ethanol in float64 at CCSD(T): how well is energy conserved?

    python examples/md/nve_drift.py [--steps 4000] [--timestep 0.25]

Prints the total-energy drift (slope of a linear fit, meV/atom/ps) and its fluctuation.
"""

import argparse

import numpy as np
from ase import units
from ase.build import molecule
from ase.md.velocitydistribution import ZeroRotation
from ase.md.verlet import VelocityVerlet

from mfcalc import MFCalculator
from mfcalc.workflows import thermalize

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=4000)
parser.add_argument("--timestep", type=float, default=0.25, help="fs")
parser.add_argument("--temperature", type=float, default=300.0, help="K, initial velocities")
parser.add_argument("--fidelity", default="CCSD(T)")
args = parser.parse_args()

atoms = molecule("CH3CH2OH")
atoms.calc = MFCalculator("ethanol-mf", fidelity=args.fidelity, dtype="float64")
thermalize(atoms, args.temperature, np.random.default_rng(0))
ZeroRotation(atoms)
dyn = VelocityVerlet(atoms, args.timestep * units.fs)
t, e = [], []
dyn.attach(lambda: (t.append(dyn.nsteps * args.timestep * 1e-3), e.append(atoms.get_total_energy())), interval=10)
dyn.run(args.steps)
t, e = np.array(t), np.array(e)
slope = np.polyfit(t, e, 1)[0]  # eV/ps
n = len(atoms)
print(f"{args.steps} steps of {args.timestep} fs ({t[-1]:.2f} ps), {atoms.calc.fidelity}, float64")
print(f"energy drift       {1000 * slope / n:+.4f} meV/atom/ps")
print(f"energy fluctuation {1000 * e.std() / n:.4f} meV/atom (std), {1000 * np.ptp(e) / n:.4f} meV/atom (max-min)")
