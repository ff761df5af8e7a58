"""Long Langevin NVT of a molecule (ethanol by default) at 500 K at CCSD(T): do bonds stay bonds?

    python benchmarks/md_stability.py [--ps 100] [--temperature 500] [--seeds 0 1] [--compile]
        [--model ethanol-mf] [--molecules CH3CH2OH CH3COOH ...] [--out PATH]

Checks, every 10 steps, every bond of the starting structure (stretched beyond 1.5x its length?)
and every non-bonded heavy-atom/hydrogen pair (closer than 0.8x a bond?). Writes
benchmarks/results/md_stability.md.
"""

import argparse
import time
from pathlib import Path

import numpy as np
from ase.build import molecule
from ase.md.velocitydistribution import ZeroRotation
from ase.neighborlist import natural_cutoffs, neighbor_list

from mfcalc import MFCalculator
from mfcalc.workflows import langevin, thermalize

RESULTS = Path(__file__).parent / "results"
# a bond is broken when stretched to >= STRETCH or compressed to <= COMPRESS times its start
# length; two non-bonded atoms closer than CONTACT Å count as a broken structure too
STRETCH, COMPRESS, CONTACT = 1.5, 0.7, 0.8


def run_stability(picoseconds: float = 100.0, temperature: float = 500.0, seed: int = 0,
                  timestep_fs: float = 0.5, dtype: str = "float32", model: str = "ethanol-mf",
                  compile=None, name: str = "CH3CH2OH", atoms=None, fidelity: str = "CCSD(T)") -> dict:
    """Langevin NVT of ``atoms`` (default: ase.build.molecule(name)) at ``fidelity``; the worst bond
    stretch and compression and the closest non-bonded pair seen, and when a bond first broke."""
    atoms = molecule(name) if atoms is None else atoms.copy()
    atoms.calc = MFCalculator(model, fidelity=fidelity, dtype=dtype, compile=compile)
    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.1))
    bonds = np.array([(a, b) for a, b in zip(i, j) if a < b])
    length0 = atoms.get_distances(bonds[:, 0], bonds[:, 1])
    rng = np.random.default_rng(seed)
    thermalize(atoms, temperature, rng)
    ZeroRotation(atoms)
    dyn = langevin(atoms, timestep_fs, temperature, 0.01, rng)
    worst = {"stretch": 0.0, "compress": 10.0, "nonbonded_min": 10.0, "first_break_ps": None}
    temps = []
    bonded = np.zeros((len(atoms), len(atoms)), bool)
    bonded[bonds[:, 0], bonds[:, 1]] = bonded[bonds[:, 1], bonds[:, 0]] = True
    np.fill_diagonal(bonded, True)

    def check():
        d = atoms.get_all_distances()
        ratio = d[bonds[:, 0], bonds[:, 1]] / length0
        worst["stretch"] = max(worst["stretch"], float(ratio.max()))
        worst["compress"] = min(worst["compress"], float(ratio.min()))
        worst["nonbonded_min"] = min(worst["nonbonded_min"], float(d[~bonded].min()))
        temps.append(atoms.get_temperature())
        broken = ratio.max() >= STRETCH or ratio.min() <= COMPRESS or d[~bonded].min() <= CONTACT
        if broken and worst["first_break_ps"] is None:
            worst["first_break_ps"] = dyn.nsteps * timestep_fs / 1000

    dyn.attach(check, interval=10)
    steps = int(round(picoseconds * 1000 / timestep_fs))
    start = time.perf_counter()
    dyn.run(steps)
    seconds = time.perf_counter() - start
    intact = worst["first_break_ps"] is None
    return {"picoseconds": picoseconds, "steps": steps, "temperature": temperature,
            "mean_temperature": float(np.mean(temps[len(temps) // 10:])), "intact": bool(intact),
            "max_bond_stretch": worst["stretch"], "min_bond_compression": worst["compress"],
            "min_nonbonded_distance": worst["nonbonded_min"], "first_break_ps": worst["first_break_ps"],
            "seconds": seconds,
            "ms_per_step": 1000 * seconds / steps,
            "compile_status": atoms.calc.potential.compile_status()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ps", type=float, default=100.0)
    parser.add_argument("--temperature", type=float, default=500.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--model", default="ethanol-mf")
    parser.add_argument("--molecules", nargs="+", default=["CH3CH2OH"], help="names ase.build.molecule knows")
    parser.add_argument("--compile", action="store_true", help="MFCalculator(compile=True) instead of the default "
                        "(compile='auto'): the same forces, compiled before the first step")
    parser.add_argument("--out", default=str(RESULTS / "md_stability.md"))
    args = parser.parse_args()
    text = (
        f"# MD stability: {', '.join(args.molecules)}, Langevin NVT {args.temperature:.0f} K, 0.5 fs, CCSD(T), {args.model}"
        + (" (compile=True)" if args.compile else "") + "\n\n"
        f"Every bond of the start structure checked every 10 steps: broken if stretched to >= {STRETCH}x or "
        f"compressed to <= {COMPRESS}x its length, or if two non-bonded atoms come within {CONTACT} Å.\n\n"
        "| molecule | seed | ps | steps | mean T (K) | bonds intact | first break (ps) | max bond stretch | "
        "min bond compression | min non-bonded distance (Å) | ms/step |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for name, seed in [(name, seed) for name in args.molecules for seed in args.seeds]:
        r = run_stability(args.ps, args.temperature, seed, model=args.model, compile=True if args.compile else None,
                          name=name)
        row = (
            f"| {name} | {seed} | {r['picoseconds']:.0f} | {r['steps']} | {r['mean_temperature']:.0f} | {r['intact']} | "
            f"{'-' if r['first_break_ps'] is None else round(r['first_break_ps'], 2)} | "
            f"{r['max_bond_stretch']:.3f} | {r['min_bond_compression']:.3f} | {r['min_nonbonded_distance']:.3f} | "
            f"{r['ms_per_step']:.2f} |\n"
        )
        print(row, end="", flush=True)
        text += row
    print(text)
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
