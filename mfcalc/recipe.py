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

Whole molecules can be held out instead of random frames: a dataset with ``split_by: KEY`` (an
extxyz info key such as ``name``) sends every frame whose KEY is listed under the recipe's
``held_out: {test: [...], val: [...]}`` to that split and the rest to training (``train: N``
keeps a random N of them, ``rest`` or no ``train`` keeps all)::

    held_out: {test: [acetone, pyridine], val: [oxetane]}
    datasets:
      - {path: ../data/chno/xtb_gfn2.npz, format: frames-npz, fidelity: GFN2-xTB, split_by: name}

``model:`` takes any option of mfcalc.model.default_config, and ``size``, a named network
(mfcalc.model.SIZES): ``small`` (the default: l <= 1, fastest), ``accurate`` (rank-2 tensors, a
radial MLP, 8 radial functions: the shipped models' network) or ``manybody`` (``accurate`` at 32
features with the many-body options: the lowest errors per data point), e.g. ``model: {size: accurate}``.

``model: {core_pair_radius: auto}`` clamps each element pair's learned distance just inside the
closest pair of that kind in the training frames (mfcalc.domain.pair_clamp_from_data); the radii
are written into the model's config.

``start_from: PATH`` (a checkpoint.pt, e.g. a shipped model's) continues training from those weights
instead of a fresh network: the network and its reference energies are the checkpoint's (a recipe with
``start_from`` has no ``model:`` block), and the recipe's data must have the checkpoint's fidelities
and elements. The card records the checkpoint, the checksum of the weights it started from and the
network. Use it for a second stage, e.g. a warm restart of the learning-rate schedule
(recipes/chno-mf.yaml: v8 is v7 continued this way).
"""

import inspect
import json
import platform
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .version import __version__
from .data import (
    Structure, read_ase_db, read_extxyz, read_frames_npz, read_gdml_npz, read_rmd17_npz, read_transition1x_json,
    split_indices,
)
from .domain import domain_statistics, pair_clamp_from_data
from .model import default_config
from .modelfile import build_forcefield, checksum, export_model, load_checkpoint, save_checkpoint
from .training import (
    TrainSettings, distributed_rank_world, evaluate, init_distributed, leave_distributed, to_graphs, train,
)

READERS = {
    "extxyz": read_extxyz,
    "gdml": read_gdml_npz,  # sGDML and mbGDML .npz (also cc_avtz/: R, z, E, F with energy_unit eV)
    "rmd17": read_rmd17_npz,  # revised MD17 .npz (labels: revised | original)
    "frames-npz": read_frames_npz,  # mfcalc's flat .npz of many molecules (data/chno)
    "ase-db": read_ase_db,
    "transition1x": read_transition1x_json,
}
SPLIT_KEYS = {"path", "format", "fidelity", "train", "val", "test", "seed", "source", "split_by"}


def read_recipe(path: Path) -> Dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    import yaml

    return yaml.safe_load(text)


def _split_random(records: List[Structure], entry: Dict[str, Any]) -> Dict[str, List[Structure]]:
    """``train``/``val``/``test`` sizes (``train: rest`` takes what is left), seeded."""
    sizes = [0 if entry.get(key) == "rest" else int(entry.get(key, 0)) for key in ("train", "val", "test")]
    if entry.get("train") == "rest":
        sizes[0] = len(records) - sizes[1] - sizes[2]
    idx = split_indices(len(records), sizes, seed=int(entry.get("seed", 0)))
    return {name: [records[i] for i in ix] for name, ix in zip(("train", "val", "test"), idx)}


def _split_by_group(
    records: List[Structure], entry: Dict[str, Any], held_out: Dict[str, set]
) -> Dict[str, List[Structure]]:
    """Frames of held-out groups to their split, the rest (or a seeded ``train: N`` of it) to train."""
    parts = {name: [r for r in records if r.group in held_out[name]] for name in ("test", "val")}
    pool = [r for r in records if r.group not in held_out["test"] | held_out["val"]]
    if entry.get("train", "rest") != "rest":
        pool = [pool[i] for i in split_indices(len(pool), [int(entry["train"])], seed=int(entry.get("seed", 0)))[0]]
    return {"train": pool, **parts}


def load_datasets(recipe: Dict[str, Any], root: Path, by_dataset: bool = False) -> Dict[str, List[Structure]]:
    """Train / val / test structures from every dataset entry, split reproducibly. With
    ``by_dataset`` also ``"test:<k>"``: the test structures of dataset entry k alone."""
    splits: Dict[str, List[Structure]] = {"train": [], "val": [], "test": []}
    unknown_split = set(recipe.get("held_out", {})) - {"test", "val"}
    if unknown_split:
        raise ValueError(f"held_out takes the keys 'test' and 'val', got {sorted(unknown_split)}")
    held_out = {name: set(recipe.get("held_out", {}).get(name, [])) for name in ("test", "val")}
    if held_out["test"] & held_out["val"]:
        raise ValueError(f"held_out: {sorted(held_out['test'] & held_out['val'])} listed as test and val")
    seen_groups = set()
    for k, entry in enumerate(recipe["datasets"]):
        entry = dict(entry)
        fmt = entry.get("format", "extxyz")
        if fmt not in READERS:
            raise ValueError(f"dataset format {fmt!r} unknown; known: {sorted(READERS)}")
        reader = READERS[fmt]
        options = {k: v for k, v in entry.items() if k not in SPLIT_KEYS}
        accepted = set(inspect.signature(reader).parameters) - {"path", "fidelity"}
        if "split_by" in entry:
            if "group_key" not in accepted:
                raise ValueError(f"dataset {entry['path']}: split_by needs per-frame info keys; "
                                 f"format {fmt!r} has none (use extxyz or frames-npz)")
            options["group_key"] = entry["split_by"]
        if set(options) - accepted:
            raise ValueError(
                f"dataset {entry['path']}: option(s) {sorted(set(options) - accepted)} are not "
                f"understood by format {fmt!r}, which takes {sorted(accepted)}"
            )
        records = reader(root / entry["path"], fidelity=entry["fidelity"], **options)
        if "split_by" in entry:
            seen_groups |= {r.group for r in records}
            parts = _split_by_group(records, entry, held_out)
        else:
            parts = _split_random(records, entry)
        for name in ("train", "val", "test"):
            splits[name].extend(parts[name])
        if by_dataset:
            splits[f"test:{k}"] = parts["test"]
    missing = sorted((held_out["test"] | held_out["val"]) - seen_groups)
    if missing:
        raise ValueError(f"held_out names {missing} are in no dataset with split_by "
                         f"(known: {len(seen_groups)} names, e.g. {sorted(seen_groups)[:5]})")
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

    splits = load_datasets(recipe, root, by_dataset=True)
    fidelities = list(dict.fromkeys(e["fidelity"] for e in recipe["datasets"]))
    elements = sorted({int(z) for s in splits["train"] for z in s.numbers})
    start = starting_point(recipe, root, elements, fidelities)
    model_options = dict(recipe.get("model", {}))
    if model_options.get("core_pair_radius") == "auto":
        # each element pair clamped just inside its closest training distance (mfcalc.domain)
        generic = default_config(elements, fidelities, **{**model_options, "core_pair_radius": {}})
        model_options["core_pair_radius"] = pair_clamp_from_data(
            splits["train"], float(generic["cutoff"]), float(generic["core_radius_factor"]))
    config = start["config"] if start else default_config(elements, fidelities, **model_options)
    known = {f.name for f in fields(TrainSettings)}
    unknown = set(recipe.get("training", {})) - known
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(known)}")
    settings = TrainSettings(**recipe.get("training", {}))
    torch.manual_seed(settings.seed)
    forcefield = build_forcefield(config, start["state_dict"] if start else None)
    start_checksum = checksum(forcefield) if start else None  # before training moves the weights
    if rank != 0:
        log = lambda *args, **kwargs: None  # noqa: E731 - one voice in the log
    log(f"model: {config}")
    summary = train(
        forcefield, splits["train"], splits["val"], settings, log=log, workdir=out_dir,
        resume=resume, fit_references=start is None,
    )
    if world > 1:
        sums: List[Any] = [None] * world
        torch.distributed.all_gather_object(sums, checksum(forcefield))
        if rank == 0:
            (out_dir / "ranks.json").write_text(json.dumps({"world_size": world, "checksums": sums}))
        leave_distributed()
        if rank != 0:
            return {}

    forcefield = forcefield.double()
    # test graphs built once per dataset entry: each entry's own row, and all of them per fidelity
    test_graphs = [to_graphs(splits[f"test:{k}"], fidelities, config["cutoff"]) for k in range(len(recipe["datasets"]))]
    test_errors = evaluate(forcefield, [g for graphs in test_graphs for g in graphs], fidelities)
    log("test errors: " + json.dumps(test_errors, indent=1))
    test_by_dataset = [
        {"dataset": Path(entry["path"]).name, **evaluate(forcefield, graphs, fidelities)[entry["fidelity"]],
         "fidelity": entry["fidelity"]}
        for entry, graphs in zip(recipe["datasets"], test_graphs) if graphs
    ]
    test_by_molecule = errors_by_group(forcefield, recipe, splits, test_graphs, fidelities)
    provenance = [
        {k: v for k, v in e.items() if k not in ("seed",)} | {"split_seed": e.get("seed", 0)}
        for e in recipe["datasets"]
    ]
    card = {
        "recipe": str(recipe_path.name),
        "overrides": dict(overrides or {}),  # `mfcalc train` flags over the recipe's training block
        "mfcalc_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "training_settings": asdict(settings),
        "training_minutes": round(summary["minutes"], 2),
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "test_errors": test_errors,
        "test_errors_by_dataset": test_by_dataset,
        "test_errors_by_molecule": test_by_molecule,
        "held_out": recipe.get("held_out", {}),
        **({"start_from": {"path": str(recipe["start_from"]), "checksum": start_checksum,
                           "network": {k: v for k, v in config.items() if k not in ("elements", "fidelities")}}}
           if start else {}),
        "training_data": provenance,
        "aliases": recipe.get("aliases", {}),
        "default_fidelity": recipe.get("default_fidelity", fidelities[-1]),
        "date": time.strftime("%Y-%m-%d"),
    }
    save_checkpoint(out_dir / "checkpoint.pt", forcefield, card=json.dumps(card))
    write_model_files(out_dir, recipe, forcefield, card, summary["history"], splits["train"])
    log(f"wrote {out_dir / 'model.pt'}")
    return card


def starting_point(recipe: Dict[str, Any], root: Path, elements: List[int], fidelities: List[str]):
    """The recipe's ``start_from`` checkpoint (config and weights), checked against
    the recipe's data; None without ``start_from``."""
    if not recipe.get("start_from"):
        return None
    path = (root / recipe["start_from"]).resolve()
    if recipe.get("model"):
        raise ValueError(
            f"the recipe has both start_from ({recipe['start_from']}) and a model block: training continues "
            "with the checkpoint's network, so remove `model:` (or remove start_from to train a new network)")
    payload = load_checkpoint(path)
    config = payload["config"]
    if list(config["fidelities"]) != list(fidelities):
        raise ValueError(
            f"start_from {path} has the fidelities {config['fidelities']}, the recipe's datasets give "
            f"{fidelities}: list the datasets so that their fidelities come in the checkpoint's order")
    missing = sorted(set(elements) - set(config["elements"]))
    if missing:
        raise ValueError(f"start_from {path} knows the elements {config['elements']}; the recipe's training "
                         f"data also has {missing}: start a new network instead")
    return {"config": config, "state_dict": payload["state_dict"]}


def write_model_files(out_dir: Path, recipe: Dict[str, Any], forcefield, card: Dict[str, Any],
                      history: List[Dict[str, Any]], train_structures: List[Structure]) -> None:
    """model.pt (float64, with aliases, default fidelity, data provenance, test errors and the
    training-domain statistics), card.json and README.md of a trained model in ``out_dir``."""
    export_model(
        forcefield,
        out_dir / "model.pt",
        metadata={
            "aliases": card["aliases"],
            "default_fidelity": card["default_fidelity"],
            "training_data": card["training_data"],
            "test_errors": card["test_errors"],
            # what MFCalculator's out-of-domain signal compares structures with (mfcalc.domain)
            "domain": domain_statistics(train_structures, float(forcefield.model.config["cutoff"])),
        },
        dtype=torch.float64,
    )
    (out_dir / "card.json").write_text(json.dumps(card | {"history": history}, indent=1))
    (out_dir / "README.md").write_text(card_markdown(out_dir.name, recipe, card))


def finish_run(path: str, output: Optional[str] = None, log=print) -> Dict[str, Any]:
    """Write model.pt, card.json and README.md of a run whose training ended (checkpoint.pt with
    its card, train_state.pt with its history) but whose export did not, e.g. because the source
    files changed under a long run (TorchScript compiles from the files on disk)."""
    recipe_path = Path(path).resolve()
    recipe = read_recipe(recipe_path)
    out_dir = Path(output) if output else recipe_path.parent / recipe["output"]
    payload = load_checkpoint(out_dir / "checkpoint.pt")
    if "card" not in payload:
        raise ValueError(f"{out_dir / 'checkpoint.pt'} holds no card: it was not written by run_recipe")
    card = json.loads(payload["card"])
    forcefield = build_forcefield(payload["config"], payload["state_dict"]).double()
    state_path = out_dir / "train_state.pt"
    history = torch.load(state_path, map_location="cpu", weights_only=True)["history"] if state_path.exists() else []
    splits = load_datasets(recipe, recipe_path.parent, by_dataset=True)
    write_model_files(out_dir, recipe, forcefield, card, history, splits["train"])
    log(f"wrote {out_dir / 'model.pt'}")
    return card


def errors_by_group(forcefield, recipe, splits, test_graphs, fidelities) -> List[Dict[str, Any]]:
    """Test errors of each held-out molecule (group) of the datasets split by group."""
    rows = []
    for k, (entry, graphs) in enumerate(zip(recipe["datasets"], test_graphs)):
        if "split_by" not in entry or not graphs:
            continue
        groups = [s.group for s in splits[f"test:{k}"]]
        assert len(groups) == len(graphs)
        for group in dict.fromkeys(groups):
            subset = [g for g, name in zip(graphs, groups) if name == group]
            errors = evaluate(forcefield, subset, fidelities)[entry["fidelity"]]
            rows.append({"dataset": Path(entry["path"]).name, "fidelity": entry["fidelity"], "molecule": group}
                        | errors)
    return rows


def molecule_table(rows: List[Dict[str, Any]]) -> List[str]:
    """Markdown: one line per held-out molecule, one column per dataset split by molecule."""
    datasets = list(dict.fromkeys((r["dataset"], r["fidelity"]) for r in rows))
    cells = {(r["molecule"], r["dataset"]): r for r in rows}
    lines = ["| molecule | " + " | ".join(f"{fid} (`{ds}`)" for ds, fid in datasets) + " |",
             "|---|" + "---|" * len(datasets)]
    for molecule in dict.fromkeys(r["molecule"] for r in rows):
        out = []
        for ds, _ in datasets:
            r = cells.get((molecule, ds))
            if r is None:
                out.append("")
            else:
                text = f"{1000 * r['energy_mae']:.0f} ({1000 * r['energy_residual_std']:.0f})"
                out.append(text + (f" / {1000 * r['forces_mae']:.0f}" if "forces_mae" in r else ""))
        lines.append(f"| {molecule} | " + " | ".join(out) + " |")
    return lines


def reproduce_command(card: Dict[str, Any]) -> str:
    """The `mfcalc train` line that made a card's model, with the flags that overrode the recipe."""
    flags = "".join(f" --{key.replace('_', '-')} {value}" for key, value in card.get("overrides", {}).items())
    return f"mfcalc train recipes/{card['recipe']}{flags}"


def card_markdown(name: str, recipe: Dict[str, Any], card: Dict[str, Any]) -> str:
    """A model card: data and splits, how it was trained, per-fidelity test errors."""
    lines = [
        f"# {name}",
        "",
        f"Trained with mfcalc {card['mfcalc_version']} (torch {card['torch_version']}) on "
        f"{card['machine']} in {card['training_minutes']:.1f} min "
        f"({card['epochs_run']} epochs, best validation at epoch {card['best_epoch']}), {card['date']}.",
        "",
        f"Reproduce: `{reproduce_command(card)}`"
        + (f", after training the checkpoint it starts from, `{card['start_from']['path']}` (weights checksum "
           f"{card['start_from']['checksum'][:12]})" if card.get("start_from") else ""),
        "",
        "## Data (fidelity = level of theory); splits are random with the seed shown",
        "",
        "| fidelity | file | energy unit in file | train | val | test | seed | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in recipe["datasets"]:
        if "split_by" in e:
            val_test = f"held-out {e['split_by']}s | held-out {e['split_by']}s"
            train = e.get("train", "rest")
        else:
            val_test = f"{e.get('val', 0)} | {e.get('test', 0)}"
            train = e.get("train", 0)
        lines.append(
            f"| {e['fidelity']} | `{Path(e['path']).name}` | {e.get('energy_unit', 'eV')} | "
            f"{train} | {val_test} | {e.get('seed', 0)} | {e.get('source', '')} |"
        )
    held = card.get("held_out") or {}
    if held:
        lines += ["", "Held out whole (every frame, every fidelity): "
                  + "; ".join(f"{name} ({len(v)}): " + ", ".join(v) for name, v in held.items()) + "."]
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
    rows = card.get("test_errors_by_dataset") or []
    if len(rows) > 1:
        def test_set(e):
            if e.get("split_by") == "name":
                return "held-out molecules"
            if e.get("train", 0) == 0:  # a test-only dataset: none of its frames is in training
                return "test-only dataset"
            return "held-out frames"

        kinds = {(Path(e["path"]).name, e["fidelity"]): test_set(e) for e in recipe["datasets"]}
        lines += ["", "### By dataset", "",
                  "Test set: **held-out molecules** where the dataset is split by name (every frame of those "
                  "molecules, at every fidelity, out of training), else **held-out frames** of molecules that "
                  "are in training; **test-only dataset**: a dataset none of whose frames is in training.", "",
                  "| dataset | fidelity | test set | n | energy MAE (meV) | energy MAE per atom (meV) | forces MAE (meV/Å) |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            f_mae = f"{1000 * r['forces_mae']:.1f}" if "forces_mae" in r else "-"
            lines.append(f"| `{r['dataset']}` | {r['fidelity']} | {kinds.get((r['dataset'], r['fidelity']), '-')} | {r['n']} | {1000 * r['energy_mae']:.2f} | "
                         f"{1000 * r['energy_mae_per_atom']:.2f} | {f_mae} |")
    by_molecule = card.get("test_errors_by_molecule") or []
    if by_molecule:
        lines += ["", "### Held-out molecules, one by one", "",
                  "Energy MAE in meV (in brackets: its spread within the molecule, offset removed) / "
                  "forces MAE in meV/Å where the data has forces.", ""] + molecule_table(by_molecule)
    start = card.get("start_from")
    if start:  # a start_from recipe has no model block: the network is the checkpoint's
        lines += ["", "## Model", "", f"The network of the checkpoint it continues from (`{start['path']}`):", "",
                  "```", json.dumps(start["network"]), "```", ""]
    else:
        lines += ["", "## Model", "", "```", json.dumps(recipe.get("model", {})), "```", ""]
    return "\n".join(lines)
