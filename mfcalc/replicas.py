"""Batched evaluation and replica molecular dynamics, all in torch.

``predict(model, structures)`` evaluates many structures in one forward pass (a flat batch).
``ReplicaMD`` advances R copies of a system together (Velocity Verlet, or Langevin with the
BAOAB splitting) on CPU or GPU, one batched force call per step, and writes one ASE trajectory
per replica. Units are ASE's: Å, eV, amu, and ASE time (``ase.units.fs``).
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from .calculator import (
    MFCalculator, check_finite_results, closest_pair, force_call, stress_defined, warn_if_close,
)
from .compiled import DENSE_GRAPH_MAX_ATOMS
from .neighbors import pick_backend

DENSE_PAIRS_PER_CALL_CPU = 64 * 81  # R * N * N of 64 ethanol replicas


def _as_calculator(model, fidelity, device, dtype) -> MFCalculator:
    if isinstance(model, MFCalculator):
        if fidelity is not None:
            model.fidelity = fidelity
        return model
    return MFCalculator(model, fidelity=fidelity, device=device, dtype=dtype)


def batch_pairs(calc: MFCalculator, positions: torch.Tensor, structures: Sequence[Atoms]) -> List[torch.Tensor]:
    """Pair lists of every structure, offset into one flat batch: [edge_index, shifts]."""
    edges, shifts, offset, start = [], [], 0, 0
    for atoms in structures:
        n = len(atoms)
        cell = torch.tensor(atoms.cell.array, dtype=calc.dtype, device=calc.device)
        pbc = torch.tensor(atoms.pbc, device=calc.device)
        backend = calc.neighbor_backend
        if backend in ("auto", "torch-cluster"):  # the model file holds dense and vesin only
            backend = pick_backend(n, calc.device, bool(atoms.pbc.any()))
        e, s = calc.module.neighbor_list(positions[start : start + n], cell, pbc, backend)
        edges.append(e + offset)
        shifts.append(s)
        offset += n
        start += n
    return [torch.cat(edges, dim=1), torch.cat(shifts)]


def predict(
    model: Union[str, Path, MFCalculator], structures: Sequence[Atoms], fidelity: Optional[str] = None,
    device: str = "auto", dtype: Optional[str] = None, max_atoms: int = 20000,
) -> List[Dict[str, np.ndarray]]:
    """Energies, forces (and stress for periodic ones whose cell has a volume, see
    ``MFCalculator``) of many structures, in batches of up to ``max_atoms`` atoms per forward
    pass. Returns one dict per structure. Every structure is checked as ``MFCalculator`` checks
    one (``check_structure``), and a non-finite result raises FloatingPointError naming it."""
    calc = _as_calculator(model, fidelity, device, dtype)
    structures = list(structures)
    for index, atoms in enumerate(structures):  # all of them before any work
        try:
            calc.check_structure(atoms)
        except ValueError as err:
            raise ValueError(f"structure {index}: {err}") from None
    results: List[Dict[str, np.ndarray]] = []
    chunk: List[Atoms] = []
    with calc._lock:  # the calculator's per-structure state is used below
        for atoms in structures + [None]:
            if atoms is not None and (not chunk or sum(map(len, chunk)) + len(atoms) <= max_atoms):
                chunk.append(atoms)
                continue
            results.extend(_predict_chunk(calc, chunk, first=len(results)))
            chunk = [atoms] if atoms is not None else []
    return results


def _shortest_pairs(positions: torch.Tensor, cells: torch.Tensor, edge_index: torch.Tensor, shifts: torch.Tensor,
                    batch: torch.Tensor, n_structures: int) -> np.ndarray:
    """The shortest pair distance of every structure of a flat batch (inf without pairs)."""
    i, j = edge_index[0], edge_index[1]
    vectors = positions[j] - positions[i] + torch.bmm(shifts.unsqueeze(1), cells[batch[i]]).squeeze(1)
    shortest = torch.full((n_structures,), float("inf"), dtype=positions.dtype, device=positions.device)
    shortest = shortest.scatter_reduce(0, batch[i], vectors.norm(dim=1), reduce="amin")
    return shortest.cpu().numpy().astype(np.float64)


def _predict_chunk(calc: MFCalculator, structures: List[Atoms], first: int = 0) -> List[Dict[str, np.ndarray]]:
    """One forward pass over ``structures`` (already checked), numbered from ``first``."""
    for atoms in structures:
        calc._check_structure(atoms)  # cached: the structure's tensors for the neighbor search
    counts = [len(a) for a in structures]
    positions = torch.tensor(
        np.concatenate([a.positions - a.positions[0] for a in structures]), dtype=calc.dtype, device=calc.device
    )
    edge_index, shifts = batch_pairs(calc, positions, structures)
    with_stress = [stress_defined(a) for a in structures]
    periodic = any(with_stress)
    n_structures = len(structures)
    cells = torch.tensor(np.stack([a.cell.array for a in structures]), dtype=calc.dtype, device=calc.device)
    batch = torch.repeat_interleave(torch.arange(n_structures, device=calc.device),
                                    torch.tensor(counts, device=calc.device))
    with force_call(calc.module, calc.thread_policy, len(positions)):
        out = calc.module.forward(
            positions,
            torch.tensor(np.concatenate([a.numbers for a in structures]), device=calc.device),
            cells,
            edge_index, shifts,
            torch.full((n_structures,), calc._fidelity_index, device=calc.device),
            batch,
            True, periodic,
        )
    energy = out["energy"].cpu().numpy().astype(np.float64)
    forces = np.split(out["forces"].cpu().numpy().astype(np.float64), np.cumsum(counts)[:-1])
    shortest = _shortest_pairs(positions, cells, edge_index, shifts, batch, n_structures)
    results = []
    for k, atoms in enumerate(structures):
        warn_if_close(shortest[k], f" in structure {first + k}")
        check_finite_results(energy[k], forces[k], atoms, f" for structure {first + k}")
        r = {"energy": float(energy[k]), "forces": forces[k]}
        if with_stress[k]:
            r["stress"] = full_3x3_to_voigt_6_stress(out["stress"][k].cpu().numpy().astype(np.float64))
        results.append(r)
    return results


class ReplicaMD:
    """R replicas advanced together: one batched force evaluation per step.

    ``temperature`` and ``friction`` (1/fs) > 0 give Langevin dynamics (BAOAB), friction 0 gives
    Velocity Verlet (NVE). Replicas must be non-periodic molecules of at most a few hundred atoms
    (the pair list is an all-pairs search inside each replica, batched). A calculator made with
    ``compile=True`` runs the forces through one compiled graph: for molecules of up to
    ``DENSE_GRAPH_MAX_ATOMS`` atoms the dense one (mfcalc.dense), with no pair search at all.
    """

    def __init__(
        self, model, replicas: Sequence[Atoms], fidelity: Optional[str] = None, timestep: float = 0.5,
        temperature: float = 300.0, friction: float = 0.01, device: str = "auto", dtype: Optional[str] = None,
        seed: int = 0,
    ):
        self.calc = _as_calculator(model, fidelity, device, dtype)
        if any(a.pbc.any() for a in replicas):
            raise ValueError("ReplicaMD handles non-periodic molecules; use ASE MD with MFCalculator for periodic cells")
        sizes = {len(a) for a in replicas}
        if len(sizes) != 1:
            raise ValueError(f"replicas must have the same number of atoms, got sizes {sorted(sizes)}")
        with self.calc._lock:
            for k, atoms in enumerate(replicas):
                try:
                    self.calc.check_structure(atoms)
                except ValueError as err:
                    raise ValueError(f"replica {k}: {err}") from None
        dev, dt = self.calc.device, self.calc.dtype
        self.n_replicas, self.n_atoms = len(replicas), sizes.pop()
        self.symbols = [a.get_chemical_symbols() for a in replicas]
        self.positions = torch.tensor(np.stack([a.positions for a in replicas]), dtype=dt, device=dev)
        self.masses = torch.tensor(np.stack([a.get_masses() for a in replicas]), dtype=dt, device=dev).unsqueeze(-1)
        self.velocities = torch.tensor(np.stack([a.get_velocities() for a in replicas]), dtype=dt, device=dev)
        self.numbers = torch.tensor(np.concatenate([a.numbers for a in replicas]), device=dev)
        self.timestep = timestep * units.fs
        self.kT = temperature * units.kB
        self.friction = friction / units.fs
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        r, n = self.n_replicas, self.n_atoms
        self.batch = torch.arange(r, device=dev).repeat_interleave(n)
        self.fidelity = torch.full((r,), self.calc._fidelity_index, device=dev)
        self.cells = torch.zeros((r, 3, 3), dtype=dt, device=dev)
        local = torch.ones(n, n, dtype=torch.bool, device=dev).fill_diagonal_(False)
        self._local_pairs = local
        # replicas per dense force call: on a CPU the (R, N, N, 3, F) tensors of more than ~64
        # ethanol replicas fall out of cache (ethanol, 2 threads: 64 replicas 28 ms per step,
        # 256 replicas 181 ms in one call); one call for all of them on a GPU
        self.chunk = r if dev.type == "cuda" else max(1, DENSE_PAIRS_PER_CALL_CPU // (n * n))
        self._compiled = hasattr(self.calc.module, "molecules")  # MFCalculator(compile=True)
        self._dense = self._compiled and n <= DENSE_GRAPH_MAX_ATOMS  # dense fused graph, no pair search
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

    def _pairs(self) -> List[torch.Tensor]:
        """All-pairs search inside every replica at once: (R, N, N) distances -> flat pairs."""
        d2 = (self.positions.unsqueeze(1) - self.positions.unsqueeze(2)).pow(2).sum(-1)
        mask = (d2 < self.calc.cutoff**2) & self._local_pairs
        rep, i, j = mask.nonzero(as_tuple=True)
        edge_index = torch.stack([rep * self.n_atoms + i, rep * self.n_atoms + j])
        return [edge_index, torch.zeros((edge_index.shape[1], 3), dtype=self.positions.dtype, device=self.positions.device)]

    def _forces(self):
        with force_call(self.calc.module, self.calc.thread_policy, self.n_replicas * self.n_atoms):
            return self._all_forces()

    def _all_forces(self):
        if self._dense:
            numbers = self.numbers.view(self.n_replicas, self.n_atoms)
            energy, forces = [], []
            for start in range(0, self.n_replicas, self.chunk):  # cache-sized chunks on a CPU
                part = slice(start, start + self.chunk)
                out = self.calc.module.molecules(self.positions[part], numbers[part], self.fidelity[part])
                energy.append(out["energy"])
                forces.append(out["forces"])
            return torch.cat(energy), torch.cat(forces)
        edge_index, shifts = self._pairs()
        if self._compiled:
            out = self.calc.module.flat_molecules(self.positions.reshape(-1, 3), self.numbers, edge_index,
                                                  self.fidelity[self.batch])
            energy = out["energies"].view(self.n_replicas, self.n_atoms).sum(dim=1)
            return energy, out["forces"].view(self.n_replicas, self.n_atoms, 3)
        out = self.calc.module.forward(
            self.positions.reshape(-1, 3), self.numbers, self.cells, edge_index, shifts,
            self.fidelity, self.batch, True, False,
        )
        return out["energy"], out["forces"].view(self.n_replicas, self.n_atoms, 3)

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
