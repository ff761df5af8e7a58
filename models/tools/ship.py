"""Ship a trained run as a model: copy a `mfcalc train` output directory into models/NAME,
re-exporting model.pt from its checkpoint with this checkout's code (same weights, same metadata,
fresh entry hashes) and re-rendering README.md from card.json with this checkout's card layout.

    python models/tools/ship.py runs/chno-mf chno-mf --recipe recipes/chno-mf.yaml [--write]

Without --write it only checks: the checkpoint's weights are the run's model file's weights
(checksum), and the re-exported file gives the same energies and forces as the run's file on the
recipe's first test structures (1e-10 eV). Why re-export: a long run exports with the code it
imported when it started; fixes made meanwhile to the scripted force path (e.g. the neighbor
search) reach the shipped file this way, with the weights untouched. ``--core`` re-sets the
short-range core (refused if a training pair lies inside it; ``core_pair_radius``, e.g.
``{"1-1": 1.27}``, clamps one element pair's learned distance below that radius, refused at or beyond
the pair's closest training distance; ``"auto"``: 0.9x each pair's closest training distance, as a
recipe's ``core_pair_radius: auto`` does at training). README.md is re-rendered from the
card: hand-written sections below the generated card (models/*/README.md) must be added again.
``--model-only`` replaces model.pt alone (the same weights through this checkout's force path).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from mfcalc import MFCalculator
from mfcalc.domain import pair_clamp_from_closest
from mfcalc.modelfile import build_forcefield, checksum, export_model, load_checkpoint, read_metadata, save_checkpoint
from mfcalc.recipe import card_markdown, load_datasets, read_recipe

ROOT = Path(__file__).resolve().parent.parent.parent
KEEP = ("checkpoint.pt", "card.json", "log.csv")


def closest_ratio(domain: dict):
    """The smallest training pair distance / (sum of covalent radii) in a model's domain statistics."""
    from ase.data import covalent_radii

    ratios = [d / (covalent_radii[int(a)] + covalent_radii[int(b)])
              for pair, d in domain.get("pair_min_distance", {}).items() for a, b in [pair.split("-")]]
    return min(ratios) if ratios else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a mfcalc train output directory (model.pt, checkpoint.pt, card.json)")
    parser.add_argument("name", help="models/NAME to write")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--core", default=None,
                        help='JSON of short-range settings to set, e.g. \'{"core_radius_factor": 0.65}\'; '
                             "refused if any training pair lies inside the new switch radius")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--model-only", action="store_true",
                        help="with --write: replace only models/NAME/model.pt (a faster force path for the "
                             "same weights), keeping its card, README and checkpoint")
    args = parser.parse_args()
    run = Path(args.run)
    payload = load_checkpoint(run / "checkpoint.pt")
    forcefield = build_forcefield(payload["config"], payload["state_dict"])
    meta = read_metadata(run / "model.pt")
    if checksum(forcefield.double()) != meta["checksum"]:
        raise SystemExit(f"{run}/checkpoint.pt does not hold the weights of {run}/model.pt")
    core = json.loads(args.core) if args.core else {}
    if set(core) - {"core_radius_factor", "core_switch_factor", "core_inner_factor", "core_clamp_width",
                    "core_pair_radius"}:
        raise SystemExit(f"--core takes only short-range settings, got {sorted(core)}")
    closest = meta.get("domain", {}).get("pair_min_distance", {})
    if core.get("core_pair_radius") == "auto":  # as a recipe's auto: 0.9 x each pair's closest training distance
        if not closest:
            raise SystemExit(f"core_pair_radius auto needs the training-domain statistics in {run}/model.pt")
        core["core_pair_radius"] = pair_clamp_from_closest(
            closest, float(core.get("core_radius_factor", payload["config"]["core_radius_factor"])))
        print(f"core_pair_radius auto: {core['core_pair_radius']}")
    for pair, radius in core.get("core_pair_radius", {}).items():
        a, b = sorted(int(z) for z in pair.split("-"))
        seen = closest.get(f"{a}-{b}")
        if seen is None:
            raise SystemExit(f"core_pair_radius {pair!r}: no {a}-{b} pair in the model's training data (domain statistics)")
        if radius >= seen:
            raise SystemExit(f"core_pair_radius {pair!r} = {radius} Å reaches a training pair ({seen:.3f} Å): "
                             "the clamp must lie inside the data")
    if core:
        config = {**payload["config"], **core}
        outer = max(config["core_switch_factor"], config["core_radius_factor"])
        ratio = closest_ratio(meta.get("domain", {}))
        if ratio is not None and ratio <= outer:
            raise SystemExit(f"a training pair lies at {ratio:.3f} x the covalent radii, inside the new core ({outer})")
        forcefield = build_forcefield(config, payload["state_dict"])
        changes = ", ".join(f"{k}: {payload['config'].get(k)} -> {v}" for k, v in core.items())
        print(f"short range {changes}; closest training pair {ratio:.3f} x the covalent radii")
    keep = {k: v for k, v in meta.items() if k in ("aliases", "default_fidelity", "training_data", "test_errors",
                                                   "domain")}
    tmp = Path(tempfile.mkdtemp()) / "model.pt"
    export_model(forcefield, tmp, keep, dtype=torch.float64)
    recipe = read_recipe(Path(args.recipe).resolve())
    splits = load_datasets(recipe, Path(args.recipe).resolve().parent)
    old = MFCalculator(str(run / "model.pt"), dtype="float64")
    new = MFCalculator(str(tmp), dtype="float64")
    worst = 0.0
    for s in splits["test"][:: max(1, len(splits["test"]) // 20)]:
        atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        for fidelity in meta["fidelities"]:
            old.fidelity = new.fidelity = fidelity
            a, b = atoms.copy(), atoms.copy()
            a.calc, b.calc = old, new
            worst = max(worst, abs(a.get_potential_energy() - b.get_potential_energy()),
                        float(np.abs(a.get_forces() - b.get_forces()).max()))
    print(f"re-exported file vs run's file on {len(splits['test'][:: max(1, len(splits['test']) // 20)])} test "
          f"structures x {len(meta['fidelities'])} fidelities: largest difference {worst:.2e} (eV, eV/Å)")
    if worst > 1e-8:
        raise SystemExit("the re-exported file differs from the run's file: nothing written")
    if not args.write:
        return
    out = ROOT / "models" / args.name
    out.mkdir(exist_ok=True)
    shutil.copy(tmp, out / "model.pt")
    if args.model_only:
        print(f"wrote {out}/model.pt (re-exported)")
        return
    for name in KEEP:
        if (run / name).exists():
            shutil.copy(run / name, out / name)
    if core:  # the checkpoint carries the config the model file was made with
        extra = {k: v for k, v in payload.items() if k not in ("mfcalc_version", "config", "state_dict")}
        save_checkpoint(out / "checkpoint.pt", forcefield.double(), **extra)
    card = json.loads((run / "card.json").read_text())
    (out / "README.md").write_text(card_markdown(args.name, recipe, card))
    print(f"wrote {out}: model.pt (re-exported), {', '.join(KEEP)}, README.md")


if __name__ == "__main__":
    main()
