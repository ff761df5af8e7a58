"""The `mfcalc` command: train, export, info, md."""

import argparse
import json
import sys
from typing import List, Optional

import numpy as np

from .modelfile import DEFAULT_MODEL


def _cmd_train(args: argparse.Namespace) -> None:
    from .recipe import run_recipe

    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.steps_per_epoch is not None:
        overrides["steps_per_epoch"] = args.steps_per_epoch
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    if args.meta is not None:
        overrides["meta"] = args.meta
    run_recipe(args.recipe, output=args.output, overrides=overrides, resume=args.resume)


def _cmd_export(args: argparse.Namespace) -> None:
    import torch

    from .modelfile import build_forcefield, export_model, load_checkpoint

    payload = load_checkpoint(args.checkpoint)
    card = json.loads(payload.get("card", "{}"))
    forcefield = build_forcefield(payload["config"], payload["state_dict"])
    meta = {"training_data": card.get("training_data", []), "test_errors": card.get("test_errors", {})}
    for key in ("aliases", "default_fidelity"):  # the recipe's, kept in the checkpoint's card
        if key in card:
            meta[key] = card[key]
    if args.aliases:
        meta["aliases"] = json.loads(args.aliases)
    if args.default_fidelity:
        meta["default_fidelity"] = args.default_fidelity
    export_model(forcefield, args.output, meta, dtype=getattr(torch, args.dtype))
    print(f"wrote {args.output}: fidelities {payload['config']['fidelities']}")


def _cmd_info(args: argparse.Namespace) -> None:
    from ase.data import chemical_symbols

    from .modelfile import load_model

    _, meta = load_model(args.model)
    if args.json:
        print(json.dumps(meta, indent=1))
        return
    print(f"model        {meta['path']}")
    print(f"mfcalc       {meta['mfcalc_version']} (format {meta['format_version']}), dtype {meta['dtype']}")
    print(f"cutoff       {meta['cutoff']} Å")
    print(f"elements     {' '.join(chemical_symbols[z] for z in meta['elements'])}")
    print(f"default      {meta['default_fidelity']}")
    print("fidelities")
    errors = meta.get("test_errors", {})
    for name in meta["fidelities"]:
        aliases = [a for a, t in meta.get("aliases", {}).items() if t == name]
        e = errors.get(name, {})
        err = ""
        if e:
            err = f"test n={e['n']}: E MAE {1000 * e['energy_mae']:.2f} meV"
            if "forces_mae" in e:
                err += f", F MAE {1000 * e['forces_mae']:.1f} meV/Å"
        alias_text = f" (alias {', '.join(aliases)})" if aliases else ""
        print(f"  - {name}{alias_text}  {err}")
    for entry in meta.get("training_data", []):
        print(f"data         {entry.get('fidelity')}: {entry.get('source', entry.get('path'))}")


def _cmd_md(args: argparse.Namespace) -> None:
    from .workflows import run_md

    run_md(
        args.structure, model=args.model, fidelity=args.fidelity, temperature=args.temperature,
        steps=args.steps, timestep=args.timestep, out=args.out, seed=args.seed,
        dtype=args.dtype, device=args.device, compile=args.compile,
    )


def _cmd_sample(args: argparse.Namespace) -> None:
    from ase.io import write

    from .sampling import sample
    from .workflows import read_structure

    frames = sample(
        read_structure(args.structure), model=args.model, fidelity=args.fidelity, n=args.n,
        temperature=args.temperature, steps=args.steps, timestep=args.timestep,
        interval=args.interval, select=args.select, seed=args.seed, dtype=args.dtype, device=args.device,
    )
    write(args.out, frames, format="extxyz")
    print(f"wrote {len(frames)} structures ({args.select} from MD at {frames[0].info['sampled_fidelity']}, "
          f"{args.temperature:g} K) to {args.out}; label them with: mfcalc label {args.out} --method ...")


def _cmd_relax(args: argparse.Namespace) -> None:
    from ase.io import write

    from .calculator import MFCalculator
    from .workflows import read_structure, relax

    atoms = read_structure(args.structure)
    atoms.calc = MFCalculator(args.model, fidelity=args.fidelity, dtype=args.dtype, device=args.device)
    rows = []
    for name in args.optimizer:
        trial = atoms.copy()
        trial.calc = atoms.calc
        summary = relax(trial, fmax=args.fmax, optimizer=name, steps=args.steps, cell=args.cell)
        rows.append(summary)
        final = trial
    print(f"relaxation of {atoms.get_chemical_formula()} at {atoms.calc.fidelity} ({args.dtype or atoms.calc.dtype})")
    print("| optimizer | converged | steps | E start (eV) | E final (eV) | max force (eV/Å) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['converged']} | {r['steps']} | {r['energy_start']:.6f} | "
              f"{r['energy']:.6f} | {r['fmax']:.2e} |")
    if args.out:
        write(args.out, final)
        print(f"wrote {args.out}")
    if not all(r["converged"] for r in rows):
        raise RuntimeError(f"not converged to fmax {args.fmax} eV/Å within {args.steps} steps")


def _cmd_vib(args: argparse.Namespace) -> None:
    from .calculator import MFCalculator
    from .workflows import frequencies_ase, frequencies_phonopy, read_structure, relax

    atoms = read_structure(args.structure)
    calc = MFCalculator(args.model, dtype="float64", device=args.device)
    fidelities = args.fidelity or [calc.fidelity]
    table = {}
    for fid in fidelities:
        calc.fidelity = fid
        trial = atoms.copy()
        trial.calc = calc
        if not args.no_relax:
            relax(trial, fmax=args.fmax)
        table[calc.fidelity] = {"ase": frequencies_ase(trial), "phonopy": frequencies_phonopy(trial)}
    n_skip = 6 if len(atoms) > 2 else 5
    names = list(table)
    print("harmonic frequencies (cm^-1), " + ("geometry relaxed at each fidelity" if not args.no_relax else "input geometry"))
    print("| mode | " + " | ".join(f"{n} ase | {n} phonopy" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for k in range(n_skip, 3 * len(atoms)):
        cells = " | ".join(f"{table[n]['ase'][k]:.1f} | {table[n]['phonopy'][k]:.1f}" for n in names)
        print(f"| {k - n_skip + 1} | {cells} |")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from .finetune import finetune, save_finetuned
    from .recipe import READERS, load_datasets, read_recipe

    reader = READERS[args.format]
    options = {"energy_unit": args.energy_unit} if args.energy_unit else {}
    data = reader(args.data, fidelity=args.fidelity, **options)
    replay = replay_val = None
    if args.replay:
        from pathlib import Path

        recipe_path = Path(args.replay).resolve()
        splits = load_datasets(read_recipe(recipe_path), recipe_path.parent)
        rng = np.random.default_rng(0)
        replay = [splits["train"][i] for i in rng.permutation(len(splits["train"]))[: args.replay_size]]
        replay_val = splits["val"]
    aliases = json.loads(args.aliases) if args.aliases else None
    from .training import TrainSettings

    settings = TrainSettings(
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr,
        weight_decay=0.0, ema_decay=0.95 if args.epochs * args.steps_per_epoch < 5000 else 0.995,
        patience=max(10, args.epochs // 4), energy_weight=100.0, seed=args.seed,
    )
    result = finetune(args.base, data, args.fidelity, new_fidelity=args.new_fidelity, strategy=args.strategy,
                      replay=replay, replay_val=replay_val, replay_fraction=args.replay_fraction, aliases=aliases,
                      settings=settings, seed=args.seed)
    path = save_finetuned(result, args.output)
    print(f"wrote {path}: fidelities {result.forcefield.fidelities}")
    drift = result.report["drift"]
    if drift:
        print("| fidelity | forces MAE before (meV/Å) | after | energy MAE before (meV) | after |")
        print("|---|---|---|---|---|")
        for name, row in drift.items():
            fb, fa = row.get("forces_mae_before"), row.get("forces_mae_after")
            f_text = f"{1000 * fb:.1f} | {1000 * fa:.1f}" if fb is not None else "- | -"
            print(f"| {name} | {f_text} | {1000 * row['energy_mae_before']:.2f} | {1000 * row['energy_mae_after']:.2f} |")


def _cmd_label(args: argparse.Namespace) -> None:
    from ase.io import read

    from .label import label

    structures = read(args.structures, index=":")
    labelled = label(structures, args.method, args.out, forces=args.forces, fidelity=args.fidelity,
                     charge=args.charge, spin=args.spin, workers=args.workers,
                     threads_per_worker=args.threads, density_fit=args.density_fit)
    print(f"{len(labelled)} of {len(structures)} structures labelled at {args.method} in {args.out}")
    if len(labelled) < len(structures):
        raise RuntimeError(f"{len(structures) - len(labelled)} structures failed; run again to retry them")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .finetune import load_base
    from .recipe import load_datasets, read_recipe
    from .training import evaluate, to_graphs

    forcefield, _ = load_base(args.model)
    recipe_path = Path(args.recipe).resolve()
    structures = load_datasets(read_recipe(recipe_path), recipe_path.parent)[args.split]
    known = set(forcefield.fidelities)
    structures = [s for s in structures if s.fidelity in known]
    errors = evaluate(forcefield, to_graphs(structures, forcefield.fidelities, forcefield.cutoff), forcefield.fidelities)
    if args.json:
        print(json.dumps(errors, indent=1))
        return
    print(f"{args.split} split of {recipe_path.name}, model {args.model}")
    print("| fidelity | n | energy MAE (meV) | energy RMSE (meV) | forces MAE (meV/Å) | forces RMSE (meV/Å) |")
    print("|---|---|---|---|---|---|")
    for name, e in errors.items():
        f = f"{1000 * e['forces_mae']:.1f} | {1000 * e['forces_rmse']:.1f}" if "forces_mae" in e else "- | -"
        print(f"| {name} | {e['n']} | {1000 * e['energy_mae']:.2f} | {1000 * e['energy_rmse']:.2f} | {f} |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfcalc", description="multi-fidelity ML potentials")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML/TOML recipe")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", help="output directory (default: the recipe's)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/train_state.pt")
    p.add_argument("--meta", choices=["none", "reptile"], help="meta-learned pretraining (fidelities as tasks)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="write a TorchScript model file from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--aliases", help='JSON, e.g. \'{"CCSD(T)": "CCSD(T)/cc-pVTZ"}\'')
    p.add_argument("--default-fidelity")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("label", help="quantum-chemistry labels with PySCF (resumable)")
    p.add_argument("structures", help="any file ASE reads; every frame is labelled")
    p.add_argument("--method", required=True, help='METHOD/BASIS, e.g. "CCSD(T)/cc-pVDZ", "PBE/def2-SVP"')
    p.add_argument("--forces", action="store_true", help="analytic gradients too")
    p.add_argument("--out", required=True, help="extxyz, appended one finished structure at a time")
    p.add_argument("--fidelity", help="fidelity name written to the records (default: the method)")
    p.add_argument("--charge", type=int, default=0)
    p.add_argument("--spin", type=int, default=0, help="2S (number of unpaired electrons)")
    p.add_argument("--workers", type=int, default=1, help="structures computed in parallel")
    p.add_argument("--threads", type=int, default=1, help="PySCF threads per worker")
    p.add_argument("--density-fit", action="store_true",
                   help="RI-J for DFT (ORCA's default for GGAs); RI-JK + RI-MP2 for MP2 energies "
                        "(PySCF's default auxiliary basis sets)")
    p.set_defaults(func=_cmd_label)

    p = sub.add_parser("finetune", help="fine-tune a model on a few new points, keeping every fidelity")
    p.add_argument("base", help="model name, exported .pt or checkpoint")
    p.add_argument("data", help="labelled structures")
    p.add_argument("--fidelity", required=True, help="level of theory of DATA")
    p.add_argument("--new-fidelity", action="store_true", help="add FIDELITY as a new level of theory")
    p.add_argument("--strategy", choices=["embedding", "readout", "full"], default="full")
    p.add_argument("--format", choices=["extxyz", "gdml", "ase-db", "transition1x"], default="extxyz")
    p.add_argument("--energy-unit", help="energy unit of DATA (default: the reader's)")
    p.add_argument("--replay", help="recipe of the base model: its data is replayed and its validation split drives the drift report")
    p.add_argument("--replay-size", type=int, default=500)
    p.add_argument("--replay-fraction", type=float, default=0.3)
    p.add_argument("--aliases", help='JSON, e.g. \'{"CC": "CCSD(T)/cc-pVDZ"}\'')
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("evaluate", help="per-fidelity errors of a model on a recipe's split")
    p.add_argument("model")
    p.add_argument("--recipe", required=True)
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("info", help="fidelities, elements, cutoff and test errors of a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("md", help="Langevin MD of a structure at a chosen fidelity")
    p.add_argument("structure", help="any file ASE reads, or a molecule name (e.g. CH3CH2OH)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--fidelity")
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--out", default="md.traj", help="trajectory (.traj or .xyz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="compile the force path (torch.compile): ~30-45 s once, then 2-4x fewer ms per "
                        "step for small molecules on CPU; worth it for runs longer than ~10^4 steps")
    p.set_defaults(func=_cmd_md)

    p = sub.add_parser("sample", help="diverse structures to label: MD at a cheap fidelity, farthest-point picks")
    p.add_argument("model")
    p.add_argument("structure", help="any file ASE reads, or a molecule name (e.g. CH3CH2OH)")
    p.add_argument("--fidelity", help="level of theory driving the MD (a cheap one)")
    p.add_argument("-n", type=int, default=50, help="structures to pick")
    p.add_argument("--select", choices=["fps", "spread"], default="fps",
                   help="farthest-point on a structure descriptor, or weighted by cross-fidelity spread")
    p.add_argument("--temperature", type=float, default=500.0, help="K")
    p.add_argument("--steps", type=int, help="MD steps (default: a pool of 10 n frames)")
    p.add_argument("--interval", type=int, default=10, help="MD steps between pool frames")
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="extxyz for mfcalc label")
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("relax", help="geometry optimisation with a summary table")
    p.add_argument("structure")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--fidelity")
    p.add_argument("--fmax", type=float, default=1e-3, help="eV/Å")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--optimizer", nargs="+", default=["BFGS"], choices=["BFGS", "FIRE", "LBFGS"])
    p.add_argument("--cell", action="store_true", help="relax the cell too (periodic structures)")
    p.add_argument("--out", help="write the relaxed structure here")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_relax)

    p = sub.add_parser("vib", help="harmonic frequencies (ase.vibrations and phonopy) at one or more fidelities")
    p.add_argument("structure")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--fidelity", action="append", help="repeat to compare fidelities side by side")
    p.add_argument("--fmax", type=float, default=1e-4)
    p.add_argument("--no-relax", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_vib)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("mfcalc: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, KeyError, OSError) as err:
        print(f"mfcalc {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
