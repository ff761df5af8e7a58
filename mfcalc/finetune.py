"""Fine-tuning a trained model on a few new points, without forgetting the other fidelities.

    base model (exported file or checkpoint) -> [new fidelity row, initialised from the closest
    existing one] -> reference energies refitted on the new points -> training of the chosen
    weights (embedding / readout / full), optionally replaying old data -> drift report of every
    old fidelity (before vs after) -> a model file that still holds every fidelity.
"""

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch

from .data import Structure, count_by_fidelity, split_indices
from .forcefield import ForceField
from .model import ELEMENT_CONSTANTS
from .modelfile import ModelFileError, build_forcefield, export_model, load_checkpoint, load_model, save_checkpoint
from .training import TrainSettings, evaluate, refit_reference, to_graphs, train

STRATEGIES = {
    # which weights move (parameter-name prefixes of ForceField)
    "embedding": ["model.fidelity_embedding"],
    "readout": ["model.fidelity_embedding", "model.film", "model.readout", "model.layer_readout"],
    "full": [""],
}


@dataclass
class FinetuneResult:
    forcefield: ForceField
    metadata: Dict[str, Any]
    report: Dict[str, Any] = field(default_factory=dict)

    def calculator(self, path: Union[str, Path], **kwargs):
        """Export to ``path`` and return an MFCalculator on it."""
        from .calculator import MFCalculator

        export_model(self.forcefield, path, self.metadata)
        return MFCalculator(path, **kwargs)


def load_base(base: Union[str, Path]) -> tuple:
    """(eager ForceField, metadata) from an exported model file, a model name, or a checkpoint."""
    try:
        module, meta = load_model(base)
        forcefield = build_forcefield(meta["config"], module.state_dict())
    except ModelFileError:
        payload = load_checkpoint(base)
        card = json.loads(payload.get("card", "{}"))
        forcefield = build_forcefield(payload["config"], payload["state_dict"])
        meta = {"training_data": card.get("training_data", []), "test_errors": card.get("test_errors", {}),
                # the aliases and default fidelity that `mfcalc export` would write
                "aliases": card.get("aliases", {}),
                "default_fidelity": card.get("default_fidelity", payload["config"]["fidelities"][-1])}
    return forcefield.double(), meta


def add_fidelity(forcefield: ForceField, name: str, like: int) -> ForceField:
    """A copy of ``forcefield`` with one more fidelity whose embedding row and reference energies
    start as those of fidelity ``like``."""
    config = dict(forcefield.model.config)
    if name in config["fidelities"]:
        raise ValueError(f"fidelity {name!r} already exists; fine-tune it without --new-fidelity")
    config["fidelities"] = list(config["fidelities"]) + [name]
    grown = build_forcefield(config).to(next(forcefield.parameters()).dtype)
    state = forcefield.state_dict()
    for key, value in grown.state_dict().items():
        old = state[key]
        if old.shape == value.shape:
            value.copy_(old)
        else:  # the embedding table and the reference energies gain one row
            value[: old.shape[0]] = old
            value[old.shape[0]] = old[like]
    return grown


def add_elements(forcefield: ForceField, elements: Sequence[int]) -> ForceField:
    """A copy of ``forcefield`` that also knows ``elements``: each new element's embedding
    starts as the mean of the known ones, its reference energies at zero (refitted later)."""
    config = dict(forcefield.model.config)
    old = list(config["elements"])
    config["elements"] = sorted(set(old) | {int(z) for z in elements})
    grown = build_forcefield(config).to(next(forcefield.parameters()).dtype)
    state = forcefield.state_dict()
    where = [config["elements"].index(z) for z in old]
    for key, value in grown.state_dict().items():
        if key == "model.species_embedding.weight":
            value[:] = state[key].mean(dim=0)
            value[where] = state[key]
        elif key == "model.e0":
            value.zero_()
            value[:, where] = state[key]
        elif key != "species_of_z" and key.rsplit(".", 1)[-1] not in ELEMENT_CONSTANTS:
            value.copy_(state[key])
    return grown


def closest_fidelity(forcefield: ForceField, graphs, candidates: Sequence[int]) -> int:
    """The existing fidelity whose forces (or, for energy-only data, energies after removing a
    constant offset) best match the new data."""
    scores = []
    for f in candidates:
        probe = copy.deepcopy(graphs)
        for g in probe:
            g.fidelity = f
        errors = evaluate(forcefield, probe, forcefield.fidelities)[forcefield.fidelities[f]]
        scores.append(errors.get("forces_mae", errors["energy_residual_std"]))
    return int(candidates[int(np.argmin(scores))])


def finetune(
    base: Union[str, Path],
    data: Sequence[Structure],
    fidelity: str,
    new_fidelity: bool = False,
    strategy: str = "full",
    replay: Optional[Sequence[Structure]] = None,
    replay_val: Optional[Sequence[Structure]] = None,
    replay_fraction: float = 0.3,
    val_fraction: float = 0.2,
    settings: Optional[TrainSettings] = None,
    setting_overrides: Optional[Dict[str, Any]] = None,
    aliases: Optional[Dict[str, str]] = None,
    seed: int = 0,
    refit_reference_energies: Optional[bool] = None,
    log=print,
) -> FinetuneResult:
    """Fine-tune ``base`` on ``data`` (all at ``fidelity``). See the module docstring.

    ``replay``/``replay_val``: structures of the old fidelities, replayed during training and
    used for the drift report. With fewer than 10 points the number of epochs is chosen by
    k-fold cross-validation and the final model is trained on all points. The reference energies
    of ``fidelity`` are refitted on the new points when it is new (default), and kept when it
    already exists: its references then come from far more data than a few new points.
    ``settings`` replaces the protocol (``finetune_settings``) whole; ``setting_overrides``
    changes single settings of it (None values are ignored).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    if not data:
        raise ValueError("no data to fine-tune on")
    wrong = {s.fidelity for s in data} - {fidelity}
    if wrong:
        raise ValueError(f"every fine-tuning record must be at fidelity {fidelity!r}; found {sorted(wrong)}")
    forcefield, meta = load_base(base)
    base_state = {k: v.detach().clone() for k, v in forcefield.state_dict().items()}
    base_elements = list(forcefield.elements)
    new_elements = sorted({int(z) for s in data for z in s.numbers} - set(forcefield.elements))
    if new_elements:
        from ase.data import chemical_symbols

        log(f"adding element(s) {[chemical_symbols[z] for z in new_elements]} to the model")
        forcefield = add_elements(forcefield, new_elements)
    old_fidelities = list(forcefield.fidelities)
    if new_fidelity:
        graphs = to_graphs([replace(s, fidelity=old_fidelities[0]) for s in data], old_fidelities, forcefield.cutoff)
        like = closest_fidelity(forcefield, graphs, range(len(old_fidelities)))
        log(f"new fidelity {fidelity!r} starts from {old_fidelities[like]!r} (closest on the new data)")
        forcefield = add_fidelity(forcefield, fidelity, like)
    elif fidelity not in old_fidelities:
        raise ValueError(
            f"fidelity {fidelity!r} is not in the base model {old_fidelities}; "
            "pass new_fidelity=True (--new-fidelity) to add it"
        )
    index = forcefield.fidelities.index(fidelity)
    n = len(data)
    n_val = held_out_count(n, val_fraction)
    before = _drift_errors(forcefield, replay_val)
    graphs = to_graphs(data, forcefield.fidelities, forcefield.cutoff)
    if new_fidelity if refit_reference_energies is None else refit_reference_energies:
        shift = refit_reference(forcefield, graphs, index)
        log(f"reference energies of {fidelity!r} shifted by {np.round(shift.numpy(), 4).tolist()} eV per element")
    start = evaluate(forcefield, graphs, forcefield.fidelities)[fidelity].get("forces_mae")
    if start is not None:
        log(f"the base starts at a forces MAE of {1000 * start:.1f} meV/Å on these points")
    settings = settings or finetune_settings(n - n_val, strategy, seed=seed, start_forces_mae=start,
                                             **(setting_overrides or {}))
    log(describe_settings(settings, n, n_val))

    if n < 10:
        epochs = _epochs_by_kfold(forcefield, data, replay, replay_fraction, strategy, settings, seed, log,
                                  new_elements)
        train_set, val_set = list(data), []
        settings = replace(settings, epochs=epochs, patience=10**6)
    else:
        train_idx, val_idx = split_indices(n, [n - n_val, n_val], seed)
        train_set, val_set = [data[i] for i in train_idx], [data[i] for i in val_idx]
    result = _train(forcefield, train_set, val_set, replay, replay_fraction, strategy, settings, log, new_elements)
    after = _drift_errors(forcefield, replay_val)

    new_errors = evaluate(forcefield.double(), to_graphs(val_set, forcefield.fidelities, forcefield.cutoff),
                          forcefield.fidelities).get(fidelity, {}) if val_set else {}
    report = {
        "fidelity": fidelity, "new_fidelity": new_fidelity, "strategy": strategy, "points": n,
        "train": len(train_set), "val": len(val_set), "replay": count_by_fidelity(replay or []),
        "epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
        "settings": {k: v for k, v in vars(settings).items() if k != "fidelity_weights"},
        "start_forces_mae": start,
        "minutes": result["minutes"],
        "validation_errors": new_errors, "drift": _drift_table(before, after),
    }
    changed = changed_fidelities(base_state, base_elements, old_fidelities, forcefield.double())
    report["changed_fidelities"] = changed
    measured = {fidelity: _labelled(new_errors, f"fine-tuning validation set: {len(val_set)} of the {n} new "
                                                f"points, held out of the fine-tuning (random split, seed {seed})")}
    if replay_val:
        measured.update({name: _labelled(e, f"validation split of the base model's recipe ({e['n']} frames "
                                            "of that fidelity), after fine-tuning")
                         for name, e in after.items() if name in changed and name != fidelity})
    meta = dict(meta)
    meta["test_errors"], meta["base_test_errors"] = card_errors(
        meta.get("test_errors", {}), meta.get("base_test_errors", {}), changed,
        {k: v for k, v in measured.items() if v},
    )
    meta["training_data"] = list(meta.get("training_data", [])) + [
        {"fidelity": fidelity, "source": f"fine-tuning data: {n} points ({len(train_set)} trained on, "
                                         f"{len(val_set)} validation)", "train": len(train_set), "val": len(val_set)}
    ]
    meta["aliases"] = {**meta.get("aliases", {}), **(aliases or {})}
    meta["default_fidelity"] = meta.get("default_fidelity", fidelity)
    meta["finetune"] = meta.get("finetune", []) + [report]
    keep = {k: meta[k] for k in ("aliases", "default_fidelity", "training_data", "test_errors", "base_test_errors",
                                 "finetune") if k in meta and (meta[k] or k != "base_test_errors")}
    return FinetuneResult(forcefield.double().eval(), keep, report)


# --------------------------------------------------------------------------- the protocol
LEARNING_RATES = {"full": 5e-4, "readout": 4e-3, "embedding": 1e-2}  # per STRATEGIES entry
# the learning rate follows how far the base starts from the new points: its forces MAE on them
# over FAR_FORCES_MAE (eV/Å) scales LEARNING_RATES, down to LR_FLOOR of it (lr_factor). Measured
# (benchmarks/transfer.py few-shot, benchmarks/rmd17.py --base --finetune-lr), forces MAE meV/Å:
# - a base at 12 meV/Å on H2CO's CCSD(T) frames (seen at MP2 only), 10 points: 15.9 at lr 2e-3
#   (worse than it started), 9.5 at 5e-4, 6.2 at 2e-4; 25 points: 11.8, 6.5, 4.9;
# - chno-mf (128 meV/Å from benzene), 50 benzene points: 5.3 at 2e-3, 3.6 at 5e-4.
FAR_FORCES_MAE = 0.05
LR_FLOOR = 0.4
# weight of the squared per-atom energy error (eV/atom)^2 against the squared force error (eV/Å)^2
FINETUNE_ENERGY_WEIGHT = 10.0


def lr_factor(start_forces_mae: Optional[float]) -> float:
    """Learning-rate scale for a base whose forces MAE on the new points is ``start_forces_mae``
    (eV/Å; None without forces: 1)."""
    if start_forces_mae is None:
        return 1.0
    return float(np.clip(start_forces_mae / FAR_FORCES_MAE, LR_FLOOR, 1.0))


def finetune_settings(n_train: int, strategy: str = "full", seed: int = 0,
                      start_forces_mae: Optional[float] = None, **overrides: Any) -> TrainSettings:
    """The default fine-tuning protocol for ``n_train`` training points, chosen from the data size
    (the one place these defaults live; the command line passes only what the user set).

    One epoch is one pass over the points in batches of n/8 (2 to 16); the optimiser budget is
    250 steps per point, between 2,500 and 20,000 steps (few points need many passes, many points
    fewer); cosine learning rate from 5e-4 (full; 4e-3 readout, 1e-2 embedding) to 1% of it,
    scaled down (to 0.4 of it) for a base that already starts close to the points
    (``lr_factor``: its forces MAE on them, ``start_forces_mae``, over 0.05 eV/Å), EMA
    0.99, float64, and early stopping when the validation error has not improved for a quarter
    of the epochs. Measured on rMD17 (benchmarks/rmd17.py --base): with 100 steps per point at
    1e-3 both benzene and naphthalene (40 points) were still improving at the last epoch; with
    250 steps per point benzene reached 5.3 meV/Å at 2e-3 and 3.6 at 5e-4 (naphthalene at 5e-4:
    not measured)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    n_train = max(1, int(n_train))
    batch_size = int(np.clip(n_train // 8, 2, 16))
    steps_per_epoch = int(np.ceil(n_train / batch_size))
    total_steps = int(np.clip(250 * n_train, 2500, 20000))
    epochs = int(np.ceil(total_steps / steps_per_epoch))
    values = dict(
        epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
        lr=LEARNING_RATES[strategy] * lr_factor(start_forces_mae),
        lr_min_factor=0.01, weight_decay=0.0, ema_decay=0.99, patience=max(20, epochs // 4), seed=seed,
        energy_weight=FINETUNE_ENERGY_WEIGHT, dtype="float64", sampling_temperature=1.0,
    )
    unknown = set(overrides) - set(TrainSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown training setting(s) {sorted(unknown)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings(**values)


def held_out_count(n: int, val_fraction: float) -> int:
    """Validation points out of ``n``: none below 10 points (cross-validation instead), else
    ``val_fraction`` of them, at least 2."""
    return 0 if n < 10 else max(2, int(round(val_fraction * n)))



def describe_settings(settings: TrainSettings, n: int, n_val: int) -> str:
    split = (f"{n - n_val} to train on, {n_val} held out for validation and early stopping" if n_val
             else f"all {n} to train on (epochs chosen by cross-validation: fewer than 10 points)")
    return (f"fine-tuning on {n} points: {split}; batches of {settings.batch_size}, up to {settings.epochs} epochs "
            f"x {settings.steps_per_epoch} steps, lr {settings.lr:g} (cosine to {settings.lr * settings.lr_min_factor:g}), "
            f"stop after {settings.patience} epochs without improvement, {settings.dtype}")


# --------------------------------------------------------------------------- the card
def _labelled(errors: Dict[str, Any], measured_on: str) -> Dict[str, Any]:
    return {**errors, "measured_on": measured_on} if errors else {}


def _moved(before: torch.Tensor, after: torch.Tensor) -> bool:
    """True when a weight was trained (more than float32 rounding of a float64 value)."""
    before, after = before.double(), after.double()
    return bool(((after - before).abs() > 1e-6 * before.abs() + 1e-12).any())


def changed_fidelities(base_state: Dict[str, torch.Tensor], base_elements: Sequence[int],
                       old_fidelities: Sequence[str], forcefield: ForceField) -> list:
    """The old fidelities whose predictions for the base model's elements can differ from the
    base model's: all of them when a shared weight moved, else those whose own embedding row or
    reference energies moved. (New elements' rows only matter for structures the base could
    not compute, so they do not count.)"""
    state = forcefield.state_dict()
    columns = [list(forcefield.elements).index(z) for z in base_elements]
    n = len(old_fidelities)
    per_fidelity = {
        "model.e0": lambda t: t[:n][:, columns],
        "model.fidelity_embedding.weight": lambda t: t[:n],
    }
    for key, before in base_state.items():
        if key in per_fidelity or key == "species_of_z" or key.rsplit(".", 1)[-1] in ELEMENT_CONSTANTS:
            continue
        after = state[key][columns] if key == "model.species_embedding.weight" else state[key]
        if _moved(before, after):
            return list(old_fidelities)
    changed = []
    for k, name in enumerate(old_fidelities):
        if any(_moved(base_state[key][k], pick(state[key])[k]) for key, pick in per_fidelity.items()):
            changed.append(name)
    return changed


def card_errors(test_errors: Dict[str, Any], base_errors: Dict[str, Any], changed: Sequence[str],
                measured: Dict[str, Any]) -> tuple:
    """(test_errors, base_test_errors) of a fine-tuned model: the base's errors of every fidelity
    the fine-tuning changed move to ``base_test_errors`` (labelled "before fine-tuning"), the
    others stay; ``measured`` (errors labelled with what they were measured on) are added."""
    kept = {name: e for name, e in test_errors.items() if name not in changed}
    moved = dict(base_errors)
    for name in changed:
        if name in test_errors:
            label = test_errors[name].get("measured_on", "the base model's test set")
            moved[name] = {**test_errors[name], "measured_on": f"before fine-tuning: {label}"}
    kept.update(measured)
    return kept, moved


def _train(forcefield, train_set, val_set, replay, replay_fraction, strategy, settings, log, new_elements=()):
    structures = list(train_set) + list(replay or [])
    weights = None
    if replay:
        weights = np.concatenate([
            np.full(len(train_set), (1 - replay_fraction) / len(train_set)),
            np.full(len(replay), replay_fraction / len(replay)),
        ])
    trainable = list(STRATEGIES[strategy])
    table = forcefield.model.species_embedding.weight
    frozen = [i for i, z in enumerate(forcefield.elements) if z not in set(new_elements)]
    handle = None
    if new_elements and strategy != "full":
        # a new element's embedding row starts as the mean of the known ones: it must learn in
        # every strategy, while the rows of the known elements stay exactly as they were
        trainable.append("model.species_embedding")
        keep = table.detach().clone()
        mask = torch.ones_like(table)
        mask[frozen] = 0.0
        handle = table.register_hook(lambda grad: grad * mask.to(grad.dtype))
    try:
        return train(forcefield, structures, val_set, settings, log=log, fit_references=False,
                     trainable=trainable, sample_weights=weights)
    finally:
        if handle is not None:
            handle.remove()
            with torch.no_grad():  # weight decay or EMA must not have moved the known rows either
                table[frozen] = keep[frozen].to(table.dtype)


def _epochs_by_kfold(forcefield, data, replay, replay_fraction, strategy, settings, seed, log,
                     new_elements=()) -> int:
    k = min(len(data), 5)
    order = np.random.default_rng(seed).permutation(len(data))
    best = []
    for fold in range(k):
        val_idx = order[fold::k]
        train_idx = np.setdiff1d(order, val_idx)
        trial = copy.deepcopy(forcefield)
        r = _train(trial, [data[i] for i in train_idx], [data[i] for i in val_idx], replay, replay_fraction,
                   strategy, settings, lambda *a: None, new_elements)
        best.append(r["best_epoch"] + 1)
    epochs = int(np.median(best))
    log(f"{k}-fold cross-validation on {len(data)} points: best after {best} epochs -> {epochs}")
    return max(epochs, 1)


def _drift_errors(forcefield: ForceField, structures) -> Dict[str, Dict[str, float]]:
    if not structures:
        return {}
    probe = copy.deepcopy(forcefield).double()
    return evaluate(probe, to_graphs(structures, probe.fidelities, probe.cutoff), probe.fidelities)


def _drift_table(before, after) -> Dict[str, Dict[str, float]]:
    table = {}
    for name, b in before.items():
        a = after.get(name, {})
        row = {"energy_mae_before": b["energy_mae"], "energy_mae_after": a.get("energy_mae")}
        if "forces_mae" in b:
            row.update(forces_mae_before=b["forces_mae"], forces_mae_after=a.get("forces_mae"))
        table[name] = row
    return table


OUTPUT_FILES = ("model.pt", "checkpoint.pt", "finetune.json")


def check_output_dir(out_dir: Union[str, Path], force: bool = False) -> Path:
    """Check before any work that ``out_dir`` may receive a fine-tuned model: never a model
    directory shipped with mfcalc, and one that already holds a model only with ``force``."""
    from .workflows import refuse_shipped_model

    out = Path(out_dir).expanduser()
    refuse_shipped_model(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {str(out_dir)!r} is a file; fine-tuning writes a directory "
                                 f"({', '.join(OUTPUT_FILES)})")
    there = [name for name in OUTPUT_FILES if (out / name).exists()]
    if there and not force:
        raise FileExistsError(f"output directory {str(out_dir)!r} already holds {', '.join(there)}; pass --force "
                              "to overwrite them, or choose another -o")
    return out


def save_finetuned(result: FinetuneResult, out_dir: Union[str, Path], force: bool = True) -> Path:
    """model.pt (every fidelity), checkpoint.pt and finetune.json in ``out_dir``. A model
    directory shipped with mfcalc is never overwritten; ``force=False`` also refuses a directory
    that already holds a model."""
    out = check_output_dir(out_dir, force=force)
    out.mkdir(parents=True, exist_ok=True)
    export_model(result.forcefield, out / "model.pt", result.metadata)
    save_checkpoint(out / "checkpoint.pt", result.forcefield, card=json.dumps(result.metadata))
    (out / "finetune.json").write_text(json.dumps(result.report, indent=1))
    return out / "model.pt"
