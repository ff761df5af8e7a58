"""Path-integral MD of ethanol with i-PI: nuclear quantum effects against classical MD.

    python examples/md/pimd_ethanol.py                      # 8 beads, 300 K, 300 steps of 0.5 fs
    python examples/md/pimd_ethanol.py --steps 2000 --fidelity PBE+TS

i-PI (pip install 'mfcalc[ecosystem]') runs as a subprocess on a UNIX socket and drives two
``mfcalc ipi`` force clients (each computes half of the beads of every step). The same run
with one bead is classical MD with the same thermostat (PILE-L). Prints the quantum kinetic
energy (centroid-virial estimator) against the classical 3N/2 kT, and the mean and spread of
the bond lengths: zero-point motion widens every bond's distribution, most for the bonds to H.

A few hundred steps show the size of the effect, not converged averages: the first 50 fs of
the 150 fs run are thrown away as equilibration (both runs start at the model's minimum with
thermal velocities; the thermostat's centroid time constant is a tight 10 fs), and the kinetic
energies carry statistical errors of a few percent (the printed +- is the standard error of
the mean over blocks of 20 fs). Run more steps for numbers to quote.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase.build import molecule
from ase.data import covalent_radii
from ase.units import kB

from mfcalc import MFCalculator
from mfcalc.ipi import nvt_input, read_bead_xyz, read_properties, write_xyz

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--beads", type=int, default=8)
parser.add_argument("--clients", type=int, default=2)
parser.add_argument("--temperature", type=float, default=300.0, help="K")
parser.add_argument("--timestep", type=float, default=0.5, help="fs")
parser.add_argument("--equilibration", type=float, default=50.0, help="fs thrown away at the start")
parser.add_argument("--model", default="ethanol-mf")
parser.add_argument("--fidelity", default="CCSD(T)")
parser.add_argument("--timeout", type=float, default=300.0, help="s for each i-PI run")
args = parser.parse_args()

# start at the model's own minimum, so that the first femtoseconds are not a relaxation
atoms = molecule("CH3CH2OH")
atoms.calc = MFCalculator(args.model, fidelity=args.fidelity, dtype="float64")
from ase.optimize import BFGS  # noqa: E402

BFGS(atoms, logfile=None).run(fmax=1e-3, steps=200)
print(f"model {args.model}, fidelity {atoms.calc.fidelity}, {args.beads} beads, {args.temperature:g} K, "
      f"{args.steps} steps of {args.timestep:g} fs, {args.clients} mfcalc ipi clients")


def run_ipi(workdir: Path, beads: int, clients: int) -> dict:
    """One i-PI NVT run with ``clients`` mfcalc ipi clients on a UNIX socket."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_xyz(workdir / "start.xyz", atoms)
    address = f"mfcalc-pimd-{os.getpid()}-{beads}"
    (workdir / "input.xml").write_text(nvt_input(
        "start.xyz", address, beads=beads, temperature=args.temperature, steps=args.steps,
        timestep=args.timestep, tau=10.0, prefix="run", stride=5))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(workdir / "i-pi.log", "w")
    server = subprocess.Popen(["i-pi", "input.xml"], cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
    client_command = [sys.executable, "-m", "mfcalc.cli", "ipi", args.model, "--fidelity", args.fidelity,
                      "--structure", str(workdir / "start.xyz"), "--address", address, "--unix",
                      "--threads", "1", "--dtype", "float64"]
    workers = [subprocess.Popen(client_command, cwd=workdir, stdout=subprocess.DEVNULL,
                                stderr=open(workdir / f"client{k}.log", "w"), env=env) for k in range(clients)]
    start = time.perf_counter()
    try:
        server.wait(timeout=args.timeout)
        for worker in workers:
            worker.wait(timeout=30)
    finally:
        for process in [server, *workers]:
            if process.poll() is None:
                process.kill()
                process.wait()
    seconds = time.perf_counter() - start
    if server.returncode != 0:
        sys.exit(f"i-PI failed (exit {server.returncode}):\n" + (workdir / "i-pi.log").read_text()[-3000:])
    properties = read_properties(workdir / "run.out")
    digits = len(str(beads - 1))
    frames = [read_bead_xyz(workdir / f"run.pos_{b:0{digits}d}.xyz") for b in range(beads)]
    return {"properties": properties, "frames": frames, "seconds": seconds}


def block_error(values: np.ndarray, block: int) -> float:
    blocks = [values[k:k + block].mean() for k in range(0, len(values) - block + 1, block)]
    return float(np.std(blocks, ddof=1) / np.sqrt(len(blocks))) if len(blocks) > 1 else float("nan")


# the bonds of the starting molecule, grouped by the elements they join
symbols = atoms.get_chemical_symbols()
distances = atoms.get_all_distances()
bonds = {}
for i in range(len(atoms)):
    for j in range(i + 1, len(atoms)):
        if distances[i, j] < 1.2 * (covalent_radii[atoms.numbers[i]] + covalent_radii[atoms.numbers[j]]):
            bonds.setdefault("-".join(sorted([symbols[i], symbols[j]], key="CHO".index)), []).append((i, j))

with tempfile.TemporaryDirectory(prefix="mfcalc-pimd-") as tmp:
    runs = {"quantum": run_ipi(Path(tmp) / "pimd", args.beads, args.clients),
            "classical": run_ipi(Path(tmp) / "classical", 1, 1)}

skip_steps = int(round(args.equilibration / args.timestep))
classical_ke = 1.5 * len(atoms) * kB * args.temperature
block = max(1, int(round(20.0 / args.timestep)))
print(f"\ni-PI wall time: PIMD {runs['quantum']['seconds']:.1f} s ({args.beads} x {args.steps + 1} force calls), "
      f"classical {runs['classical']['seconds']:.1f} s")
print(f"(averages over steps {skip_steps}-{args.steps}; +- is the standard error over 20 fs blocks)\n")
print("| | quantum (PIMD) | classical MD |")
print("|---|---|---|")
ke = {}
for kind, run in runs.items():
    p = run["properties"]
    production = p["step"] >= skip_steps
    estimator = p["kinetic_cv"] if kind == "quantum" else p["kinetic_md"]
    ke[kind] = (float(estimator[production].mean()), block_error(estimator[production], block))
    run["temperature"] = float(p["temperature"][production].mean())
print(f"| kinetic energy (eV) | {ke['quantum'][0]:.3f} +- {ke['quantum'][1]:.3f} | {ke['classical'][0]:.3f} +- "
      f"{ke['classical'][1]:.3f} (3N/2 kT = {classical_ke:.3f}) |")
print(f"| temperature of the beads (K) | {runs['quantum']['temperature']:.0f} | {runs['classical']['temperature']:.0f} |")
stride_skip = skip_steps // 5
for name, pairs in bonds.items():
    cells = []
    for kind in ("quantum", "classical"):
        lengths = np.concatenate([[np.linalg.norm(x[j] - x[i]) for x in bead[stride_skip:] for i, j in pairs]
                                  for bead in runs[kind]["frames"]])
        cells.append(f"{lengths.mean():.4f} +- {lengths.std():.4f}")
    print(f"| {name} bond length (Å, mean +- spread, {len(pairs)} bonds) | {cells[0]} | {cells[1]} |")
print(f"\nquantum kinetic energy / classical 3N/2 kT: {ke['quantum'][0] / classical_ke:.2f}")
