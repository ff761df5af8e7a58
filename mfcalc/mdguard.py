"""Stop a molecular-dynamics run the moment it goes wrong, with a reason and what to try.

An MD run that explodes (a time step too long for the fastest vibration, a structure far
outside the model's training data, a temperature the model never saw) does not stop by
itself: it runs to the end with temperatures of 1e12 K and atoms 1000 Å apart, or dies much
later with an error about something else. ``MDGuard`` is an observer for any ASE dynamics::

    guard = MDGuard(atoms, temperature=500, timestep=0.5)
    dyn.attach(guard, interval=1)
    dyn.run(10000)        # raises MDInstabilityError at the first bad step

Every call checks, in this order (all limits tunable, eV and Å):

- positions and momenta are finite;
- the energy and forces are finite;
- no force is above ``max_force`` (default 50 eV/Å: covalent bonds pulled hard give ~10);
- the temperature is below ``max_temperature`` (default: 10x the target and at least 5000 K);
- the potential energy changed by less than ``max_energy_step`` per atom since the last
  check (default 1 eV/atom);
- for molecules (no periodic direction), when ``check_geometry``: every atom keeps a neighbour
  within ``max_isolation`` Å (default 4 Å, or 1.5x the loneliest atom's distance at the start)
  and the structure's radius around its centre stays below ``max_growth`` (3x) times its
  initial radius (at least 1 Å).

The guard only reads results the dynamics already computed (no extra force call).
"""

from typing import Callable, Optional, Tuple, Union

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

MAX_FORCE = 50.0  # eV/Å
MIN_TEMPERATURE_LIMIT = 5000.0  # K
TEMPERATURE_FACTOR = 10.0
MAX_ENERGY_STEP = 1.0  # eV per atom between two checks
MAX_ISOLATION = 4.0  # Å
MAX_GROWTH = 3.0
AUTO = "auto"  # a limit derived from the target temperature / the starting structure
SMALL = 200  # atoms up to which the nearest-neighbour search is all pairs in numpy


class MDInstabilityError(RuntimeError):
    """An MD run that went unphysical; ``step`` is the MD step where it was seen."""

    def __init__(self, reason: str, step: int, hint: str, kept: str = ""):
        self.reason, self.step, self.hint, self.kept = reason, int(step), hint, kept
        text = f"MD became unstable at step {self.step}: {reason}; {hint}"
        super().__init__(text + (f"; {kept}" if kept else ""))

    def with_kept(self, kept: str) -> "MDInstabilityError":
        """The same error, saying what was kept of the run (e.g. the trajectory so far)."""
        return MDInstabilityError(self.reason, self.step, self.hint, kept)


def hint(timestep: Optional[float] = None, geometry: bool = False) -> str:
    """What to try when a run became unstable (``timestep`` in fs, if known)."""
    step = f" (now {timestep:g} fs; 0.5-1 fs with hydrogen)" if timestep else " (0.5-1 fs with hydrogen)"
    text = (f"try a smaller time step{step} or a lower temperature; if it persists the structure is "
            "outside the model's training domain")
    if geometry:
        text += " (if the bond breaking is intended, switch this check off: --no-guard or check_geometry=False)"
    return text


def _atom(atoms: Atoms, index: int) -> str:
    return f"atom {index} ({chemical_symbols[atoms.numbers[index]]})"


def nearest_neighbour_distances(positions: np.ndarray) -> np.ndarray:
    """Distance of every atom to its nearest other atom (Å); inf for a single atom."""
    if len(positions) < 2:
        return np.full(len(positions), np.inf)
    if len(positions) <= SMALL:  # all pairs: ~5 µs for ethanol, against ~25 for building a tree
        d2 = ((positions[:, None, :] - positions[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d2, np.inf)
        return np.sqrt(d2.min(axis=1))
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(positions).query(positions, k=2)
    return distances[:, 1]


def radius(positions: np.ndarray) -> float:
    """Largest distance of an atom from the geometric centre (Å)."""
    return float(np.linalg.norm(positions - positions.mean(axis=0), axis=1).max())


class MDGuard:
    """Observer that raises :class:`MDInstabilityError` when an MD run goes unphysical.

    ``temperature``: the target in K (sets the default ``max_temperature``; without it the
    temperature at construction is used); ``timestep`` in fs, only for the hint; ``step``: a
    callable giving the MD step for the message (e.g. ``lambda: dyn.nsteps``; default: the
    number of earlier calls). ``None`` for a limit switches that check off. See the module
    docstring for the checks."""

    def __init__(
        self, atoms: Atoms, temperature: Optional[float] = None, timestep: Optional[float] = None,
        max_force: Optional[float] = MAX_FORCE, max_temperature: Union[None, str, float] = AUTO,
        max_energy_step: Optional[float] = MAX_ENERGY_STEP, check_geometry: bool = True,
        max_isolation: Union[None, str, float] = AUTO, max_growth: Optional[float] = MAX_GROWTH,
        step: Optional[Callable[[], int]] = None,
    ):
        self.atoms = atoms
        self.timestep = timestep
        self.max_force = max_force
        self.max_energy_step = max_energy_step
        self.step = step  # a callable giving the MD step (e.g. lambda: dyn.nsteps); else calls count
        self.calls = 0
        self._last_energy: Optional[float] = None
        target = temperature if temperature is not None else atoms.get_temperature()
        self.max_temperature = (max(TEMPERATURE_FACTOR * target, MIN_TEMPERATURE_LIMIT)
                                if max_temperature == AUTO else max_temperature)
        self.check_geometry = check_geometry and not atoms.pbc.any()
        self.max_isolation = self.max_growth = self.max_radius = None
        if self.check_geometry:
            start = nearest_neighbour_distances(atoms.positions)
            loneliest = float(start.max()) if np.isfinite(start).all() else 0.0
            self.max_isolation = (max(MAX_ISOLATION, 1.5 * loneliest) if max_isolation == AUTO
                                  else max_isolation)
            self.max_growth = max_growth
            if max_growth is not None:
                self.max_radius = max_growth * max(radius(atoms.positions), 1.0)

    # ----------------------------------------------------------------- the observer
    def __call__(self) -> None:
        step = self.step() if self.step is not None else self.calls
        self.calls += 1
        found = self.problem()
        if found is not None:
            reason, geometric = found
            raise MDInstabilityError(reason, step, hint(self.timestep, geometry=geometric))

    def problem(self) -> Optional[Tuple[str, bool]]:
        """(the first failing check in words, whether it is a geometric one), or None."""
        reason = self._finite_state()  # before the calculator is asked for anything
        if reason is not None:
            return reason, False
        energy = float(self.atoms.get_potential_energy())  # read once: every get_* runs a state check
        reason = self._finite_energy(energy) or self._forces() or self._temperature() or self._energy_step(energy)
        if reason is not None:
            return reason, False
        reason = self._geometry()
        return None if reason is None else (reason, True)

    # ----------------------------------------------------------------- the checks
    def _finite_state(self) -> Optional[str]:
        atoms = self.atoms
        bad = np.where(~np.isfinite(atoms.positions).all(axis=1))[0]
        if len(bad):
            return f"position of {_atom(atoms, int(bad[0]))} is NaN or infinite"
        bad = np.where(~np.isfinite(atoms.get_momenta()).all(axis=1))[0]
        if len(bad):
            return f"velocity of {_atom(atoms, int(bad[0]))} is NaN or infinite"
        return None

    @staticmethod
    def _finite_energy(energy: float) -> Optional[str]:
        return None if np.isfinite(energy) else f"the potential energy is {energy}"

    def _forces(self) -> Optional[str]:
        forces = self.atoms.get_forces(apply_constraint=False)
        norms = np.linalg.norm(forces, axis=1)
        if not np.isfinite(norms).all():
            return f"the force on {_atom(self.atoms, int(np.argmin(np.isfinite(norms))))} is not finite"
        k = int(np.argmax(norms))
        if self.max_force is not None and norms[k] > self.max_force:
            return f"force {norms[k]:.3g} eV/Å on {_atom(self.atoms, k)} (limit {self.max_force:g} eV/Å)"
        return None

    def _temperature(self) -> Optional[str]:
        if self.max_temperature is None:
            return None
        temperature = self.atoms.get_temperature()
        if temperature > self.max_temperature:
            return f"temperature {temperature:.4g} K (limit {self.max_temperature:.4g} K)"
        return None

    def _energy_step(self, energy: float) -> Optional[str]:
        last, self._last_energy = self._last_energy, energy
        if self.max_energy_step is None or last is None:
            return None
        per_atom = abs(energy - last) / len(self.atoms)
        if per_atom > self.max_energy_step:
            return (f"the potential energy jumped from {last:.6g} to {energy:.6g} eV in one step "
                    f"({per_atom:.3g} eV/atom, limit {self.max_energy_step:g})")
        return None

    def _geometry(self) -> Optional[str]:
        if not self.check_geometry:
            return None
        positions = self.atoms.positions
        if self.max_isolation is not None:
            nearest = nearest_neighbour_distances(positions)
            k = int(np.argmax(nearest))
            if np.isfinite(nearest[k]) and nearest[k] > self.max_isolation:
                return (f"{_atom(self.atoms, k)} has no neighbour within {self.max_isolation:.3g} Å "
                        f"(nearest {nearest[k]:.3g} Å): bonds broke or atoms flew off")
        if self.max_radius is not None:
            r = radius(positions)
            if r > self.max_radius:
                return (f"the structure grew to a radius of {r:.3g} Å, more than {self.max_growth:g}x "
                        "its initial size: it is coming apart")
        return None
