"""Everyday simulations through ASE with an MFCalculator (used by the `mfcalc md` command)."""

import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

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


def thermalized_copies(atoms: Atoms, n: int, temperature: float, seed: int = 0) -> List[Atoms]:
    """``n`` copies of ``atoms``, copy k with Maxwell-Boltzmann momenta drawn from seed ``seed + k``
    (replica MD, TorchSim batches, benchmarks)."""
    copies = []
    for k in range(n):
        copy = atoms.copy()
        thermalize(copy, temperature, np.random.default_rng(seed + k))
        copies.append(copy)
    return copies


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


TRAJECTORY_FORMATS = {".traj": "traj", ".xyz": "extxyz", ".extxyz": "extxyz"}
FORMAT_NAMES = {"traj": "ASE trajectory", "extxyz": "extended XYZ"}


def trajectory_format(out: Union[str, Path]) -> str:
    """'traj' or 'extxyz' from the file name of an MD trajectory; any other suffix is refused."""
    suffix = Path(out).suffix.lower()
    if suffix not in TRAJECTORY_FORMATS:
        raise ValueError(
            f"cannot write an MD trajectory to {str(out)!r}: unknown format {suffix or '(no suffix)'!r}; "
            "use .traj (ASE trajectory), .xyz or .extxyz (extended XYZ)"
        )
    return TRAJECTORY_FORMATS[suffix]


def shipped_model_dirs() -> List[Path]:
    """The model directories of mfcalc's own models folder (``modelfile.MODELS_DIR``)."""
    from .modelfile import MODELS_DIR

    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.parent.resolve() for p in MODELS_DIR.glob("*/model.pt"))


def refuse_shipped_model(path: Union[str, Path]) -> None:
    """Raise if ``path`` is, or lies inside, a model directory shipped with mfcalc."""
    target = Path(path).expanduser().resolve()
    for directory in shipped_model_dirs():
        if target == directory or directory in target.parents:
            raise PermissionError(
                f"{path} is in {directory}, a model shipped with mfcalc; refusing to write there even "
                "with --force: choose an output outside that directory"
            )


def check_output(path: Union[str, Path], force: bool = False, suffixes: Optional[Sequence[str]] = None,
                 what: str = "output") -> Path:
    """Check before any work that ``path`` can be written: not in a shipped model, a known
    suffix (``suffixes``, lower case with the dot), its folder exists and is writable, and no
    file is there unless ``force``. Returns the path."""
    out = Path(path).expanduser()
    refuse_shipped_model(out)
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise ValueError(f"{what} {str(path)!r} has suffix {out.suffix or '(none)'!r}; use one of {list(suffixes)}")
    if out.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory; give a file name")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r}: folder {str(folder)!r} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{what} {str(path)!r}: folder {str(folder)!r} is not writable")
    if out.exists() and not force:
        raise FileExistsError(f"{what} {str(path)!r} exists; pass --force to overwrite it, or choose another name")
    return out


class TrajectoryWriter:
    """Appends frames of ``atoms`` to ``path`` (.traj or extended XYZ), counting them; every frame
    is on disk as soon as it is written, so a run that stops keeps what it wrote."""

    def __init__(self, path: Union[str, Path], atoms: Atoms, interval: int):
        from ase.io import Trajectory

        self.path, self.atoms, self.interval = Path(path), atoms, interval
        self.format = trajectory_format(path)
        self.frames, self.last_step = 0, None
        self._traj = Trajectory(str(self.path), "w", atoms) if self.format == "traj" else None
        if self._traj is None:
            self.path.write_text("")

    def write(self, step: int) -> None:
        if self._traj is not None:
            self._traj.write()  # ASE syncs (flushes) every frame
        else:
            from ase.io import write

            write(str(self.path), self.atoms, format="extxyz", append=True)
        self.frames += 1
        self.last_step = step

    def close(self) -> None:
        if self._traj is not None:
            self._traj.close()

    def summary(self) -> str:
        if not self.frames:
            return f"no frames (none was due yet) in {self.path} ({FORMAT_NAMES[self.format]})"
        every = f"every {self.interval} steps" if self.interval > 1 else "every step"
        return (f"{self.frames} frames ({every}, last at step {self.last_step}) in {self.path} "
                f"({FORMAT_NAMES[self.format]})")


def compile_notice(atoms: Atoms, stream=None) -> None:
    """Say what the silent first call of ``compile=True`` is doing before it starts (on stderr)."""
    stream = stream or sys.stderr
    stream.write(f"compiling the force path for {len(atoms)} atoms (first call, ~30-40 s; cached on disk "
                 "afterwards)...\n")
    stream.flush()


def run_md(
    structure, model: str = DEFAULT_MODEL, fidelity: Optional[str] = None,
    temperature: float = 300.0, steps: int = 1000, timestep: float = 0.5,
    out: str = "md.traj", friction: float = 0.01, seed: int = 0, interval: int = 10,
    dtype: Optional[str] = None, device: str = "auto", log=None, compile=None,
    overwrite: bool = True, guard: bool = True, check_geometry: bool = True, threads="auto",
    committee: bool = False,
) -> Atoms:
    """Langevin NVT; writes every ``interval``-th frame to ``out`` (.traj, .xyz or .extxyz; checked
    before anything runs) and prints progress and, at the end, where it wrote.

    ``committee``: ``model`` is a committee (a folder with committee.json, see mfcalc.committee);
    the MD runs on the mean of its members and every written frame records their disagreement in
    ``info["max_force_deviation"]`` (eV/Å), shown in the progress line too.

    ``guard``: an :class:`~mfcalc.mdguard.MDGuard` checks every step and stops a run that goes
    unphysical with :class:`~mfcalc.mdguard.MDInstabilityError` (the trajectory written so far
    is kept; ``check_geometry=False`` allows bonds to break). ``overwrite=False`` refuses an
    existing ``out``. ``compile`` (True, False, "auto"; None: the default) and ``threads``
    choose the force path and the thread policy (see MFCalculator). ``log``:
    where progress goes (default stdout)."""
    from .calculator import MFCalculator
    from .committee import MFCommittee
    from .mdguard import MDGuard, MDInstabilityError, hint

    log = log or sys.stdout
    trajectory_format(out)
    _check_md_settings(temperature, steps, timestep, interval)
    check_output(out, force=overwrite, what="MD trajectory")
    atoms = read_structure(structure) if isinstance(structure, str) else structure
    options = dict(fidelity=fidelity, dtype=dtype, device=device, compile=compile, threads=threads)
    atoms.calc = MFCommittee(model, **options) if committee else MFCalculator(model, **options)
    if compile is True:
        compile_notice(atoms)
    atoms.get_forces()  # errors of the input structure surface here, as themselves
    rng = np.random.default_rng(seed)
    thermalize(atoms, temperature, rng)
    dyn = langevin(atoms, timestep, temperature, friction, rng)
    if guard:  # before the writer: only frames that passed the checks are written
        dyn.attach(MDGuard(atoms, temperature=temperature, timestep=timestep, check_geometry=check_geometry,
                           step=lambda: dyn.nsteps), interval=1)
    writer = TrajectoryWriter(out, atoms, interval)
    if committee:  # the members' disagreement goes into each written frame
        dyn.attach(lambda: atoms.info.update(max_force_deviation=atoms.calc.results["max_force_deviation"]),
                   interval=interval)
    dyn.attach(lambda: writer.write(dyn.nsteps), interval=interval)
    dyn.attach(_progress(dyn, atoms, steps, log), interval=max(1, steps // 100))
    try:
        dyn.run(steps)
    except MDInstabilityError as err:
        raise err.with_kept(f"kept {writer.summary()}") from None
    except (ValueError, FloatingPointError) as err:  # the force call refused a structure MD made
        raise MDInstabilityError(f"the force call failed ({err})", dyn.nsteps, hint(timestep)).with_kept(
            f"kept {writer.summary()}") from err
    finally:
        writer.close()
        log.write("\n")
    log.write(f"wrote {writer.summary()}\n")
    return atoms


def _check_md_settings(temperature: float, steps: int, timestep: float, interval: int) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 K, got {temperature}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not timestep > 0:
        raise ValueError(f"timestep must be > 0 fs, got {timestep}")
    if interval < 1:
        raise ValueError(f"interval must be at least 1 step, got {interval}")


def _progress(dyn, atoms: Atoms, steps: int, log):
    start = time.perf_counter()

    def progress():
        done = dyn.nsteps
        rate = done / max(time.perf_counter() - start, 1e-9)
        log.write(
            f"\rstep {done:7d}/{steps}  {rate:7.1f} steps/s  T {atoms.get_temperature():7.1f} K  "
            f"Epot {atoms.get_potential_energy():.4f} eV  [{atoms.calc.fidelity}]"
            + (f"  max dev {1000 * atoms.calc.results['max_force_deviation']:.0f} meV/Å"
               if "max_force_deviation" in atoms.calc.results else "")
        )
        log.flush()

    return progress


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
