"""The TorchScript module inside an exported metatomic model (see ``mfcalc.metatomic``).

Imported only by ``mfcalc.metatomic.export_metatomic``: it needs the optional package
``metatomic-torch`` at import time, for the types of the metatomic interface.
"""

from typing import Dict, List, Optional

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, NeighborListOptions, System
from torch import Tensor

from .model import MultiFidelityPaiNN


class MetatomicForceField(torch.nn.Module):
    """Energies of a multi-fidelity mfcalc network through metatomic's model interface.

    ``outputs`` maps each metatomic output name ("energy", "energy/<variant>") to the index of
    its fidelity. The engine computes the pair list (full, strict, within the model's cutoff)
    and registers it with autograd, so forces and stress come from the engine's backward pass
    through the pair vectors, exactly as in mfcalc's own force path (the same network, the same
    pairs). ``selected_atoms`` (domain decomposition) sums, or returns, only the selected
    atoms' energies; every atom of the system is still a neighbour.
    """

    def __init__(self, model: MultiFidelityPaiNN, species_of_z: Tensor, outputs: Dict[str, int], cutoff: float):
        super().__init__()
        self.model = model
        self.register_buffer("species_of_z", species_of_z.clone())
        self.output_fidelity: Dict[str, int] = dict(outputs)
        self.cutoff = float(cutoff)
        self.neighbors = NeighborListOptions(cutoff=self.cutoff, full_list=True, strict=True, requestor="mfcalc")

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.neighbors]

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels],
    ) -> Dict[str, TensorMap]:
        results: Dict[str, TensorMap] = {}
        if len(systems) == 0 or len(outputs) == 0:
            return results
        species_list: List[Tensor] = []
        edges: List[Tensor] = []
        vectors_list: List[Tensor] = []
        system_of_atom: List[Tensor] = []
        atom_index: List[Tensor] = []
        offset = 0
        for s, system in enumerate(systems):
            n = len(system)
            types = system.types.to(torch.long)
            species = self.species_of_z[types]
            if bool((species < 0).any()):
                unknown: List[int] = torch.unique(types[species < 0]).tolist()
                raise ValueError("atomic types " + str(unknown) + " are not in this mfcalc model")
            neighbors = system.get_neighbor_list(self.neighbors)
            pairs = neighbors.samples.values
            first = pairs[:, 0].to(torch.long) + offset
            second = pairs[:, 1].to(torch.long) + offset
            edges.append(torch.stack([first, second]))
            vectors_list.append(neighbors.values.reshape(-1, 3))
            species_list.append(species)
            system_of_atom.append(torch.full((n,), s, dtype=torch.long, device=types.device))
            atom_index.append(torch.arange(n, dtype=torch.long, device=types.device))
            offset += n
        species = torch.cat(species_list)
        edge_index = torch.cat(edges, dim=1)
        vectors = torch.cat(vectors_list)
        system_index = torch.cat(system_of_atom)
        atoms = torch.cat(atom_index)
        device = species.device
        if selected_atoms is None:
            keep = torch.ones(species.shape[0], dtype=torch.bool, device=device)
        else:
            chosen = selected_atoms.values.to(torch.long).to(device)
            keep = torch.zeros(species.shape[0], dtype=torch.bool, device=device)
            starts: List[int] = [0]
            for system in systems[:-1]:
                starts.append(starts[-1] + len(system))
            start = torch.tensor(starts, dtype=torch.long, device=device)
            keep[start[chosen[:, 0]] + chosen[:, 1]] = True

        for name, request in outputs.items():
            if name not in self.output_fidelity:
                raise ValueError("this mfcalc model has no output '" + name + "'")
            fidelity = torch.full_like(species, self.output_fidelity[name])
            energies = self.model(species, edge_index, vectors, fidelity)
            properties = Labels(["energy"], torch.zeros((1, 1), dtype=torch.int32, device=device))
            if request.sample_kind == "atom":
                samples = Labels(
                    ["system", "atom"],
                    torch.stack([system_index[keep], atoms[keep]], dim=1).to(torch.int32),
                )
                values = energies[keep].unsqueeze(-1)
            else:
                values = torch.zeros(len(systems), dtype=energies.dtype, device=device)
                values = values.index_add(0, system_index[keep], energies[keep]).unsqueeze(-1)
                samples = Labels(
                    ["system"], torch.arange(len(systems), dtype=torch.int32, device=device).unsqueeze(-1)
                )
            block = TensorBlock(values=values, samples=samples,
                                components=torch.jit.annotate(List[Labels], []), properties=properties)
            results[name] = TensorMap(Labels(["_"], torch.zeros((1, 1), dtype=torch.int32, device=device)), [block])
        return results
