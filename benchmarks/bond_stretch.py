"""Energy to pull one hydrogen of ethanol away along its bond, the rest frozen (ase.build.molecule
geometry), at every fidelity of a model: the model card's bond-stretching table. Also scans one H
out to 6 Å in 0.01 Å steps and reports the largest energy step between neighbouring points, which
shows whether the energy is continuous where pairs cross the cutoff.

    python benchmarks/bond_stretch.py [--model ethanol-mf]
"""

import argparse

import numpy as np

from ase.build import molecule

from mfcalc import MFCalculator

LENGTHS = {"C-H": (2.0, 2.5, 3.5), "O-H": (2.5,)}


def stretched(atoms, h: int, partner: int, length: float):
    out = atoms.copy()
    bond = out.positions[h] - out.positions[partner]
    out.positions[h] = out.positions[partner] + bond / np.linalg.norm(bond) * length
    return out


def hydrogens_by_bond(atoms):
    """{"C-H": [(h, partner), ...], "O-H": [...], ...}: each H with its nearest heavy atom, by
    that atom's element."""
    symbols = atoms.get_chemical_symbols()
    d = atoms.get_all_distances()
    bonds = {}
    for h in (i for i, s in enumerate(symbols) if s == "H"):
        partner = min((i for i, s in enumerate(symbols) if s != "H"), key=lambda i: d[h, i])
        bonds.setdefault(f"{symbols[partner]}-H", []).append((h, partner))
    return bonds


def energy_scan(atoms, calc, h: int, partner: int, lengths) -> np.ndarray:
    """Energy (eV) with H ``h`` moved along its bond to each of ``lengths`` (Å), the rest frozen."""
    energies = []
    for x in lengths:
        a = stretched(atoms, h, partner, x)
        a.calc = calc
        energies.append(a.get_potential_energy())
    return np.array(energies)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ethanol-mf")
    args = parser.parse_args()
    atoms = molecule("CH3CH2OH")
    hydrogens = hydrogens_by_bond(atoms)
    calc = MFCalculator(args.model, dtype="float64", device="cpu")
    header = [f"{bond} to {x} Å" for bond, xs in LENGTHS.items() for x in xs]
    lines = [f"# Pulling one H off ethanol ({args.model}), eV relative to the unstretched molecule", "",
             "| fidelity | " + " | ".join(header) + " | largest step in a 0.01 Å scan to 6 Å (eV) |",
             "|---|" + "---|" * (len(header) + 1)]
    for fidelity in calc.fidelities:
        calc.fidelity = fidelity
        atoms.calc = calc
        e0 = atoms.get_potential_energy()
        cells = []
        for bond, xs in LENGTHS.items():
            for x in xs:
                values = [energy_scan(atoms, calc, h, partner, [x])[0] - e0 for h, partner in hydrogens[bond]]
                cells.append(f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}")
        scan = energy_scan(atoms, calc, *hydrogens["C-H"][0], np.arange(1.0, 6.0, 0.01))
        step = float(np.abs(np.diff(scan)).max())
        lines.append(f"| {fidelity} | " + " | ".join(cells) + f" | {step:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
