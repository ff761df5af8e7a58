"""Keep the frames of a label input whose molecules have a given number of heavy (non-H) atoms,
in the input's order (a file in rounds stays in rounds), with every record's info untouched.

    python data/chno/select_heavy.py data/chno/pick3_all.extxyz data/chno/pick3_heavy0-4_rounds.extxyz --max-heavy 4

For label inputs cut from a pick that already exists, when the raw structures that
make_structures.py --combine needs are not at hand.
"""

import argparse

from ase.io import read, write


def heavy_atoms(atoms) -> int:
    return int((atoms.numbers > 1).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--min-heavy", type=int, default=0)
    parser.add_argument("--max-heavy", type=int, required=True)
    args = parser.parse_args()
    frames = [a for a in read(args.source, ":") if args.min_heavy <= heavy_atoms(a) <= args.max_heavy]
    if not frames:
        raise SystemExit(f"no frame of {args.source} has {args.min_heavy}-{args.max_heavy} heavy atoms")
    write(args.out, frames, format="extxyz")
    print(f"{len(frames)} frames of {len({a.info.get('name') for a in frames})} molecules -> {args.out}")


if __name__ == "__main__":
    main()
