"""A committee against its members on a recipe's held-out test frames: forces and energy errors of
each member and of their mean (mfcalc.MFCommittee), and how the members' disagreement tracks the
committee's actual error.

    python benchmarks/committee.py [--committee ethanol-mf] [--recipe recipes/ethanol-mf.yaml]
        [--fidelity "CCSD(T)/cc-pVTZ"] [--out committee_ethanol-mf]

Test frames: every test split of the recipe (``load_datasets``, the same split as the card's) at
the chosen fidelity. Forces MAE and RMSE in meV/Å over all components, energy MAE in meV (no
offset removed). Writes benchmarks/results/<out>.md and .json.
"""

import argparse
from pathlib import Path

import numpy as np

from common import frame_errors, predict_frames, write_results

from mfcalc import MFCalculator, MFCommittee
from mfcalc.committee import committee_members
from mfcalc.recipe import load_datasets, read_recipe

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--committee", default="ethanol-mf")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "ethanol-mf.yaml"))
    parser.add_argument("--fidelity", default="CCSD(T)/cc-pVTZ")
    parser.add_argument("--out", default="committee_ethanol-mf")
    args = parser.parse_args()
    recipe_path = Path(args.recipe).resolve()
    splits = load_datasets(read_recipe(recipe_path), recipe_path.parent, by_dataset=True)
    frames = [s for key, part in splits.items() if key.startswith("test:") for s in part
              if s.fidelity == args.fidelity and s.forces is not None]
    if not frames:
        raise SystemExit(f"{args.recipe} has no test frames with forces at {args.fidelity!r}")
    options = {"fidelity": args.fidelity, "dtype": "float64", "threads": 1}
    rows = {}
    for path in committee_members(args.committee):
        energies, forces, _ = predict_frames(MFCalculator(path, **options), frames)
        rows[path.name] = frame_errors(energies, forces, frames)
    energies, forces, deviation = predict_frames(MFCommittee(args.committee, **options), frames)
    rows["committee (mean)"] = frame_errors(energies, forces, frames)
    # does the spread flag the worst frames? committee error per frame vs its max force deviation
    frame_error = np.array([np.abs(f - s.forces).max() for f, s in zip(forces, frames)])
    correlation = float(np.corrcoef(deviation, frame_error)[0, 1])
    data = {"committee": args.committee, "recipe": recipe_path.name, "fidelity": args.fidelity,
            "n_frames": len(frames), "rows": rows,
            "max_force_deviation_mean_meV_A": 1000 * float(deviation.mean()),
            "pearson_deviation_vs_max_force_error": correlation}
    lines = [f"# Committee `{args.committee}` vs its members (`python benchmarks/committee.py --committee "
             f"{args.committee} --recipe {Path(args.recipe).name}`)", "",
             f"{len(frames)} held-out test frames of `{recipe_path.name}` at {args.fidelity}; float64, one thread.", "",
             "| model | forces MAE (meV/Å) | forces RMSE (meV/Å) | energy MAE (meV) |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['forces_mae_meV_A']:.2f} | {r['forces_rmse_meV_A']:.2f} | {r['energy_mae_meV']:.2f} |")
    lines += ["", f"Members' disagreement: mean max force deviation {data['max_force_deviation_mean_meV_A']:.1f} meV/Å "
              f"per frame; Pearson correlation with the committee's largest force-component error of the frame: "
              f"{correlation:.2f}.", ""]
    write_results(args.out, "\n".join(lines), data)


if __name__ == "__main__":
    main()
