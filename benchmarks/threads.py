"""ms per MD step with the default thread policy versus fixed thread counts, on a quiet host and
with N other busy processes, and the size at which a second thread starts to pay.

    python benchmarks/threads.py [--model chno-mf] [--busy 0 1 2] [--seconds 2] [--out threads]

1. Crossover: the force call (ASE get_forces after a small displacement) of periodic water boxes
   of 8..192 molecules and of ethanol and aspirin, with 1 and with all threads, quiet host.
2. Load: Velocity-Verlet ms/step for ethanol and the 576-atom water box with threads="auto" (the
   default), 1 and 2 threads, while 0, 1, 2 other processes spin on the CPU (each a bounded
   `while time.time() < end` loop, killed at the end). The settings are timed in turn in 5
   rounds of short chunks (median), so a collapsed setting costs seconds, not minutes, and the
   spinners' scheduling hits every setting alike.

Writes a markdown table to benchmarks/results/<out>.md. Run it with nothing else busy on the host
(the busy processes are the benchmark's own).
"""

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.md.verlet import VelocityVerlet

from common import aspirin, ethanol, water_box

from mfcalc import MFCalculator
from mfcalc.modelfile import DEFAULT_MODEL
from mfcalc.threads import SINGLE_THREAD_BELOW
from mfcalc.workflows import thermalize

RESULTS = Path(__file__).parent / "results"
SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def spinners(n: int, seconds: float):
    """``n`` busy processes that stop by themselves after ``seconds``."""
    return [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)]) for _ in range(n)]


def stop(processes) -> None:
    for p in processes:
        p.kill()
        p.wait()


def force_call_ms(calc, atoms, seconds: float) -> float:
    """Median ms of a force call on slightly displaced copies, for about ``seconds``."""
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(0)
    for _ in range(5):  # warm-up: the first TorchScript calls of a new size are slower
        atoms.positions += rng.normal(scale=1e-4, size=atoms.positions.shape)
        atoms.get_forces()
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(samples) < 3:
        atoms.positions += rng.normal(scale=1e-4, size=atoms.positions.shape)
        t = time.perf_counter()
        atoms.get_forces()
        samples.append(time.perf_counter() - t)
    return 1000 * float(np.median(samples))


class MDRun:
    """Velocity Verlet of one calculator on its own copy of a system, advanced in timed chunks."""

    def __init__(self, calc, atoms):
        self.atoms = atoms.copy()
        self.atoms.calc = calc
        thermalize(self.atoms, 300, np.random.default_rng(0))
        self.dyn = VelocityVerlet(self.atoms, 0.5 * units.fs)
        self.dyn.run(2)

    def chunk(self, seconds: float) -> list:
        """ms per step over about ``seconds`` of MD (at least one step)."""
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or steps < 1:
            self.dyn.run(1)
            steps += 1
        return [1000 * (time.perf_counter() - start) / steps]


def interleaved_md_ms(runs: dict, seconds: float, rounds: int = 5) -> dict:
    """Median ms/step of each run, the runs timed in turn in ``rounds`` rounds (order effects and
    the busy processes' scheduling hit every setting alike)."""
    samples = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            samples[key] += run.chunk(seconds / rounds)
    return {key: float(np.median(v)) for key, v in samples.items()}


def crossover(model: str, seconds: float, max_threads: int) -> list:
    systems = [("ethanol", ethanol()), ("aspirin", aspirin())]
    systems += [(f"water x{n}", water_box(n)) for n in (8, 16, 32, 64, 128, 192)]
    one = MFCalculator(model, device="cpu", dtype="float32", threads=1)
    many = MFCalculator(model, device="cpu", dtype="float32", threads=max_threads)
    rows = []
    for name, atoms in systems:
        a = force_call_ms(one, atoms, seconds)
        b = force_call_ms(many, atoms, seconds)
        rows.append((name, len(atoms), a, b))
        print(f"{name:12s} {len(atoms):4d} atoms: 1 thread {a:8.2f} ms, {max_threads} threads {b:8.2f} ms "
              f"({a / b:.2f}x)", flush=True)
    return rows


def under_load(model: str, busy_counts, seconds: float, max_threads: int) -> list:
    settings = [("auto (default)", "auto"), ("1", 1), (str(max_threads), max_threads)]
    calcs = {label: MFCalculator(model, device="cpu", dtype="float32", threads=t) for label, t in settings}
    rows = []
    for name, atoms in (("ethanol", ethanol()), ("water box", water_box(192))):
        for busy in busy_counts:
            procs = spinners(busy, seconds * len(settings) * 3 + 30)
            time.sleep(0.5)
            try:
                runs = {label: MDRun(calc, atoms) for label, calc in calcs.items()}
                times = interleaved_md_ms(runs, seconds)
            finally:
                stop(procs)
            best = min(times.values())
            rows.append((name, len(atoms), busy, times, times["auto (default)"] / best))
            print(f"{name} busy={busy}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items())
                  + f"; default / best = {times['auto (default)'] / best:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=2.0, help="wall time per timed cell")
    parser.add_argument("--out", default="threads")
    args = parser.parse_args()
    max_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {max_threads} threads, {os.cpu_count()} cores, {platform.processor()}")
    cross = crossover(args.model, args.seconds, max_threads)
    load = under_load(args.model, args.busy, args.seconds, max_threads)

    lines = [
        f"# Thread policy (`python benchmarks/threads.py --model {args.model}`)", "",
        f"torch {torch.__version__}, {os.cpu_count()} cores, float32, model {args.model}; "
        f"default policy: 1 thread below {SINGLE_THREAD_BELOW} atoms, else up to {max_threads} "
        "threads, fewer when other processes hold cores.", "",
        "## Force call, quiet host (median ms)", "",
        f"| system | atoms | 1 thread | {max_threads} threads | 1 / {max_threads} |", "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {a} | {x:.2f} | {y:.2f} | {x / y:.2f} |" for n, a, x, y in cross]
    labels = list(load[0][3])
    lines += ["", "## Velocity Verlet through ASE, ms/step, with N other busy processes", "",
              "| system | atoms | busy processes | " + " | ".join(labels) + " | default / best |",
              "|---|---|---|" + "---|" * (len(labels) + 1)]
    for name, atoms, busy, times, ratio in load:
        lines.append(f"| {name} | {atoms} | {busy} | " + " | ".join(f"{times[k]:.2f}" for k in labels)
                     + f" | {ratio:.2f} |")
    worst = max(r[4] for r in load)
    lines += ["", f"Worst default / best ratio: **{worst:.2f}** (target <= 1.3)."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
