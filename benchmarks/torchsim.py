"""TorchSim vs ReplicaMD: the same R ethanol replicas, the same model, fidelity, dtype and force
path (mfcalc.torchsim.MFModel over the one Potential), advanced by TorchSim's integrators and by
mfcalc's ReplicaMD, timed in interleaved rounds.

    python benchmarks/torchsim.py [--model chno-mf] [--fidelity "CCSD(T)"] [--replicas 64]
        [--dtype float32] [--threads 2] [--steps 20] [--rounds 5] [--device cpu|cuda]
        [--compile] [--out torchsim]

Two integrators each: velocity Verlet (TorchSim's nve, ReplicaMD with friction 0) and Langevin
(TorchSim's nvt_langevin, BAOAB; ReplicaMD with friction 0.01/fs, BAOAB), 0.5 fs, 300 K, the
same starting velocities. TorchSim is driven by its update function in a loop, which is what
ts.integrate runs for each step. Prints atom-steps per second and writes a markdown table to
benchmarks/results/<out>.md.
"""

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.build import molecule

import torch_sim as ts
from common import interleaved_times
from mfcalc import Potential, ReplicaMD
from mfcalc.modelfile import DEFAULT_MODEL
from mfcalc.torchsim import MFModel
from mfcalc.workflows import thermalized_copies

RESULTS = Path(__file__).parent / "results"
FRICTION = 0.01  # 1/fs, ReplicaMD's default; TorchSim's gamma is the same rate in its units


class TorchSimRun:
    """A TorchSim integrator's state and update function, advanced ``steps`` at a time."""

    def __init__(self, model, replicas, integrator, **kwargs):
        dtype = model.dtype
        dt = torch.tensor(0.5 * units.fs, dtype=dtype, device=model.device)  # ASE time = TorchSim's internal
        kT = torch.tensor(300 * units.kB, dtype=dtype, device=model.device)
        init, self.update = integrator(model=model, dt=dt, kT=kT, **kwargs)
        self.state = init(ts.io.atoms_to_state(replicas, model.device, dtype))
        self.state.momenta = torch.tensor(np.concatenate([a.get_momenta() for a in replicas]), dtype=dtype,
                                          device=model.device)  # ReplicaMD's starting velocities

    def run(self, steps):
        for _ in range(steps):
            self.state = self.update(self.state)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--fidelity", default="CCSD(T)")
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="the compiled force path (compile=True) for both")
    parser.add_argument("--out", default="torchsim", help="name of the result file in benchmarks/results/")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed sample")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median taken)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    potential = Potential.load(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    fidelity = potential.resolve_fidelity(args.fidelity)
    model = MFModel(potential, fidelity=fidelity, compute_stress=False)
    replicas = thermalized_copies(molecule("CH3CH2OH"), args.replicas, 300)
    n_atoms = args.replicas * len(replicas[0])
    gamma = torch.tensor(FRICTION / units.fs, dtype=model.dtype, device=model.device)
    runs = {
        ("velocity Verlet", "TorchSim"): TorchSimRun(model, replicas, ts.nve),
        ("velocity Verlet", "ReplicaMD"): ReplicaMD(potential, replicas, fidelity=fidelity, friction=0.0),
        ("Langevin", "TorchSim"): TorchSimRun(model, replicas, ts.nvt_langevin, gamma=gamma, seed=0),
        ("Langevin", "ReplicaMD"): ReplicaMD(potential, replicas, fidelity=fidelity, friction=FRICTION),
    }
    for run in runs.values():
        run.run(10)  # warm-up (and with --compile the first compilation)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None  # both are asynchronous on a GPU
    seconds = interleaved_times({key: (run.run, args.steps) for key, run in runs.items()}, args.rounds, sync)
    # both velocity Verlet runs took the same steps from the same start: the same trajectory
    nve_gap = float((runs["velocity Verlet", "TorchSim"].state.positions
                     - runs["velocity Verlet", "ReplicaMD"].positions.reshape(-1, 3)).abs().max())

    rows = []
    for (integrator, engine), step in seconds.items():
        rate = n_atoms / step
        ratio = seconds[integrator, "ReplicaMD"] / step
        rows.append((integrator, engine, 1000 * step, rate, ratio))
        print(f"{integrator:16s} {engine:9s}: {1000 * step:8.2f} ms per step, {rate:12,.0f} atom-steps/s, "
              f"{ratio:5.2f}x ReplicaMD", flush=True)
    steps_done = runs["velocity Verlet", "ReplicaMD"].nsteps
    lines = [
        f"# TorchSim vs ReplicaMD: {args.replicas} ethanol replicas, {args.model} at {fidelity}",
        "",
        f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"{'GPU ' + torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}, {args.dtype}, "
        f"{'compile=True' if args.compile else 'TorchScript'} force path for both (mfcalc.torchsim.MFModel over "
        f"the same Potential). 0.5 fs, 300 K, the same starting velocities; median of {args.rounds} interleaved "
        f"rounds of {args.steps} steps. After {steps_done} steps the two velocity Verlet runs differ by "
        f"{nve_gap:.2g} Å at most (the same trajectory).",
        "",
        "| integrator | engine | ms per step (all replicas) | atom-steps/s | speed vs ReplicaMD, same integrator |",
        "|---|---|---|---|---|",
    ] + [f"| {i} | {e} | {ms:.2f} | {rate:,.0f} | {x:.2f}x |" for i, e, ms, rate, x in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
