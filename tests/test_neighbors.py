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


@pytest.mark.parametrize("backend", ["dense", "vesin"])
def test_strided_inputs_give_the_same_pairs(backend):
    """Views with odd strides (an expanded pbc, a transposed cell, a slice of positions) are what
    other engines hand over; the pair list must not depend on the memory layout."""
    torch.manual_seed(0)
    cell = torch.tensor([[3.0, 0.0, 0.0], [0.4, 3.2, 0.0], [0.3, -0.2, 3.4]], dtype=torch.float64)
    positions = torch.rand(6, 3, dtype=torch.float64) @ cell
    pbc = torch.tensor([True, True, True])
    ref = neighbor_list(positions, cell, pbc, 2.5, backend)
    strided_pbc = torch.tensor(True).expand(3)
    strided_cell = cell.t().contiguous().t()
    strided_positions = torch.cat([positions, positions], dim=1)[:, :3]
    for _ in range(5):  # the misread was intermittent
        got = neighbor_list(strided_positions, strided_cell, strided_pbc, 2.5, backend)
        assert sorted(map(tuple, torch.cat([got[0].t(), got[1].to(torch.long)], 1).tolist())) == \
            sorted(map(tuple, torch.cat([ref[0].t(), ref[1].to(torch.long)], 1).tolist()))


def test_strided_pbc_inside_a_model_file(tiny_model):
    """Through a model file's scripted search (vesin), an expanded pbc was misread about once in
    50 calls before the inputs were made contiguous."""
    from mfcalc.modelfile import load_model

    module, _ = load_model(tiny_model)
    torch.manual_seed(0)
    cell = torch.tensor([[3.0, 0.0, 0.0], [0.4, 3.2, 0.0], [0.3, -0.2, 3.4]], dtype=torch.float64)
    positions = torch.rand(6, 3, dtype=torch.float64) @ cell
    ref = module.neighbor_list(positions, cell, torch.tensor([True, True, True]), "vesin")[0].shape[1]
    counts = [module.neighbor_list(positions, cell, torch.tensor(True).expand(3), "vesin")[0].shape[1]
              for _ in range(200)]
    assert counts == [ref] * 200
