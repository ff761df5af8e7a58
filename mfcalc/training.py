"""Training on several levels of theory at once.

structures -> fixed pair lists -> batches mixed across fidelities (temperature sampling) ->
loss on energies (per atom) and forces, each fidelity weighted -> AdamW + cosine schedule + EMA
weights -> best-on-validation checkpoint -> per-fidelity test errors -> exported model.
"""

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

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
            )
        )
    return graphs


def collate(graphs: Sequence[Graph], dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """A flat batch: atoms and pairs concatenated, pair indices offset per structure."""
    offsets = np.cumsum([0] + [len(g.numbers) for g in graphs[:-1]])
    n_atoms = torch.tensor([len(g.numbers) for g in graphs])
    forces, mask = [], []
    for g in graphs:
        if g.forces is None:
            forces.append(torch.zeros_like(g.positions))
            mask.append(torch.zeros(len(g.numbers), dtype=torch.bool))
        else:
            forces.append(g.forces)
            mask.append(torch.ones(len(g.numbers), dtype=torch.bool))
    return {
        "positions": torch.cat([g.positions for g in graphs]).to(dtype),
        "numbers": torch.cat([g.numbers for g in graphs]),
        "cell": torch.stack([g.cell for g in graphs]).to(dtype),
        "edge_index": torch.cat([g.edge_index + int(o) for g, o in zip(graphs, offsets)], dim=1),
        "shifts": torch.cat([g.shifts for g in graphs]).to(dtype),
        "fidelity": torch.tensor([g.fidelity for g in graphs]),
        "batch": torch.repeat_interleave(torch.arange(len(graphs)), n_atoms),
        "n_atoms": n_atoms.to(dtype),
        "energy": torch.tensor([g.energy for g in graphs], dtype=torch.float64),
        "forces": torch.cat(forces).to(dtype),
        "has_forces": torch.cat(mask),
    }


def fit_reference(graphs: Sequence[Graph], n_fidelities: int, elements: List[int]) -> Dict[str, torch.Tensor]:
    """Per-fidelity, per-element reference energies by least squares on composition, and the
    output scale (RMS of the force components). When every structure of a fidelity has the same
    composition only the total is determined; the minimum-norm solution is taken."""
    column = {z: k for k, z in enumerate(elements)}
    e0 = torch.zeros(n_fidelities, len(elements), dtype=torch.float64)
    for f in range(n_fidelities):
        rows = [g for g in graphs if g.fidelity == f]
        if not rows:
            continue
        counts = np.zeros((len(rows), len(elements)))
        for r, g in enumerate(rows):
            for z in g.numbers.tolist():
                counts[r, column[z]] += 1
        energies = np.array([g.energy for g in rows])
        solution = np.linalg.lstsq(counts, energies, rcond=None)[0]
        e0[f] = torch.from_numpy(solution)
    forces = [g.forces for g in graphs if g.forces is not None]
    scale = torch.cat(forces).pow(2).mean().sqrt() if forces else torch.tensor(1.0)
    return {"e0": e0, "scale": scale.to(torch.float64)}


def loss_terms(out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Squared errors: energy per atom (per structure) and force components (per atom)."""
    de = (out["energy"].double() - batch["energy"]) / batch["n_atoms"].double()
    df = (out["forces"] - batch["forces"]).pow(2).mean(dim=1)
    return {"energy": de.pow(2), "forces": df * batch["has_forces"]}


@torch.no_grad()
def evaluate(
    forcefield: ForceField, graphs: Sequence[Graph], fidelities: List[str], batch_size: int = 64
) -> Dict[str, Dict[str, float]]:
    """Per-fidelity errors: energy MAE/RMSE (eV and eV/atom) and force MAE/RMSE (eV/Å)."""
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
    fidelity_weights: Optional[Dict[str, float]] = None
    sampling_temperature: float = 0.5
    ema_decay: float = 0.995
    patience: int = 1000
    max_minutes: float = float("inf")
    seed: int = 0
    dtype: str = "float32"
    grad_clip: float = 10.0


def train(
    forcefield: ForceField,
    train_set: Sequence[Structure],
    val_set: Sequence[Structure],
    settings: TrainSettings,
    log=print,
) -> Dict[str, Any]:
    """Train ``forcefield`` in place (ending with the best EMA weights). Returns a summary."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    dtype = getattr(torch, settings.dtype)
    fidelities = list(forcefield.fidelities)
    cutoff = forcefield.cutoff
    train_graphs = to_graphs(train_set, fidelities, cutoff)
    val_graphs = to_graphs(val_set, fidelities, cutoff)
    reference = fit_reference(train_graphs, len(fidelities), forcefield.elements)
    forcefield.model.e0.copy_(reference["e0"])
    forcefield.model.scale.copy_(reference["scale"])
    forcefield.to(dtype)
    ema = copy.deepcopy(forcefield).eval()

    fid_weight = torch.tensor(
        [(settings.fidelity_weights or {}).get(name, 1.0) for name in fidelities], dtype=dtype
    )
    probabilities = sampling_weights(train_graphs, len(fidelities), settings.sampling_temperature)
    optimizer = torch.optim.AdamW(
        forcefield.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    total_steps = settings.epochs * settings.steps_per_epoch
    log(f"training on {count_by_fidelity(train_set)}, validating on {count_by_fidelity(val_set)}")

    best = {"score": math.inf, "epoch": -1, "state": copy.deepcopy(ema.state_dict())}
    history = []
    start = time.perf_counter()
    step = 0
    for epoch in range(settings.epochs):
        forcefield.train()
        running = {"energy": 0.0, "forces": 0.0}
        for _ in range(settings.steps_per_epoch):
            lr_factor = settings.lr_min_factor + (1 - settings.lr_min_factor) * 0.5 * (
                1 + math.cos(math.pi * step / total_steps)
            )
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * lr_factor
            picks = rng.choice(len(train_graphs), size=settings.batch_size, p=probabilities)
            batch = collate([train_graphs[k] for k in picks], dtype)
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
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(forcefield.parameters(), settings.grad_clip)
            optimizer.step()
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), forcefield.parameters()):
                    p_ema.lerp_(p, 1 - settings.ema_decay)
            running["energy"] += float(e_loss.detach())
            running["forces"] += float(f_loss.detach())
            step += 1

        metrics = evaluate(ema, val_graphs, fidelities)
        score = sum(
            settings.energy_weight * m["energy_mae_per_atom"] + settings.forces_weight * m.get("forces_mae", 0.0)
            for m in metrics.values()
        )
        minutes = (time.perf_counter() - start) / 60
        history.append({"epoch": epoch, "minutes": minutes, "score": score, "val": metrics})
        summary = "  ".join(
            f"{name}: E {1000 * m['energy_mae']:.2f} meV"
            + (f" F {1000 * m['forces_mae']:.1f} meV/Å" if "forces_mae" in m else "")
            for name, m in metrics.items()
        )
        log(f"epoch {epoch:4d} {minutes:6.1f} min lr {settings.lr * lr_factor:.2e} "
            f"train E {running['energy'] / settings.steps_per_epoch:.2e} "
            f"F {running['forces'] / settings.steps_per_epoch:.2e} | val {summary}")
        if score < best["score"]:
            best = {"score": score, "epoch": epoch, "state": copy.deepcopy(ema.state_dict())}
        if epoch - best["epoch"] >= settings.patience:
            log(f"early stop: no validation improvement for {settings.patience} epochs")
            break
        if minutes >= settings.max_minutes:
            log(f"stopping at the time budget of {settings.max_minutes} min")
            break
    forcefield.load_state_dict(best["state"])
    forcefield.eval()
    return {
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "minutes": (time.perf_counter() - start) / 60,
        "history": history,
    }
