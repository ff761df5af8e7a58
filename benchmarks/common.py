"""Structures, timing and error helpers shared by the benchmarks."""

import time

import numpy as np
from ase import Atoms
from ase.build import molecule


def water_box(n_molecules: int = 192, density: float = 1.0, seed: int = 0) -> Atoms:
    """Periodic cubic box of randomly oriented water molecules on a jittered grid (~1 g/cm^3)."""
    rng = np.random.default_rng(seed)
    volume = n_molecules * 18.015 / (density * 0.6022)  # Å^3
    length = volume ** (1 / 3)
    per_side = int(np.ceil(n_molecules ** (1 / 3)))
    spacing = length / per_side
    water = molecule("H2O")
    water.positions -= water.get_center_of_mass()
    positions, symbols = [], []
    sites = [(i, j, k) for i in range(per_side) for j in range(per_side) for k in range(per_side)]
    for site in [sites[s] for s in rng.permutation(len(sites))[:n_molecules]]:
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        a, b, c, d = q
        rot = np.array([
            [a*a + b*b - c*c - d*d, 2*(b*c - a*d), 2*(b*d + a*c)],
            [2*(b*c + a*d), a*a - b*b + c*c - d*d, 2*(c*d - a*b)],
            [2*(b*d - a*c), 2*(c*d + a*b), a*a - b*b - c*c + d*d],
        ])
        centre = (np.array(site) + 0.5 + rng.uniform(-0.1, 0.1, 3)) * spacing
        positions.extend(water.positions @ rot.T + centre)
        symbols.extend(water.get_chemical_symbols())
    return Atoms(symbols, positions=positions, cell=[length] * 3, pbc=True)


def ethanol() -> Atoms:
    return molecule("CH3CH2OH")


def aspirin() -> Atoms:
    """Aspirin (21 atoms), the first configuration of the shipped CCSD data."""
    from pathlib import Path

    from ase.io import read

    return read(str(Path(__file__).resolve().parent.parent / "data" / "aspirin_ccsd-15.xyz"), index=0)


def median_time(fn, repeats: int = 7, number: int = 20, warmup: int = 5) -> float:
    """Median over ``repeats`` of the mean time of ``number`` calls, in seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return float(np.median(samples))


def interleaved_times(runs, rounds: int, sync=None) -> dict:
    """Median seconds per step of each run, timed round-robin: ``runs`` maps a key to
    (advance, steps), where ``advance(steps)`` runs that many MD steps. Every run takes one
    sample per round, so a slow drift of a shared host (up to 2x here over minutes) hits every
    run alike and their ratios hold. ``sync`` (e.g. torch.cuda.synchronize) ends each sample."""
    samples = {key: [] for key in runs}
    for _ in range(rounds):
        for key, (advance, steps) in runs.items():
            start = time.perf_counter()
            advance(steps)
            if sync is not None:
                sync()
            samples[key].append((time.perf_counter() - start) / steps)
    return {key: float(np.median(values)) for key, values in samples.items()}


def available_backends():
    """Neighbor-list backends importable here (torch-cluster is optional)."""
    backends = ["dense", "vesin"]
    try:
        import torch_cluster  # noqa: F401

        backends.append("torch-cluster")
    except ImportError:
        pass
    return backends


def write_results(name: str, table: str, data=None) -> None:
    """Print a benchmark's markdown table and write it (and ``data`` as JSON) to
    benchmarks/results/<name>.md (.json)."""
    import json
    from pathlib import Path

    print(table)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}.md").write_text(table)
    if data is not None:
        (results / f"{name}.json").write_text(json.dumps(data, indent=1))


def predict_frames(calc, frames):
    """Energies (F,), forces (list of (N, 3)) and, for a committee, the largest force deviation
    (F,; NaN for a single model) of ``calc`` on mfcalc ``Structure`` frames."""
    energies, forces, deviation = [], [], []
    for s in frames:
        atoms = Atoms(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc)
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
        deviation.append(calc.results.get("max_force_deviation", np.nan))
    return np.array(energies), forces, np.array(deviation)


def frame_errors(energies, forces, frames) -> dict:
    """Forces MAE and RMSE (meV/Å, all components) and energy MAE (meV, no offset removed)
    of predictions against the frames' labels."""
    df = np.concatenate([(f - s.forces).ravel() for f, s in zip(forces, frames)])
    de = np.asarray(energies) - np.array([s.energy for s in frames])
    return {"forces_mae_meV_A": 1000 * float(np.abs(df).mean()),
            "forces_rmse_meV_A": 1000 * float(np.sqrt((df ** 2).mean())),
            "energy_mae_meV": 1000 * float(np.abs(de).mean())}
