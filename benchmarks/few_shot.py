"""Few-shot fine-tuning to molecules a base model never saw: test error after fine-tuning on a
handful of points, for several bases and strategies.

  3BPA (wB97X/6-31G(d), 27 atoms, brings nitrogen): fine-tune on 10 / 25 / 50 points, test on a
      fixed 200 of the other configurations;
  aspirin (CCSD/cc-pVDZ, 15 points): 5-fold cross-validation (12 train, 3 test per fold).

Bases: "scratch" (random weights, the shipped architecture), "joint" (models/ethanol-mf, trained
on three levels of theory at once) and, when given with --reptile, a Reptile-pretrained base.
Strategies embedding / readout / full for the joint base, full for the others. Results are
appended to benchmarks/results/few_shot.json as they finish (re-runs skip finished runs).

    python benchmarks/few_shot.py [--reptile models/ethanol-mf-reptile] [--quick]

Reptile against joint pretraining at the same budget (both bases trained here from the ethanol-mf
recipe with the same number of gradient steps; see benchmarks/results/few_shot_reptile/README.md):

    python benchmarks/few_shot.py --joint JOINT.pt --reptile REPTILE.pt --joint-strategies full \
        --no-drift --results benchmarks/results/few_shot_reptile
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

from mfcalc.data import read_extxyz, split_indices
from mfcalc.finetune import finetune
from mfcalc.model import default_config
from mfcalc.modelfile import build_forcefield, export_model, read_metadata
from mfcalc.training import TrainSettings, evaluate, to_graphs

RESULTS = ROOT / "benchmarks" / "results"


def tasks(quick: bool):
    bpa = read_extxyz(ROOT / "data" / "3bpa" / "train_300K.xyz", "wB97X/6-31G(d)")
    pool, test = split_indices(len(bpa), [300, 200], seed=0)
    for n in ([10] if quick else [10, 25, 50]):
        yield "3BPA", n, 0, [bpa[i] for i in pool[:n]], [bpa[i] for i in test[: 20 if quick else 200]]
    # a fidelity of its own: chno-mf has a "CCSD/cc-pVDZ" from Transition1x, but these energies sit
    # 12 eV below what that fidelity predicts for aspirin (frozen core or program: same name, other
    # reference), so the few points are fitted as a new level of theory, as for every base
    asp = read_extxyz(ROOT / "data" / "aspirin_ccsd-15.xyz", "CCSD/cc-pVDZ (sGDML)", energy_unit="kcal/mol")
    order = np.random.default_rng(0).permutation(len(asp))
    for fold in range(1 if quick else 5):
        test_idx = order[fold::5]
        train_idx = np.setdiff1d(order, test_idx)
        yield "aspirin", len(train_idx), fold, [asp[i] for i in train_idx], [asp[i] for i in test_idx]


def scratch_base(path: Path, like: str) -> Path:
    """Random weights, the architecture of the base ``like``."""
    meta = read_metadata(like)
    config = default_config(meta["elements"], meta["fidelities"], **{
        k: v for k, v in meta["config"].items() if k not in ("elements", "fidelities")})
    torch.manual_seed(0)
    export_model(build_forcefield(config), path, {"default_fidelity": meta["fidelities"][-1]})
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reptile", help="path of a Reptile-pretrained base model")
    parser.add_argument("--joint", default="ethanol-mf", help="the jointly trained base (default: ethanol-mf)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--note", default="", help="a line written under the table's title (which bases, which commit)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the tables (--quick: a temporary one)")
    parser.add_argument("--joint-strategies", nargs="+", default=["embedding", "readout", "full"],
                        choices=["embedding", "readout", "full"], help="strategies run on the joint base")
    parser.add_argument("--no-drift", action="store_true", help="skip the forgetting (drift) table")
    parser.add_argument("--save", metavar="DIR", help="also write each fine-tuned model to DIR/<molecule>-<n>-<fold>-"
                        "<base>-<strategy>.pt (for benchmarks/smoothness.py)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    results_dir = tmp if args.quick else Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    bases = {"scratch": scratch_base(tmp / "scratch.pt", args.joint), "joint": args.joint}
    if args.reptile:
        bases["reptile"] = args.reptile
    runs = [("joint", s) for s in args.joint_strategies] + [(b, "full") for b in bases if b != "joint"]
    settings = TrainSettings(epochs=4 if args.quick else 40, steps_per_epoch=5 if args.quick else 25, batch_size=8,
                             lr=5e-4, weight_decay=0.0, ema_decay=0.95, patience=10, energy_weight=100.0)
    out_path = results_dir / "few_shot.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else []
    done = {(r["molecule"], r["n"], r["fold"], r["base"], r["strategy"]) for r in results}
    for molecule, n, fold, train_set, test_set in tasks(args.quick):
        fidelity = train_set[0].fidelity
        for base, strategy in runs:
            if (molecule, n, fold, base, strategy) in done:
                continue
            result = finetune(bases[base], train_set, fidelity, new_fidelity=True, strategy=strategy,
                              settings=settings, val_fraction=0.2, log=lambda *a: None)
            ff = result.forcefield
            if args.save:
                Path(args.save).mkdir(parents=True, exist_ok=True)
                export_model(ff, Path(args.save) / f"{molecule}-{n}-{fold}-{base}-{strategy}.pt", result.metadata)
            errors = evaluate(ff, to_graphs(test_set, ff.fidelities, ff.cutoff), ff.fidelities)[fidelity]
            row = {"molecule": molecule, "n": n, "fold": fold, "base": base, "strategy": strategy,
                   "forces_mae": errors["forces_mae"], "energy_mae": errors["energy_mae"], "test": len(test_set)}
            results.append(row)
            out_path.write_text(json.dumps(results, indent=1))
            print(f"{molecule:8s} n={n:3d} fold={fold} {base:8s} {strategy:9s} F MAE {1000 * row['forces_mae']:6.1f} "
                  f"meV/Å  E MAE {1000 * row['energy_mae']:7.1f} meV", flush=True)
    report(results, results_dir, args.note)
    if not args.no_drift:
        drift(settings, args.quick, results_dir, args.joint)


def drift(settings: TrainSettings, quick: bool, results_dir: Path, base: str):
    """Forgetting, measured: errors of ethanol-mf's own fidelities on their validation split
    before and after fine-tuning to 3BPA (25 points), for the strategies, with and without
    replaying 500 of the base model's training structures (30 % of each batch)."""
    from mfcalc.recipe import load_datasets, read_recipe

    out_path = results_dir / "few_shot_drift.json"
    if out_path.exists():
        rows = json.loads(out_path.read_text())
    else:
        recipe_path = ROOT / "recipes" / "ethanol-mf.yaml"
        splits = load_datasets(read_recipe(recipe_path), recipe_path.parent)
        rng = np.random.default_rng(0)
        replay = [splits["train"][i] for i in rng.permutation(len(splits["train"]))[:500]]
        replay_val = splits["val"][:: 4 if quick else 1]
        bpa = read_extxyz(ROOT / "data" / "3bpa" / "train_300K.xyz", "wB97X/6-31G(d)")
        pool, test = split_indices(len(bpa), [300, 200], seed=0)
        train_set = [bpa[i] for i in pool[: 10 if quick else 25]]
        rows = []
        for strategy, use_replay in [("embedding", False), ("readout", False), ("full", False), ("full", True)]:
            result = finetune(base, train_set, "wB97X/6-31G(d)", new_fidelity=True, strategy=strategy,
                              replay=replay if use_replay else None, replay_val=replay_val,
                              settings=settings, val_fraction=0.2, log=lambda *a: None)
            ff = result.forcefield
            new = evaluate(ff, to_graphs([bpa[i] for i in test[: 20 if quick else 200]], ff.fidelities, ff.cutoff),
                           ff.fidelities)["wB97X/6-31G(d)"]
            rows.append({"strategy": strategy, "replay": use_replay, "drift": result.report["drift"],
                         "new_forces_mae": new["forces_mae"], "new_energy_mae": new["energy_mae"]})
            print(f"drift {strategy} replay={use_replay}: {json.dumps(result.report['drift'])}", flush=True)
        out_path.write_text(json.dumps(rows, indent=1))
    fids = list(rows[0]["drift"])
    lines = ["# Drift of the old fidelities after fine-tuning ethanol-mf to 3BPA (25 points)", "",
             "Forces MAE (meV/Å) on each old fidelity's ethanol validation split, before -> after; "
             "last column: the new fidelity's test error on 200 held-out 3BPA structures.", "",
             "| strategy | replay | " + " | ".join(fids) + " | 3BPA F MAE |",
             "|---|---|" + "---|" * len(fids) + "---|"]
    for r in rows:
        cells = [f"{1000 * r['drift'][f]['forces_mae_before']:.1f} -> {1000 * r['drift'][f]['forces_mae_after']:.1f}"
                 for f in fids]
        lines.append(f"| {r['strategy']} | {'yes' if r['replay'] else 'no'} | " + " | ".join(cells)
                     + f" | {1000 * r['new_forces_mae']:.1f} |")
    (results_dir / "few_shot_drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def report(results, results_dir: Path, note: str = ""):
    lines = ["# Few-shot fine-tuning: test errors (forces MAE meV/Å / energy MAE meV)", ""] + ([note, ""] if note else []) + [
             "| molecule | N | base | strategy | forces MAE | energy MAE |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["molecule"], r["n"], r["base"], r["strategy"]) for r in results})
    for molecule, n, base, strategy in keys:
        rows = [r for r in results if (r["molecule"], r["n"], r["base"], r["strategy"]) == (molecule, n, base, strategy)]
        f = 1000 * np.array([r["forces_mae"] for r in rows])
        e = 1000 * np.array([r["energy_mae"] for r in rows])
        lines.append(f"| {molecule} | {n} | {base} | {strategy} | {f.mean():.1f} | {e.mean():.1f} |")
    (results_dir / "few_shot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, results_dir / "few_shot.png")


def plot(results, path: Path):
    """3BPA forces MAE vs number of points per base/strategy; aspirin 12-point CV as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    runs = sorted({(r["base"], r["strategy"]) for r in results})
    for base, strategy in runs:
        rows = sorted((r["n"], 1000 * r["forces_mae"]) for r in results
                      if r["molecule"] == "3BPA" and (r["base"], r["strategy"]) == (base, strategy))
        if rows:
            left.plot(*zip(*rows), "o-", label=f"{base} / {strategy}")
    left.set(xscale="log", yscale="log", xlabel="fine-tuning points", ylabel="forces MAE (meV/Å)",
             title="3BPA, wB97X/6-31G(d), 200 test structures")
    left.legend(fontsize=8)
    labels, values = [], []
    for base, strategy in runs:
        f = [1000 * r["forces_mae"] for r in results if r["molecule"] == "aspirin" and (r["base"], r["strategy"]) == (base, strategy)]
        if f:
            labels.append(f"{base}\n{strategy}")
            values.append(np.mean(f))
    right.bar(range(len(values)), values)
    right.set_xticks(range(len(values)), labels, fontsize=8)
    right.set(ylabel="forces MAE (meV/Å)", title="aspirin CCSD, 5-fold CV (12 train / 3 test)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
