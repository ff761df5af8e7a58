"""The `mfcalc` command line.

Commands (``mfcalc COMMAND --help`` for each):

- ``train RECIPE``: train a model from a YAML/TOML recipe (also under torchrun)
- ``export CHECKPOINT -o MODEL.pt``: write a TorchScript model file from a checkpoint
  (``export MODEL --format metatomic -o FILE``: a metatomic file with every fidelity)
- ``info [MODEL]``: fidelities, aliases, elements, cutoff, and test errors with what each was measured on
- ``evaluate [MODEL] --recipe RECIPE``: per-fidelity errors of a model on a recipe's split
- ``md STRUCTURE --model MODEL``: Langevin MD at a chosen fidelity, stopped with a reason if it goes unphysical
- ``sample STRUCTURE --model MODEL``: MD at a cheap fidelity, then diverse picks to label
- ``relax STRUCTURE --model MODEL``: geometry optimisation with a summary table
- ``vib STRUCTURE --model MODEL``: harmonic frequencies (ase.vibrations and phonopy)
- ``label STRUCTURES --method METHOD``: quantum-chemistry labels with PySCF (resumable; ``--dask`` for a cluster)
- ``ipi [MODEL] --fidelity F --structure S --address ADDR [--unix]``: an i-PI force client
- ``finetune BASE DATA -o DIR``: fine-tune a model on a few new points, keeping every fidelity

Every command exits 0 on success and 1 with one line ``mfcalc COMMAND: error: ...`` otherwise
(bad arguments included); ``--debug`` or ``MFCALC_DEBUG=1`` shows the traceback instead. Commands
that write a file refuse an existing one unless ``--force`` and never write into a model directory
shipped with mfcalc.
"""

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np

from .autocompile import compile_word
from .modelfile import DEFAULT_MODEL

# optional extras of pyproject.toml: the module a command imports -> the extra that installs it
EXTRAS = {"pyscf": "qm", "rdkit": "data", "tblite": "data", "torch_cluster": "cluster", "matplotlib": "test",
          "metatomic": "ecosystem", "metatomic_ase": "ecosystem", "metatensor": "ecosystem", "ipi": "ecosystem",
          "dask": "ecosystem", "distributed": "ecosystem"}
# what an error of these types says is the whole story: printed as it is
PLAIN_ERRORS = (ValueError, RuntimeError, ArithmeticError, OSError, KeyError)


class UsageError(Exception):
    """A command line argparse cannot accept; ``prog`` is the (sub)command it belongs to."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse without abbreviated flags (``--step`` is not ``--steps``), whose errors are one
    line (raised as UsageError and printed by :func:`main`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(self.prog, f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------- argument types
def _number(text: str, kind, name: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(kind, ok, description: str, expected: str):
    """An argparse type: a ``kind`` number for which ``ok(value)`` holds, else 'must be ...'."""
    def parse(text: str):
        value = _number(text, kind, expected)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text}")
        return value
    return parse


positive_int = _bounded(int, lambda v: v >= 1, "a positive integer", "a positive integer")
nonnegative_int = _bounded(int, lambda v: v >= 0, "an integer >= 0", "an integer >= 0")
positive_float = _bounded(float, lambda v: v > 0, "a positive number", "a positive number")
nonnegative_float = _bounded(float, lambda v: v >= 0, ">= 0", "a number >= 0")
fraction = _bounded(float, lambda v: 0 <= v < 1, "in [0, 1)", "a number in [0, 1)")


# ---------------------------------------------------------------- shared checks
def _model_of(args: argparse.Namespace) -> str:
    """The model of a command that takes it positionally or with --model (not both)."""
    positional, option = getattr(args, "model_pos", None), args.model
    if positional is not None and option is not None and positional != option:
        raise ValueError(f"two models given ({positional!r} and --model {option!r}); give one")
    return positional or option or DEFAULT_MODEL


def _check_structure_output(path: Optional[str], force: bool) -> None:
    """A structure file ``path`` that ASE can write and read back, checked before any work."""
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    from .workflows import check_output

    if path is None:
        return
    try:
        fmt = filetype(path, read=False)
    except UnknownFileTypeError:
        fmt = None
    io = ioformats.get(fmt)
    if io is None or not (io.can_read and io.can_write):
        raise ValueError(f"--out {path!r}: ASE cannot write and read back a structure in "
                         f"{Path(path).suffix or 'a file without a suffix'!r}; use e.g. .xyz, .extxyz, .traj, .cif, .vasp")
    check_output(path, force=force, what="--out")


def _say(text: str) -> None:
    """A progress note on stderr (stdout stays for results)."""
    print(text, file=sys.stderr, flush=True)


def _cmd_train(args: argparse.Namespace) -> None:
    from .recipe import finish_run, run_recipe

    if args.finish:
        finish_run(args.recipe, output=args.output)
        return
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

    from .workflows import check_output

    check_output(args.output, force=args.force, suffixes=(".pt",), what="-o")
    if args.format == "metatomic":
        _export_metatomic(args)
        return
    fidelities = _export_mfcalc(args.checkpoint, args.output, args, getattr(torch, args.dtype or "float64"))
    print(f"wrote {args.output}: fidelities {fidelities}")


def _export_metatomic(args: argparse.Namespace) -> None:
    """``export MODEL --format metatomic``: MODEL is an exported model (name, directory or .pt)
    or a checkpoint (exported to mfcalc's format in a temporary file first)."""
    import tempfile

    import torch

    from .metatomic import export_metatomic
    from .modelfile import ModelFileError, load_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.load's note on a TorchScript file
        try:
            load_checkpoint(args.checkpoint)
            is_checkpoint = True
        except ModelFileError:  # an exported model (or nothing: export_metatomic says so)
            is_checkpoint = False
    if is_checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            mfcalc_file = Path(tmp) / "model.pt"
            _export_mfcalc(args.checkpoint, mfcalc_file, args, torch.float64)
            variants = export_metatomic(mfcalc_file, args.output, dtype=dtype or torch.float64)
    else:
        if args.aliases or args.default_fidelity:
            raise ValueError("--aliases and --default-fidelity apply to a checkpoint; this is an exported "
                             f"model ({args.checkpoint}), whose own are kept")
        variants = export_metatomic(args.checkpoint, args.output, dtype=dtype)
    print(f"wrote {args.output} (metatomic): outputs 'energy' and, per fidelity, 'energy/<variant>':")
    for variant, name in variants.items():
        print(f"  {variant:24s} {name}")


def _export_mfcalc(checkpoint: str, output, args: argparse.Namespace, dtype) -> list:
    """The mfcalc model file of a checkpoint, with the card's and the command line's metadata."""
    from .modelfile import build_forcefield, export_model, load_checkpoint

    payload = load_checkpoint(checkpoint)
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
    export_model(forcefield, output, meta, dtype=dtype)
    return payload["config"]["fidelities"]


def _cmd_info(args: argparse.Namespace) -> None:
    from ase.data import chemical_symbols

    from .modelfile import load_model

    _, meta = load_model(_model_of(args))
    if args.json:
        print(json.dumps(meta, indent=1))
        return
    print(f"model        {meta['path']}")
    print(f"mfcalc       {meta['mfcalc_version']} (format {meta['format_version']}), dtype {meta['dtype']}")
    print(f"cutoff       {meta['cutoff']} Å")
    print(f"elements     {' '.join(chemical_symbols[z] for z in meta['elements'])}")
    print(f"default      {meta['default_fidelity']}")
    print("fidelities   (test errors are MAE; each says what it was measured on: 'held-out molecules' = every "
          "frame of molecules never trained on, 'held-out frames' = random frames of molecules also in training)")
    card = _card_beside(meta)
    base_errors = meta.get("base_test_errors", {})
    for name in meta["fidelities"]:
        aliases = [a for a, t in meta.get("aliases", {}).items() if t == name]
        alias_text = f" (alias {', '.join(aliases)})" if aliases else ""
        print(f"  - {name}{alias_text}")
        for line in fidelity_error_lines(meta, card, name):
            print(f"      {line}")
        if name in base_errors:
            e = base_errors[name]
            print(f"      not this model: {_error_text(e)} ({e['measured_on']}; changed by fine-tuning since)")
    for entry in meta.get("training_data", []):
        print(f"data         {entry.get('fidelity')}: {entry.get('source', entry.get('path'))}")


def _card_beside(meta: dict) -> Optional[dict]:
    """The training card (card.json) next to the model file, if it belongs to this very model
    (same test errors); it holds the errors per dataset that the file's metadata pools."""
    path = Path(meta["path"]).parent / "card.json"
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return card if card.get("test_errors") == meta.get("test_errors") else None


def _error_text(e: dict) -> str:
    text = f"E MAE {1000 * e['energy_mae']:.2f} meV"
    if "forces_mae" in e:
        text += f", F MAE {1000 * e['forces_mae']:.1f} meV/Å"
    return text


def held_out_kind(entry: dict) -> Optional[str]:
    """What the test split of one training-data entry is, or None if it has none."""
    if "split_by" in entry:
        key = entry["split_by"]
        return "held-out molecules" if key == "name" else f"held-out {key}s"
    if isinstance(entry.get("test"), int) and entry["test"] > 0:
        return "held-out frames"
    return None


def _dataset_name(entry: dict) -> str:
    return Path(str(entry.get("path", entry.get("source", "?")))).name


def fidelity_error_lines(meta: dict, card: Optional[dict], name: str) -> List[str]:
    """The test errors of fidelity ``name``, one line per number, each naming its test set: the
    pooled number, and (from the training card, when there is one) each dataset's own."""
    e = meta.get("test_errors", {}).get(name)
    if not e:
        return []
    if "measured_on" in e:  # written by fine-tuning
        return [f"{_error_text(e)}  [measured on: {e['measured_on']}, n={e['n']}]"]
    entries = [d for d in meta.get("training_data", []) if d.get("fidelity") == name and held_out_kind(d)]
    if len(entries) <= 1:
        where = (f"{held_out_kind(entries[0])} of {_dataset_name(entries[0])}" if entries
                 else "test split (its datasets are not recorded)")
        return [f"{_error_text(e)}  [test: {where}, n={e['n']}]"]
    rows = {r["dataset"]: r for r in (card or {}).get("test_errors_by_dataset", []) if r.get("fidelity") == name}
    parts = []
    for d in entries:
        row = rows.get(_dataset_name(d))
        n = row["n"] if row else d.get("test")
        parts.append((f"{held_out_kind(d)} of {_dataset_name(d)}" + (f", n={n}" if n else ""), row))
    lines = [f"{_error_text(e)}  [test: all {e['n']} test frames pooled = " + " + ".join(p for p, _ in parts) + "]"]
    lines += [f"{_error_text(row)}  [test: {label}]" for label, row in parts if row]
    return lines


def thread_count(text: str):
    """--threads: 'auto' or a positive integer."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive integer, got {text!r}")
    return value


def compile_choice(text: str):
    """--compile auto|yes|no -> "auto", True, False."""
    value = compile_word(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"must be auto, yes or no, got {text!r}")
    return value


def _cmd_md(args: argparse.Namespace) -> None:
    from .workflows import run_md

    run_md(
        args.structure, model=args.model, fidelity=args.fidelity, temperature=args.temperature,
        steps=args.steps, timestep=args.timestep, out=args.out, seed=args.seed, interval=args.interval,
        dtype=args.dtype, device=args.device, compile=args.compile, overwrite=args.force,
        check_geometry=not args.no_guard, threads=args.threads, committee=args.committee,
    )


def _cmd_sample(args: argparse.Namespace) -> None:
    from ase.io import write

    from .sampling import sample
    from .workflows import check_output, read_structure

    structure, model = _sample_inputs(args)
    check_output(args.out, force=args.force, suffixes=(".xyz", ".extxyz"), what="--out")
    frames = sample(
        read_structure(structure), model=model, fidelity=args.fidelity, n=args.n,
        temperature=args.temperature, steps=args.steps, timestep=args.timestep,
        interval=args.interval, select=args.select, seed=args.seed, dtype=args.dtype, device=args.device,
        threads=args.threads,
    )
    write(args.out, frames, format="extxyz")
    print(f"wrote {len(frames)} structures ({args.select} from MD at {frames[0].info['sampled_fidelity']}, "
          f"{args.temperature:g} K) to {args.out}; label them with: mfcalc label {args.out} --method ...")


def _sample_inputs(args: argparse.Namespace) -> tuple:
    """(structure, model) of `sample STRUCTURE [--model M]`, or of the deprecated `sample MODEL STRUCTURE`."""
    if len(args.inputs) == 1:
        return args.inputs[0], args.model or DEFAULT_MODEL
    if len(args.inputs) > 2:
        raise ValueError(f"sample takes one STRUCTURE (and --model MODEL), got {args.inputs}")
    model, structure = args.inputs
    if args.model is not None:
        raise ValueError(f"two models given ({model!r} and --model {args.model!r}); "
                         f"use: mfcalc sample {structure} --model MODEL")
    _say(f"mfcalc sample: warning: 'mfcalc sample MODEL STRUCTURE' is deprecated and will be removed in the "
         f"next release; use 'mfcalc sample {structure} --model {model}'")
    return structure, model


def _cmd_relax(args: argparse.Namespace) -> None:
    from ase.io import write

    from .calculator import MFCalculator
    from .workflows import read_structure, relax

    _check_structure_output(args.out, args.force)  # before the work, not after it
    atoms = read_structure(args.structure)
    atoms.calc = MFCalculator(args.model, fidelity=args.fidelity, dtype=args.dtype, device=args.device,
                              threads=args.threads)
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
    calc = MFCalculator(args.model, dtype="float64", device=args.device, threads=args.threads)
    fidelities = args.fidelity or [calc.fidelity]
    for fid in fidelities:  # every name checked before the first (long) computation
        calc.fidelity = fid
    table = {}
    calls = 2 * 3 * len(atoms)
    for fid in fidelities:
        calc.fidelity = fid
        trial = atoms.copy()
        trial.calc = calc
        what = "" if args.no_relax else f"relaxing to fmax {args.fmax:g} eV/Å, then "
        _say(f"vib {atoms.get_chemical_formula()} at {calc.fidelity}: {what}{calls} displaced force calls for "
             f"ase.vibrations and {calls} for phonopy (float64; tens of seconds)...")
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
    from .finetune import check_output_dir, finetune, save_finetuned
    from .recipe import READERS, load_datasets, read_recipe

    check_output_dir(args.output, force=args.force)  # before the training, not after it
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

    # the protocol for the data size (mfcalc.finetune.finetune_settings), changed only where a flag was given
    overrides = dict(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                     lr=args.lr, patience=args.patience)
    result = finetune(args.base, data, args.fidelity, new_fidelity=args.new_fidelity, strategy=args.strategy,
                      replay=replay, replay_val=replay_val, replay_fraction=args.replay_fraction, aliases=aliases,
                      setting_overrides=overrides, seed=args.seed, val_fraction=args.val_fraction)
    path = save_finetuned(result, args.output, force=args.force)
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
                     threads_per_worker=args.threads, density_fit=args.density_fit, dask=args.dask,
                     dask_workers=args.dask_workers)
    print(f"{len(labelled)} of {len(structures)} structures labelled at {args.method} in {args.out}")
    if len(labelled) < len(structures):
        raise RuntimeError(f"{len(structures) - len(labelled)} structures failed; run again to retry them")


def _cmd_ipi(args: argparse.Namespace) -> None:
    from .ipi import run_client
    from .workflows import read_structure

    if args.unix and args.port is not None:
        raise ValueError("--port is for a TCP socket; a UNIX socket (--unix) is named by --address alone")
    atoms = read_structure(args.structure)
    calls = run_client(atoms, _model_of(args), args.fidelity, args.address, unix=args.unix,
                       port=args.port or 31415, timeout=args.timeout, dtype=args.dtype, device=args.device,
                       threads=args.threads)
    _say(f"mfcalc ipi: i-PI closed the connection after {calls} force calls")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .finetune import load_base
    from .recipe import load_datasets, read_recipe
    from .training import evaluate, to_graphs

    model = _model_of(args)
    forcefield, _ = load_base(model)
    recipe_path = Path(args.recipe).resolve()
    structures = load_datasets(read_recipe(recipe_path), recipe_path.parent)[args.split]
    known = set(forcefield.fidelities)
    structures = [s for s in structures if s.fidelity in known]
    errors = evaluate(forcefield, to_graphs(structures, forcefield.fidelities, forcefield.cutoff), forcefield.fidelities)
    if args.json:
        print(json.dumps(errors, indent=1))
        return
    print(f"{args.split} split of {recipe_path.name}, model {model}")
    print("| fidelity | n | energy MAE (meV) | energy RMSE (meV) | forces MAE (meV/Å) | forces RMSE (meV/Å) |")
    print("|---|---|---|---|---|---|")
    for name, e in errors.items():
        f = f"{1000 * e['forces_mae']:.1f} | {1000 * e['forces_rmse']:.1f}" if "forces_mae" in e else "- | -"
        print(f"| {name} | {e['n']} | {1000 * e['energy_mae']:.2f} | {1000 * e['energy_rmse']:.2f} | {f} |")


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error (also MFCALC_DEBUG=1)")
    parser = Parser(prog="mfcalc", description="multi-fidelity ML potentials", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    def threads(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=thread_count, default="auto",
                       help="torch threads per force call: 'auto' (default: 1 below 24 atoms, else the "
                            "free cores) or a number")

    def force(p: argparse.ArgumentParser) -> None:
        p.add_argument("--force", action="store_true", help="overwrite an existing output (never a shipped model)")

    p = command("train", "train a model from a YAML/TOML recipe")
    p.add_argument("recipe")
    p.add_argument("-o", "--output", help="output directory (default: the recipe's)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--steps-per-epoch", type=positive_int)
    p.add_argument("--max-minutes", type=positive_float)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/train_state.pt")
    p.add_argument("--finish", action="store_true",
                   help="only write model.pt, card.json and README.md of a run whose training ended (OUTPUT/checkpoint.pt)")
    p.add_argument("--meta", choices=["none", "reptile"], help="meta-learned pretraining (fidelities as tasks)")
    p.set_defaults(func=_cmd_train)

    p = command("export", "write a TorchScript model file from a checkpoint (or a metatomic file of a model)")
    p.add_argument("checkpoint", help="checkpoint; with --format metatomic also an exported model (name or .pt)")
    p.add_argument("-o", "--output", required=True, help="model file (.pt)")
    p.add_argument("--format", choices=["mfcalc", "metatomic"], default="mfcalc",
                   help="mfcalc (default): mfcalc's own model file; metatomic: a metatomic AtomisticModel "
                        "with every fidelity as an 'energy/<variant>' output, for LAMMPS, i-PI, ASE, TorchSim "
                        "(needs pip install 'mfcalc[ecosystem]')")
    p.add_argument("--dtype", choices=["float32", "float64"],
                   help="default float64 (metatomic from an exported model: that model's own)")
    p.add_argument("--aliases", help='JSON, e.g. \'{"CCSD(T)": "CCSD(T)/cc-pVTZ"}\'')
    p.add_argument("--default-fidelity")
    force(p)
    p.set_defaults(func=_cmd_export)

    p = command("label", "quantum-chemistry labels with PySCF (resumable)")
    p.add_argument("structures", help="any file ASE reads; every frame is labelled")
    p.add_argument("--method", required=True, help='METHOD/BASIS, e.g. "CCSD(T)/cc-pVDZ", "PBE/def2-SVP"')
    p.add_argument("--forces", action="store_true", help="analytic gradients too")
    p.add_argument("--out", required=True, help="extxyz, appended one finished structure at a time (a rerun resumes)")
    p.add_argument("--fidelity", help="fidelity name written to the records (default: the method)")
    p.add_argument("--charge", type=int, default=0)
    p.add_argument("--spin", type=nonnegative_int, default=0, help="2S (number of unpaired electrons)")
    p.add_argument("--workers", type=positive_int, default=1, help="structures computed in parallel")
    p.add_argument("--threads", type=positive_int, default=1, help="PySCF threads per worker")
    p.add_argument("--dask", metavar="ADDRESS",
                   help="run the structures on a Dask cluster: a scheduler address (tcp://host:8786, e.g. from "
                        "dask-jobqueue's SLURMCluster) or 'local' (a LocalCluster here); same output and resume")
    p.add_argument("--dask-workers", type=positive_int,
                   help="worker processes of --dask local (default: --workers)")
    p.add_argument("--density-fit", action="store_true",
                   help="RI-J for DFT (ORCA's default for GGAs); RI-JK + RI-MP2 for MP2 energies "
                        "(PySCF's default auxiliary basis sets)")
    p.set_defaults(func=_cmd_label)

    p = command("finetune", "fine-tune a model on a few new points, keeping every fidelity")
    p.add_argument("base", help="model name, exported .pt or checkpoint")
    p.add_argument("data", help="labelled structures")
    p.add_argument("--fidelity", required=True, help="level of theory of DATA")
    p.add_argument("--new-fidelity", action="store_true", help="add FIDELITY as a new level of theory")
    p.add_argument("--strategy", choices=["embedding", "readout", "full"], default="full")
    p.add_argument("--format", choices=["extxyz", "gdml", "ase-db", "transition1x"], default="extxyz")
    p.add_argument("--energy-unit", help="energy unit of DATA (default: the reader's)")
    p.add_argument("--replay", help="recipe of the base model: its data is replayed and its validation split drives the drift report")
    p.add_argument("--replay-size", type=positive_int, default=500)
    p.add_argument("--replay-fraction", type=fraction, default=0.3)
    p.add_argument("--aliases", help='JSON, e.g. \'{"CC": "CCSD(T)/cc-pVDZ"}\'')
    p.add_argument("--val-fraction", type=fraction, default=0.2,
                   help="share of the points held out for validation and early stopping (none below 10 points)")
    p.add_argument("--epochs", type=positive_int, help="default: from the data size (250 steps per point, 2.5k-20k)")
    p.add_argument("--steps-per-epoch", type=positive_int, help="default: one pass over the points")
    p.add_argument("--batch-size", type=positive_int, help="default: points/8, between 2 and 16")
    p.add_argument("--lr", type=positive_float, help="default: 5e-4 full, 4e-3 readout, 1e-2 embedding, scaled down to 0.4x for a base that starts within 0.05 eV/Å of the points")
    p.add_argument("--patience", type=positive_int, help="default: a quarter of the epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="output directory (not a shipped model's)")
    force(p)
    p.set_defaults(func=_cmd_finetune)

    p = command("ipi", "an i-PI force client (path-integral MD and more, driven by i-PI) at one fidelity")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model name or file (or --model)")
    p.add_argument("--model", help=f"model name or file (default {DEFAULT_MODEL})")
    p.add_argument("--fidelity", help="level of theory (default: the model's)")
    p.add_argument("--structure", required=True,
                   help="the structure i-PI starts from (any file ASE reads, or a molecule name): its atomic "
                        "numbers and pbc; i-PI sends positions and cell")
    p.add_argument("--address", default="localhost",
                   help="i-PI's <address>: a host for TCP (default localhost), a socket name with --unix")
    p.add_argument("--unix", action="store_true", help="UNIX socket /tmp/ipi_ADDRESS (i-PI's mode='unix')")
    p.add_argument("--port", type=positive_int, help="TCP port (default 31415)")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds to wait for i-PI's socket")
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--device", default="auto")
    threads(p)
    p.set_defaults(func=_cmd_ipi)

    p = command("evaluate", "per-fidelity errors of a model on a recipe's split")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model name or file (or --model)")
    p.add_argument("--model", help=f"model name or file (default {DEFAULT_MODEL})")
    p.add_argument("--recipe", required=True)
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = command("info", "fidelities, elements, cutoff and test errors (with their test sets) of a model")
    p.add_argument("model_pos", nargs="?", metavar="MODEL", help="model name or file (or --model)")
    p.add_argument("--model", help=f"model name or file (default {DEFAULT_MODEL})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = command("md", "Langevin MD of a structure at a chosen fidelity")
    p.add_argument("structure", help="any file ASE reads, or a molecule name (e.g. CH3CH2OH)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--fidelity")
    p.add_argument("--temperature", type=nonnegative_float, default=300.0, help="K")
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--timestep", type=positive_float, default=0.5, help="fs")
    p.add_argument("--interval", type=positive_int, default=10, help="MD steps between written frames")
    p.add_argument("--out", default="md.traj", help="trajectory: .traj (ASE), .xyz or .extxyz (extended XYZ)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--device", default="auto")
    threads(p)
    p.add_argument("--compile", nargs="?", const=True, default=None, type=compile_choice,
                   metavar="{auto,yes,no}",
                   help="force path: 'auto' (default) runs TorchScript at once and switches small molecules "
                        "to a graph compiled in the background; bare --compile or 'yes' compiles before the "
                        "first step (~30-40 s, then ~4x fewer ms per step on CPU); 'no': TorchScript only")
    p.add_argument("--no-guard", action="store_true",
                   help="let bonds break and atoms leave (the energy, force and temperature checks stay on)")
    p.add_argument("--committee", action="store_true",
                   help="--model is a committee (a folder with committee.json, e.g. ethanol-mf): MD on the mean "
                        "of its members; each written frame records their max_force_deviation (eV/Å)")
    force(p)
    p.set_defaults(func=_cmd_md)

    p = command("sample", "diverse structures to label: MD at a cheap fidelity, farthest-point picks")
    p.add_argument("inputs", nargs="+", metavar="STRUCTURE",
                   help="any file ASE reads, or a molecule name (e.g. CH3CH2OH); the old form "
                        "'sample MODEL STRUCTURE' still works this release (deprecated)")
    p.add_argument("--model", help=f"model name or file (default {DEFAULT_MODEL})")
    p.add_argument("--fidelity", help="level of theory driving the MD (a cheap one)")
    p.add_argument("-n", type=positive_int, default=50, help="structures to pick")
    p.add_argument("--select", choices=["fps", "spread", "committee"], default="fps",
                   help="farthest-point on a structure descriptor ('fps'), weighted by cross-fidelity spread "
                        "('spread'), or by the disagreement of a committee ('committee': --model is a folder "
                        "with committee.json, e.g. ethanol-mf; the MD runs with its first member)")
    p.add_argument("--temperature", type=nonnegative_float, default=500.0, help="K")
    p.add_argument("--steps", type=positive_int, help="MD steps (default: a pool of 10 n frames)")
    p.add_argument("--interval", type=positive_int, default=10, help="MD steps between pool frames")
    p.add_argument("--timestep", type=positive_float, default=0.5, help="fs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="extxyz (.xyz or .extxyz) for mfcalc label")
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--device", default="auto")
    threads(p)
    force(p)
    p.set_defaults(func=_cmd_sample)

    p = command("relax", "geometry optimisation with a summary table")
    p.add_argument("structure")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--fidelity")
    p.add_argument("--fmax", type=positive_float, default=1e-3, help="eV/Å")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--optimizer", nargs="+", default=["BFGS"], choices=["BFGS", "FIRE", "LBFGS"])
    p.add_argument("--cell", action="store_true", help="relax the cell too (periodic structures)")
    p.add_argument("--out", help="write the relaxed structure here (checked before the relaxation)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--device", default="auto")
    threads(p)
    force(p)
    p.set_defaults(func=_cmd_relax)

    p = command("vib", "harmonic frequencies (ase.vibrations and phonopy) at one or more fidelities")
    p.add_argument("structure")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--fidelity", action="append", help="repeat to compare fidelities side by side")
    p.add_argument("--fmax", type=positive_float, default=1e-4)
    p.add_argument("--no-relax", action="store_true")
    p.add_argument("--device", default="auto")
    threads(p)
    p.set_defaults(func=_cmd_vib)
    return parser


def one_line(err: BaseException) -> str:
    """What went wrong, on one line, with what to do for a missing optional package."""
    if isinstance(err, ImportError):
        name = (err.name or "").split(".")[0]
        if name in EXTRAS:
            return (f"this needs the optional package {name!r}, which is not installed; install it with: "
                    f"pip install 'mfcalc[{EXTRAS[name]}]'")
        return f"{err}; a required package is missing or broken: reinstall mfcalc (pip install mfcalc)"
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__
    if isinstance(err, PLAIN_ERRORS):
        return text
    return f"{type(err).__name__}: {text} (run with --debug or MFCALC_DEBUG=1 for the traceback)"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"mfcalc: warning: {message}\n"


def _close_flags(flag: str, known: List[str]) -> List[str]:
    """The flags ``flag`` abbreviates, or else the one it most likely misspells."""
    import difflib

    return [k for k in known if k.startswith(flag)] or difflib.get_close_matches(flag, known, n=1, cutoff=0.75)


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The parsed command line; an unknown flag is blamed on its command, with the close match."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = sub.choices[args.command]
        known = [o for o in command._option_string_actions if o.startswith("--")]
        close = [m for x in extra if x.startswith("-") for m in _close_flags(x.split("=")[0], known)]
        hint = f"; did you mean {', '.join(close)}? (flags are never abbreviated)" if close else ""
        raise UsageError(command.prog, f"unrecognized arguments: {' '.join(extra)}{hint} (see '{command.prog} --help')")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = parse(argv)
    except UsageError as err:
        print(f"{err.prog}: error: {err}", file=sys.stderr)
        return 1
    debug = getattr(args, "debug", False) or os.environ.get("MFCALC_DEBUG", "") not in ("", "0")
    formatwarning = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _one_line_warning
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("mfcalc: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the command line's one-line error for every failure
        if debug:
            raise
        print(f"mfcalc {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning
    return 0


if __name__ == "__main__":
    sys.exit(main())
