"""Reorder a label input into rounds, cheapest molecules first, so a labelling run that is cut
short covers the most molecules (mfcalc label resumes where it stopped).

    python data/chno/reorder_rounds.py data/chno/pick3_heavy0-3.extxyz \
        data/chno/pick3_heavy0-3_rounds.extxyz --all-rounds-below 3

Order: every frame of the molecules with fewer than ``--all-rounds-below`` heavy atoms (their
CCSD(T) gradients cost seconds), molecule by molecule, smallest first; then the first frame of
every larger molecule (smallest first), then the second frames, and so on. The frames and their
info are copied unchanged.
"""

import argparse
from collections import defaultdict

from ase.io import read, write


def size_key(atoms):
    heavy = int((atoms.numbers > 1).sum())
    return heavy, len(atoms), int(atoms.numbers.sum()), atoms.info.get("name", "")


def reorder(frames, all_rounds_below: int):
    by_molecule = defaultdict(list)
    for atoms in frames:
        by_molecule[atoms.info["name"]].append(atoms)
    molecules = sorted(by_molecule.values(), key=lambda group: size_key(group[0]))
    small = [g for g in molecules if size_key(g[0])[0] < all_rounds_below]
    large = [g for g in molecules if size_key(g[0])[0] >= all_rounds_below]
    ordered = [a for g in small for a in g]
    for k in range(max((len(g) for g in large), default=0)):
        ordered += [g[k] for g in large if k < len(g)]
    return ordered


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--all-rounds-below", type=int, default=3)
    args = parser.parse_args()
    frames = read(args.source, ":")
    ordered = reorder(frames, args.all_rounds_below)
    assert len(ordered) == len(frames)
    write(args.target, ordered, format="extxyz")
    print(f"{len(ordered)} frames -> {args.target}")


if __name__ == "__main__":
    main()
