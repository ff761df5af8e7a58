"""Smoothness of potential energy surfaces, several models side by side: bond scans and hot MD.

    python benchmarks/smoothness.py --models joint=A.pt reptile=B.pt [--structure CH3CH2OH | FILE.xyz]
        [--fidelity "CCSD(T)"] [--ps 10] [--temperature 500] [--out benchmarks/results/NAME]

Bond scans: for the first hydrogen bonded to each heavy element of the structure (C-H, N-H, O-H),
that H is moved along its bond from 0.8 Å to 6 Å in 0.01 Å steps, the rest frozen. A smooth
surface rises without wiggles to a plateau, so per scan:
  - largest step: the largest energy change between neighbouring points beyond the minimum (eV);
    a discontinuity (a pair crossing the cutoff without a smooth envelope, a spline kink) shows here;
  - extrema: local maxima and minima of E(r) beyond the minimum, counting only turns larger than
    1 meV (a bond dissociation curve has none);
  - tail curvature: the largest |d2E/dr2| beyond 3 Å (eV/Å2), where the bond is broken and the
    curve should be flat;
  - plateau: E(6 Å) - E(minimum) (eV), the frozen-rest dissociation energy.
MD: Langevin NVT at --temperature for --ps with benchmarks/md_stability.py's bond checks.

The Reptile paper (Allen et al. 2024) claims smoother surfaces from meta-learned pretraining; this
script is how benchmarks/results/reptile_vs_joint_chno/ measures it.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from ase.build import molecule
from ase.io import read

from bond_stretch import energy_scan, hydrogens_by_bond
from md_stability import run_stability
from mfcalc import MFCalculator

SCAN = np.round(np.arange(0.8, 6.0 + 1e-9, 0.01), 2)
TURN = 1e-3  # eV: a turn of E(r) smaller than this is noise, not an extremum
TAIL = 3.0  # Å: a Morse C-H bond (a = 1.9 /Å) curves by < 0.9 eV/Å2 beyond it


def load_structure(spec: str):
    return read(spec, index=0) if Path(spec).exists() else molecule(spec)


def scanned_bonds(atoms):
    """[(label, h, partner)]: the first H bonded (nearest heavy atom) to each heavy element."""
    return [(label, *pairs[0]) for label, pairs in sorted(hydrogens_by_bond(atoms).items())]


def extrema(energies: np.ndarray, turn: float = TURN) -> int:
    """Local extrema of a sampled curve, counting only turns larger than ``turn``."""
    count, direction, anchor = 0, 0, energies[0]
    for e in energies[1:]:
        if direction >= 0 and e < anchor - turn:
            count += direction > 0
            direction, anchor = -1, e
        elif direction <= 0 and e > anchor + turn:
            count += direction < 0
            direction, anchor = 1, e
        elif (direction > 0 and e > anchor) or (direction < 0 and e < anchor):
            anchor = e
    return count


def scan_metrics(energies: np.ndarray) -> dict:
    m = int(np.argmin(energies))
    beyond = energies[m:]
    second = np.diff(energies, 2) / 0.01 ** 2
    tail = second[SCAN[1:-1] >= TAIL]
    return {"r_min": float(SCAN[m]), "largest_step": float(np.abs(np.diff(beyond)).max()) if len(beyond) > 1 else 0.0,
            "extrema": extrema(beyond), "tail_curvature": float(np.abs(tail).max()),
            "plateau": float(energies[-1] - energies[m])}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=MODEL")
    parser.add_argument("--structure", default="CH3CH2OH", help="an ase.build.molecule name or a structure file")
    parser.add_argument("--fidelity", default="CCSD(T)")
    parser.add_argument("--ps", type=float, default=10.0)
    parser.add_argument("--temperature", type=float, default=500.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True, help="path without suffix: writes OUT.md and OUT.json")
    args = parser.parse_args()
    models = dict(spec.split("=", 1) for spec in args.models)
    atoms = load_structure(args.structure)
    bonds = scanned_bonds(atoms)
    rows = []
    for name, path in models.items():
        calc = MFCalculator(path, fidelity=args.fidelity, dtype="float64", device="cpu")
        for label, h, partner in bonds:
            row = {"model": name, "kind": "scan", "bond": label, **scan_metrics(energy_scan(atoms, calc, h, partner, SCAN))}
            rows.append(row)
            print(row, flush=True)
        for seed in args.seeds:
            r = run_stability(args.ps, args.temperature, seed, model=path, atoms=atoms, fidelity=args.fidelity)
            r.pop("compile_status", None)
            rows.append({"model": name, "kind": "md", "seed": seed, **r})
            print(rows[-1], flush=True)
    write(rows, args, Path(args.out))


def write(rows, args, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"structure": args.structure, "fidelity": args.fidelity,
                                                    "rows": rows}, indent=1))
    lines = [f"# Smoothness{': ' + args.title if args.title else ''}", "",
             f"`python benchmarks/smoothness.py` on {args.structure} at `{args.fidelity}`. Bond scans: one H moved "
             "along its bond 0.8-6 Å in 0.01 Å steps, the rest frozen; largest step and extrema (turns > 1 meV) "
             f"counted beyond the minimum; tail curvature = max |d2E/dr2| beyond {TAIL} Å; plateau = E(6 Å) - E(min).", "",
             "| model | bond | r_min (Å) | largest step (eV) | extrema | tail curvature (eV/Å2) | plateau (eV) |",
             "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "scan"):
        lines.append(f"| {r['model']} | {r['bond']} | {r['r_min']:.2f} | {r['largest_step']:.3f} | {r['extrema']} | "
                     f"{r['tail_curvature']:.2f} | {r['plateau']:.2f} |")
    lines += ["", f"Langevin NVT {args.temperature:.0f} K, 0.5 fs, {args.ps:g} ps (bond broken: stretched >= 1.5x, "
              "compressed <= 0.7x, or non-bonded atoms within 0.8 Å):", "",
              "| model | seed | bonds intact | first break (ps) | max bond stretch | min non-bonded distance (Å) | mean T (K) |",
              "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "md"):
        lines.append(f"| {r['model']} | {r['seed']} | {r['intact']} | {'-' if r['first_break_ps'] is None else round(r['first_break_ps'], 2)} | "
                     f"{r['max_bond_stretch']:.3f} | {r['min_nonbonded_distance']:.3f} | {r['mean_temperature']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
