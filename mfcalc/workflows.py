"""Everyday simulations through ASE with an MFCalculator (used by the `mfcalc md` command)."""

import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from ase import Atoms, units


def read_structure(structure: str) -> Atoms:
    """A file ASE can read (last frame), or a molecule name from ``ase.build.molecule``."""
    path = Path(structure)
    if path.exists():
        from ase.io import read

        return read(str(path), index=-1)
    from ase.build import molecule
    from ase.collections import g2

    if structure in g2.names:
        return molecule(structure)
    raise ValueError(
        f"{structure!r} is neither a file nor a molecule name ase.build.molecule knows "
        "(e.g. CH3CH2OH, H2O, CH4)"
    )


def run_md(
    structure, model: str = "ethanol-mf", fidelity: Optional[str] = None,
    temperature: float = 300.0, steps: int = 1000, timestep: float = 0.5,
    out: str = "md.traj", friction: float = 0.01, seed: int = 0, interval: int = 10,
    dtype: Optional[str] = None, device: str = "auto", log=sys.stdout,
) -> Atoms:
    """Langevin NVT; writes every ``interval``-th frame to ``out`` and prints progress."""
    from ase.io import Trajectory, write
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    from .calculator import MFCalculator

    atoms = read_structure(structure) if isinstance(structure, str) else structure
    atoms.calc = MFCalculator(model, fidelity=fidelity, dtype=dtype, device=device)
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    dyn = Langevin(
        atoms, timestep * units.fs, temperature_K=temperature, friction=friction / units.fs, rng=rng
    )
    out_path = Path(out)
    if out_path.suffix == ".traj":
        traj = Trajectory(str(out_path), "w", atoms)
        dyn.attach(traj.write, interval=interval)
    else:
        traj = None
        out_path.write_text("")
        dyn.attach(lambda: write(str(out_path), atoms, format="extxyz", append=True), interval=interval)
    start = time.perf_counter()

    def progress():
        done = dyn.nsteps
        rate = done / max(time.perf_counter() - start, 1e-9)
        log.write(
            f"\rstep {done:7d}/{steps}  {rate:7.1f} steps/s  T {atoms.get_temperature():7.1f} K  "
            f"Epot {atoms.get_potential_energy():.4f} eV  [{atoms.calc.fidelity}]"
        )
        log.flush()

    dyn.attach(progress, interval=max(1, steps // 100))
    try:
        dyn.run(steps)
    finally:
        if traj is not None:
            traj.close()
        log.write("\n")
    return atoms
