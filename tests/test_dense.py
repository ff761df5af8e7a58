"""The dense (R, N, N) layout of the network gives the pair-list layout's energies and forces."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from mfcalc.neighbors import dense_neighbor_list


def _structures():
    """Three same-size molecules, two of them with pairs beyond the 4 Å cutoff (a stretched
    chain, and ethanol far from a water), so that the mask matters."""
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=0)
    chain = Atoms("CCCCCCCCH", positions=[[1.5 * k, 0.1 * k * k, 0.0] for k in range(9)])
    apart = molecule("CH3CH2OH")[:6] + molecule("H2O")
    apart.positions[6:] += [7.0, 0.0, 0.0]
    return [ethanol, chain, apart]


def _flat(forcefield, atoms, fidelity):
    positions = torch.tensor(atoms.positions, dtype=torch.float64)
    cell = torch.zeros((3, 3), dtype=torch.float64)
    pbc = torch.zeros(3, dtype=torch.bool)
    edge_index, shifts = dense_neighbor_list(positions, cell, pbc, forcefield.cutoff)
    numbers = torch.tensor(atoms.numbers)
    out = forcefield(positions, numbers, cell.unsqueeze(0), edge_index, shifts, torch.tensor([fidelity]),
                     torch.zeros(len(atoms), dtype=torch.long), True, False)
    return out["energies"], out["forces"]


@pytest.mark.parametrize("network", ["l1", "l2", "l2-products"])
@pytest.mark.parametrize("mode", ["film", "readout"])
@pytest.mark.parametrize("envelope", [True, False])
def test_dense_graph_equals_the_pair_list(forcefield_factory, mode, envelope, network):
    forcefield = forcefield_factory(seed=3, mode=mode, network=network)
    forcefield.model.interactions[0].filter_envelope = envelope
    forcefield.model.interactions[1].filter_envelope = envelope
    structures = _structures()
    fidelities = [0, 2, 1]
    positions = torch.tensor(np.stack([a.positions for a in structures]), requires_grad=True)
    species = forcefield.species_of_z[torch.tensor(np.stack([a.numbers for a in structures]))]
    energies, shortest = forcefield.model.dense_energies(species, positions, torch.tensor(fidelities))
    forces = -torch.autograd.grad(energies.sum(), positions)[0]
    assert torch.isfinite(forces).all()
    for k, atoms in enumerate(structures):
        flat_energies, flat_forces = _flat(forcefield, atoms, fidelities[k])
        torch.testing.assert_close(energies[k].detach(), flat_energies, atol=1e-10, rtol=0)
        torch.testing.assert_close(forces[k], flat_forces, atol=1e-10, rtol=0)
    assert float(shortest.detach()) == pytest.approx(min(a.get_all_distances()[np.triu_indices(9, 1)].min()
                                                for a in structures))


def test_every_layout_names_the_atomic_numbers_the_model_does_not_know(forcefield_factory):
    """The pair-list forward, the dense layout, the TorchScript file and the compiled path share
    one element check: the same error, naming the unknown atomic number and the known ones."""
    from mfcalc.compiled import CompiledForceField

    forcefield = forcefield_factory(seed=0).eval()
    atoms = molecule("CH3CH2OH")
    atoms.numbers[2] = 7  # nitrogen: the test model knows H, C, O, Si
    message = r"atomic number\(s\) \[7\] that this model does not know; it knows atomic numbers \[1, 6, 8, 14\]"
    with pytest.raises(ValueError, match=message):
        _flat(forcefield, atoms, 0)
    positions = torch.tensor(atoms.positions, dtype=torch.float64).unsqueeze(0)
    with pytest.raises(ValueError, match=message):
        forcefield.dense_forward(positions, torch.tensor(atoms.numbers).unsqueeze(0), torch.tensor([0]))
    with pytest.raises(Exception, match=message):
        _flat(torch.jit.script(forcefield), atoms, 0)
    cell = torch.zeros((3, 3), dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        CompiledForceField(forcefield).compute(positions[0], torch.tensor(atoms.numbers), cell,
                                               torch.zeros(3, dtype=torch.bool), 0)
