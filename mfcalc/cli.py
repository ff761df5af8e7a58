"""The `mfcalc` command: train, export, info, md."""

import argparse
import json
import sys
from typing import List, Optional


def _cmd_train(args: argparse.Namespace) -> None:
    from .recipe import run_recipe

    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.steps_per_epoch is not None:
        overrides["steps_per_epoch"] = args.steps_per_epoch
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    run_recipe(args.recipe, output=args.output, overrides=overrides, resume=args.resume)


def _cmd_export(args: argparse.Namespace) -> None:
    import torch

    from .modelfile import build_forcefield, export_model, load_checkpoint

    payload = load_checkpoint(args.checkpoint)
    card = json.loads(payload.get("card", "{}"))
    forcefield = build_forcefield(payload["config"], payload["state_dict"])
    meta = {"training_data": card.get("training_data", []), "test_errors": card.get("test_errors", {})}
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
        dtype=args.dtype, device=args.device,
    )


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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="write a TorchScript model file from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--aliases", help='JSON, e.g. \'{"CCSD(T)": "CCSD(T)/cc-pVTZ"}\'')
    p.add_argument("--default-fidelity")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("info", help="fidelities, elements, cutoff and test errors of a model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("md", help="Langevin MD of a structure at a chosen fidelity")
    p.add_argument("structure", help="any file ASE reads, or a molecule name (e.g. CH3CH2OH)")
    p.add_argument("--model", default="ethanol-mf")
    p.add_argument("--fidelity")
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--out", default="md.traj", help="trajectory (.traj or .xyz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_md)
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
