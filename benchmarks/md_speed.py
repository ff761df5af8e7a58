"""ms per MD step through ASE (Velocity Verlet, after warm-up, median of repeats) for ethanol
(9 atoms), aspirin (21 atoms) and a periodic water box (576 atoms), float32 and float64, per
neighbor-list backend, and the same runs with peers (MACE-OFF small, SchNetPack PaiNN) built with
random weights in the same process, when they are importable (see peers.py for how to install
them beside torch without replacing it).

    python benchmarks/md_speed.py [--model chno-mf] [--systems ethanol,aspirin,water] [--threads 2]
        [--device cpu|cuda] [--quick] [--no-peers] [--out md_speed]

Prints a markdown table with mfcalc/peer ratios and writes it, with a PNG bar chart, to
benchmarks/results/. A zero-cost calculator gives ASE's own floor per step.
"""

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from ase import units
from ase.calculators.calculator import Calculator, all_changes
from ase.md.verlet import VelocityVerlet

from common import aspirin, available_backends, ethanol, interleaved_times, water_box

from mfcalc import MFCalculator
from mfcalc.calculator import exact_changes
from mfcalc.modelfile import DEFAULT_MODEL
from mfcalc.workflows import thermalize

RESULTS = Path(__file__).parent / "results"


class ZeroCalculator(Calculator):
    """No work at all: what ASE's step costs by itself."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, exact: bool):
        super().__init__()
        self.exact = exact

    def check_state(self, atoms, tol=1e-15):
        if self.exact and self.atoms is not None:
            return exact_changes(self.atoms, atoms)
        return super().check_state(atoms, tol)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3))}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return "GPU " + torch.cuda.get_device_name(torch.device(device))
    return "CPU"


class Run:
    """One calculator's MD on its own copy of a system, ready to be timed a few steps at a time."""

    def __init__(self, atoms, calc, timestep: float, steps: int):
        self.atoms = atoms.copy()
        self.atoms.calc = calc
        if timestep < 0.1:  # a cost probe: heavy atoms barely move, the work per step is unchanged
            self.atoms.set_masses(self.atoms.get_masses() * 1e4)
        thermalize(self.atoms, 300, np.random.default_rng(0))
        self.dyn = VelocityVerlet(self.atoms, timestep * units.fs)
        self.steps = steps
        self.extent = np.ptp(self.atoms.positions, axis=0).max()
        # warm-up: compile=True compiles here (tens of seconds the first time, cached on disk)
        self.dyn.run(20 if len(atoms) < 100 else 3)
        # compile="auto" (the default): run until the background compilation has switched the
        # calls over (or given up), so the row is the steady state a long run gets
        self.switch_seconds = None
        potential = getattr(calc, "potential", None)
        if potential is not None and potential.auto is not None:
            start = time.perf_counter()
            while time.perf_counter() - start < 600:
                state = potential.compile_status().get(len(atoms), {}).get("state")
                if state not in (None, "waiting", "compiling"):
                    break
                if state is None and not potential.auto.eligible(
                        len(atoms), bool(atoms.pbc.any()), potential.backend_for(len(atoms), bool(atoms.pbc.any())),
                        False):
                    break  # auto leaves this system on TorchScript
                self.dyn.run(20)
            self.switch_seconds = time.perf_counter() - start

    def warn_if_apart(self) -> None:
        """A model that does not know the molecule blows it apart, and a cell-list search over the
        exploded box then costs far more than for the molecule."""
        grew = np.ptp(self.atoms.positions, axis=0).max() / self.extent
        if not self.atoms.pbc.any() and grew > 2:
            print(f"WARNING: the molecule came apart in this run (extent x{grew:.0f}); "
                  "this row is not the cost of a stable trajectory", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--systems", default="ethanol,aspirin,water",
                        help="comma-separated subset of ethanol, aspirin, water")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peers run on the same device)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--out", default="md_speed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backends = available_backends()
    peers = {}
    if not args.no_peers:
        from peers import PEERS

        for name, make in PEERS.items():
            try:
                make("float32", args.device)
                peers[name] = make
            except Exception as err:  # noqa: BLE001 - a missing peer is reported, not fatal
                print(f"peer {name} unavailable: {type(err).__name__}: {err}")
    # the water box is only a cost probe: no shipped model knows liquid water, so its atoms are made
    # 10^4 times heavier to keep the (meaningless) dynamics from collapsing; cost per step is the same
    systems = {
        "ethanol (9 atoms)": (ethanol, 50, 0.5),
        "aspirin (21 atoms)": (aspirin, 30, 0.5),
        "water box (576 atoms, periodic)": (water_box, 3, 0.02),
    }
    wanted = {w.strip() for w in args.systems.split(",")}
    unknown = wanted - {name.split()[0] for name in systems}
    if unknown:
        parser.error(f"unknown system(s) {sorted(unknown)}; choose from ethanol, aspirin, water")
    systems = {name: (make(), steps, dt) for name, (make, steps, dt) in systems.items() if name.split()[0] in wanted}
    repeats = 3 if args.quick else 7
    rows = []
    # a throwaway run first, so that process start-up costs (thread pools, allocator, the first
    # TorchScript optimisation) land in no table row (measured: 4.27 vs 4.02 ms/step for ethanol)
    warm = Run(ethanol(), MFCalculator(args.model, dtype="float32", device=args.device, compile=False), 0.5, 100)
    seconds = interleaved_times({"warm": (warm.dyn.run, warm.steps)}, 3)["warm"]
    print(f"process warm-up (not in the table): ethanol float32 {1000 * seconds:.2f} ms/step", flush=True)

    for name, (atoms, steps, dt) in systems.items():
        runs = {}  # (calculator, dtype, backend) -> Run, timed together below
        for exact in (False, True):
            label = "exact state check" if exact else "ASE default state check"
            runs[f"zero-cost ({label})", "-", "-"] = Run(atoms, ZeroCalculator(exact), dt, steps * 4)
        for dtype in ("float32", "float64"):
            for backend in backends + ["auto"]:
                calc = MFCalculator(args.model, dtype=dtype, device=args.device, neighbor_list=backend,
                                    compile=False)
                shown = f"auto ({calc.backend_for(atoms)})" if backend == "auto" else backend
                runs["mfcalc " + args.model + " compile=False", dtype, shown] = Run(atoms, calc, dt, steps)
            calc = MFCalculator(args.model, dtype=dtype, device=args.device)
            shown = f"auto ({calc.backend_for(atoms)})"
            runs["mfcalc " + args.model + " default", dtype, shown] = run = Run(atoms, calc, dt, steps)
            print(f"{name} {dtype}: default path switched after {run.switch_seconds:.1f} s "
                  f"({calc.potential.compile_status()})", flush=True)
            calc = MFCalculator(args.model, dtype=dtype, device=args.device, compile=True)
            runs["mfcalc " + args.model + " compile=True", dtype, shown] = Run(atoms, calc, dt, steps)
            for peer, make in peers.items():
                n = max(1, steps // 10) if len(atoms) > 100 else steps
                runs[peer, dtype, "own"] = Run(atoms, make(dtype, args.device), dt, n)
        print(f"{name}: {len(runs)} runs built, timing them in {repeats} interleaved rounds", flush=True)
        seconds = interleaved_times({key: (run.dyn.run, run.steps) for key, run in runs.items()}, repeats)
        for (calculator, dtype, backend), run in runs.items():
            run.warn_if_apart()
            t = 1000 * seconds[calculator, dtype, backend]
            rows.append((name, calculator, dtype, backend, t))
            print(f"{name:32s} {calculator:28s} {dtype:8s} {backend:16s} {t:9.2f} ms/step", flush=True)
    lines = [
        "# MD speed: ms per Velocity-Verlet step through ASE",
        "",
        f"{platform.machine()}, torch {torch.__version__}, {args.threads} threads, {device_name(args.device)}; "
        "median of repeats after warm-up, every row of a system timed in the same interleaved rounds "
        "(round-robin), so that the drift of a shared host hits them alike; peers built at their "
        "published sizes with random weights, in the same process. Lower is better.",
        "",
        "Rows: `compile=False` (the TorchScript file, per neighbor-list backend); `default` "
        "(`compile=\"auto\"`: timed after its background compilation has switched small molecules "
        "to the compiled graph, the steady state of any run longer than a few seconds; periodic "
        "and large systems stay on TorchScript); `compile=True`. Last three columns, on the peer "
        "rows: how many times faster mfcalc is than that peer with each.",
        "",
        "| system | calculator | dtype | neighbor list | ms/step | speed-up (compile=False) | "
        "speed-up (default) | speed-up (compile=True) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tables = [{(r[0], r[2]): r[4] for r in rows if r[1] == f"mfcalc {args.model} {kind}" and r[3].startswith("auto")}
              for kind in ("compile=False", "default", "compile=True")]
    for system, calculator, dtype, backend, t in rows:
        ratios = ["", "", ""]
        if calculator in peers:
            ratios = [f"{t / table[system, dtype]:.1f}x" if (system, dtype) in table else "" for table in tables]
        lines.append(f"| {system} | {calculator} | {dtype} | {backend} | {t:.2f} | " + " | ".join(ratios) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(table)
    plot(rows, peers, RESULTS / f"{args.out}.png")


def plot(rows, peers, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r[0] for r in rows))
    labels = ["mfcalc compile=False", "mfcalc default", "mfcalc compile=True"] + list(peers)
    fig, axes = plt.subplots(1, len(systems), figsize=(4 * len(systems), 3.5))
    for ax, system in zip(np.atleast_1d(axes), systems):
        for k, dtype in enumerate(("float32", "float64")):
            values = []
            for label in labels:
                match = [r[4] for r in rows if r[0] == system and r[2] == dtype and r[3].startswith(("auto", "own"))
                         and (r[1] == label or label.startswith("mfcalc") and r[1].endswith(label.split()[-1]))]
                values.append(match[0] if match else np.nan)
            ax.bar(np.arange(len(labels)) + 0.4 * k, values, width=0.4, label=dtype)
        ax.set_xticks(np.arange(len(labels)) + 0.2)
        ax.set_xticklabels(labels, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(system, fontsize=9)
        ax.set_ylabel("ms per MD step")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
