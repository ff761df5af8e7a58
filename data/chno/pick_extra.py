"""Pick more frames per molecule from the xTB pool (xtb_gfn2.npz) for a label run, leaving out the
frames other picks already hold and the molecules a recipe holds out.

    python data/chno/pick_extra.py data/chno/pick4extra_heavy0-4_rounds.extxyz --max-heavy 4 \
        --strata md:600,normal_mode:300,md:1000,normal_mode:600 \
        --exclude data/chno/pick5_heavy0-4.extxyz data/chno/pick3_heavy0-4_rounds.extxyz \
        --held-out-recipe recipes/chno-mf.yaml

One frame per (sampling, temperature) stratum and molecule, drawn with numpy.random.default_rng(seed)
among the stratum's frames not excluded, written in rounds (the first pick of every molecule, smallest
molecules first, then the second, ...), so a label run cut off part-way has covered the most molecules.
Records carry the pool's info (name, smiles, family, sampling, temperature_K, frame) and charge 0,
spin 0 (data/chno holds neutral closed-shell molecules only, see catalog.py).
"""

import argparse
from pathlib import Path

import numpy as np
import yaml
from ase import Atoms
from ase.io import read, write

HERE = Path(__file__).resolve().parent


def pool_frames(path: Path):
    """Yield (info, Atoms) for every frame of the xTB pool, positions in Å."""
    with np.load(path) as npz:  # every array read once: NpzFile reads an array on each access
        z = {key: npz[key] for key in npz.files}
    start = np.concatenate([[0], np.cumsum(z["n_atoms"])])
    for i in range(len(z["n_atoms"])):
        sl = slice(start[i], start[i + 1])
        info = {"name": str(z["info_name"][i]), "smiles": str(z["info_smiles"][i]),
                "family": str(z["info_family"][i]), "sampling": str(z["info_sampling"][i]),
                "temperature_K": float(z["info_temperature_K"][i]), "frame": int(z["info_frame"][i]),
                "charge": 0, "spin": 0}
        yield info, Atoms(numbers=z["numbers"][sl], positions=z["positions"][sl].astype(np.float64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--pool", default=str(HERE / "xtb_gfn2.npz"))
    parser.add_argument("--max-heavy", type=int, required=True)
    parser.add_argument("--strata", required=True, help="sampling:temperature_K pairs, comma-separated")
    parser.add_argument("--exclude", nargs="*", default=[], help="picks whose (name, frame) are not drawn again")
    parser.add_argument("--held-out-recipe", help="a recipe whose held_out test and val molecules are skipped")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    strata = [(s.split(":")[0], float(s.split(":")[1])) for s in args.strata.split(",")]
    taken = {(a.info["name"], int(a.info["frame"])) for path in args.exclude for a in read(path, ":")}
    skip = set()
    if args.held_out_recipe:
        held = yaml.safe_load(Path(args.held_out_recipe).read_text()).get("held_out", {})
        skip = set(held.get("test", [])) | set(held.get("val", []))

    by_molecule = {}
    for info, atoms in pool_frames(Path(args.pool)):
        if info["name"] in skip or (atoms.numbers > 1).sum() > args.max_heavy:
            continue
        if (info["name"], info["frame"]) in taken:
            continue
        atoms.info.update(info)
        by_molecule.setdefault(info["name"], []).append(atoms)

    rng = np.random.default_rng(args.seed)
    picks = []
    for name, frames in by_molecule.items():
        chosen = []
        for sampling, temperature in strata:
            options = [a for a in frames if a.info["sampling"] == sampling and a.info["temperature_K"] == temperature]
            if options:
                chosen.append(options[int(rng.integers(len(options)))])
        picks.append(chosen)
    picks.sort(key=lambda frames: len(frames[0]) if frames else 0)  # stable: pool order within a size
    out = [frames[k] for k in range(len(strata)) for frames in picks if k < len(frames)]
    write(args.out, out, format="extxyz")
    print(f"{len(out)} frames of {len(picks)} molecules -> {args.out}")


if __name__ == "__main__":
    main()
