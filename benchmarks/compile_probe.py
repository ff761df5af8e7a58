"""Probe (session 2): force-call cost of ethanol-mf as TorchScript file, with torch.compile of the network,
and with torch.compile of torch.func.grad_and_value of the whole energy (one graph, forward+backward fused).
    python benchmarks/compile_probe.py [threads] [ethanol|aspirin|water]
Measured 2 threads, ethanol, edges given: script 2.02 ms, compile(model) 2.12 ms, compile(grad_and_value) 0.90 ms
(first call ~37 s to compile). Path (c) is what MFCalculator(compile=True) runs (mfcalc/compiled.py)."""
import sys
import time

import numpy as np
import torch

from common import ethanol, aspirin, water_box
from mfcalc.modelfile import load_model, build_forcefield
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
which = sys.argv[2] if len(sys.argv) > 2 else "ethanol"
a = {"ethanol": ethanol, "aspirin": aspirin, "water": water_box}[which]()
dt = torch.float32
mod, meta = load_model("ethanol-mf", dtype=dt)
ff = build_forcefield(meta["config"], mod.state_dict()).to(dt).eval()
pos = torch.tensor(a.positions, dtype=dt); num = torch.tensor(a.numbers); cell = torch.tensor(a.cell.array, dtype=dt); pbc = torch.tensor(a.pbc)
backend = "vesin" if a.pbc.any() else "dense"
edges = mod.neighbor_list(pos, cell, pbc, backend)
def bench(fn, n):
    for _ in range(5): fn()
    ts=[]
    for _ in range(5):
        t=time.perf_counter()
        for _ in range(n): fn()
        ts.append((time.perf_counter()-t)/n)
    return np.median(ts)*1e3
n = 200 if len(a) < 50 else 3
ref = mod.compute(pos, num, cell, pbc, 2, False, backend, edges)
print("script", bench(lambda: mod.compute(pos, num, cell, pbc, 2, False, backend, edges), n), flush=True)

# (b) compile the network only
ffb = build_forcefield(meta["config"], mod.state_dict()).to(dt).eval()
ffb.model = torch.compile(ffb.model, dynamic=True)
t = time.perf_counter(); out = ffb.compute(pos, num, cell, pbc, 2, False, backend, edges); print("compile model: first call", time.perf_counter() - t, "s", flush=True)
print("  max |dF|", (out["forces"] - ref["forces"]).abs().max().item())
print("compile model", bench(lambda: ffb.compute(pos, num, cell, pbc, 2, False, backend, edges), n), flush=True)

# (c) compile energy+grad as one function with torch.func
model = ff.model
species = ff.species_of_z[num]
fid = torch.full((len(a),), 2)
def energy(positions, edge_index, shifts, cell):
    i, j = edge_index[0], edge_index[1]
    v = positions.index_select(0, j) - positions.index_select(0, i) + shifts @ cell
    e = model(species, edge_index, v, fid)
    return e.sum(), e
gv = torch.func.grad_and_value(energy, argnums=0, has_aux=True)
cg = torch.compile(gv, dynamic=True)
t = time.perf_counter(); g, (e, es) = cg(pos, edges[0], edges[1], cell); print("compile func: first call", time.perf_counter() - t, "s", flush=True)
print("  max |dF|", (-g - ref["forces"]).abs().max().item(), "dE", (e - ref["energy"]).item())
print("compile func", bench(lambda: cg(pos, edges[0], edges[1], cell), n), flush=True)
