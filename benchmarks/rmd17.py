"""The field's low-data protocol on revised MD17: train from scratch on N frames of the train
split, test on the full test split; energy and forces MAE per molecule, next to the published
MACE and NequIP numbers (Batatia et al. 2022, Table 2 / low-data table).

    python benchmarks/rmd17.py --molecules benzene ethanol --n 50 [--n 1000] [--model-size small|accurate|manybody]
        [--epochs auto] [--results benchmarks/results/rmd17] [--tag NAME] [--save-models DIR]
    python benchmarks/rmd17.py --molecules benzene --n 50 --committee DIR/a.pt DIR/b.pt --tag NAME

Data: ../shared/data/rmd17/rmd17_<molecule>_{train,test}_01.npz (PBE/def2-SVP labels, kcal/mol ->
eV in mfcalc.data.read_rmd17_npz). Ethanol is not in that folder: the shared data hold only its
1000-frame train split (../shared/data/ethanol/ethanol_rmd17_pbe_def2svp-train1000.xyz), so for
ethanol the N training frames are drawn from it and the test set is *the other* frames of that
split (950 for N = 50; N = 1000 is not possible and is refused).

Protocol, the same for every row: the first N frames of a fixed permutation (seed 0) of the train
split; no validation set beyond those N frames (the last EMA weights are kept, nothing is selected
on test or extra data); float64 training; the optimiser budget is a number of epochs over the N
frames (``--epochs auto``: as many as fit in ``--minutes``, at least 200). Each result row is
appended to <results>/rmd17.json keyed by (molecule, N, tag), and the table and plot are rewritten
from everything there.
"""

import argparse
import json
import platform
import sys
import time
from typing import Optional
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

from mfcalc.data import read_extxyz, read_rmd17_npz
from mfcalc.model import SIZES, default_config
from mfcalc.modelfile import build_forcefield
from mfcalc.training import TrainSettings, evaluate, to_graphs, train

FIDELITY = "PBE/def2-SVP"
MOLECULES = ("benzene", "ethanol", "naphthalene", "salicylic", "toluene", "uracil")
# MAE energy meV / forces meV/Å (Batatia et al. 2022)
PUBLISHED = {
    "benzene": {1000: {"MACE": (0.4, 0.3), "NequIP": (0.04, 0.3)}, 50: {"MACE": (0.7, 2.7), "NequIP": (0.6, 2.9)}},
    "ethanol": {1000: {"MACE": (0.4, 2.1), "NequIP": (0.4, 2.8)}, 50: {"MACE": (6.7, 32.6), "NequIP": (8.7, 40.2)}},
    "naphthalene": {1000: {"MACE": (0.5, 1.6), "NequIP": (0.9, 1.3)}, 50: {"MACE": (2.1, 9.2), "NequIP": (2.1, 10.0)}},
    "salicylic": {1000: {"MACE": (0.9, 3.1), "NequIP": (0.7, 4.0)}, 50: {"MACE": (6.5, 28.4), "NequIP": (8.0, 35.0)}},
    "toluene": {1000: {"MACE": (0.5, 1.5), "NequIP": (0.3, 1.6)}, 50: {"MACE": (3.1, 12.1), "NequIP": (3.3, 15.1)}},
    "uracil": {1000: {"MACE": (0.5, 2.1), "NequIP": (0.4, 3.1)}, 50: {"MACE": (4.4, 25.9), "NequIP": (7.3, 40.1)}},
}


def load(molecule: str, n: int, seed: int = 0):
    """(train, test) Structure lists for the protocol above."""
    if molecule == "ethanol":
        frames = read_extxyz(SHARED / "ethanol" / "ethanol_rmd17_pbe_def2svp-train1000.xyz", fidelity=FIDELITY)
        if n >= len(frames):
            raise SystemExit("ethanol: the shared data hold only the 1000-frame train split; N must be < 1000")
        order = np.random.default_rng(seed).permutation(len(frames))
        return [frames[i] for i in order[:n]], [frames[i] for i in order[n:]]
    train_split = read_rmd17_npz(SHARED / "rmd17" / f"rmd17_{molecule}_train_01.npz", FIDELITY)
    test_split = read_rmd17_npz(SHARED / "rmd17" / f"rmd17_{molecule}_test_01.npz", FIDELITY)
    order = np.random.default_rng(seed).permutation(len(train_split))
    return [train_split[i] for i in order[:n]], test_split


def epochs_for(n: int, batch_size: int, minutes: float, seconds_per_step: float) -> int:
    steps = max(1, n // batch_size)
    return max(200, int(minutes * 60 / (seconds_per_step * steps)))


def run(molecule: str, n: int, size: str, epochs: str, minutes: float, lr: float, batch_size: int,
        energy_weight: float, log, options: dict = None, final_energy_weight: Optional[float] = None,
        weight_decay: float = 1e-6, seed: int = 0) -> dict:
    train_set, test_set = load(molecule, n)
    elements = sorted({int(z) for s in train_set for z in s.numbers})
    config = default_config(elements, [FIDELITY], size=size, **(options or {}))
    torch.manual_seed(seed)  # the initial weights (the N frames do not depend on it)
    forcefield = build_forcefield(config).double()
    steps = max(1, n // batch_size)
    if epochs == "auto":  # time one step first
        probe = TrainSettings(epochs=1, steps_per_epoch=3, batch_size=batch_size, dtype="float64")
        start = time.perf_counter()
        train(build_forcefield(config).double(), train_set, [], probe, log=lambda *_: None)
        n_epochs = epochs_for(n, batch_size, minutes, (time.perf_counter() - start) / 3)
    else:
        n_epochs = int(epochs)
    settings = TrainSettings(
        epochs=n_epochs, steps_per_epoch=steps, batch_size=batch_size, lr=lr, lr_min_factor=0.01,
        energy_weight=energy_weight, forces_weight=1.0, ema_decay=0.99, dtype="float64", patience=10**9,
        sampling_temperature=1.0, final_energy_weight=final_energy_weight, weight_decay=weight_decay, seed=seed,
    )
    start = time.perf_counter()
    summary = train(forcefield, train_set, [], settings, log=log)
    train_minutes = (time.perf_counter() - start) / 60
    graphs = to_graphs(test_set, [FIDELITY], forcefield.cutoff)
    errors = evaluate(forcefield, graphs, [FIDELITY])[FIDELITY]
    # the same errors on the N training frames: far below the test error is over-fitting, close
    # to it is a network (or an optimisation) that cannot fit even what it saw
    fit = evaluate(forcefield, to_graphs(train_set, [FIDELITY], forcefield.cutoff), [FIDELITY])[FIDELITY]
    return {
        "molecule": molecule, "n_train": n, "n_test": len(test_set), "size": size, "epochs": n_epochs,
        "train_energy_mae_meV": 1000 * fit["energy_mae"], "train_forces_mae_meV_A": 1000 * fit["forces_mae"],
        "steps": n_epochs * steps, "batch_size": batch_size, "lr": lr, "energy_weight": energy_weight,
        "final_energy_weight": final_energy_weight, "weight_decay": weight_decay, "seed": seed, "train_minutes": round(train_minutes, 2), "energy_mae_meV": 1000 * errors["energy_mae"],
        "forces_mae_meV_A": 1000 * errors["forces_mae"],
        "parameters": sum(p.numel() for p in forcefield.parameters()),
        "config": {k: v for k, v in config.items() if k not in ("elements", "fidelities")},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "best_epoch": summary["best_epoch"],
    }, forcefield


def run_finetune(molecule: str, n: int, base: str, strategy: str, new_fidelity: bool, log,
                 overrides: Optional[dict] = None) -> dict:
    """Fine-tune ``base`` on the same N frames with mfcalc's default protocol (validation split
    and early stopping inside the N frames) and test on the same test set."""
    from mfcalc.finetune import finetune

    train_set, test_set = load(molecule, n)
    fidelity = f"{FIDELITY} (rMD17 {molecule})" if new_fidelity else FIDELITY
    if new_fidelity:
        train_set = [replace(s, fidelity=fidelity) for s in train_set]
        test_set = [replace(s, fidelity=fidelity) for s in test_set]
    start = time.perf_counter()
    result = finetune(base, train_set, fidelity, new_fidelity=new_fidelity, strategy=strategy, log=log,
                      setting_overrides=overrides)
    train_minutes = (time.perf_counter() - start) / 60
    forcefield = result.forcefield.double()
    graphs = to_graphs(test_set, forcefield.fidelities, forcefield.cutoff)
    errors = evaluate(forcefield, graphs, forcefield.fidelities)[fidelity]
    settings = result.report["settings"]
    return {
        "molecule": molecule, "n_train": n, "n_test": len(test_set), "size": f"finetune {base} ({strategy})",
        "epochs": result.report["epochs_run"], "steps": result.report["epochs_run"] * settings["steps_per_epoch"],
        "batch_size": settings["batch_size"], "lr": settings["lr"], "energy_weight": settings["energy_weight"],
        "train_minutes": round(train_minutes, 2), "energy_mae_meV": 1000 * errors["energy_mae"],
        "forces_mae_meV_A": 1000 * errors["forces_mae"],
        "parameters": sum(p.numel() for p in forcefield.parameters()), "base": base, "strategy": strategy,
        "new_fidelity": new_fidelity, "best_epoch": result.report["best_epoch"],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }, forcefield


def run_committee(molecule: str, n: int, members: list) -> dict:
    """The mean of already trained models (``--save-models`` files of earlier rows) on the same
    test set: mfcalc.MFCommittee, float64."""
    from common import frame_errors, predict_frames

    from mfcalc import MFCommittee
    from mfcalc.modelfile import read_metadata

    _, test_set = load(molecule, n)
    committee = MFCommittee(members, fidelity=FIDELITY, dtype="float64", threads=1, compile=False)
    energies, forces, _ = predict_frames(committee, test_set)
    errors = frame_errors(energies, forces, test_set)
    meta = [read_metadata(m) for m in members]
    return {
        "molecule": molecule, "n_train": n, "n_test": len(test_set), "size": f"committee of {len(members)}",
        "epochs": sum(int(m.get("epochs", 0)) for m in meta), "steps": 0, "batch_size": 0, "lr": 0.0,
        "energy_weight": 0.0, "train_minutes": round(sum(float(m.get("train_minutes", 0)) for m in meta), 2),
        "energy_mae_meV": errors["energy_mae_meV"], "forces_mae_meV_A": errors["forces_mae_meV_A"],
        "parameters": 0, "members": [Path(m).name for m in members],
        "member_tags": [m.get("rmd17_tag") for m in meta], "best_epoch": -1,
        "machine": f"{platform.processor() or platform.machine()}, 1 threads", "torch": torch.__version__,
    }


def write_table(rows: list, out: Path) -> None:
    lines = ["# rMD17 from scratch (`python benchmarks/rmd17.py`)", "",
             "MAE energy meV / forces meV/Å on the test split (ethanol: the other frames of its train split, "
             "see the script). MACE and NequIP as published (Batatia et al. 2022). Ratio = mfcalc forces / "
             "MACE forces.", "",
             "| molecule | N | mfcalc (tag) | E / F | MACE | NequIP | F ratio to MACE | F on its N training frames "
             "| train min | epochs | params |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (MOLECULES.index(r["molecule"]), r["n_train"], r["tag"])):
        pub = PUBLISHED[r["molecule"]][r["n_train"]] if r["n_train"] in PUBLISHED[r["molecule"]] else {}
        mace = pub.get("MACE")
        nequip = pub.get("NequIP")
        ratio = f"{r['forces_mae_meV_A'] / mace[1]:.2f}" if mace else "-"
        fit = f"{r['train_forces_mae_meV_A']:.1f}" if "train_forces_mae_meV_A" in r else "-"
        lines.append(
            f"| {r['molecule']} | {r['n_train']} | {r['tag']} | {r['energy_mae_meV']:.2f} / {r['forces_mae_meV_A']:.1f} "
            f"| {f'{mace[0]} / {mace[1]}' if mace else '-'} | {f'{nequip[0]} / {nequip[1]}' if nequip else '-'} | {ratio} "
            f"| {fit} | {r['train_minutes']:.1f} | {r['epochs']} | {r['parameters']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, n in zip(axes, (50, 1000)):
        sel = [r for r in rows if r["n_train"] == n]
        mols = [m for m in MOLECULES if any(r["molecule"] == m for r in sel)]
        tags = sorted({r["tag"] for r in sel})
        width = 0.8 / (len(tags) + 2)
        x = np.arange(len(mols))
        for k, peer in enumerate(("MACE", "NequIP")):
            ax.bar(x + k * width, [PUBLISHED[m][n][peer][1] for m in mols], width, label=peer)
        for k, tag in enumerate(tags, 2):
            values = [next((r["forces_mae_meV_A"] for r in sel if r["molecule"] == m and r["tag"] == tag), np.nan)
                      for m in mols]
            ax.bar(x + k * width, values, width, label=f"mfcalc {tag}")
        ax.set_xticks(x + 0.4 - width / 2, mols, rotation=20)
        ax.set_ylabel("forces MAE (meV/Å)")
        ax.set_title(f"rMD17, N = {n}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", nargs="+", default=list(MOLECULES), choices=MOLECULES)
    parser.add_argument("--n", type=int, nargs="+", default=[50])
    parser.add_argument("--model-size", default="small", choices=sorted(SIZES),
                        help="a named network size of mfcalc.model.SIZES (rows before 2026-12-07 say 'default': small)")
    parser.add_argument("--model-options", default="{}", help='JSON overrides of the size, e.g. \'{"max_l": 2}\'')
    parser.add_argument("--epochs", default="auto", help="'auto' (fill --minutes) or a number")
    parser.add_argument("--minutes", type=float, default=4.0, help="training budget per row with --epochs auto")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--energy-weight", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights and batch order (the N training frames stay the same)")
    parser.add_argument("--weight-decay", type=float, default=1e-6, help="AdamW's decoupled weight decay")
    parser.add_argument("--final-energy-weight", type=float, default=None,
                        help="energy weight of the last 20%% of the epochs (MACE's SWA stage; default: no stage)")
    parser.add_argument("--tag", default=None, help="row label (default: the model size)")
    parser.add_argument("--base", help="fine-tune this model instead of training from scratch "
                                       "(mfcalc's default fine-tuning protocol, no flags)")
    parser.add_argument("--strategy", default="full", choices=["embedding", "readout", "full"])
    parser.add_argument("--new-fidelity", action="store_true",
                        help="fit the data as a new fidelity instead of the base's PBE/def2-SVP")
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help="with --base: this learning rate instead of the protocol's (lr_factor of the start error)")
    parser.add_argument("--save-models", metavar="DIR",
                        help="export each row's model to DIR/<molecule>-n<N>-<tag>.pt (for --committee)")
    parser.add_argument("--committee", nargs="+", metavar="MODEL",
                        help="no training: the row is the committee (mean) of these --save-models files")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "rmd17"))
    args = parser.parse_args()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "rmd17.json"
    rows = json.loads(store.read_text()) if store.exists() else []
    tag = args.tag or (f"ft-{Path(args.base).stem}-{args.strategy}" if args.base else args.model_size)
    for molecule in args.molecules:
        for n in args.n:
            forcefield = None
            if args.committee:
                row = run_committee(molecule, n, args.committee)
            elif args.base:
                row, forcefield = run_finetune(molecule, n, args.base, args.strategy, args.new_fidelity,
                                               log=lambda *_: None, overrides={"lr": args.finetune_lr})
            else:
                row, forcefield = run(molecule, n, args.model_size, args.epochs, args.minutes, args.lr,
                                      args.batch_size, args.energy_weight, log=lambda *_: None,
                                      options=json.loads(args.model_options),
                                      final_energy_weight=args.final_energy_weight,
                                      weight_decay=args.weight_decay, seed=args.seed)
            row["tag"] = tag
            if args.save_models and forcefield is not None:
                from mfcalc.modelfile import export_model

                path = Path(args.save_models) / f"{molecule}-n{n}-{tag}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                export_model(forcefield.eval(), path, dtype=torch.float64, metadata={
                    "default_fidelity": FIDELITY, "rmd17_tag": tag, "epochs": row["epochs"],
                    "train_minutes": row["train_minutes"],
                    "training_data": [{"fidelity": FIDELITY, "source": f"rMD17 {molecule}, {n} frames "
                                       "(benchmarks/rmd17.py protocol)"}]})
                row["saved_model"] = str(path)
            row["command"] = "python benchmarks/rmd17.py " + " ".join(sys.argv[1:])
            print(f"{molecule} N={n} {tag}: E {row['energy_mae_meV']:.2f} meV, F {row['forces_mae_meV_A']:.1f} meV/Å "
                  f"({row['train_minutes']:.1f} min, {row['epochs']} epochs"
                  + (f"; on its training frames F {row['train_forces_mae_meV_A']:.1f}" if "train_forces_mae_meV_A" in row else "")
                  + ")", flush=True)
            rows = json.loads(store.read_text()) if store.exists() else []  # another run may have written
            rows = [r for r in rows if (r["molecule"], r["n_train"], r["tag"]) != (molecule, n, tag)] + [row]
            store.write_text(json.dumps(rows, indent=1))
    write_table(rows, out / "rmd17")


if __name__ == "__main__":
    main()
