"""ms per MD step through ASE (Velocity Verlet, after warm-up, median of repeats) for ethanol
(9 atoms) and a periodic water box (576 atoms), float32 and float64, per neighbor-list backend.

    python benchmarks/md_speed.py [--model ethanol-mf] [--threads 2]

Prints a markdown table and writes it to benchmarks/results/md_speed.md. A zero-cost
calculator with the same state check gives ASE's own floor per step.
"""

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.calculators.calculator import Calculator, all_changes
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

sys.path.insert(0, str(Path(__file__).parent))
from common import ethanol, median_time, water_box  # noqa: E402

from mfcalc import MFCalculator  # noqa: E402
from mfcalc.calculator import exact_changes  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class ZeroCalculator(Calculator):
    """No work at all: what ASE's step costs by itself."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, exact: bool):
        super().__init__()
        self.exact = exact

    def check_state(self, atoms, tol=1e-15):
        if self.exact and self.atoms is not None:
            return exact_changes(self.atoms, atoms)
        return super().check_state(atoms, tol)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3))}


def ms_per_step(atoms, calc, steps: int, repeats: int) -> float:
    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    return 1000 * median_time(lambda: dyn.run(1), repeats=repeats, number=steps, warmup=5)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ethanol-mf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backends = ["dense", "vesin"]
    try:
        import torch_cluster  # noqa: F401

        backends.append("torch-cluster")
    except ImportError:
        pass
    systems = {"ethanol (9 atoms)": (ethanol(), 50), "water box (576 atoms, periodic)": (water_box(), 3)}
    repeats = 3 if args.quick else 7
    rows = []
    for name, (atoms, steps) in systems.items():
        for exact in (False, True):
            label = "exact state check" if exact else "ASE default state check"
            t = ms_per_step(atoms, ZeroCalculator(exact), steps * 4, repeats)
            rows.append((name, f"zero-cost calculator, {label}", "-", "-", t))
        for dtype in ("float32", "float64"):
            for backend in backends + ["auto"]:
                calc = MFCalculator(args.model, dtype=dtype, device="cpu", neighbor_list=backend)
                t = ms_per_step(atoms, calc, steps, repeats)
                chosen = calc._backend
                rows.append((name, "mfcalc " + args.model, dtype, f"{backend} ({chosen})" if backend == "auto" else backend, t))
                print(f"{name:32s} {dtype:8s} {backend:14s} {t:9.2f} ms/step", flush=True)
    header = (
        f"# MD speed (ms per Velocity-Verlet step through ASE)\n\n"
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, device cpu\n\n"
        "| system | calculator | dtype | neighbor list | ms/step |\n|---|---|---|---|---|\n"
    )
    table = header + "".join(f"| {a} | {b} | {c} | {d} | {t:.2f} |\n" for a, b, c, d, t in rows)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "md_speed.md").write_text(table)


if __name__ == "__main__":
    main()
