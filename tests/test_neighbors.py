"""Every neighbor-list backend gives exactly the pairs (and image shifts) ASE's gives."""

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mfcalc.neighbors import neighbor_list

BACKENDS = ["dense", "vesin", "auto"]
try:
    import torch_cluster  # noqa: F401

    BACKENDS.append("torch-cluster")
except ImportError:
    pass


def pairs(i, j, shifts):
    shifts = np.rint(np.asarray(shifts)).astype(int)
    return sorted(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), map(tuple, shifts.tolist())))


def structures():
    mol = molecule("CH3CH2OH")
    out = {"molecule": mol}
    si = bulk("Si", "diamond", a=5.43)  # 2 atoms, cell far smaller than 2 x cutoff
    si.rattle(0.05, seed=0)
    out["small periodic cell"] = si
    tri = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 1))
    tri.cell = tri.cell.array + [[0.0, 0.4, 0.0], [0.5, 0.0, 0.2], [0.0, 0.3, 0.0]]
    tri.positions += [13.0, -20.0, 3.5]  # far outside the cell
    out["triclinic, unwrapped"] = tri
    wire = molecule("CH3CH2OH")
    wire.cell = [[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # zero cell where aperiodic
    wire.pbc = [True, False, False]
    out["mixed pbc: 1D wire"] = wire
    slab = bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1))
    slab.pbc = [True, True, False]
    slab.rattle(0.1, seed=3)
    out["mixed pbc: slab"] = slab
    water = molecule("H2O")
    water.center(vacuum=4.0)
    water.pbc = True
    out["molecule in a periodic box"] = water
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(structures()))
@pytest.mark.parametrize("cutoff", [2.6, 5.0])
def test_backends_match_ase(name, backend, cutoff):
    atoms = structures()[name]
    reference = pairs(*ase_neighbor_list("ijS", atoms, cutoff))
    edge_index, shifts = neighbor_list(
        torch.tensor(atoms.positions), torch.tensor(atoms.cell.array), torch.tensor(atoms.pbc),
        cutoff, backend,
    )
    assert edge_index.dtype == torch.long and shifts.shape == (edge_index.shape[1], 3)
    assert pairs(edge_index[0], edge_index[1], shifts) == reference


@pytest.mark.parametrize("backend", ["dense", "vesin"])
def test_pair_vectors_follow_the_shift_convention(backend):
    atoms = structures()["triclinic, unwrapped"]
    pos, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)
    edge_index, shifts = neighbor_list(pos, cell, torch.tensor(atoms.pbc), 4.0, backend)
    vectors = pos[edge_index[1]] - pos[edge_index[0]] + shifts @ cell
    assert torch.all(vectors.norm(dim=1) < 4.0)
    d_ref = np.sort(ase_neighbor_list("d", atoms, 4.0))
    assert np.allclose(np.sort(vectors.norm(dim=1).numpy()), d_ref)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown neighbor-list backend 'kdtree'.*dense"):
        neighbor_list(torch.zeros(2, 3), torch.zeros(3, 3), torch.zeros(3, dtype=torch.bool), 5.0, "kdtree")


def test_auto_picks_by_size_and_periodicity():
    """On a CPU `auto` takes the all-pairs search only for small molecules; periodic cells go
    to the cell list whatever their size (the dense search loops over images)."""
    from mfcalc.neighbors import DENSE_MAX_ATOMS_CPU, pick_backend

    cpu = torch.device("cpu")
    assert pick_backend(9, cpu) == "dense"
    assert pick_backend(DENSE_MAX_ATOMS_CPU + 1, cpu) == "vesin"
    assert pick_backend(9, cpu, periodic=True) == "vesin"
    assert pick_backend(9, torch.device("cuda"), periodic=True) == "dense"
