"""The force path compiled whole: energy, forces and stress in few fused kernels.

Small molecules on a CPU are overhead-bound: a PaiNN force call is ~800 tiny torch ops whose
launch cost (≈ 7 µs each here) dwarfs their arithmetic. Compiling only the network does not help
(the backward pass stays eager). Here the energy *and its gradient* are one function,
``torch.func.grad_and_value``, handed to ``torch.compile`` (inductor), so forward and backward are
traced into one graph and fused. Measured on 2 CPU threads for ethanol: 2.0 ms per force call
scripted, 0.9 ms compiled (benchmarks/compile_probe.py, benchmarks/md_speed.py).

``CompiledForceField`` has the same ``compute`` / ``neighbor_list`` interface as the exported
``ForceField``, so the calculator uses either. Molecules of up to ``DENSE_GRAPH_MAX_ATOMS`` atoms
go through the dense (R, N, N) layout of the network (``MultiFidelityPaiNN.dense_energies``): the whole step, pair search included, is
one compiled call (``molecules`` also serves replica MD). Larger and periodic structures go through
the pair list, whose search stays outside the compiled graph (its output size changes every step).
The first call of each variant compiles, which takes tens of seconds; inductor caches the result
on disk (``TORCHINDUCTOR_CACHE_DIR``), so a later process starts much faster.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .forcefield import ForceField

# Non-periodic structures up to this many atoms go through the dense (R, N, N) graph
# (MultiFidelityPaiNN.dense_energies): no neighbor search, no scatter; larger ones through the pair list. Measured
# with chno-mf on 2 CPU threads (ms per ASE force call, dense / pair list): ethanol 2.3 / 3.0,
# aspirin (21) 2.9 / 4.2, decane (32) 9.1 / 8.1, C16 alkane (50) 19 / 14.
DENSE_GRAPH_MAX_ATOMS = 24


def _inductor_options(device: torch.device) -> Dict[str, bool]:
    """On a CPU, inductor's C++ wrapper calls the kernels without the Python wrapper in between:
    ethanol's dense force call 1.9 -> 1.2 ms (median of alternating runs, 2 threads), at the
    price of a few seconds more on the first compilation. Left at the default on CUDA (not
    measured there)."""
    return {"cpp_wrapper": True} if device.type == "cpu" else {}


# Dynamo keeps its compiled graphs per code object: every model compiled in one process (and
# every graph variant of one) is another entry for the same inner ``energy`` function, and past
# torch._dynamo.config.recompile_limit (8 by default) dynamo silently runs that function eagerly
# instead. Measured (benchmarks/pareto.py, five models in one process, 2026-12-07): the 4th and
# 5th models compiled for aspirin ran at 15.7-19.9 ms/step instead of ~4.3.
RECOMPILE_LIMIT = 1024


def allow_many_compiled_models() -> None:
    """Raise dynamo's per-function recompile limits to at least RECOMPILE_LIMIT (never lower them)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        try:  # the names differ between torch versions (cache_size_limit became recompile_limit)
            if isinstance(getattr(config, name), int) and getattr(config, name) < RECOMPILE_LIMIT:
                setattr(config, name, RECOMPILE_LIMIT)
        except AttributeError:
            continue


class CompiledForceField:
    """``ForceField.compute`` with energy + gradient compiled as one graph (inference only)."""

    def __init__(self, forcefield: ForceField, dynamic: bool = True):
        allow_many_compiled_models()
        self.forcefield = forcefield.eval()
        for p in self.forcefield.parameters():
            p.requires_grad_(False)
        self.dynamic = dynamic
        self._compiled: Dict[bool, Callable] = {}
        self._compiled_dense: Optional[Callable] = None

    def _options(self) -> Dict[str, bool]:
        return _inductor_options(self.forcefield.species_of_z.device)

    # the interface the calculator and the batched predictor use
    def parameters(self):
        return self.forcefield.parameters()

    def state_dict(self):
        return self.forcefield.state_dict()

    @property
    def species_of_z(self) -> Tensor:
        return self.forcefield.species_of_z

    @property
    def model(self):
        return self.forcefield.model

    def neighbor_list(self, positions: Tensor, cell: Tensor, pbc: Tensor, backend: str = "auto") -> List[Tensor]:
        return self.forcefield.neighbor_list(positions, cell, pbc, backend)

    def forward(self, *args, **kwargs) -> Dict[str, Tensor]:  # batched path: eager
        return self.forcefield.forward(*args, **kwargs)

    def _function(self, stress: bool) -> Callable:
        if stress not in self._compiled:
            model = self.forcefield.model

            def energy(positions: Tensor, strain: Tensor, species: Tensor, edge_index: Tensor,
                       shifts: Tensor, cell: Tensor, fidelity: Tensor) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
                r = positions
                if stress:
                    r = positions + positions @ strain
                    cell = cell + cell @ strain
                i, j = edge_index[0], edge_index[1]
                vectors = r.index_select(0, j) - r.index_select(0, i) + shifts @ cell
                energies = model(species, edge_index, vectors, fidelity)
                distance = torch.sqrt((vectors * vectors).sum(dim=1).min())
                return energies.sum(), (energies, distance)

            argnums = (0, 1) if stress else 0
            grad = torch.func.grad_and_value(energy, argnums=argnums, has_aux=True)
            self._compiled[stress] = torch.compile(grad, dynamic=self.dynamic, options=self._options())
        return self._compiled[stress]

    def _dense_function(self) -> Callable:
        if self._compiled_dense is None:
            model = self.forcefield.model

            def energy(positions: Tensor, species: Tensor, fidelity: Tensor) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
                energies, shortest = model.dense_energies(species, positions, fidelity)
                return energies.sum(), (energies, shortest)

            grad = torch.func.grad_and_value(energy, has_aux=True)
            self._compiled_dense = torch.compile(grad, dynamic=self.dynamic, options=self._options())
        return self._compiled_dense

    def molecules(self, positions: Tensor, numbers: Tensor, fidelity: Tensor) -> Dict[str, Tensor]:
        """R non-periodic molecules of N atoms each, in one dense graph (replica MD).

        positions (R, N, 3), numbers (R, N), fidelity (R,) indices. Returns ``energy`` (R,),
        ``energies`` (R, N), ``forces`` (R, N, 3) and ``min_distance``. Every pair within the
        cutoff interacts; there is no neighbor search."""
        return self._dense(positions, self.forcefield.species_of_z[numbers], fidelity)

    def _dense(self, positions: Tensor, species: Tensor, fidelity: Tensor) -> Dict[str, Tensor]:
        grad, (_, (energies, shortest)) = self._dense_function()(positions.detach(), species, fidelity)
        energies = energies.detach()
        return {"energy": energies.sum(dim=1), "energies": energies, "forces": -grad.detach(),
                "min_distance": shortest.detach()}

    def flat_molecules(self, positions: Tensor, numbers: Tensor, edge_index: Tensor,
                       fidelity: Tensor) -> Dict[str, Tensor]:
        """Non-periodic structures flattened into one pair-list graph (replicas too large for
        the dense graph): per-atom ``fidelity``; returns per-atom ``energies`` and ``forces``."""
        species = self.forcefield.species_of_z[numbers]
        shifts = torch.zeros((edge_index.shape[1], 3), dtype=positions.dtype, device=positions.device)
        cell = torch.zeros((3, 3), dtype=positions.dtype, device=positions.device)
        grad, (_, (energies, _)) = self._function(False)(
            positions.detach(), cell, species, edge_index, shifts, cell, fidelity)
        return {"energies": energies.detach(), "forces": -grad.detach()}

    def compute(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        fidelity: int,
        compute_stress: bool = False,
        backend: str = "auto",
        edges: Optional[List[Tensor]] = None,
    ) -> Dict[str, Tensor]:
        """Same arguments and results as ``ForceField.compute``."""
        fidelities = self.forcefield.fidelities
        if fidelity < 0 or fidelity >= len(fidelities):
            raise ValueError("fidelity index out of range; this model has fidelities " + ", ".join(fidelities))
        species = self.forcefield.species(numbers)
        n_atoms = positions.shape[0]
        if (edges is None and backend in ("auto", "dense") and not bool(pbc.any())
                and 1 < n_atoms <= DENSE_GRAPH_MAX_ATOMS):
            fid = torch.full((1,), fidelity, dtype=torch.long, device=positions.device)
            out = self._dense(positions.unsqueeze(0), species.unsqueeze(0), fid)
            return {"energy": out["energy"][0], "energies": out["energies"][0], "forces": out["forces"][0],
                    "min_distance": out["min_distance"]}
        if edges is None:
            edges = self.neighbor_list(positions, cell, pbc, backend)
        edge_index, shifts = edges[0], edges[1]
        if edge_index.shape[1] == 0:  # no pairs: nothing to compile, the eager path is exact
            return self.forcefield.compute(positions, numbers, cell, pbc, fidelity, compute_stress, backend, edges)
        fid = torch.full((positions.shape[0],), fidelity, dtype=torch.long, device=positions.device)
        strain = torch.zeros((3, 3), dtype=positions.dtype, device=positions.device)
        grads, (energy, (energies, distance)) = self._function(compute_stress)(
            positions.detach(), strain, species, edge_index, shifts, cell, fid)
        out = {"energy": energy.detach(), "energies": energies.detach(), "min_distance": distance.detach()}
        if compute_stress:
            g_pos, g_strain = grads
            volume = torch.abs(torch.linalg.det(cell))
            out["stress"] = (g_strain / volume).detach()
        else:
            g_pos = grads
        out["forces"] = -g_pos.detach()
        return out
