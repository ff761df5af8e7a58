"""Langevin NVT of ethanol at the CCSD(T) level of theory with the shipped ethanol-mf model.

    python examples/md/ethanol_langevin.py            # 1000 steps of 0.5 fs at 500 K
    python examples/md/ethanol_langevin.py --steps 200 --temperature 300 --fidelity PBE+TS

Writes the trajectory (every 10th step) to examples/md/output/ethanol_langevin.traj, a plot of
temperature and potential energy against time next to it (.png), and prints ms per step.
Open the trajectory with `ase gui` or ase.io.read.
"""

import argparse
import time
from pathlib import Path

import numpy as np
from ase.build import molecule
from ase.io import Trajectory
from ase.md.velocitydistribution import ZeroRotation

from mfcalc import MFCalculator
from mfcalc.workflows import langevin, thermalize

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--temperature", type=float, default=500.0, help="K")
parser.add_argument("--fidelity", default="CCSD(T)")
parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
parser.add_argument("--out", default=str(Path(__file__).parent / "output" / "ethanol_langevin.traj"))
args = parser.parse_args()

atoms = molecule("CH3CH2OH")
atoms.calc = MFCalculator("ethanol-mf", fidelity=args.fidelity, dtype=args.dtype)
print(f"fidelity {atoms.calc.fidelity}, dtype {args.dtype}, device {atoms.calc.device}")

rng = np.random.default_rng(0)
thermalize(atoms, args.temperature, rng)  # Maxwell-Boltzmann, zero total momentum
ZeroRotation(atoms)
# ASE's Langevin with the centre of mass held by a FixCom constraint: 0.5 fs, friction 0.01/fs
dyn = langevin(atoms, timestep=0.5, temperature=args.temperature, friction=0.01, rng=rng)

Path(args.out).parent.mkdir(parents=True, exist_ok=True)
times, temperatures, energies = [], [], []


def record():
    times.append(dyn.nsteps * 0.5e-3)  # ps
    temperatures.append(atoms.get_temperature())
    energies.append(atoms.get_potential_energy())


with Trajectory(args.out, "w", atoms) as traj:
    dyn.attach(traj.write, interval=10)
    dyn.attach(record, interval=10)
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
print(f"mean temperature {np.mean(temperatures[len(temperatures) // 5:]):.0f} K (target {args.temperature:.0f} K)")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, (ax_t, ax_e) = plt.subplots(2, 1, sharex=True, figsize=(6, 5))
ax_t.plot(times, temperatures)
ax_t.axhline(args.temperature, color="k", lw=0.8, ls="--")
ax_t.set_ylabel("temperature (K)")
ax_e.plot(times, np.array(energies) - energies[0])
ax_e.set_ylabel(f"E_pot - E_pot(0) (eV)")
ax_e.set_xlabel("time (ps)")
ax_t.set_title(f"ethanol, Langevin NVT, {atoms.calc.fidelity}")
fig.tight_layout()
png = str(Path(args.out).with_suffix(".png"))
fig.savefig(png, dpi=120)
print(f"plot: {png}")
