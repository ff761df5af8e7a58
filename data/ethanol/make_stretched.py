"""Ethanol configurations with one bond stretched, for labelling at PBE/def2-SVP with PySCF.

MD17/rMD17 sample ethanol near equilibrium at 500 K; a potential trained on them alone does not
know that pulling a hydrogen off costs ~4 eV (ethanol-mf v1 said ~0.6 eV and lost hydrogens in
10-20 ps Langevin runs at 500 K). These configurations teach the shape of bond stretching.

    python data/ethanol/make_stretched.py            # writes ethanol_stretched_structures.xyz
    mfcalc label data/ethanol/ethanol_stretched_structures.xyz --method PBE/def2-SVP --forces \
        --out data/ethanol/ethanol_stretched_pbe_def2svp.xyz

Closed-shell (restricted) PBE like rMD17; it over-binds bonds stretched far beyond 2 Å, which is
the safe side for a stability prior but not a description of bond breaking.
"""

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import read, write
from ase.neighborlist import natural_cutoffs, neighbor_list

HERE = Path(__file__).parent
rng = np.random.default_rng(2026)
frames = read(str(HERE / "ethanol_rmd17_pbe_def2svp-train1000.xyz"), index=":")
first = frames[0]
i, j = neighbor_list("ij", first, natural_cutoffs(first, mult=1.1))
bonds = [(a, b) for a, b in zip(i, j) if a < b]
h_bonds = [b for b in bonds if "H" in (first[b[0]].symbol, first[b[1]].symbol)]
heavy_bonds = [b for b in bonds if b not in h_bonds]
out = []
for k in range(120):
    base = frames[rng.integers(len(frames))]
    atoms = Atoms(numbers=base.numbers, positions=base.positions.copy())
    if k < 90:
        a, b = h_bonds[rng.integers(len(h_bonds))]
        length = rng.uniform(1.25, 3.0)
    else:
        a, b = heavy_bonds[rng.integers(len(heavy_bonds))]
        length = rng.uniform(1.65, 2.6)
    moving = b if atoms[b].symbol == "H" or atoms[a].symbol != "H" else a
    fixed = a if moving == b else b
    v = atoms.positions[moving] - atoms.positions[fixed]
    atoms.positions[moving] = atoms.positions[fixed] + length * v / np.linalg.norm(v)
    atoms.info["stretched_bond"] = f"{atoms[fixed].symbol}{fixed}-{atoms[moving].symbol}{moving}"
    atoms.info["bond_length"] = round(float(length), 4)
    out.append(atoms)
write(str(HERE / "ethanol_stretched_structures.xyz"), out, format="extxyz")
print(f"wrote {len(out)} structures")
