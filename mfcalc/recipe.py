"""`mfcalc train CONFIG`: a YAML/TOML recipe -> datasets and splits -> training -> test errors ->
checkpoint, exported model and a model card, all in the output directory.

A recipe (paths relative to the recipe file)::

    output: ../models/ethanol-mf
    model: {features: 64, layers: 3, cutoff: 5.0, fidelity_mode: film}
    aliases: {"CCSD(T)": "CCSD(T)/cc-pVTZ"}
    default_fidelity: CCSD(T)/cc-pVTZ
    datasets:
      - {path: ../data/ethanol/ethanol_ccsd_t-300.npz, format: gdml, energy_unit: kcal/mol,
         fidelity: CCSD(T)/cc-pVTZ, train: 180, val: 20, test: 100, seed: 0,
         source: "sGDML, Chmiela et al. 2018"}
    training: {epochs: 100, steps_per_epoch: 100, batch_size: 16, lr: 1.0e-3}
"""

import inspect
import json
import platform
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import __version__
from .data import (
    Structure, read_ase_db, read_extxyz, read_gdml_npz, read_transition1x_json, split_indices,
)
from .model import default_config
from .modelfile import build_forcefield, checksum, export_model, save_checkpoint
from .training import TrainSettings, distributed_rank_world, evaluate, init_distributed, to_graphs, train

READERS = {
    "extxyz": read_extxyz,
    "gdml": read_gdml_npz,  # sGDML and mbGDML .npz
    "ase-db": read_ase_db,
    "transition1x": read_transition1x_json,
}
SPLIT_KEYS = {"path", "format", "fidelity", "train", "val", "test", "seed", "source"}


def read_recipe(path: Path) -> Dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    import yaml

    return yaml.safe_load(text)


def load_datasets(recipe: Dict[str, Any], root: Path) -> Dict[str, List[Structure]]:
    """Train / val / test structures from every dataset entry, split reproducibly."""
    splits: Dict[str, List[Structure]] = {"train": [], "val": [], "test": []}
    for entry in recipe["datasets"]:
        entry = dict(entry)
        fmt = entry.get("format", "extxyz")
        if fmt not in READERS:
            raise ValueError(f"dataset format {fmt!r} unknown; known: {sorted(READERS)}")
        reader = READERS[fmt]
        options = {k: v for k, v in entry.items() if k not in SPLIT_KEYS}
        accepted = set(inspect.signature(reader).parameters) - {"path", "fidelity"}
        if set(options) - accepted:
            raise ValueError(
                f"dataset {entry['path']}: option(s) {sorted(set(options) - accepted)} are not "
                f"understood by format {fmt!r}, which takes {sorted(accepted)}"
            )
        records = reader(root / entry["path"], fidelity=entry["fidelity"], **options)
        sizes = [0 if entry.get(k) == "rest" else int(entry.get(k, 0)) for k in ("train", "val", "test")]
        if entry.get("train") == "rest":
            sizes[0] = len(records) - sizes[1] - sizes[2]
        parts = split_indices(len(records), sizes, seed=int(entry.get("seed", 0)))
        for name, idx in zip(("train", "val", "test"), parts):
            splits[name].extend(records[i] for i in idx)
    return splits


def run_recipe(
    path: str, output: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
    log=print, resume: bool = False,
) -> Dict[str, Any]:
    """Train the model a recipe describes; write checkpoint.pt, model.pt, card.json, README.md,
    log.csv and train_state.pt (for --resume) to its output directory. Under torchrun every
    rank trains; rank 0 writes the files, and ranks.json records every rank's weight checksum."""
    init_distributed()
    rank, world = distributed_rank_world()
    recipe_path = Path(path).resolve()
    recipe = read_recipe(recipe_path)
    for key, value in (overrides or {}).items():
        recipe.setdefault("training", {})[key] = value
    root = recipe_path.parent
    out_dir = Path(output) if output else root / recipe["output"]
    out_dir.mkdir(parents=True, exist_ok=True)

    splits = load_datasets(recipe, root)
    fidelities = list(dict.fromkeys(e["fidelity"] for e in recipe["datasets"]))
    elements = sorted({int(z) for s in splits["train"] for z in s.numbers})
    config = default_config(elements, fidelities, **recipe.get("model", {}))
    known = {f.name for f in fields(TrainSettings)}
    unknown = set(recipe.get("training", {})) - known
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
    settings = TrainSettings(**recipe.get("training", {}))
    torch.manual_seed(settings.seed)
    forcefield = build_forcefield(config)
    if rank != 0:
        log = lambda *args, **kwargs: None  # noqa: E731 - one voice in the log
    log(f"model: {config}")
    summary = train(
        forcefield, splits["train"], splits["val"], settings, log=log, workdir=out_dir,
        resume=resume,
    )
    if world > 1:
        sums: List[Any] = [None] * world
        torch.distributed.all_gather_object(sums, checksum(forcefield))
        if rank == 0:
            (out_dir / "ranks.json").write_text(json.dumps({"world_size": world, "checksums": sums}))
        # leave the group together: a rank that exits with gloo's threads still running aborts
        # ("terminate called without an active exception") and torchrun then kills rank 0 too
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return {}

    forcefield = forcefield.double()
    test_errors = evaluate(forcefield, to_graphs(splits["test"], fidelities, config["cutoff"]), fidelities)
    log("test errors: " + json.dumps(test_errors, indent=1))
    provenance = [
        {k: v for k, v in e.items() if k not in ("seed",)} | {"split_seed": e.get("seed", 0)}
        for e in recipe["datasets"]
    ]
    card = {
        "recipe": str(recipe_path.name),
        "mfcalc_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "training_settings": asdict(settings),
        "training_minutes": round(summary["minutes"], 2),
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "test_errors": test_errors,
        "training_data": provenance,
        "aliases": recipe.get("aliases", {}),
        "default_fidelity": recipe.get("default_fidelity", fidelities[-1]),
        "date": time.strftime("%Y-%m-%d"),
    }
    save_checkpoint(out_dir / "checkpoint.pt", forcefield, card=json.dumps(card))
    export_model(
        forcefield,
        out_dir / "model.pt",
        metadata={
            "aliases": card["aliases"],
            "default_fidelity": card["default_fidelity"],
            "training_data": provenance,
            "test_errors": test_errors,
        },
        dtype=torch.float64,
    )
    (out_dir / "card.json").write_text(json.dumps(card | {"history": summary["history"]}, indent=1))
    (out_dir / "README.md").write_text(card_markdown(out_dir.name, recipe, card))
    log(f"wrote {out_dir / 'model.pt'}")
    return card


def card_markdown(name: str, recipe: Dict[str, Any], card: Dict[str, Any]) -> str:
    """A model card: data and splits, how it was trained, per-fidelity test errors."""
    lines = [
        f"# {name}",
        "",
        f"Trained with mfcalc {card['mfcalc_version']} (torch {card['torch_version']}) on "
        f"{card['machine']} in {card['training_minutes']:.1f} min "
        f"({card['epochs_run']} epochs, best validation at epoch {card['best_epoch']}), {card['date']}.",
        "",
        f"Reproduce: `mfcalc train recipes/{card['recipe']}`",
        "",
        "## Data (fidelity = level of theory); splits are random with the seed shown",
        "",
        "| fidelity | file | energy unit in file | train | val | test | seed | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in recipe["datasets"]:
        lines.append(
            f"| {e['fidelity']} | `{Path(e['path']).name}` | {e.get('energy_unit', 'eV')} | "
            f"{e.get('train', 0)} | {e.get('val', 0)} | {e.get('test', 0)} | {e.get('seed', 0)} | "
            f"{e.get('source', '')} |"
        )
    aliases = recipe.get("aliases", {})
    lines += [
        "",
        "Aliases: " + (", ".join(f"`{a}` -> `{t}`" for a, t in aliases.items()) or "none")
        + f". Default fidelity: `{recipe.get('default_fidelity', '')}`.",
        "",
        "## Test errors (held-out configurations, float64)",
        "",
        "| fidelity | n | energy MAE (meV) | energy RMSE (meV) | forces MAE (meV/Å) | forces RMSE (meV/Å) |",
        "|---|---|---|---|---|---|",
    ]
    for fid, e in card["test_errors"].items():
        f_mae = f"{1000 * e['forces_mae']:.1f}" if "forces_mae" in e else "-"
        f_rmse = f"{1000 * e['forces_rmse']:.1f}" if "forces_rmse" in e else "-"
        lines.append(
            f"| {fid} | {e['n']} | {1000 * e['energy_mae']:.2f} | {1000 * e['energy_rmse']:.2f} | "
            f"{f_mae} | {f_rmse} |"
        )
    lines += ["", "## Model", "", "```", json.dumps(recipe.get("model", {})), "```", ""]
    return "\n".join(lines)
