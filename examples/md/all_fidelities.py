"""Every level of theory at once: predict_all_fidelities along a short MD trajectory, and the
spread between fidelities as a cheap disagreement signal.

    python examples/md/all_fidelities.py [--steps 400]

Writes examples/md/output/all_fidelities.png (relative energies per fidelity and force spread).
"""

import argparse
from pathlib import Path

import numpy as np
from ase.build import molecule

from mfcalc import MFCalculator
from mfcalc.workflows import langevin, thermalize

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=400)
parser.add_argument("--out", default=str(Path(__file__).parent / "output" / "all_fidelities.png"))
args = parser.parse_args()

atoms = molecule("CH3CH2OH")
calc = MFCalculator("ethanol-mf", fidelity="PBE/def2-SVP")  # MD runs at a cheap-to-trust level
atoms.calc = calc
thermalize(atoms, 500, np.random.default_rng(0))
dyn = langevin(atoms, timestep=0.5, temperature=500, friction=0.01, rng=np.random.default_rng(1))  # fs, K, 1/fs

once = calc.predict_all_fidelities(atoms)
print("one structure, every fidelity in one batched pass:")
for name, e, rel in zip(once["fidelities"], once["energy"], once["relative_energy"]):
    print(f"  {name:18s} E = {e:14.4f} eV   E - sum(E0) = {rel:8.4f} eV")
print(f"  spread of relative energies {1000 * once['energy_spread']:.1f} meV, "
      f"largest per-atom force spread {1000 * once['forces_spread'].max():.1f} meV/Å")

times, relative, spread = [], [], []


def sample():
    p = calc.predict_all_fidelities(atoms)
    times.append(dyn.nsteps * 0.5e-3)
    relative.append(p["relative_energy"])
    spread.append(p["forces_spread"].max())


dyn.attach(sample, interval=10)
dyn.run(args.steps)
relative = np.array(relative)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, (ax_e, ax_s) = plt.subplots(2, 1, sharex=True, figsize=(6, 5))
for k, name in enumerate(once["fidelities"]):
    ax_e.plot(times, relative[:, k] - relative[0, k], label=name)
ax_e.set_ylabel("E - E(t=0) (eV)")
ax_e.legend(fontsize=8)
ax_s.plot(times, 1000 * np.array(spread))
ax_s.set_ylabel("max force spread (meV/Å)")
ax_s.set_xlabel("time (ps)")
ax_e.set_title("ethanol at 500 K: all fidelities along one trajectory")
fig.tight_layout()
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out, dpi=120)
print(f"mean force spread along the trajectory {1000 * np.mean(spread):.1f} meV/Å; plot: {args.out}")
