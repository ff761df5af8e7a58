"""One-off step applied to models/chno-mf after its training (2026-11-23): re-derive the reference
energies of its under-determined fidelities the way mfcalc.training.fit_reference now does, as a change
in the null space of each such fidelity's training compositions only, then re-export:

    python models/chno-mf/rederive_e0.py --write && mfcalc export models/chno-mf/checkpoint.pt -o models/chno-mf/model.pt

A new `mfcalc train recipes/chno-mf.yaml` needs no such step."""
import sys
from pathlib import Path

import numpy as np
import torch

from mfcalc.modelfile import build_forcefield, load_checkpoint, save_checkpoint
from mfcalc.recipe import load_datasets, read_recipe

ROOT = Path(__file__).resolve().parent.parent.parent
recipe_path = ROOT / "recipes" / "chno-mf.yaml"
train = load_datasets(read_recipe(recipe_path), recipe_path.parent)["train"]
payload = load_checkpoint(ROOT / "models" / "chno-mf" / "checkpoint.pt")
fids, elements = payload["config"]["fidelities"], payload["config"]["elements"]
old = payload["state_dict"]["model.e0"].double().numpy()
new = old.copy()
col = {z: k for k, z in enumerate(elements)}
rows = {f: [] for f in range(len(fids))}
for s in train:
    rows[fids.index(s.fidelity)].append((np.bincount([col[int(z)] for z in s.numbers], minlength=len(elements)), s.energy))
A = {f: np.array([c for c, _ in r], float) for f, r in rows.items()}
y = {f: np.array([e for _, e in r]) for f, r in rows.items()}
determined = [f for f in A if np.linalg.matrix_rank(A[f]) == len(elements)]
for f in A:
    if f in determined:
        continue
    atoms = A[f].sum(axis=1)
    misfit = {g: float(np.sqrt(np.mean(((y[f] - A[f] @ old[g]) / atoms) ** 2))) for g in determined}
    g = min(misfit, key=misfit.get)
    _, sv, vt = np.linalg.svd(A[f], full_matrices=False)
    basis = vt[: np.linalg.matrix_rank(A[f])]
    P = basis.T @ basis  # projector on the row space of f's compositions
    new[f] = old[f] + (np.eye(len(elements)) - P) @ (old[g] - old[f])
    change = np.abs(A[f] @ (new[f] - old[f])).max()
    print(f"{fids[f]:16s} prior {fids[g]:16s} (misfit {1000 * misfit[g]:.0f} meV/atom) "
          f"|dE0| max {np.abs(new[f] - old[f]).max():9.3f} eV, change on own data {change:.1e} eV")
if "--write" in sys.argv:
    state = payload.pop("state_dict")
    state["model.e0"] = torch.from_numpy(new).to(state["model.e0"].dtype)
    config = payload.pop("config")
    payload.pop("mfcalc_version", None)
    save_checkpoint(ROOT / "models" / "chno-mf" / "checkpoint.pt", build_forcefield(config, state), **payload)
    print("wrote models/chno-mf/checkpoint.pt")
