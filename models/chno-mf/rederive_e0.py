"""One-off step applied to models/chno-mf after its training (2026-11-23): re-derive the reference
energies of its under-determined fidelities with mfcalc.training.borrow_undetermined_references
(what fit_reference now does during training), a change in the null space of each such fidelity's
training compositions only, then re-export:

    python models/chno-mf/rederive_e0.py --write && mfcalc export models/chno-mf/checkpoint.pt -o models/chno-mf/model.pt

Idempotent; a new `mfcalc train recipes/chno-mf.yaml` needs no such step."""
import sys
from pathlib import Path

import numpy as np
import torch

from mfcalc.modelfile import build_forcefield, load_checkpoint, save_checkpoint
from mfcalc.recipe import load_datasets, read_recipe
from mfcalc.training import borrow_undetermined_references, composition_systems

ROOT = Path(__file__).resolve().parent.parent.parent
CHECKPOINT = ROOT / "models" / "chno-mf" / "checkpoint.pt"
recipe_path = ROOT / "recipes" / "chno-mf.yaml"
train = load_datasets(read_recipe(recipe_path), recipe_path.parent)["train"]
payload = load_checkpoint(CHECKPOINT)
fids, elements = payload["config"]["fidelities"], payload["config"]["elements"]
systems = composition_systems(((fids.index(s.fidelity), s.numbers, s.energy) for s in train), len(fids), elements)
old = payload["state_dict"]["model.e0"].double().numpy()
new = old.copy()
for f, prior in borrow_undetermined_references(new, systems).items():
    counts = systems[f][0]
    print(f"{fids[f]:16s} borrows from {fids[prior]:16s} |dE0| max {np.abs(new[f] - old[f]).max():9.3f} eV, "
          f"change on its own data {np.abs(counts @ (new[f] - old[f])).max():.1e} eV")
if "--write" in sys.argv:
    state = payload.pop("state_dict")
    state["model.e0"] = torch.from_numpy(new).to(state["model.e0"].dtype)
    config = payload.pop("config")
    payload.pop("mfcalc_version", None)
    save_checkpoint(CHECKPOINT, build_forcefield(config, state), **payload)
    print(f"wrote {CHECKPOINT}")
