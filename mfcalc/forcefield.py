"""The force path: structure -> neighbor list -> model -> energy -> forces and stress.

``ForceField`` wraps a ``MultiFidelityPaiNN`` and is what gets exported to TorchScript: one file
holds the neighbor search (``dense`` and ``vesin``), every fidelity, and the autograd forces and
stress. It takes either one structure (``compute``) or a flat batch of structures with a
precomputed pair list (``forward``), which is what training and batched prediction use.

Sign conventions (ASE's): forces = -dE/dR; stress = (1/V) dE/d(strain), in eV/Å^3.
"""

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .model import MultiFidelityPaiNN
from .neighbors import dense_neighbor_list, pick_backend, vesin_neighbor_list


class ForceField(nn.Module):
    """Energies, forces and stress at any of the model's fidelities."""

    def __init__(self, model: MultiFidelityPaiNN):
        super().__init__()
        self.model = model
        self.cutoff: float = float(model.config["cutoff"])
        self.fidelities: List[str] = list(model.config["fidelities"])
        self.elements: List[int] = list(model.config["elements"])
        table = torch.full((119,), -1, dtype=torch.long)
        for index, z in enumerate(self.elements):
            table[z] = index
        self.register_buffer("species_of_z", table)

    def species(self, numbers: Tensor) -> Tensor:
        """The model's element index of each atomic number; an error naming the atomic numbers the
        model was not trained on."""
        species = self.species_of_z[numbers]
        if bool((species < 0).any()):
            unknown: List[int] = torch.unique(numbers[species < 0]).tolist()
            raise ValueError(
                "structure has atomic number(s) " + str(unknown)
                + " that this model does not know; it knows atomic numbers " + str(self.elements)
            )
        return species

    def forward(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        edge_index: Tensor,
        shifts: Tensor,
        fidelity: Tensor,
        batch: Tensor,
        compute_forces: bool = True,
        compute_stress: bool = False,
    ) -> Dict[str, Tensor]:
        """A flat batch of B structures.

        positions (N, 3), numbers (N,), cell (B, 3, 3), edge_index (2, E), shifts (E, 3),
        fidelity (B,) indices into ``self.fidelities``, batch (N,) structure of each atom.
        Returns energy (B,), energies (N,), min_distance (shortest pair, when there are pairs),
        and forces (N, 3) / stress (B, 3, 3) when asked.
        """
        species = self.species(numbers)
        n_structures = fidelity.shape[0]
        positions = positions.detach().requires_grad_(compute_forces or compute_stress)
        inputs: List[Tensor] = [positions]
        r = positions
        if compute_stress:
            strain = torch.zeros(
                (n_structures, 3, 3), dtype=positions.dtype, device=positions.device
            ).requires_grad_(True)
            inputs.append(strain)
            r = positions + torch.bmm(positions.unsqueeze(1), strain[batch]).squeeze(1)
            cell = cell + torch.bmm(cell, strain)
        i, j = edge_index[0], edge_index[1]
        vectors = r.index_select(0, j) - r.index_select(0, i)
        if n_structures == 1:
            vectors = vectors + shifts @ cell[0]
        else:
            vectors = vectors + torch.bmm(shifts.unsqueeze(1), cell[batch[i]]).squeeze(1)

        energies = self.model(species, edge_index, vectors, fidelity[batch])
        if n_structures == 1:
            energy = energies.sum().unsqueeze(0)
        else:
            energy = torch.zeros(
                n_structures, dtype=energies.dtype, device=energies.device
            ).index_add(0, batch, energies)
        out: Dict[str, Tensor] = {"energy": energy, "energies": energies}
        if not self.training and edge_index.shape[1] > 0:  # lets callers warn about close atoms
            out["min_distance"] = torch.sqrt((vectors * vectors).sum(dim=1).min()).detach()
        if compute_forces or compute_stress:
            grads = torch.autograd.grad(
                [energy.sum()], inputs, create_graph=self.training, allow_unused=True
            )
            g_pos = grads[0]
            if g_pos is None:  # no pairs at all: energy does not depend on positions
                g_pos = torch.zeros_like(positions)
            out["forces"] = -g_pos
            if compute_stress:
                g_strain = grads[1]
                if g_strain is None:
                    g_strain = torch.zeros_like(cell)
                volume = torch.abs(torch.linalg.det(cell.detach()))
                out["stress"] = g_strain / volume.view(-1, 1, 1)
        if not self.training:  # hand back plain numbers, not pieces of a graph
            for key in list(out.keys()):
                out[key] = out[key].detach()
        return out

    @torch.jit.unused
    def dense_forward(self, positions: Tensor, numbers: Tensor, fidelity: Tensor,
                      compute_forces: bool = True) -> Dict[str, Tensor]:
        """R molecules of N atoms each (not periodic) through the dense (R, N, N) layout, no pair
        list: positions (R, N, 3), numbers (R, N), fidelity (R,). The same numbers as ``forward``
        on their flat batch, in its layout: energy (R,), energies (R N,), forces (R N, 3). Used by
        training for batches of same-size molecules (no scatter in the double backward)."""
        species = self.species(numbers)
        positions = positions.detach().requires_grad_(compute_forces)
        energies, _ = self.model.dense_energies(species, positions, fidelity)
        energy = energies.sum(dim=1)
        out: Dict[str, Tensor] = {"energy": energy, "energies": energies.reshape(-1)}
        if compute_forces:
            (grad,) = torch.autograd.grad([energy.sum()], [positions], create_graph=self.training)
            out["forces"] = -grad.reshape(-1, 3)
        return out

    @torch.jit.export
    def neighbor_list(
        self, positions: Tensor, cell: Tensor, pbc: Tensor, backend: str = "auto"
    ) -> List[Tensor]:
        """Pairs within the model's cutoff for one structure: [edge_index, shifts]."""
        if backend == "auto":
            backend = pick_backend(positions.shape[0], positions.device, bool(pbc.any()))
        if backend == "dense":
            edge_index, shifts = dense_neighbor_list(positions, cell, pbc, self.cutoff)
        elif backend == "vesin":
            edge_index, shifts = vesin_neighbor_list(positions, cell, pbc, self.cutoff)
        else:
            raise ValueError(
                "inside a model file the neighbor list is 'dense', 'vesin' or 'auto', got "
                + backend
            )
        return [edge_index, shifts]

    @torch.jit.export
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
        """One structure, everything inside: neighbor list -> energy -> forces (-> stress).

        ``edges`` may carry a neighbor list computed earlier ([edge_index, shifts]).
        Returns energy (scalar), energies (N,), forces (N, 3), stress (3, 3) if asked.
        """
        if fidelity < 0 or fidelity >= len(self.fidelities):
            raise ValueError(
                "fidelity index out of range; this model has fidelities "
                + ", ".join(self.fidelities)
            )
        if edges is None:
            edges = self.neighbor_list(positions, cell, pbc, backend)
        batch = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
        fid = torch.full((1,), fidelity, dtype=torch.long, device=positions.device)
        out = self.forward(
            positions, numbers, cell.unsqueeze(0), edges[0], edges[1], fid, batch, True,
            compute_stress,
        )
        out["energy"] = out["energy"][0]
        if compute_stress:
            out["stress"] = out["stress"][0]
        return out
