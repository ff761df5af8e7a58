"""ms per MD step of two or more model files on the same system, timed in the same interleaved
rounds (so host drift hits them alike): what a re-export or an architecture change costs.

    git show 63a5a14:models/chno-mf/model.pt > /tmp/old.pt
    python benchmarks/model_versions.py /tmp/old.pt chno-mf [--system ethanol] [--compile] [--rounds 15]

Velocity Verlet through ASE, float32, default calculator settings (threads="auto").
"""

import argparse

import numpy as np
from ase import units
from ase.md.verlet import VelocityVerlet

from common import aspirin, ethanol, interleaved_times, water_box

from mfcalc import MFCalculator
from mfcalc.workflows import thermalize

SYSTEMS = {"ethanol": ethanol, "aspirin": aspirin, "water": lambda: water_box(192)}


def runner(model: str, atoms, compile: bool, steps: int):
    atoms = atoms.copy()
    atoms.calc = MFCalculator(model, device="cpu", dtype="float32", compile=compile, check_domain=False)
    thermalize(atoms, 300, np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(20)  # warm-up (compiles with --compile)
    return (dyn.run, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--system", default="ethanol", choices=sorted(SYSTEMS))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    atoms = SYSTEMS[args.system]()
    runs = {model: runner(model, atoms, args.compile, args.steps) for model in args.models}
    times = interleaved_times(runs, args.rounds)
    path = "compile=True" if args.compile else "TorchScript file"
    print(f"| model ({args.system}, {path}) | ms/step |\n|---|---|")
    for model, seconds in times.items():
        print(f"| {model} | {1000 * seconds:.2f} |")


if __name__ == "__main__":
    main()
