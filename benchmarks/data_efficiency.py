"""Data efficiency at the highest fidelity: CCSD(T) test error of ethanol versus the number of
CCSD(T) training configurations, for

  (a) scratch   - CCSD(T) alone, from random weights;
  (b) joint     - one multi-fidelity model trained on the DFT sets (PBE+TS 1800, PBE/def2-SVP 850)
                  and the N CCSD(T) points at once (trainable fidelity embedding);
  (c) pretrain  - the same network pretrained on the DFT sets only, then fine-tuned on the N
                  CCSD(T) points (reference energies refitted, all weights trained).

The CCSD(T) test set is the fixed 100-configuration split of the shipped model's recipe; the N
training points are nested subsets of its 180 training points, validation is its 20.
Every run has the same model size and a fixed number of optimiser steps. Results are appended
to benchmarks/results/data_efficiency.json as they finish (a re-run skips finished runs), then
a markdown table and a PNG learning curve are written.

    python benchmarks/data_efficiency.py [--sizes 10 25 50 100 180] [--seeds 0 1] [--quick]
"""

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

from mfcalc.data import read_extxyz, read_gdml_npz, split_indices
from mfcalc.model import default_config
from mfcalc.modelfile import build_forcefield
from mfcalc.training import TrainSettings, evaluate, refit_reference, to_graphs, train

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "data" / "ethanol"
CC = "CCSD(T)/cc-pVTZ"
FIDELITIES = ["PBE+TS", "PBE/def2-SVP", CC]


def load():
    md17 = read_extxyz(DATA / "ethanol_md17_pbe_ts-2000.xyz", "PBE+TS", energy_unit="kcal/mol")
    rmd17 = read_extxyz(DATA / "ethanol_rmd17_pbe_def2svp-train1000.xyz", "PBE/def2-SVP")
    cc = read_gdml_npz(DATA / "ethanol_ccsd_t-300.npz", CC)
    # the same splits as recipes/ethanol-mf.yaml
    md17_train = [md17[i] for i in split_indices(len(md17), [1800, 100, 100], 0)[0]]
    rmd17_train = [rmd17[i] for i in split_indices(len(rmd17), [850, 50, 100], 0)[0]]
    cc_train, cc_val, cc_test = ([cc[i] for i in idx] for idx in split_indices(len(cc), [180, 20, 100], 0))
    return md17_train + rmd17_train, cc_train, cc_val, cc_test


def settings(steps: int, seed: int, lr: float = 1e-3) -> TrainSettings:
    epochs = 20
    return TrainSettings(
        epochs=epochs, steps_per_epoch=max(1, steps // epochs), batch_size=16, lr=lr,
        energy_weight=100.0, forces_weight=1.0, sampling_temperature=0.5, ema_decay=0.99, seed=seed,
    )


def new_model(seed: int, model_options):
    torch.manual_seed(seed)
    return build_forcefield(default_config([1, 6, 8], FIDELITIES, **model_options))


def test_errors(forcefield, cc_test):
    forcefield = copy.deepcopy(forcefield).double()
    return evaluate(forcefield, to_graphs(cc_test, FIDELITIES, forcefield.cutoff), FIDELITIES)[CC]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50, 100, 180])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps of a CCSD(T)-only run")
    parser.add_argument("--joint-steps", type=int, default=4000)
    parser.add_argument("--pretrain-steps", type=int, default=8000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS / "data_efficiency.json"))
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.seeds, args.steps, args.joint_steps, args.pretrain_steps = [10], [0], 40, 40, 40
    model_options = {"features": args.features, "layers": 3}
    torch.set_num_threads(args.threads)
    dft, cc_train, cc_val, cc_test = load()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out_path.read_text()) if out_path.exists() else []
    done = {(r["method"], r["n"], r["seed"]) for r in results}
    quiet = lambda *a: None  # noqa: E731

    def record(method, n, seed, forcefield, minutes):
        errors = test_errors(forcefield, cc_test)
        row = {"method": method, "n": n, "seed": seed, "minutes": round(minutes, 2),
               "forces_mae": errors["forces_mae"], "energy_mae": errors["energy_mae"],
               "steps": {"scratch": args.steps, "joint": args.joint_steps, "pretrain": args.steps}[method]}
        results.append(row)
        out_path.write_text(json.dumps(results, indent=1))
        print(f"{method:9s} n={n:4d} seed={seed}  F MAE {1000 * row['forces_mae']:6.1f} meV/Å  "
              f"E MAE {1000 * row['energy_mae']:6.2f} meV  ({minutes:.1f} min)", flush=True)

    for seed in args.seeds:
        base = None
        for n in args.sizes:
            subset = cc_train[:n]
            if ("scratch", n, seed) not in done:
                t = time.perf_counter()
                model = new_model(seed, model_options)
                train(model, subset, cc_val, settings(args.steps, seed), log=quiet)
                record("scratch", n, seed, model, (time.perf_counter() - t) / 60)
            if ("joint", n, seed) not in done:
                t = time.perf_counter()
                model = new_model(seed, model_options)
                train(model, dft + subset, cc_val, settings(args.joint_steps, seed), log=quiet)
                record("joint", n, seed, model, (time.perf_counter() - t) / 60)
            if ("pretrain", n, seed) not in done:
                t = time.perf_counter()
                if base is None:
                    base = new_model(seed, model_options)
                    train(base, dft, [], settings(args.pretrain_steps, seed), log=quiet)
                    print(f"pretrained on DFT in {(time.perf_counter() - t) / 60:.1f} min", flush=True)
                    t = time.perf_counter()
                model = copy.deepcopy(base).float()
                refit_reference(model, to_graphs(subset, FIDELITIES, model.cutoff), FIDELITIES.index(CC))
                train(model, subset, cc_val, settings(args.steps, seed, lr=5e-4), log=quiet, fit_references=False)
                record("pretrain", n, seed, model, (time.perf_counter() - t) / 60)
    write_report(results, args)


def write_report(results, args):
    methods = {"scratch": "CCSD(T) only, from scratch", "joint": "joint multi-fidelity (DFT + CCSD(T))",
               "pretrain": "DFT pretraining, then CCSD(T) fine-tuning"}
    sizes = sorted({r["n"] for r in results})
    lines = [
        "# Data efficiency: ethanol CCSD(T)/cc-pVTZ test error vs CCSD(T) training points",
        "",
        f"Fixed CCSD(T) test set: 100 configurations. PaiNN-MF, {args.features} features, 3 layers, "
        f"float32 training, CPU. Steps: scratch and fine-tuning {args.steps}, joint {args.joint_steps}, "
        f"DFT pretraining {args.pretrain_steps} (batch 16). Mean ± spread over seeds "
        f"{sorted({r['seed'] for r in results})}.",
        "",
        "Forces MAE (meV/Å) / energy MAE (meV):",
        "",
        "| method | " + " | ".join(f"N={n}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    curves = {}
    for method, label in methods.items():
        cells = []
        for n in sizes:
            rows = [r for r in results if r["method"] == method and r["n"] == n]
            if not rows:
                cells.append("-")
                continue
            f = 1000 * np.array([r["forces_mae"] for r in rows])
            e = 1000 * np.array([r["energy_mae"] for r in rows])
            curves.setdefault(method, []).append((n, f.mean(), f.std(), e.mean()))
            cells.append(f"{f.mean():.1f} ± {f.std():.1f} / {e.mean():.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    # data-efficiency factor: how many CCSD(T) points scratch needs to match the others
    if "scratch" in curves:
        ns, fs = np.array([c[0] for c in curves["scratch"]]), np.array([c[1] for c in curves["scratch"]])
        lines += ["", "CCSD(T) points that training from scratch would need for the same forces MAE "
                  "(log-log interpolation of the scratch curve; '>' = beyond the largest N measured):", ""]
        for method in ("joint", "pretrain"):
            for n, f, _, _ in curves.get(method, []):
                if f < fs.min():
                    lines.append(f"- {methods[method]}, N={n}: {f:.1f} meV/Å; scratch needs > {ns.max()} points")
                else:
                    need = float(np.exp(np.interp(np.log(f), np.log(fs[::-1]), np.log(ns[::-1]))))
                    lines.append(f"- {methods[method]}, N={n}: {f:.1f} meV/Å; scratch needs ≈ {need:.0f} points ({need / n:.1f}×)")
    (RESULTS / "data_efficiency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, points in curves.items():
        n, f, s, _ = map(np.array, zip(*points))
        ax.errorbar(n, f, yerr=s, marker="o", capsize=3, label=methods[method])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("CCSD(T) training configurations")
    ax.set_ylabel("CCSD(T) test force MAE (meV/Å)")
    ax.set_title("ethanol: data efficiency at CCSD(T)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "data_efficiency.png", dpi=130)


if __name__ == "__main__":
    main()
