"""Everyday simulations through ASE with an MFCalculator (used by the `mfcalc md` command)."""

import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from ase import Atoms, units

from .modelfile import DEFAULT_MODEL


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


def thermalize(atoms: Atoms, temperature: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta at ``temperature`` K with zero total momentum."""
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.28
        vd.thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    vd.Stationary(atoms)


def langevin(atoms: Atoms, timestep: float, temperature: float, friction: float, rng: np.random.Generator):
    """ASE Langevin (``timestep`` fs, ``friction`` 1/fs) that keeps the centre of mass fixed the
    way ASE >= 3.28 recommends: a FixCom constraint (added to ``atoms`` if missing), not the
    thermostat's ``fixcm``."""
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    if not any(isinstance(c, FixCom) for c in atoms.constraints):
        atoms.set_constraint(list(atoms.constraints) + [FixCom()])
    return Langevin(atoms, timestep * units.fs, temperature_K=temperature, friction=friction / units.fs,
                    fixcm=False, rng=rng)


def run_md(
    structure, model: str = DEFAULT_MODEL, fidelity: Optional[str] = None,
    temperature: float = 300.0, steps: int = 1000, timestep: float = 0.5,
    out: str = "md.traj", friction: float = 0.01, seed: int = 0, interval: int = 10,
    dtype: Optional[str] = None, device: str = "auto", log=sys.stdout, compile: bool = False,
) -> Atoms:
    """Langevin NVT; writes every ``interval``-th frame to ``out`` and prints progress.
    ``compile=True`` runs the compiled force path (see MFCalculator)."""
    from ase.io import Trajectory, write

    from .calculator import MFCalculator

    atoms = read_structure(structure) if isinstance(structure, str) else structure
    atoms.calc = MFCalculator(model, fidelity=fidelity, dtype=dtype, device=device, compile=compile)
    rng = np.random.default_rng(seed)
    thermalize(atoms, temperature, rng)
    dyn = langevin(atoms, timestep, temperature, friction, rng)
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


OPTIMIZERS = ("BFGS", "FIRE", "LBFGS")


def relax(atoms: Atoms, fmax: float = 1e-4, optimizer: str = "BFGS", steps: int = 2000,
          trajectory: Optional[str] = None, cell: bool = False, logfile=None) -> dict:
    """Geometry optimisation (optionally with the cell) to ``fmax`` eV/Å. Returns a summary."""
    import ase.optimize
    from ase.filters import FrechetCellFilter

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if cell and not atoms.pbc.all():
        raise ValueError("a cell relaxation needs a periodic structure (pbc=True in all directions)")
    e_start = atoms.get_potential_energy()
    target = FrechetCellFilter(atoms) if cell else atoms
    opt = getattr(ase.optimize, optimizer)(target, trajectory=trajectory, logfile=logfile)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    forces = atoms.get_forces()
    return {
        "optimizer": optimizer, "converged": converged, "steps": opt.nsteps,
        "energy_start": e_start, "energy": atoms.get_potential_energy(),
        "fmax": float(np.linalg.norm(forces, axis=1).max()),
    }


def frequencies_ase(atoms: Atoms, delta: float = 0.005, workdir: Optional[str] = None) -> np.ndarray:
    """Harmonic frequencies (cm^-1, imaginary ones negative) by ase.vibrations finite
    differences with the atoms' calculator; all 3N modes, sorted."""
    import tempfile

    from ase.vibrations import Vibrations

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        vib = Vibrations(atoms, name=str(Path(tmp) / "vib"), delta=delta, nfree=2)
        vib.run()
        freqs = vib.get_frequencies()
    return np.sort(np.where(np.abs(freqs.imag) > 0, -np.abs(freqs.imag), freqs.real))


def frequencies_phonopy(atoms: Atoms, delta: float = 0.005, box: float = 20.0) -> np.ndarray:
    """Harmonic frequencies (cm^-1, imaginary negative) of a molecule with phonopy: the molecule
    in a ``box`` Å cubic cell (no interaction with its images), Γ point, all 3N modes, sorted."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    THZ_TO_CM = 33.35640951981521
    calc = atoms.calc
    molecule = atoms.copy()
    molecule.cell = [box, box, box]
    molecule.center()
    unit = PhonopyAtoms(symbols=molecule.get_chemical_symbols(), cell=molecule.cell.array,
                        positions=molecule.positions)
    phonon = Phonopy(unit, supercell_matrix=np.eye(3, dtype=int), primitive_matrix="P")
    phonon.generate_displacements(distance=delta, is_plusminus=True)
    forces = []
    for displaced in phonon.supercells_with_displacements:
        probe = Atoms(displaced.symbols, positions=displaced.positions)  # evaluated as a molecule
        probe.calc = calc
        forces.append(probe.get_forces().copy())
    phonon.forces = np.array(forces)
    phonon.produce_force_constants()
    return np.sort(np.asarray(phonon.get_frequencies([0.0, 0.0, 0.0])) * THZ_TO_CM)
