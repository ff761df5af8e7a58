"""Replica MD throughput: R ethanol replicas advanced together by mfcalc.ReplicaMD (one batched
force call per step) versus R independent ASE Velocity-Verlet runs one after another.

    python benchmarks/replicas.py [--model chno-mf] [--replicas 1 4 16 64 256] [--dtype float32]
        [--steps 20] [--rounds 5] [--device cpu|cuda] [--out replicas]

Prints atom-steps per second and the speed-up, writes benchmarks/results/replicas.md and a PNG
of the scaling curve.
"""

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.build import molecule
from ase.md.verlet import VelocityVerlet

from common import interleaved_times
from mfcalc import MFCalculator, ReplicaMD
from mfcalc.modelfile import DEFAULT_MODEL
from mfcalc.workflows import thermalize

RESULTS = Path(__file__).parent / "results"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="replicas", help="name of the result files in benchmarks/results/")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed sample")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median taken)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_atoms = 9

    rows, baselines = [], {}
    # a throwaway MD run first, so that process start-up costs land in no timed row (see md_speed.py)
    warm = molecule("CH3CH2OH")
    warm.calc = MFCalculator(args.model, dtype=args.dtype, device=args.device)
    thermalize(warm, 300, np.random.default_rng(0))
    VelocityVerlet(warm, 0.5 * units.fs).run(300)
    for compile in (False, True):
        calc = MFCalculator(args.model, fidelity="CCSD(T)", dtype=args.dtype, device=args.device, compile=compile)
        path = "compile=True" if compile else "TorchScript"
        atoms = molecule("CH3CH2OH")
        atoms.calc = calc
        thermalize(atoms, 300, np.random.default_rng(0))
        runs = {0: VelocityVerlet(atoms, 0.5 * units.fs)}  # 0: the ASE baseline
        runs[0].run(20)
        for r in args.replicas:
            replicas = []
            for k in range(r):
                a = molecule("CH3CH2OH")
                thermalize(a, 300, np.random.default_rng(k))
                replicas.append(a)
            runs[r] = ReplicaMD(calc.potential, replicas, fidelity=calc.fidelity, friction=0.0)
            runs[r].run(10)  # warm-up (and, for compile=True, the first compilation)
        # interleaved rounds, so that the drift of a shared host hits baseline and replicas alike;
        # the 9-atom ASE step is short, so it takes 4x the steps per sample
        seconds = interleaved_times(
            {r: (md.run, args.steps * 4 if r == 0 else args.steps) for r, md in runs.items()}, args.rounds,
            torch.cuda.synchronize if args.device.startswith("cuda") else None)  # ReplicaMD is asynchronous on a GPU
        ase_step = seconds[0]
        ase_rate = n_atoms / ase_step  # atom-steps per second, any number of sequential runs
        baselines[path] = (ase_step, ase_rate)
        print(f"{path}: ASE, one run after another: {1000 * ase_step:.2f} ms per step, {ase_rate:,.0f} atom-steps/s",
              flush=True)
        for r in args.replicas:
            step = seconds[r]
            rate = r * n_atoms / step
            rows.append((path, r, 1000 * step, rate, rate / ase_rate))
            print(f"{path:12s} {r:4d} replicas: {1000 * step:8.2f} ms per step, {rate:12,.0f} atom-steps/s, "
                  f"{rate / ase_rate:6.1f}x ASE", flush=True)
    lines = [
        f"# Replica MD throughput: ethanol, {args.model} at CCSD(T)",
        "",
        f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"{'GPU ' + torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}, {args.dtype}. "
        "Baseline for each force path: ASE Velocity Verlet with MFCalculator on the same path, one run after "
        "another (atom-steps/s is the same for any number of sequential runs): "
        + "; ".join(f"{p} {1000 * t:.2f} ms per step ({r:,.0f} atom-steps/s)" for p, (t, r) in baselines.items()) + ".",
        "",
        "| force path | replicas | ms per step (all replicas) | atom-steps/s | x sequential ASE, same force path "
        "| x sequential ASE, TorchScript (default) |",
        "|---|---|---|---|---|---|",
    ] + [f"| {p} | {r} | {ms:.2f} | {rate:,.0f} | {x:.1f}x | {rate / baselines['TorchScript'][1]:.1f}x |"
         for p, r, ms, rate, x in rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for path in ("TorchScript", "compile=True"):
        mine = [row for row in rows if row[0] == path]
        ax.plot([row[1] for row in mine], [row[3] for row in mine], "o-", label=f"mfcalc ReplicaMD ({path})")
    for path, style in (("TorchScript", "--"), ("compile=True", ":")):
        ax.axhline(baselines[path][1], color="k", ls=style, label=f"ASE, sequential runs ({path})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("replicas")
    ax.set_ylabel("atom-steps per second")
    ax.legend()
    ax.set_title(f"ethanol replica MD, {args.device} {args.threads} threads, {args.dtype}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.out}.png", dpi=120)


if __name__ == "__main__":
    main()
