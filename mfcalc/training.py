"""Training on several levels of theory at once.

structures -> fixed pair lists -> batches mixed across fidelities (temperature sampling) ->
loss on energies (per atom) and forces, each fidelity weighted -> AdamW + cosine schedule + EMA
weights -> best-on-validation checkpoint -> per-fidelity test errors -> exported model.
"""

import copy
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .batching import flat_batch
from .data import Structure, count_by_fidelity
from .forcefield import ForceField
from .neighbors import neighbor_list


@dataclass
class Graph:
    """A structure as tensors, with its pair list computed once."""

    numbers: torch.Tensor
    positions: torch.Tensor
    cell: torch.Tensor
    edge_index: torch.Tensor
    shifts: torch.Tensor
    fidelity: int
    energy: float
    forces: Optional[torch.Tensor]
    periodic: bool = False


def to_graphs(
    structures: Sequence[Structure], fidelities: List[str], cutoff: float
) -> List[Graph]:
    index = {name: k for k, name in enumerate(fidelities)}
    graphs = []
    for s in structures:
        if s.fidelity not in index:
            raise ValueError(f"structure has fidelity {s.fidelity!r}; the model has {fidelities}")
        positions = torch.tensor(s.positions, dtype=torch.float64)
        cell = torch.tensor(s.cell, dtype=torch.float64)
        pbc = torch.tensor(s.pbc, dtype=torch.bool)
        edge_index, shifts = neighbor_list(positions, cell, pbc, cutoff, "auto")
        graphs.append(
            Graph(
                numbers=torch.tensor(s.numbers, dtype=torch.long),
                positions=positions,
                cell=cell,
                edge_index=edge_index,
                shifts=shifts,
                fidelity=index[s.fidelity],
                energy=float(s.energy),
                forces=None if s.forces is None else torch.tensor(s.forces, dtype=torch.float64),
                periodic=bool(np.any(s.pbc)),
            )
        )
    return graphs


# batches of same-size molecules up to this many atoms train through the dense (R, N, N) layout
# (ForceField.dense_forward: the same loss, no index_add in the double backward); larger ones and
# periodic structures through the pair list
DENSE_TRAINING_MAX_ATOMS = 32


def dense_trainable(graphs: Sequence[Graph]) -> bool:
    """Whether a batch can go through the dense layout: same atom count, no periodic structure."""
    n = len(graphs[0].numbers)
    return n <= DENSE_TRAINING_MAX_ATOMS and all(len(g.numbers) == n and not g.periodic for g in graphs)


def collate(graphs: Sequence[Graph], dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """A flat batch (``batching.flat_batch``, the layout every force call uses) with the labels:
    energy (B,), forces (sum N, 3; zeros where a structure has none) and has_forces per atom."""
    batch = flat_batch([g.positions.to(dtype) for g in graphs], [g.numbers for g in graphs],
                       [g.cell.to(dtype) for g in graphs], [g.edge_index for g in graphs],
                       [g.shifts.to(dtype) for g in graphs], [g.fidelity for g in graphs])
    forces, mask = [], []
    for g in graphs:
        if g.forces is None:
            forces.append(torch.zeros_like(g.positions))
            mask.append(torch.zeros(len(g.numbers), dtype=torch.bool))
        else:
            forces.append(g.forces)
            mask.append(torch.ones(len(g.numbers), dtype=torch.bool))
    batch["n_atoms"] = batch["n_atoms"].to(dtype)
    batch["energy"] = torch.tensor([g.energy for g in graphs], dtype=torch.float64)
    batch["forces"] = torch.cat(forces).to(dtype)
    batch["has_forces"] = torch.cat(mask)
    if dense_trainable(graphs):
        batch["dense_positions"] = torch.stack([g.positions for g in graphs]).to(dtype)
        batch["dense_numbers"] = torch.stack([g.numbers for g in graphs])
    return batch


def composition_systems(records, n_fidelities: int, elements: List[int]) -> Dict[int, tuple]:
    """{fidelity: (element counts [structures, elements], energies)} from (fidelity index,
    atomic numbers, energy) records: the least-squares systems of the reference energies."""
    column = {z: k for k, z in enumerate(elements)}
    rows: Dict[int, list] = {}
    for f, numbers, energy in records:
        rows.setdefault(int(f), []).append((np.bincount([column[int(z)] for z in numbers], minlength=len(elements)),
                                            float(energy)))
    return {f: (np.array([c for c, _ in r], dtype=float), np.array([e for _, e in r]))
            for f, r in sorted(rows.items()) if f < n_fidelities}


def borrow_undetermined_references(e0: np.ndarray, systems: Dict[int, tuple]) -> Dict[int, int]:
    """In place: each fidelity whose compositions do not determine every element's reference
    takes the undetermined part (the null space of its compositions) from the fully determined
    fidelity whose references best explain its energies (smallest RMS error per atom); its fit to
    its own data is unchanged. Returns {fidelity: the fidelity it borrowed from}."""
    n_elements = e0.shape[1]
    determined = [f for f, (counts, _) in systems.items() if np.linalg.matrix_rank(counts) == n_elements]
    borrowed = {}
    for f, (counts, energies) in systems.items():
        if f in determined or not determined:
            continue
        atoms = counts.sum(axis=1)
        prior = min(determined, key=lambda g: np.mean(((energies - counts @ e0[g]) / atoms) ** 2))
        row_space = np.linalg.svd(counts, full_matrices=False)[2][: np.linalg.matrix_rank(counts)]
        e0[f] += (np.eye(n_elements) - row_space.T @ row_space) @ (e0[prior] - e0[f])
        borrowed[f] = prior
    return borrowed


def fit_reference(graphs: Sequence[Graph], n_fidelities: int, elements: List[int]) -> Dict[str, torch.Tensor]:
    """Per-fidelity, per-element reference energies by least squares on composition, and the
    output scale (RMS of the force components).

    A fidelity whose data do not determine every element's reference (one molecule, one reaction,
    an element absent) borrows the undetermined part from a fidelity that does
    (``borrow_undetermined_references``), so that a molecule of another composition at that level
    of theory is not off by whole atomic energies; its fit to its own data is that of the
    minimum-norm solution. With no fully determined fidelity the minimum-norm solution is kept."""
    systems = composition_systems(((g.fidelity, g.numbers.tolist(), g.energy) for g in graphs),
                                  n_fidelities, elements)
    e0 = np.zeros((n_fidelities, len(elements)))
    for f, (counts, energies) in systems.items():
        e0[f] = np.linalg.lstsq(counts, energies, rcond=None)[0]
    borrow_undetermined_references(e0, systems)
    forces = [g.forces for g in graphs if g.forces is not None]
    scale = torch.cat(forces).pow(2).mean().sqrt() if forces else torch.tensor(1.0)
    return {"e0": torch.from_numpy(e0), "scale": scale.to(torch.float64)}


@torch.no_grad()
def refit_reference(forcefield: ForceField, graphs: Sequence[Graph], fidelity: int) -> torch.Tensor:
    """Shift the reference energies E0[fidelity, :] by least squares on what the model gets
    wrong on ``graphs`` (energies at that fidelity): the step that keeps a fine-tuning run from
    starting with errors of whole hartrees when a new level of theory joins. Returns the shift."""
    rows = [g for g in graphs if g.fidelity == fidelity]
    if not rows:
        raise ValueError("no structure of that fidelity to fit reference energies on")
    elements = forcefield.elements
    column = {z: k for k, z in enumerate(elements)}
    was_training = forcefield.training
    forcefield.eval()
    dtype = next(forcefield.parameters()).dtype
    residual, counts = [], np.zeros((len(rows), len(elements)))
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        batch = collate(chunk, dtype)
        out = forcefield(
            batch["positions"], batch["numbers"], batch["cell"], batch["edge_index"],
            batch["shifts"], batch["fidelity"], batch["batch"], False, False,
        )
        residual.extend((batch["energy"] - out["energy"].double()).tolist())
    for r, g in enumerate(rows):
        for z in g.numbers.tolist():
            counts[r, column[z]] += 1
    shift = torch.from_numpy(np.linalg.lstsq(counts, np.array(residual), rcond=None)[0])
    forcefield.model.e0[fidelity] += shift.to(forcefield.model.e0.dtype)
    forcefield.train(was_training)
    return shift


def loss_terms(out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Squared errors: energy per atom (per structure) and force components (per atom)."""
    de = (out["energy"].double() - batch["energy"]) / batch["n_atoms"].double()
    df = (out["forces"] - batch["forces"]).pow(2).mean(dim=1)
    return {"energy": de.pow(2), "forces": df * batch["has_forces"]}


@torch.no_grad()
def evaluate(
    forcefield: ForceField, graphs: Sequence[Graph], fidelities: List[str], batch_size: int = 64
) -> Dict[str, Dict[str, float]]:
    """Per-fidelity errors: energy MAE/RMSE (eV and eV/atom), the standard deviation of the energy
    error (eV, offset removed) and force MAE/RMSE (eV/Å)."""
    dtype = next(forcefield.parameters()).dtype
    forcefield.eval()
    acc: Dict[int, Dict[str, list]] = {}
    for start in range(0, len(graphs), batch_size):
        batch = collate(graphs[start : start + batch_size], dtype)
        with torch.enable_grad():
            out = forcefield(
                batch["positions"], batch["numbers"], batch["cell"], batch["edge_index"],
                batch["shifts"], batch["fidelity"], batch["batch"], True, False,
            )
        de = (out["energy"].double() - batch["energy"]).numpy()
        df = (out["forces"] - batch["forces"]).double().numpy()
        for k, f in enumerate(batch["fidelity"].tolist()):
            a = acc.setdefault(f, {"de": [], "de_atom": [], "df": []})
            a["de"].append(de[k])
            a["de_atom"].append(de[k] / float(batch["n_atoms"][k]))
        has = batch["has_forces"].numpy()
        atom_fid = batch["fidelity"][batch["batch"]].numpy()
        for f in np.unique(atom_fid[has]):
            acc[int(f)]["df"].append(df[has & (atom_fid == f)].reshape(-1))
    result = {}
    for f, a in sorted(acc.items()):
        de, de_atom = np.array(a["de"]), np.array(a["de_atom"])
        r = {
            "n": len(de),
            "energy_mae": float(np.abs(de).mean()),
            "energy_rmse": float(np.sqrt((de**2).mean())),
            "energy_mae_per_atom": float(np.abs(de_atom).mean()),
            # spread of the error once its mean is removed: how well the *shape* of the energy
            # surface matches, whatever constant offset separates the reference energies
            "energy_residual_std": float(np.std(de)),
        }
        if a["df"]:
            df = np.concatenate(a["df"])
            r["forces_mae"] = float(np.abs(df).mean())
            r["forces_rmse"] = float(np.sqrt((df**2).mean()))
        result[fidelities[f]] = r
    return result


def sampling_weights(graphs: Sequence[Graph], n_fidelities: int, temperature: float) -> np.ndarray:
    """Probability of drawing each structure: a fidelity with n structures is drawn with
    probability proportional to n**temperature (1: as in the data, 0: every fidelity equally)."""
    counts = np.bincount([g.fidelity for g in graphs], minlength=n_fidelities).astype(float)
    per_fid = np.where(counts > 0, counts**temperature, 0.0)
    per_fid /= per_fid.sum()
    return np.array([per_fid[g.fidelity] / counts[g.fidelity] for g in graphs])


@dataclass
class TrainSettings:
    epochs: int = 100
    steps_per_epoch: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    lr_min_factor: float = 0.02
    weight_decay: float = 1e-6
    energy_weight: float = 10.0
    forces_weight: float = 1.0
    # a last stage (MACE's "SWA" stage): from epoch (1 - final_fraction) x epochs on, the energy
    # weight is final_energy_weight instead (None: one stage). Model selection keeps scoring
    # with energy_weight, so scores stay comparable across the switch.
    final_energy_weight: Optional[float] = None
    final_fraction: float = 0.2
    fidelity_weights: Optional[Dict[str, float]] = None
    sampling_temperature: float = 0.5
    ema_decay: float = 0.995
    patience: int = 1000
    max_minutes: float = float("inf")
    seed: int = 0
    dtype: str = "float32"
    grad_clip: float = 10.0
    # a step whose loss or gradient is not finite (an overflow on one batch) is skipped instead of
    # turning every weight into NaN; this many in a row end the training with TrainingDiverged
    max_nonfinite_steps: int = 50
    # meta-learning: "reptile" treats every fidelity as a task (inner Adam steps on one task,
    # outer step of size outer_lr towards the adapted weights, annealed with the cosine schedule)
    meta: str = "none"
    inner_steps: int = 5
    inner_lr: float = 1e-3
    outer_lr: float = 0.5


def final_stage_start(settings: "TrainSettings") -> Optional[int]:
    """The first epoch of the last stage (None: one stage)."""
    if settings.final_energy_weight is None:
        return None
    return round((1 - settings.final_fraction) * settings.epochs)


def stage_settings(settings: "TrainSettings", epoch: int) -> "TrainSettings":
    """The settings the loss of ``epoch`` uses: ``settings``, or in the last stage the same with
    ``final_energy_weight`` as the energy weight."""
    start = final_stage_start(settings)
    if start is None or epoch < start:
        return settings
    return replace(settings, energy_weight=settings.final_energy_weight)


def _batch_loss(forcefield, batch, fid_weight, settings, dtype):
    if "dense_positions" in batch:
        out = forcefield.dense_forward(batch["dense_positions"], batch["dense_numbers"], batch["fidelity"])
    else:
        out = forcefield(
            batch["positions"], batch["numbers"], batch["cell"], batch["edge_index"],
            batch["shifts"], batch["fidelity"], batch["batch"], True, False,
        )
    terms = loss_terms(out, batch)
    w_struct = fid_weight[batch["fidelity"]]
    w_atom = w_struct[batch["batch"]]
    e_loss = (terms["energy"].to(dtype) * w_struct).mean()
    f_loss = (terms["forces"] * w_atom).sum() / batch["has_forces"].sum().clamp(min=1)
    loss = settings.energy_weight * e_loss + settings.forces_weight * f_loss
    return out, e_loss, f_loss, loss


def _reptile_step(forcefield, graphs, task_members, rng, settings, lr_factor, fid_weight, dtype, parameters, world):
    """One outer Reptile step (Nichol et al. 2018; Allen et al. 2024 for fidelities as tasks):
    adapt a copy of the weights to one task with a few Adam steps, then move the shared weights
    a fraction of the way towards the adapted ones. Under torchrun the moves are averaged."""
    tasks = list(task_members)
    task = tasks[rng.integers(len(tasks))]
    start = [p.detach().clone() for p in parameters]
    inner = torch.optim.Adam(parameters, lr=settings.inner_lr)
    stepped = False  # whether any inner step moved the weights (a non-finite one is skipped)
    for _ in range(settings.inner_steps):
        picks = rng.choice(task_members[task], size=settings.batch_size)
        batch = collate([graphs[i] for i in picks], dtype)
        out, e_loss, f_loss, loss = _batch_loss(forcefield, batch, fid_weight, settings, dtype)
        inner.zero_grad(set_to_none=True)
        loss.backward()
        stepped = _finite_step(inner, parameters, settings.grad_clip) or stepped
    with torch.no_grad():
        deltas = [p - p0 for p, p0 in zip(parameters, start)]
        if world > 1:
            flat = torch.cat([d.reshape(-1) for d in deltas])
            torch.distributed.all_reduce(flat)
            flat /= world
            deltas = list(torch.split(flat, [d.numel() for d in deltas]))
        for p, p0, d in zip(parameters, start, deltas):
            p.copy_(p0 + settings.outer_lr * lr_factor * d.view_as(p0))
    return out, batch, e_loss, f_loss, stepped


def distributed_rank_world() -> Tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not running under torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU). False if alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return True


def leave_distributed(poll_seconds: float = 0.01, timeout_seconds: float = 300.0) -> None:
    """Leave the process group without a rank aborting on the way out.

    A gloo barrier followed at once by destroying the group is a known race (pytorch/gloo#155):
    a rank that tears its connections down while a peer still finishes the barrier makes that
    peer abort ("terminate called without an active exception", SIGABRT) and torchrun then
    kills the other ranks too, after the training itself had succeeded. So: every rank passes
    the barrier; then the ranks take their connections down one at a time, highest rank first,
    each waiting (on the rendezvous key-value store, not on gloo) until every higher rank has
    left, so no rank ever has gloo work in flight when a peer closes its side."""
    rank, world = distributed_rank_world()
    if world <= 1:
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    torch.distributed.barrier()
    deadline = time.monotonic() + timeout_seconds
    while int(store.add("mfcalc/left", 0)) < world - 1 - rank:
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: the higher ranks did not leave the process group "
                               f"within {timeout_seconds:.0f} s")
        time.sleep(poll_seconds)
    torch.distributed.destroy_process_group()
    store.add("mfcalc/left", 1)


def _average_gradients(parameters: List[torch.Tensor], world: int) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(parameters, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text[:150].ljust(150))
        sys.stderr.flush()


def cosine_factor(step: int, total_steps: int, lr_min_factor: float) -> float:
    """The learning-rate multiplier at ``step``: cosine from 1 to ``lr_min_factor`` over ``total_steps``."""
    return lr_min_factor + (1 - lr_min_factor) * 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))


def validation_score(metrics: Dict[str, Dict[str, float]], settings: "TrainSettings") -> float:
    """What model selection minimises: per fidelity, energy MAE per atom x energy weight + forces MAE."""
    return sum(
        settings.energy_weight * m["energy_mae_per_atom"] + settings.forces_weight * m.get("forces_mae", 0.0)
        for m in metrics.values()
    )


def check_finite_labels(structures: Sequence[Structure], what: str) -> None:
    """Refuse structures whose positions, energy or forces hold NaN or inf: one of them would make
    the fitted reference energies, and then every weight, NaN."""
    bad = []
    for k, s in enumerate(structures):
        parts = [name for name, value in (("positions", s.positions), ("energy", s.energy), ("forces", s.forces))
                 if value is not None and not np.isfinite(value).all()]
        if parts:
            bad.append(f"#{k} ({s.fidelity}{', ' + s.group if s.group else ''}: {' and '.join(parts)})")
    if bad:
        raise ValueError(f"{len(bad)} {what} structure(s) have non-finite (NaN or inf) values: {', '.join(bad[:5])}"
                         + (" ..." if len(bad) > 5 else "") + "; remove those frames or fix their labels")


def batch_summary(batch: Dict[str, torch.Tensor], fidelities: Sequence[str]) -> str:
    """What a batch held, for a message: size, fidelities, atoms per structure, largest labels."""
    counts = torch.bincount(batch["batch"]).tolist()
    names = sorted({fidelities[int(i)] for i in batch["fidelity"]})
    text = (f"a batch of {len(counts)} structures ({', '.join(names)}; {min(counts)}-{max(counts)} atoms; "
            f"energy labels {float(batch['energy'].min()):.6g} to {float(batch['energy'].max()):.6g} eV")
    if bool(batch["has_forces"].any()):
        text += f"; largest force label {float(batch['forces'][batch['has_forces']].abs().max()):.3g} eV/Å"
    return text + ")"


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stayed non-finite for ``max_nonfinite_steps`` steps in a row."""


def _finite_step(optimizer, parameters, grad_clip: float) -> bool:
    """Clip the gradients and step, unless their norm is not finite (NaN or inf anywhere: clipping
    an infinite norm multiplies inf by 0 and writes NaN into every weight). Returns whether it stepped."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    if not bool(torch.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def _sgd_step(forcefield, batch, fid_weight, settings, dtype, optimizer, parameters, world):
    """One optimiser step on ``batch`` (gradients averaged across ranks, clipped); skipped when the
    gradients are not finite. Returns (out, energy loss, forces loss, whether it stepped)."""
    out, e_loss, f_loss, loss = _batch_loss(forcefield, batch, fid_weight, settings, dtype)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:  # every rank then holds the same averaged gradients, so all skip alike
        _average_gradients(parameters, world)
    return out, e_loss, f_loss, _finite_step(optimizer, parameters, settings.grad_clip)


def _save_state(path: Path, forcefield, ema, optimizer, best, history, step: int, epoch: int, minutes: float) -> None:
    """Everything --resume needs, written atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": forcefield.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
        "best": best, "history": history, "step": step, "epoch": epoch, "minutes": minutes,
    }, tmp)
    os.replace(tmp, path)


def _load_state(path: Optional[Path], forcefield, ema, optimizer):
    """Restore a ``_save_state`` file into the modules and optimiser: (best, history, step, next epoch, minutes)."""
    if path is None or not path.exists():
        raise FileNotFoundError(f"--resume: no training state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    forcefield.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    return state["best"], state["history"], state["step"], state["epoch"] + 1, state["minutes"]


def train(
    forcefield: ForceField,
    train_set: Sequence[Structure],
    val_set: Sequence[Structure],
    settings: TrainSettings,
    log=print,
    workdir: Optional[Path] = None,
    resume: bool = False,
    fit_references: bool = True,
    trainable: Optional[Sequence[str]] = None,
    sample_weights: Optional[np.ndarray] = None,
) -> Dict[str, Any]:
    """Train ``forcefield`` in place (ending with the best EMA weights). Returns a summary.

    With ``workdir`` the full training state is saved there after every epoch
    (``train_state.pt``) and a CSV log is appended (``log.csv``); ``resume=True`` continues from
    the saved state. Under torchrun every process draws its own batches and gradients are
    averaged, so all ranks hold identical weights. ``trainable`` (parameter-name prefixes) limits
    which weights move; ``sample_weights`` (one per training structure) replaces the temperature
    sampling across fidelities.
    """
    rank, world = distributed_rank_world()
    check_finite_labels(train_set, "training")
    check_finite_labels(val_set, "validation")
    torch.manual_seed(settings.seed)
    dtype = getattr(torch, settings.dtype)
    fidelities = list(forcefield.fidelities)
    cutoff = forcefield.cutoff
    train_graphs = to_graphs(train_set, fidelities, cutoff)
    val_graphs = to_graphs(val_set, fidelities, cutoff)
    if fit_references:
        reference = fit_reference(train_graphs, len(fidelities), forcefield.elements)
        forcefield.model.e0.copy_(reference["e0"])
        forcefield.model.scale.copy_(reference["scale"])
    forcefield.to(dtype)
    if world > 1:
        for tensor in forcefield.state_dict().values():
            torch.distributed.broadcast(tensor, 0)
    ema = copy.deepcopy(forcefield).eval()
    parameters = [
        p for name, p in forcefield.named_parameters()
        if trainable is None or any(name.startswith(prefix) for prefix in trainable)
    ]
    if not parameters:
        raise ValueError(f"no parameter matches trainable={list(trainable or [])}")

    fid_weight = torch.tensor(
        [(settings.fidelity_weights or {}).get(name, 1.0) for name in fidelities], dtype=dtype
    )
    if sample_weights is None:
        probabilities = sampling_weights(train_graphs, len(fidelities), settings.sampling_temperature)
    else:
        probabilities = np.asarray(sample_weights, float) / np.sum(sample_weights)
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.meta not in ("none", "reptile"):
        raise ValueError(f"meta must be 'none' or 'reptile', got {settings.meta!r}")
    # Reptile tasks: one per fidelity present in the training data
    task_members = {
        f: np.array([i for i, g in enumerate(train_graphs) if g.fidelity == f])
        for f in sorted({g.fidelity for g in train_graphs})
    }
    total_steps = settings.epochs * settings.steps_per_epoch

    best = {"score": math.inf, "epoch": -1, "state": copy.deepcopy(ema.state_dict())}
    history: List[Dict[str, Any]] = []
    step, first_epoch, elapsed_before = 0, 0, 0.0
    state_path = Path(workdir) / "train_state.pt" if workdir else None
    if resume:
        best, history, step, first_epoch, elapsed_before = _load_state(state_path, forcefield, ema, optimizer)
        log(f"resumed from {state_path} after epoch {first_epoch - 1} ({elapsed_before:.1f} min)")
    log(f"training on {count_by_fidelity(train_set)}, validating on {count_by_fidelity(val_set)}"
        + (f", {world} processes" if world > 1 else ""))

    if val_graphs and not resume:
        # the starting weights are a candidate too: a fine-tuning that never beats its base on the
        # validation points returns the base (epoch -1), not the first epoch's damage
        best["score"] = validation_score(evaluate(ema, val_graphs, fidelities), settings)
    start = time.perf_counter() - 60 * elapsed_before
    lr_factor = 1.0
    nonfinite_run = 0  # non-finite steps in a row
    for epoch in range(first_epoch, settings.epochs):
        forcefield.train()
        # batches depend on (seed, rank, epoch) only: a resumed run draws what the first would have
        rng = np.random.default_rng([settings.seed, rank, epoch])
        loss_settings = stage_settings(settings, epoch)
        if loss_settings is not settings and rank == 0 and epoch == max(first_epoch, final_stage_start(settings)):
            log(f"last stage from epoch {epoch}: energy weight {settings.energy_weight:g} -> {loss_settings.energy_weight:g}")
        running = {"energy": 0.0, "forces": 0.0}
        skipped = 0
        f_abs = np.zeros(len(fidelities))
        f_count = np.zeros(len(fidelities))
        for k in range(settings.steps_per_epoch):
            lr_factor = cosine_factor(step, total_steps, settings.lr_min_factor)
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * lr_factor
            if settings.meta == "reptile":
                out, batch, e_loss, f_loss, stepped = _reptile_step(
                    forcefield, train_graphs, task_members, rng, loss_settings, lr_factor, fid_weight, dtype,
                    parameters, world,
                )
            else:
                picks = rng.choice(len(train_graphs), size=settings.batch_size, p=probabilities)
                batch = collate([train_graphs[i] for i in picks], dtype)
                out, e_loss, f_loss, stepped = _sgd_step(forcefield, batch, fid_weight, loss_settings, dtype,
                                                         optimizer, parameters, world)
            step += 1
            if not stepped:
                skipped += 1
                nonfinite_run += 1
                if skipped == 1 and rank == 0:
                    log(f"epoch {epoch} step {k}: loss or gradients not finite on {batch_summary(batch, fidelities)}; "
                        "step skipped (the weights are unchanged)")
                if nonfinite_run >= settings.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"training diverged: the loss or its gradients were not finite for {nonfinite_run} steps in "
                        f"a row (epoch {epoch}, step {k}, learning rate {settings.lr * lr_factor:.2e}; last batch: "
                        f"{batch_summary(batch, fidelities)}). Lower the learning rate (lr) or grad_clip "
                        f"({settings.grad_clip:g}), train in float64 (dtype), or look for frames with extreme "
                        "energies or forces in the data; the state of the last finished epoch is in "
                        "train_state.pt of the output directory")
                continue
            nonfinite_run = 0
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), forcefield.parameters()):
                    p_ema.lerp_(p, 1 - settings.ema_decay)
                atom_fid = batch["fidelity"][batch["batch"]]
                err = (out["forces"].detach() - batch["forces"]).abs().mean(dim=1)
                has = batch["has_forces"]
                f_abs += torch.bincount(atom_fid[has], err[has].double(), len(fidelities)).numpy()
                f_count += torch.bincount(atom_fid[has], minlength=len(fidelities)).numpy()
            running["energy"] += float(e_loss.detach())
            running["forces"] += float(f_loss.detach())
            if k % 10 == 0 and rank == 0:
                live = " ".join(
                    f"{name}: {1000 * f_abs[i] / f_count[i]:.0f}" for i, name in enumerate(fidelities) if f_count[i]
                )
                _progress(f"epoch {epoch} step {k}/{settings.steps_per_epoch} train F MAE (meV/Å) {live}")

        metrics = evaluate(ema, val_graphs, fidelities)
        score = validation_score(metrics, settings)
        minutes = (time.perf_counter() - start) / 60
        train_f_mae = {name: float(f_abs[i] / f_count[i]) for i, name in enumerate(fidelities) if f_count[i]}
        record = {
            "epoch": epoch, "minutes": minutes, "lr": settings.lr * lr_factor, "score": score,
            "train_energy_loss": running["energy"] / max(settings.steps_per_epoch - skipped, 1),
            "train_forces_loss": running["forces"] / max(settings.steps_per_epoch - skipped, 1),
            "skipped_steps": skipped,
            "train_forces_mae": train_f_mae, "val": metrics,
        }
        history.append(record)
        if score < best["score"] or not val_graphs:  # without validation data the last is kept
            best = {"score": score, "epoch": epoch, "state": copy.deepcopy(ema.state_dict())}
        stop = ""
        if epoch - best["epoch"] >= settings.patience:
            stop = f"early stop: no validation improvement for {settings.patience} epochs"
        elif minutes >= settings.max_minutes:
            stop = f"stopping at the time budget of {settings.max_minutes} min"
        if world > 1:  # rank 0 decides, so that every process stops at the same epoch
            flag = torch.tensor([int(bool(stop))])
            torch.distributed.broadcast(flag, 0)
            stop = (stop or "stopping with rank 0") if int(flag) else ""
        if rank == 0:
            if sys.stderr.isatty():
                sys.stderr.write("\r" + " " * 150 + "\r")
            summary = "  ".join(
                f"{name}: E {1000 * m['energy_mae']:.2f} meV"
                + (f" F {1000 * m['forces_mae']:.1f} meV/Å" if "forces_mae" in m else "")
                for name, m in metrics.items()
            )
            log(f"epoch {epoch:4d} {minutes:6.1f} min lr {settings.lr * lr_factor:.2e} "
                f"train E {record['train_energy_loss']:.2e} F {record['train_forces_loss']:.2e}"
                + (f" ({skipped} non-finite steps skipped)" if skipped else "") + f" | val {summary}")
            if workdir:
                _append_csv(Path(workdir) / "log.csv", record, fidelities)
                _save_state(state_path, forcefield, ema, optimizer, best, history, step, epoch, minutes)
        if stop:
            log(stop)
            break
    forcefield.load_state_dict(best["state"])
    forcefield.eval()
    return {
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "minutes": (time.perf_counter() - start) / 60,
        "history": history,
        "world_size": world,
    }


def _append_csv(path: Path, record: Dict[str, Any], fidelities: List[str]) -> None:
    columns = ["epoch", "minutes", "lr", "train_energy_loss", "train_forces_loss"]
    values = [record[c] for c in columns]
    for name in fidelities:
        m = record["val"].get(name, {})
        columns += [f"val_energy_mae[{name}]", f"val_forces_mae[{name}]", f"train_forces_mae[{name}]"]
        values += [m.get("energy_mae", ""), m.get("forces_mae", ""), record["train_forces_mae"].get(name, "")]
    new = not path.exists() or record["epoch"] == 0
    with open(path, "w" if new else "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(columns)
        writer.writerow(values)
