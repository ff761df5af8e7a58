"""Batched evaluation and replica molecular dynamics, all in torch.

``predict(model, structures)`` evaluates many structures in one forward pass (a flat batch).
``ReplicaMD`` advances R copies of a system together (Velocity Verlet, or Langevin with the
BAOAB splitting) on CPU or GPU, one batched force call per step, and writes one ASE trajectory
per replica. Units are ASE's: Å, eV, amu, and ASE time (``ase.units.fs``).
"""

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from .potential import (  # noqa: F401  (DENSE_*: where they were)
    DENSE_GRAPH_MAX_ATOMS, DENSE_PAIRS_PER_CALL_CPU, Potential, PreparedStructure, UnsupportedStateWarning,
    closest_pair,
)

Model = Union[str, Path, Potential, Any]  # a model name or path, a Potential, or an MFCalculator


def resolve(model: Model, fidelity: Optional[str] = None, device: str = "auto", dtype: Optional[str] = None,
            allow_unsupported_state: bool = False) -> Tuple[Potential, int, bool]:
    """(potential, fidelity index, allow_unsupported_state) for what the batched entry points
    take: a model name or path (loaded on ``device`` in ``dtype``), a ``Potential``, or an
    ``MFCalculator`` (its ``potential``, its fidelity unless ``fidelity`` is given, and its
    ``allow_unsupported_state``; the calculator itself is left as it is)."""
    potential = getattr(model, "potential", None)
    if isinstance(potential, Potential):  # an MFCalculator (duck-typed: no import of calculator.py)
        name = model.fidelity if fidelity is None else fidelity
        allow = allow_unsupported_state or bool(getattr(model, "allow_unsupported_state", False))
        return potential, potential.fidelity_index(name), allow
    if not isinstance(model, Potential):
        model = Potential.load(model, device=device, dtype=dtype)
    return model, model.fidelity_index(fidelity), allow_unsupported_state


def prepare_all(potential: Potential, structures: Sequence[Atoms], allow_unsupported_state: bool = False,
                name: str = "structure") -> List[PreparedStructure]:
    """Every structure prepared (checked) before any work; ValueError naming the first bad one
    ("structure 3: ..."); one warning for those predicted despite an unsupported charge/spin."""
    prepared = []
    for index, atoms in enumerate(structures):
        try:
            prepared.append(potential.prepare(atoms, allow_unsupported_state=allow_unsupported_state))
        except ValueError as err:
            raise ValueError(f"{name} {index}: {err}") from None
    problems = [k for k, p in enumerate(prepared) if p.state_problem is not None]
    if problems:
        warnings.warn(f"{name} {problems[0]}: {prepared[problems[0]].state_problem} (allow_unsupported_state=True: "
                      f"predicted without charge or spin; {len(problems)} {name}(s) like this)",
                      UnsupportedStateWarning, stacklevel=3)
    return prepared


def predict(
    model: Model, structures: Sequence[Atoms], fidelity: Optional[str] = None,
    device: str = "auto", dtype: Optional[str] = None, max_atoms: int = 20000,
    allow_unsupported_state: bool = False,
) -> List[Dict[str, np.ndarray]]:
    """Energies, forces (and stress for periodic ones whose cell has a volume, see
    ``MFCalculator``) of many structures, in batches of up to ``max_atoms`` atoms per forward
    pass. ``model``: a model name or path, a ``Potential`` or an ``MFCalculator`` (see
    ``resolve``; a calculator's cached structure and results are not touched). Returns one dict
    per structure. Every structure is checked as ``MFCalculator`` checks one
    (``Potential.prepare``), and a non-finite result raises FloatingPointError naming it."""
    potential, index, allow = resolve(model, fidelity, device, dtype, allow_unsupported_state)
    prepared = prepare_all(potential, list(structures), allow)
    results: List[Dict[str, np.ndarray]] = []
    chunk: List[PreparedStructure] = []
    for p in prepared + [None]:
        if p is not None and (not chunk or sum(c.n_atoms for c in chunk) + p.n_atoms <= max_atoms):
            chunk.append(p)
            continue
        if chunk:
            results.extend(potential.evaluate_batch(chunk, index, numbered_from=len(results)))
        chunk = [p] if p is not None else []
    for r in results:
        if "stress" in r:
            r["stress"] = full_3x3_to_voigt_6_stress(r["stress"])
    return results


def predict_all_fidelities(model: Model, atoms: Atoms, device: str = "auto", dtype: Optional[str] = None,
                           allow_unsupported_state: bool = False) -> Dict[str, Any]:
    """Energy and forces of one structure at every fidelity from one batched pass, and their spread.

    Returns a dict with ``fidelities`` (names), ``energy`` (F,) total energies in eV,
    ``forces`` (F, N, 3), ``relative_energy`` (F,) energies minus each fidelity's
    element reference energies (comparable across methods), ``energy_spread`` (std of
    ``relative_energy``, eV) and ``forces_spread`` (N,) RMS over components of the std
    of the forces across fidelities, eV/Å: a cheap disagreement signal. The structure is
    checked as everywhere else (``Potential.prepare``).
    """
    potential, _, allow = resolve(model, None, device, dtype, allow_unsupported_state)
    prepared = potential.prepare(atoms, allow_unsupported_state=allow)
    if prepared.state_problem is not None:
        warnings.warn(prepared.state_problem + " (allow_unsupported_state=True: predicted without charge or spin)",
                      UnsupportedStateWarning, stacklevel=2)
    n_fid = len(potential.fidelities)
    results = potential.evaluate_batch([prepared] * n_fid, range(n_fid), numbered_from=None, stress=False)
    energy = np.array([r["energy"] for r in results])
    forces = np.stack([r["forces"] for r in results])
    relative = energy - potential.reference_energies(prepared)
    return {
        "fidelities": list(potential.fidelities),
        "energy": energy,
        "forces": forces,
        "relative_energy": relative,
        "energy_spread": float(relative.std()),
        "forces_spread": np.sqrt((forces.std(axis=0) ** 2).mean(axis=1)),
    }


class ReplicaMD:
    """R replicas advanced together: one batched force evaluation per step.

    ``model``: a model name or path, a ``Potential`` or an ``MFCalculator`` (see ``resolve``).
    ``temperature`` and ``friction`` (1/fs) > 0 give Langevin dynamics (BAOAB), friction 0 gives
    Velocity Verlet (NVE). Replicas must be non-periodic molecules of at most a few hundred atoms
    (the pair list is an all-pairs search inside each replica, batched). A potential loaded with
    ``compile=True`` runs the forces through one compiled graph: for molecules of up to
    ``DENSE_GRAPH_MAX_ATOMS`` atoms the dense one (mfcalc.dense), with no pair search at all
    (``Potential.evaluate_replicas``).
    """

    def __init__(
        self, model: Model, replicas: Sequence[Atoms], fidelity: Optional[str] = None, timestep: float = 0.5,
        temperature: float = 300.0, friction: float = 0.01, device: str = "auto", dtype: Optional[str] = None,
        seed: int = 0, allow_unsupported_state: bool = False,
    ):
        self.potential, index, allow = resolve(model, fidelity, device, dtype, allow_unsupported_state)
        if any(a.pbc.any() for a in replicas):
            raise ValueError("ReplicaMD handles non-periodic molecules; use ASE MD with MFCalculator for periodic cells")
        sizes = {len(a) for a in replicas}
        if len(sizes) != 1:
            raise ValueError(f"replicas must have the same number of atoms, got sizes {sorted(sizes)}")
        prepare_all(self.potential, replicas, allow, name="replica")
        dev, dt = self.potential.device, self.potential.dtype
        self.n_replicas, self.n_atoms = len(replicas), sizes.pop()
        self.symbols = [a.get_chemical_symbols() for a in replicas]
        self.positions = torch.tensor(np.stack([a.positions for a in replicas]), dtype=dt, device=dev)
        self.masses = torch.tensor(np.stack([a.get_masses() for a in replicas]), dtype=dt, device=dev).unsqueeze(-1)
        self.velocities = torch.tensor(np.stack([a.get_velocities() for a in replicas]), dtype=dt, device=dev)
        self.numbers = torch.tensor(np.stack([a.numbers for a in replicas]), dtype=torch.long, device=dev)  # R, N
        self.timestep = timestep * units.fs
        self.kT = temperature * units.kB
        self.friction = friction / units.fs
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        self.fidelity = torch.full((self.n_replicas,), index, device=dev)
        self.nsteps = 0
        self.energy, self.forces = self._forces()
        self._check_finite("at the start")

    def _check_finite(self, when: str) -> None:
        """FloatingPointError naming the replicas whose energy or forces are NaN/inf (a run that
        exploded, or atoms on top of each other), before the integrator uses them."""
        finite = torch.isfinite(self.forces).flatten(1).all(dim=1) & torch.isfinite(self.energy)
        if bool(finite.all()):
            return
        bad = (~finite).nonzero().flatten().tolist()
        shortest = closest_pair(self.atoms(bad[0]))[0]
        raise FloatingPointError(
            f"replica(s) {bad[:10]} got non-finite energy or forces {when} (replica {bad[0]}: "
            f"smallest distance {shortest:.3g} Å): the run exploded or two atoms coincide; try a smaller "
            "timestep or a lower temperature (trajectory frames written so far are kept)"
        )

    def _forces(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.potential.evaluate_replicas(self.positions, self.numbers, self.fidelity)

    def step(self) -> None:
        dt = self.timestep
        self.velocities += 0.5 * dt * self.forces / self.masses
        if self.friction > 0:  # BAOAB
            self.positions += 0.5 * dt * self.velocities
            c1 = np.exp(-self.friction * dt)
            noise = torch.randn(self.velocities.shape, generator=self.generator, dtype=self.velocities.dtype,
                                device=self.velocities.device)
            self.velocities = c1 * self.velocities + np.sqrt(1 - c1 * c1) * torch.sqrt(self.kT / self.masses) * noise
            self.positions += 0.5 * dt * self.velocities
        else:
            self.positions += dt * self.velocities
        self.energy, self.forces = self._forces()
        self._check_finite(f"in step {self.nsteps + 1}")
        self.velocities += 0.5 * dt * self.forces / self.masses
        self.nsteps += 1

    def temperatures(self) -> np.ndarray:
        kinetic = 0.5 * (self.masses * self.velocities.pow(2)).sum(dim=(1, 2))
        return (2 * kinetic / (3 * self.n_atoms * units.kB)).cpu().numpy()

    def atoms(self, k: int) -> Atoms:
        """Replica ``k`` as ASE Atoms with velocities, energy and forces attached."""
        atoms = Atoms(self.symbols[k], positions=self.positions[k].cpu().numpy().astype(np.float64))
        atoms.set_velocities(self.velocities[k].cpu().numpy().astype(np.float64))
        atoms.calc = SinglePointCalculator(
            atoms, energy=float(self.energy[k]), forces=self.forces[k].cpu().numpy().astype(np.float64)
        )
        return atoms

    def run(self, steps: int, trajectory: Optional[str] = None, interval: int = 10) -> None:
        """Advance ``steps`` steps; with ``trajectory`` (a pattern with ``{k}``, e.g.
        "rep{k}.traj") write every ``interval``-th frame of each replica with ASE."""
        from ase.io import Trajectory

        writers = []
        if trajectory:
            writers = [Trajectory(trajectory.format(k=k), "a" if self.nsteps else "w") for k in range(self.n_replicas)]
        try:
            for _ in range(steps):
                self.step()
                if writers and self.nsteps % interval == 0:
                    for k, w in enumerate(writers):
                        w.write(self.atoms(k))
        finally:
            for w in writers:
                w.close()
