"""Give a shipped model the short-range core of mfcalc >= 0.2 (mfcalc.model: learned distances
clamped below 0.45 x the sum of covalent radii, ZBL repulsion switched in below 0.6x) and re-export
it, weights untouched, with its training-domain statistics:

    python models/tools/add_core.py chno-mf --recipe recipes/chno-mf.yaml            # checks only
    python models/tools/add_core.py chno-mf --recipe recipes/chno-mf.yaml --write    # and writes

Before anything is written it checks, on the recipe's validation and test splits and every 10th
training structure, that every pair distance lies beyond the core (so the core cannot change a
prediction the model was trained or tested on), that energies and forces are unchanged to
1e-9 eV, and that every element pair at every fidelity is repulsive and monotonic from 0.05 Å up
to the clamp radius, 0.6 x the sum of covalent radii (inside every real bond length). Then model.pt (same metadata, plus ``domain``) and
checkpoint.pt (same weights, config with the core) are rewritten.
"""

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from ase.data import chemical_symbols, covalent_radii

from mfcalc.domain import domain_statistics
from mfcalc.modelfile import build_forcefield, export_model, load_checkpoint, read_metadata, save_checkpoint
from mfcalc.model import default_config
from mfcalc.recipe import load_datasets, read_recipe
from mfcalc.training import evaluate, to_graphs

ROOT = Path(__file__).resolve().parent.parent.parent
CORE = {key: default_config([1], ["x"])[key] for key in
        ("core_radius_factor", "core_switch_factor", "core_inner_factor", "core_clamp_width")}


def shortest_ratio(structures) -> float:
    """Smallest pair distance / (sum of covalent radii) over the structures (non-periodic)."""
    best = np.inf
    for s in structures:
        d = np.linalg.norm(s.positions[:, None] - s.positions[None], axis=-1)
        radii = covalent_radii[s.numbers]
        ratio = d / (radii[:, None] + radii[None])
        np.fill_diagonal(ratio, np.inf)
        best = min(best, float(ratio.min()))
    return best


def dimer_scan(forcefield, domain) -> list:
    """Problems found scanning every element pair at every fidelity from 0.05 Å to where the
    core ends (0.6 x the sum of covalent radii: every real dimer is repulsive there; bonds are
    longer). Empty when all is well."""
    problems = []
    zero_cell, no_pbc = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool)
    for z1, z2 in itertools.combinations_with_replacement(forcefield.elements, 2):
        upto = CORE["core_radius_factor"] * (covalent_radii[z1] + covalent_radii[z2])
        distances = np.linspace(0.05, upto, 80)
        for f, name in enumerate(forcefield.fidelities):
            energies = []
            for d in distances:
                positions = torch.tensor([[0.0, 0.0, 0.0], [d, 0.0, 0.0]], dtype=torch.float64)
                energies.append(float(forcefield.compute(positions, torch.tensor([z1, z2]), zero_cell, no_pbc, f)["energy"]))
            rising = np.diff(energies)
            if not (rising < 0).all():
                where = distances[1:][rising >= 0]
                problems.append(f"{chemical_symbols[z1]}-{chemical_symbols[z2]} at {name}: not monotonic at "
                                f"{where.min():.2f}-{where.max():.2f} Å (scan 0.05-{upto:.2f} Å)")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="shipped model directory name under models/")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    directory = ROOT / "models" / args.model
    payload = load_checkpoint(directory / "checkpoint.pt")
    meta = read_metadata(directory / "model.pt")
    recipe_path = Path(args.recipe).resolve()
    splits = load_datasets(read_recipe(recipe_path), recipe_path.parent)
    checked = list(splits["val"]) + list(splits["test"]) + list(splits["train"][::10])

    ratio = min(shortest_ratio(splits["train"]), shortest_ratio(checked))
    print(f"shortest pair / sum of covalent radii in the data: {ratio:.3f} (core switch at {CORE['core_switch_factor']})")
    if ratio <= CORE["core_switch_factor"]:
        sys.exit("the data reach into the core: adding it would change trained predictions")

    old = build_forcefield(payload["config"], payload["state_dict"]).double().eval()
    config = {**payload["config"], **CORE}
    new = build_forcefield(config, payload["state_dict"]).double().eval()
    fidelities = list(config["fidelities"])
    graphs = to_graphs(checked, fidelities, float(config["cutoff"]))
    a, b = evaluate(old, graphs, fidelities), evaluate(new, graphs, fidelities)
    worst = max(abs(a[k]["energy_mae"] - b[k]["energy_mae"]) + abs(a[k].get("forces_mae", 0) - b[k].get("forces_mae", 0))
                for k in a)
    print(f"{len(checked)} structures: largest change of an error {worst:.2e} eV")
    if worst > 1e-9:
        sys.exit("the core changed predictions on the data")

    domain = domain_statistics(splits["train"], float(config["cutoff"]))
    before = dimer_scan(old, domain)
    after = dimer_scan(new, domain)
    print(f"dimer scans without the core: {len(before)} problems, e.g. {before[:3]}")
    print(f"dimer scans with the core: {len(after)} problems {after[:10]}")
    if after:
        sys.exit("the core does not make every pair monotonic")
    if args.write:
        keep = {k: meta[k] for k in ("aliases", "default_fidelity", "training_data", "test_errors", "finetune")
                if k in meta}
        export_model(new, directory / "model.pt", metadata={**keep, "domain": domain}, dtype=torch.float64)
        extra = {k: v for k, v in payload.items() if k not in ("config", "state_dict", "mfcalc_version")}
        save_checkpoint(directory / "checkpoint.pt", new, **extra)
        print(f"wrote {directory / 'model.pt'} and {directory / 'checkpoint.pt'}")


if __name__ == "__main__":
    main()
