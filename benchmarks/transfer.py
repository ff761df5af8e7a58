"""Transfer between levels of theory on identical geometries (data/cc_avtz: MP2,
CCSD(T) and CCSD(T)-F12 / aug-cc-pVTZ from Molpro, energies and forces).

    python benchmarks/transfer.py zero-shot [--held-out h2co] [--per-level 200] [--epochs 40]
    python benchmarks/transfer.py few-shot [--held-out h2co] [--points 10,25,50] [--scratch 50,250]
    python benchmarks/transfer.py disjoint [--per-level 200] [--epochs 40]

zero-shot: one multi-fidelity model is trained on MP2/aug-cc-pVTZ for all six molecules
(H2CO, HCOOH, CH3OH, CH3CHO, CH3COOH, CH3NO2) and on CCSD(T)/aug-cc-pVTZ for every molecule
that has it *except* the held-out one; the held-out molecule's CCSD(T) forces are then predicted
(it was seen only at MP2). The error is reported next to that molecule's own MP2-vs-CCSD(T) gap
on the same test geometries: the model must beat "just use MP2" by a wide margin (target: at
most a third of the gap). Test geometries are never trained on at any level.

few-shot: the same base (the held-out molecule's CCSD(T) never seen), then `mfcalc finetune`'s
defaults (mfcalc.finetune, no settings given) on N of the held-out molecule's CCSD(T) frames,
replaying the base's own training frames; next to it, the same network trained from scratch on
N CCSD(T) frames of that molecule alone (the same protocol, finetune_settings(N)). Targets: the
fine-tuned error at N = 50 below half of the MP2-vs-CCSD(T) gap, and the data efficiency of the
cheap levels: scratch needs 10x the CCSD(T) points for the fine-tuned error.

disjoint: two sets of different molecules, each at its own single level (H2CO and HCOOH at
CCSD(T)/aug-cc-pVTZ; CH3OH, CH3CHO, CH3COOH and CH3NO2 at MP2/aug-cc-pVTZ): one joint
multi-fidelity model on both against one model per set, at equal budget (the joint model takes
the sum of the two models' optimiser steps), each tested on its own set's held-out frames at its
own level. The ratio joint / separate says whether the sets help each other (< 1) or get in each
other's way (> 1).

Results are appended to benchmarks/results/transfer.json and the table rewritten in transfer.md.
"""

import argparse
import json
import platform
import hashlib
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CC_AVTZ = ROOT / "data" / "cc_avtz"  # copied from ../shared/data/cc_avtz (see its README)

from mfcalc.data import read_gdml_npz
from mfcalc.model import default_config
from mfcalc.modelfile import build_forcefield
from mfcalc.training import TrainSettings, evaluate, to_graphs, train

MP2, CC = "MP2/aug-cc-pVTZ", "CCSD(T)/aug-cc-pVTZ"
MOLECULES = ("h2co", "hcooh", "ch3oh", "ch3cho", "ch3cooh", "ch3no2")
HAS_CC = ("h2co", "hcooh")
RESULTS = ROOT / "benchmarks" / "results"


def level(molecule: str, fidelity: str):
    tag = {MP2: "mp2", CC: "ccsd_t"}[fidelity]
    path = CC_AVTZ / f"{molecule}_{tag}_avtz.npz"
    return read_gdml_npz(path, fidelity=fidelity, energy_unit="eV")  # already eV and eV/Å


def split(n_frames: int, n_train: int, n_test: int, seed: int):
    order = np.random.default_rng(seed).permutation(n_frames)
    return order[:n_train], order[n_train:n_train + n_test]


def base_data(held_out: str, per_level: int, n_test: int, seed: int = 0):
    """[training frames, test frames per molecule, the held-out molecule's unused training
    indices at CCSD(T)]: MP2 for every molecule, CCSD(T) for those that have it but the held-out."""
    train_set, tests, spare = [], {}, []
    for molecule in MOLECULES:
        mp2 = level(molecule, MP2)
        train_idx, test_idx = split(len(mp2), per_level, n_test, seed)
        train_set += [replace(mp2[i], group=molecule) for i in train_idx]
        if molecule in HAS_CC:
            cc = level(molecule, CC)
            if molecule != held_out:
                train_set += [replace(cc[i], group=molecule) for i in train_idx]
            else:  # frames of neither the base's training nor the test: the few-shot pool
                used = set(train_idx) | set(test_idx)
                spare = [replace(cc[i], group=molecule) for i in np.random.default_rng(seed + 1).permutation(len(cc))
                         if i not in used]
            tests[molecule] = {"mp2": [mp2[i] for i in test_idx], "cc": [cc[i] for i in test_idx]}
    return train_set, tests, spare


def new_network(structures, options: dict, seed: int):
    elements = sorted({int(z) for s in structures for z in s.numbers})
    torch.manual_seed(seed)
    return build_forcefield(default_config(elements, [MP2, CC], **options)).double()


def train_base(train_set, epochs: int, options: dict, seed: int = 0):
    """[the multi-fidelity base, training minutes]"""
    forcefield = new_network(train_set, options, seed)
    batch = 8
    settings = TrainSettings(epochs=epochs, steps_per_epoch=len(train_set) // batch, batch_size=batch, lr=2e-3,
                             lr_min_factor=0.01, energy_weight=1.0, ema_decay=0.99, dtype="float64",
                             patience=10**9, sampling_temperature=1.0, seed=seed)
    start = time.perf_counter()
    train(forcefield, train_set, [], settings, log=lambda *_: None)
    return forcefield, (time.perf_counter() - start) / 60


def cached_base(train_set, held_out: str, per_level: int, epochs: int, options: dict, seed: int):
    """[base, its training minutes, its checkpoint path]: the base is deterministic in its
    settings, so it is trained once and then read from runs/transfer-bases/ (not committed)."""
    from mfcalc.finetune import load_base
    from mfcalc.modelfile import save_checkpoint

    key = hashlib.sha256(json.dumps([held_out, per_level, epochs, options, seed], sort_keys=True).encode()).hexdigest()
    path = ROOT / "runs" / "transfer-bases" / f"{held_out}-{key[:12]}.pt"
    if path.exists():
        forcefield, _ = load_base(str(path))
        return forcefield, float(json.loads(path.with_suffix(".json").read_text())["minutes"]), path
    forcefield, minutes = train_base(train_set, epochs, options, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, forcefield)
    path.with_suffix(".json").write_text(json.dumps({"minutes": minutes}))
    return forcefield, minutes, path


def forces_gap(sets) -> float:
    """MP2 vs CCSD(T) forces MAE on the same geometries, eV/Å"""
    return float(np.mean([np.abs(a.forces - b.forces).mean() for a, b in zip(sets["mp2"], sets["cc"])]))


def cc_errors(forcefield, structures) -> dict:
    return evaluate(forcefield.double(), to_graphs(structures, forcefield.fidelities, forcefield.cutoff),
                    forcefield.fidelities)[CC]


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def zero_shot(held_out: str, per_level: int, n_test: int, epochs: int, options: dict, seed: int = 0) -> dict:
    train_set, tests, _ = base_data(held_out, per_level, n_test, seed)
    forcefield, minutes, _ = cached_base(train_set, held_out, per_level, epochs, options, seed)
    rows = {}
    for molecule, sets in tests.items():
        cc_err = cc_errors(forcefield, sets["cc"])
        mp2_err = evaluate(forcefield, to_graphs(sets["mp2"], [MP2, CC], forcefield.cutoff), [MP2, CC])[MP2]
        gap_e = np.std([a.energy - b.energy for a, b in zip(sets["mp2"], sets["cc"])])
        rows[molecule] = {
            "cc_in_training": molecule != held_out,
            "cc_forces_mae_meV_A": 1000 * cc_err["forces_mae"],
            "cc_energy_residual_std_meV": 1000 * cc_err["energy_residual_std"],
            "mp2_forces_mae_meV_A": 1000 * mp2_err["forces_mae"],
            "mp2_vs_cc_forces_gap_meV_A": 1000 * forces_gap(sets),
            "mp2_vs_cc_energy_gap_std_meV": 1000 * gap_e,
        }
    return {"experiment": "zero-shot", "held_out": held_out, "per_level": per_level, "n_test": n_test,
            "epochs": epochs, "train_minutes": round(minutes, 2), "options": options, "molecules": rows,
            "machine": machine(), "command": "python benchmarks/transfer.py " + " ".join(sys.argv[1:])}


def few_shot(held_out: str, per_level: int, n_test: int, epochs: int, options: dict, points, scratch,
             seed: int = 0) -> dict:
    from mfcalc.finetune import finetune, finetune_settings

    train_set, tests, spare = base_data(held_out, per_level, n_test, seed)
    test = tests[held_out]["cc"]
    forcefield, base_minutes, cached = cached_base(train_set, held_out, per_level, epochs, options, seed)
    zero = cc_errors(forcefield, test)
    rows = []
    for n in sorted(set(points) | set(scratch)):
        data = spare[:n]
        if n in points:
            start = time.perf_counter()
            result = finetune(str(cached), data, CC, replay=train_set, seed=seed, log=lambda *_: None)
            err = cc_errors(result.forcefield, test)
            rows.append({"n": n, "model": "fine-tuned", "forces_mae_meV_A": 1000 * err["forces_mae"],
                         "energy_mae_meV": 1000 * err["energy_mae"],
                         "energy_residual_std_meV": 1000 * err["energy_residual_std"],
                         "epochs_run": result.report["epochs_run"], "lr": result.report["settings"]["lr"],
                         "minutes": round((time.perf_counter() - start) / 60, 2)})
            print(rows[-1], flush=True)
        if n in scratch:
            fresh = new_network(data, options, seed)
            n_val = max(2, n // 5)
            settings = finetune_settings(n - n_val, seed=seed)
            start = time.perf_counter()
            summary = train(fresh, data[n_val:], data[:n_val], settings, log=lambda *_: None)
            err = cc_errors(fresh, test)
            rows.append({"n": n, "model": "scratch (CCSD(T) of this molecule only)",
                         "forces_mae_meV_A": 1000 * err["forces_mae"], "energy_mae_meV": 1000 * err["energy_mae"],
                         "energy_residual_std_meV": 1000 * err["energy_residual_std"],
                         "epochs_run": summary["epochs_run"], "lr": settings.lr,
                         "minutes": round((time.perf_counter() - start) / 60, 2)})
            print(rows[-1], flush=True)
    return {"experiment": "few-shot", "held_out": held_out, "per_level": per_level, "n_test": n_test,
            "epochs": epochs, "options": options, "base_minutes": round(base_minutes, 2),
            "zero_shot_forces_mae_meV_A": 1000 * zero["forces_mae"],
            "mp2_vs_cc_forces_gap_meV_A": 1000 * forces_gap(tests[held_out]), "rows": rows,
            "machine": machine(), "command": "python benchmarks/transfer.py " + " ".join(sys.argv[1:])}


DISJOINT = {CC: ("h2co", "hcooh"), MP2: ("ch3oh", "ch3cho", "ch3cooh", "ch3no2")}


def disjoint(per_level: int, n_test: int, epochs: int, options: dict, seed: int = 0) -> dict:
    sets, tests = {}, {}
    for fidelity, molecules in DISJOINT.items():
        sets[fidelity], tests[fidelity] = [], {}
        for molecule in molecules:
            frames = level(molecule, fidelity)
            train_idx, test_idx = split(len(frames), per_level, n_test, seed)
            sets[fidelity] += [replace(frames[i], group=molecule) for i in train_idx]
            tests[fidelity][molecule] = [frames[i] for i in test_idx]
    models, minutes = {}, {}
    for fidelity, train_set in sets.items():
        models[fidelity], minutes[fidelity] = train_base(train_set, epochs, options, seed)
    joint, minutes["joint"] = train_base(sets[CC] + sets[MP2], epochs, options, seed)
    rows = {}
    for fidelity, molecules in tests.items():
        for molecule, frames in molecules.items():
            graphs = lambda ff: to_graphs(frames, ff.fidelities, ff.cutoff)
            alone = evaluate(models[fidelity], graphs(models[fidelity]), models[fidelity].fidelities)[fidelity]
            both = evaluate(joint, graphs(joint), joint.fidelities)[fidelity]
            rows[molecule] = {"fidelity": fidelity,
                              "separate_forces_mae_meV_A": 1000 * alone["forces_mae"],
                              "joint_forces_mae_meV_A": 1000 * both["forces_mae"],
                              "separate_energy_mae_meV": 1000 * alone["energy_mae"],
                              "joint_energy_mae_meV": 1000 * both["energy_mae"]}
            print(molecule, rows[molecule], flush=True)
    return {"experiment": "disjoint", "held_out": "-", "per_level": per_level, "n_test": n_test, "epochs": epochs,
            "options": options, "train_minutes": {k: round(v, 2) for k, v in minutes.items()}, "molecules": rows,
            "machine": machine(), "command": "python benchmarks/transfer.py " + " ".join(sys.argv[1:])}


def write(results: list, out: Path = RESULTS) -> None:
    lines = ["# Transfer between levels of theory (`python benchmarks/transfer.py`)", "",
             "## Zero-shot CCSD(T): a molecule seen only at MP2", "",
             "Forces MAE (meV/Å) on test geometries never trained on. `gap` = MP2 vs CCSD(T) on the same geometries "
             "(what 'just use MP2' would cost). Target: held-out CCSD(T) error <= gap / 3.", "",
             "| held out | model options | molecule | CCSD(T) in training | CCSD(T) F MAE | MP2 F MAE | MP2-CCSD(T) gap "
             "| error / gap | CCSD(T) E residual std (meV) | train min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["experiment"] != "zero-shot":
            continue
        for molecule, m in r["molecules"].items():
            lines.append(
                f"| {r['held_out']} | `{json.dumps(r.get('options', {}))}` | {molecule} | {'yes' if m['cc_in_training'] else '**no**'} "
                f"| {m['cc_forces_mae_meV_A']:.1f} | {m['mp2_forces_mae_meV_A']:.1f} | {m['mp2_vs_cc_forces_gap_meV_A']:.1f} "
                f"| {m['cc_forces_mae_meV_A'] / m['mp2_vs_cc_forces_gap_meV_A']:.2f} "
                f"| {m['cc_energy_residual_std_meV']:.2f} | {r['train_minutes']:.1f} |")
    few = [r for r in results if r["experiment"] == "few-shot"]
    if few:
        lines += ["", "## Few-shot CCSD(T): fine-tuned from the base vs trained from scratch", "",
                  "The held-out molecule's CCSD(T) forces MAE (meV/Å) on the same test geometries, after `finetune` "
                  "with its defaults on N CCSD(T) frames of it (replaying the base's training frames), or after "
                  "training the same network from scratch on those N frames alone (same protocol). Targets: "
                  "fine-tuned N = 50 below gap / 2; scratch needs 10x the points for the same error.", "",
                  "| held out | model options | N | model | CCSD(T) F MAE | E MAE (meV) | error / gap | lr | epochs | min |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in few:
            gap = r["mp2_vs_cc_forces_gap_meV_A"]
            lines.append(f"| {r['held_out']} | `{json.dumps(r['options'])}` | 0 | zero-shot base "
                         f"({r['base_minutes']:.1f} min) | {r['zero_shot_forces_mae_meV_A']:.1f} | | "
                         f"{r['zero_shot_forces_mae_meV_A'] / gap:.2f} | | | |")
            for row in r["rows"]:
                lines.append(f"| {r['held_out']} | `{json.dumps(r['options'])}` | {row['n']} | {row['model']} "
                             f"| {row['forces_mae_meV_A']:.1f} | {row['energy_mae_meV']:.2f} "
                             f"| {row['forces_mae_meV_A'] / gap:.2f} | {row.get('lr', 2e-3):.1e} | {row['epochs_run']} "
                             f"| {row['minutes']:.1f} |")
            lines.append(f"| | | | MP2-vs-CCSD(T) gap | {gap:.1f} | | 1 | | | |")
    for r in results:
        if r["experiment"] != "disjoint":
            continue
        lines += ["", "## Disjoint sets: one joint model vs one model per set", "",
                  f"Each set at its own level, {r['per_level']} training frames per molecule, equal optimiser budget "
                  f"(training minutes: {r['train_minutes']}); forces / energy MAE (meV/Å / meV) on "
                  f"{r['n_test']} held-out frames per molecule. Options `{json.dumps(r['options'])}`.", "",
                  "| molecule | level | separate F | joint F | joint / separate (F) | separate E | joint E |",
                  "|---|---|---|---|---|---|---|"]
        for molecule, m in r["molecules"].items():
            lines.append(f"| {molecule} | {m['fidelity']} | {m['separate_forces_mae_meV_A']:.1f} "
                         f"| {m['joint_forces_mae_meV_A']:.1f} "
                         f"| {m['joint_forces_mae_meV_A'] / m['separate_forces_mae_meV_A']:.2f} "
                         f"| {m['separate_energy_mae_meV']:.2f} | {m['joint_energy_mae_meV']:.2f} |")
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["zero-shot", "few-shot", "disjoint"])
    parser.add_argument("--held-out", default="h2co", choices=HAS_CC)
    parser.add_argument("--per-level", type=int, default=200, help="training frames per molecule and level")
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--model-options", default="{}")
    parser.add_argument("--points", default="10,25,50", help="few-shot: CCSD(T) frames to fine-tune on")
    parser.add_argument("--scratch", default="50,250", help="few-shot: CCSD(T) frames to train from scratch on")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of transfer.json / transfer.md")
    args = parser.parse_args()
    store = args.results / "transfer.json"
    results = json.loads(store.read_text()) if store.exists() else []
    options = json.loads(args.model_options)
    if args.experiment == "zero-shot":
        row = zero_shot(args.held_out, args.per_level, args.n_test, args.epochs, options)
    elif args.experiment == "disjoint":
        row = disjoint(args.per_level, args.n_test, args.epochs, options)
    else:
        ints = lambda text: [int(x) for x in text.split(",") if x]
        row = few_shot(args.held_out, args.per_level, args.n_test, args.epochs, options, ints(args.points),
                       ints(args.scratch))
    same = (row["experiment"], row["held_out"], json.dumps(row["options"], sort_keys=True))
    if row["experiment"] == "few-shot":  # keep an earlier run's rows of (N, model) not run again
        for r in results:
            if (r["experiment"], r["held_out"], json.dumps(r.get("options", {}), sort_keys=True)) == same:
                done = {(x["n"], x["model"]) for x in row["rows"]}
                row["rows"] = sorted([x for x in r["rows"] if (x["n"], x["model"]) not in done] + row["rows"],
                                     key=lambda x: (x["n"], x["model"]))
    results = [r for r in results
               if (r["experiment"], r["held_out"], json.dumps(r.get("options", {}), sort_keys=True)) != same] + [row]
    args.results.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(results, indent=1))
    write(results, args.results)


if __name__ == "__main__":
    main()
