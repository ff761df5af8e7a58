"""µs per neighbor-list call of each backend versus system size, one structure, 5 Å cutoff:
clusters cut from a water box (molecules) and periodic water boxes. Picks the size where
`auto` should switch from the dense all-pairs search to a cell list.

    python benchmarks/neighbor_lists.py [--threads 1]
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from common import available_backends, median_time, water_box

from mfcalc.neighbors import neighbor_list

RESULTS = Path(__file__).parent / "results"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backends = available_backends()
    rows = []
    big = water_box(1000)
    for periodic in (False, True):
        for n_mol in (3, 8, 16, 32, 48, 64, 100, 192, 1000):
            if periodic:
                atoms = water_box(n_mol)
            else:
                centre = big.cell.array.diagonal() / 2
                order = np.argsort(np.linalg.norm(big.positions[::3] - centre, axis=1))[:n_mol]
                idx = np.concatenate([[3 * m, 3 * m + 1, 3 * m + 2] for m in order])
                atoms = big[idx]
                atoms.pbc = False
                atoms.cell = np.zeros((3, 3))
            pos = torch.tensor(atoms.positions)
            cell = torch.tensor(atoms.cell.array)
            pbc = torch.tensor(atoms.pbc)
            times = {}
            for backend in backends:
                if backend == "dense" and len(atoms) > 1000 and periodic:
                    continue
                number = max(3, min(200, int(2e5 / len(atoms) ** 1.5)))
                times[backend] = 1e6 * median_time(
                    lambda: neighbor_list(pos, cell, pbc, 5.0, backend), repeats=5, number=number
                )
            rows.append((len(atoms), periodic, times))
            print(len(atoms), "periodic" if periodic else "molecule",
                  {k: round(v, 1) for k, v in times.items()}, flush=True)
    lines = ["# Neighbor-list cost (µs per call, 5 Å cutoff, %d thread(s))\n" % args.threads,
             "| atoms | periodic | " + " | ".join(backends) + " | fastest |",
             "|---|---|" + "---|" * len(backends) + "---|"]
    for n, periodic, times in rows:
        cells = [f"{times[b]:.0f}" if b in times else "-" for b in backends]
        lines.append(f"| {n} | {periodic} | " + " | ".join(cells) + f" | {min(times, key=times.get)} |")
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "neighbor_lists.md").write_text(table)


if __name__ == "__main__":
    main()
