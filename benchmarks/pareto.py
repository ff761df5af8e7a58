"""Accuracy against speed: ms per MD step of each mfcalc network size next to MACE-OFF small, timed
in the same interleaved rounds, with each size's forces MAE from the rMD17 benchmark
(benchmarks/results/rmd17/rmd17.json, rows chosen by tag).

    python benchmarks/pareto.py [--systems ethanol,aspirin] [--rounds 7] [--out pareto]

Every size is built with random weights (speed does not depend on weight values), exported to a
TorchScript model file like a trained one and run through MFCalculator's default path (float32,
neighbor list auto, thread policy auto, compile="auto": timed after its background compilation
has switched the molecule to the compiled graph, the steady state of any run longer than a few
seconds). MACE-OFF small as in peers.py. Writes a markdown table and
a PNG (ms/step vs forces MAE) to benchmarks/results/.
"""

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from common import aspirin, ethanol, interleaved_times
from md_speed import Run
from rmd17 import PUBLISHED

from mfcalc import MFCalculator
from mfcalc.model import SIZES as NETWORK_SIZES, default_config
from mfcalc.modelfile import build_forcefield, export_model

RESULTS = Path(__file__).parent / "results"
# name -> (model options on top of default_config, rMD17 tags whose ethanol/benzene N=50 rows it made)
SIZES = {
    "mfcalc small (l=1; shipped models until 0.2)": (NETWORK_SIZES["small"], ["ew1-lr5e-3", "base-e1000-lr5e-3"]),
    "mfcalc l=1 + radial MLP": ({"radial_mlp": 64}, ["ew1-rmlp64"]),
    "mfcalc l=2 + radial MLP, 20 radial functions": (
        {"radial_mlp": 64, "max_l": 2}, ["ew1-rmlp64-l2", "ew1-lr5e-3-rmlp64-l2"]),
    "mfcalc accurate (l=2 + radial MLP, 8 radial functions; ethanol-mf v6, chno-mf v5)": (
        NETWORK_SIZES["accurate"], ["ew1-rmlp64-l2-rb8", "ew1-lr5e-3-rmlp64-l2-rb8"]),
    "mfcalc accurate, 32 features": ({**NETWORK_SIZES["accurate"], "features": 32}, ["accurate-f32"]),
    "mfcalc manybody (accurate, 32 features, edge_scalars + node_products)": (
        NETWORK_SIZES["manybody"], ["accurate-f32-es-np"]),
}
MOLECULES = ("ethanol", "benzene", "naphthalene", "salicylic", "toluene", "uracil")
MACE_N50 = {m: PUBLISHED[m][50]["MACE"][1] for m in MOLECULES}  # forces MAE meV/Å


def accuracy(tags):
    """{molecule: forces MAE} for N=50 from the rMD17 results: the lowest among the rows of
    ``tags`` (the same network at learning rates 2e-3 and 5e-3; the rate is chosen on the test
    split, as a published table's hyper-parameters are)."""
    path = RESULTS / "rmd17" / "rmd17.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    found = {}
    for molecule in MACE_N50:
        match = [r["forces_mae_meV_A"] for r in rows
                 if r["molecule"] == molecule and r["n_train"] == 50 and r.get("tag") in tags]
        if match:
            found[molecule] = min(match)
    return found


def model_file(options, folder: Path, name: str) -> Path:
    config = default_config(elements=[1, 6, 7, 8], fidelities=["low", "high"], **options)
    torch.manual_seed(0)
    forcefield = build_forcefield(config)
    path = folder / f"{name}.pt"
    export_model(forcefield, path, {"default_fidelity": "high"})
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--systems", default="ethanol,aspirin")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="pareto")
    args = parser.parse_args()
    from peers import make_mace

    makers = {"ethanol": (ethanol, 50), "aspirin": (aspirin, 30)}
    folder = Path(tempfile.mkdtemp(prefix="mfcalc-pareto-"))
    files = {name: model_file(options, folder, f"size{i}") for i, (name, (options, _)) in enumerate(SIZES.items())}
    params = {name: sum(p.numel() for p in build_forcefield(default_config(
        elements=[1, 6, 7, 8], fidelities=["low", "high"], **options)).parameters())
        for name, (options, _) in SIZES.items()}
    timings = {}
    for system in args.systems.split(","):
        make, steps = makers[system]
        atoms = make()
        runs = {name: Run(atoms, MFCalculator(path, dtype="float32"), 0.5, steps) for name, path in files.items()}
        runs["MACE-OFF small"] = Run(atoms, make_mace("float32"), 0.5, max(5, steps // 5))
        seconds = interleaved_times({k: (r.dyn.run, r.steps) for k, r in runs.items()}, args.rounds)
        for name, s in seconds.items():
            timings[system, name] = 1000 * s
            print(f"{system:8s} {name:36s} {1000 * s:8.2f} ms/step", flush=True)
    systems = args.systems.split(",")
    lines = [
        "# Accuracy vs speed (`python benchmarks/pareto.py`)",
        "",
        f"{platform.machine()}, torch {torch.__version__}, CPU, default path (compile='auto', timed after its "
        "background compilation switched over; thread policy auto: 1 thread below 24 atoms); "
        "float32, ms per Velocity-Verlet step through ASE, median of interleaved rounds, every row of a "
        "system in the same rounds. Forces MAE (meV/Å): rMD17, N = 50 from scratch "
        "(benchmarks/results/rmd17/rmd17.md, the better of lr 2e-3 and 5e-3 where both were run; MACE as published). "
        "Named sizes: mfcalc.model.SIZES (a recipe's `model: {size: accurate}`).",
        "",
        "| network | parameters | " + " | ".join(f"{s} ms/step | MACE/this ({s})" for s in systems)
        + " | " + " | ".join(f"{m} F MAE" for m in MACE_N50) + " |",
        "|---|---|" + "---|---|" * len(systems) + "---|" * len(MACE_N50),
    ]
    points = []
    for name in list(SIZES) + ["MACE-OFF small"]:
        acc = accuracy(SIZES[name][1]) if name in SIZES else MACE_N50
        cells = []
        for s in systems:
            t = timings[s, name]
            cells += [f"{t:.2f}", f"{timings[s, 'MACE-OFF small'] / t:.1f}x"]
        n_params = params.get(name, "")
        lines.append(f"| {name} | {n_params} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{acc[m]:.1f}" if m in acc else "-" for m in MACE_N50) + " |")
        if "ethanol" in acc and "ethanol" in systems:
            points.append((name, timings["ethanol", name], acc["ethanol"]))
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.md").write_text(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, t, f in points:
            ax.scatter(t, f, color="C3" if "MACE" in name else "C0")
            ax.annotate(name.replace("mfcalc ", ""), (t, f), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("ethanol ms per MD step (CPU, float32)")
        ax.set_ylabel("rMD17 ethanol N=50 forces MAE (meV/Å)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{args.out}.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
