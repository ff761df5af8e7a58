"""Physics of the force path: forces = -dE/dR, stress = (1/V) dE/d(strain), invariances,
TorchScript == eager, and float32 close to float64."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from mfcalc import MFCalculator
from mfcalc.modelfile import load_model

from helpers import numeric_forces, numeric_stress



def energy_forces(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


@pytest.mark.parametrize("fidelity", ["low", "high"])
@pytest.mark.parametrize("structure", ["ethanol", "silicon_small_cell"])
def test_forces_are_minus_gradient_of_energy(network_model, request, structure, fidelity):
    atoms = request.getfixturevalue(structure)
    calc = MFCalculator(network_model, fidelity=fidelity, dtype="float64", device="cpu")
    atoms.calc = calc
    forces = atoms.get_forces()
    numeric = numeric_forces(atoms, calc)
    assert np.abs(forces).max() > 1e-3  # the test means something
    np.testing.assert_allclose(forces, numeric, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("pbc", [[True, True, True], [True, True, False]])
def test_stress_is_finite_strain_derivative(network_model, silicon_small_cell, pbc):
    atoms = silicon_small_cell
    atoms.pbc = pbc
    calc = MFCalculator(network_model, fidelity="mid", dtype="float64", device="cpu")
    atoms.calc = calc
    stress = atoms.get_stress(voigt=False)
    # h = 1e-5: energies are ~1e4 eV, float64 round-off in the difference is ~1e-12 relative
    numeric = numeric_stress(atoms, calc, h=1e-5)
    assert np.abs(stress).max() > 1e-5  # the test means something: 1000x its tolerance
    np.testing.assert_allclose(stress, numeric, atol=1e-8)
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)


def test_rotation_translation_permutation(network_model, ethanol):
    calc = MFCalculator(network_model, fidelity="high", dtype="float64", device="cpu")
    e0, f0 = energy_forces(calc, ethanol)
    rot = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    moved = ethanol.copy()
    moved.positions = ethanol.positions @ rot.T + [3.0, -40.0, 1000.0]
    e1, f1 = energy_forces(calc, moved)
    assert e1 == pytest.approx(e0, abs=1e-9)
    np.testing.assert_allclose(f1, f0 @ rot.T, atol=1e-9)
    order = np.random.default_rng(0).permutation(len(ethanol))
    e2, f2 = energy_forces(calc, ethanol[order])
    assert e2 == pytest.approx(e0, abs=1e-9)
    np.testing.assert_allclose(f2, f0[order], atol=1e-9)


def test_periodic_energy_is_invariant_to_the_choice_of_images(network_model, silicon_small_cell):
    calc = MFCalculator(network_model, fidelity="low", dtype="float64", device="cpu")
    e0, f0 = energy_forces(calc, silicon_small_cell)
    wrapped = silicon_small_cell.copy()
    wrapped.wrap()
    e1, f1 = energy_forces(calc, wrapped)
    assert e1 == pytest.approx(e0, abs=1e-9)
    np.testing.assert_allclose(f1, f0, atol=1e-9)
    # a supercell has exactly twice the energy
    e2, f2 = energy_forces(calc, silicon_small_cell.repeat((2, 1, 1)))
    assert e2 == pytest.approx(2 * e0, rel=1e-10)


@pytest.mark.parametrize("network", ["l1", "l2", "l2-products"])
@pytest.mark.parametrize("mode", ["film", "readout"])
def test_torchscript_equals_eager(tmp_path, mode, network, ethanol, silicon_small_cell, forcefield_factory):
    from mfcalc.modelfile import export_model

    eager = forcefield_factory(seed=3, mode=mode, network=network).eval()
    export_model(eager, tmp_path / "m.pt", dtype=torch.float64)
    scripted, _ = load_model(tmp_path / "m.pt")
    for atoms in (ethanol, silicon_small_cell):
        args = (
            torch.tensor(atoms.positions), torch.tensor(atoms.numbers),
            torch.tensor(atoms.cell.array), torch.tensor(atoms.pbc),
        )
        stress = bool(atoms.pbc.any())
        for fidelity in range(3):
            a = eager.compute(*args, fidelity, stress)
            b = scripted.compute(*args, fidelity, stress)
            for key in a:
                torch.testing.assert_close(a[key], b[key], atol=1e-10, rtol=0)


def test_fidelities_differ_and_float32_is_close(network_model, ethanol):
    results = {}
    for dtype in ("float32", "float64"):
        for fid in ("low", "high"):
            results[dtype, fid] = energy_forces(
                MFCalculator(network_model, fidelity=fid, dtype=dtype, device="cpu"), ethanol
            )
    assert not np.allclose(results["float64", "low"][1], results["float64", "high"][1])
    for fid in ("low", "high"):
        e32, f32 = results["float32", fid]
        e64, f64 = results["float64", fid]
        assert e32 == pytest.approx(e64, abs=1e-3)
        np.testing.assert_allclose(f32, f64, atol=1e-4)


def test_isolated_atoms_get_reference_energy(network_model):
    from ase import Atoms

    calc = MFCalculator(network_model, fidelity="low", dtype="float64", device="cpu")
    atoms = Atoms("O", positions=[[0, 0, 0]])
    atoms.calc = calc
    # a lone atom has no neighbors: its energy is the network's free-atom term, forces are zero
    assert np.isfinite(atoms.get_potential_energy())
    np.testing.assert_array_equal(atoms.get_forces(), np.zeros((1, 3)))
    far = Atoms("OO", positions=[[0, 0, 0], [0, 0, 50]])
    far.calc = calc
    assert far.get_potential_energy() == pytest.approx(2 * atoms.get_potential_energy(), abs=1e-10)


@pytest.mark.parametrize("pair", ["HH", "CO"])
def test_energy_is_continuous_where_a_pair_crosses_the_cutoff(network_model, pair):
    """A pair's whole message (the filter bias included) must fade to zero at the cutoff: the
    energy of a dimer just inside the cutoff equals that just outside, and E(r) is smooth there
    (models before the filter envelope jumped by 0.1-0.6 eV)."""
    from ase import Atoms

    calc = MFCalculator(network_model, fidelity="mid", dtype="float64", device="cpu")
    cutoff = calc.cutoff
    energies = []
    for r in (cutoff - 0.02, cutoff - 1e-6, cutoff + 1e-6, cutoff + 0.02):
        atoms = Atoms(pair, positions=[[0, 0, 0], [r, 0, 0]])
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
    assert energies[1] == pytest.approx(energies[2], abs=1e-9)
    assert energies[0] == pytest.approx(energies[3], abs=1e-5)  # zero slope: second order in 0.02 Å


def test_models_from_before_the_filter_envelope_keep_their_numbers(forcefield_factory, ethanol):
    """A model config without 'filter_envelope' (files from mfcalc <= 0.3) rebuilds the old network,
    so fine-tuning or re-exporting an old file reproduces its predictions."""
    from mfcalc.modelfile import build_forcefield

    new = forcefield_factory()
    config = dict(new.model.config)
    config.pop("filter_envelope")
    old = build_forcefield(config, new.state_dict()).double()
    args = (torch.tensor(ethanol.positions), torch.tensor(ethanol.numbers), torch.zeros(3, 3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.bool))
    e_new = float(new.eval().compute(*args, 1)["energy"])
    e_old = float(old.eval().compute(*args, 1)["energy"])
    assert not old.model.interactions[0].filter_envelope and new.model.interactions[0].filter_envelope
    assert e_old != pytest.approx(e_new, abs=1e-6)  # the envelope changes every pair inside the cutoff


@pytest.mark.parametrize("network", ["l1", "l2", "l2-products"])
def test_network_exports_with_torch_export(forcefield_factory, ethanol, network):
    """The network stays torch.export-friendly (no data-dependent Python control flow): exported
    once with symbolic atom and pair counts, it gives the eager energies and, through autograd,
    the eager forces for a structure of another size."""
    from mfcalc.neighbors import dense_neighbor_list

    forcefield = forcefield_factory(seed=4, network=network).eval()
    model = forcefield.model

    def inputs(atoms):
        positions = torch.tensor(atoms.positions, requires_grad=True)
        edge_index, _ = dense_neighbor_list(positions, torch.zeros(3, 3, dtype=torch.float64),
                                            torch.zeros(3, dtype=torch.bool), forcefield.cutoff)
        vectors = positions[edge_index[1]] - positions[edge_index[0]]
        species = forcefield.species_of_z[torch.tensor(atoms.numbers)]
        fidelity = torch.full((len(atoms),), 1, dtype=torch.long)
        return positions, (species, edge_index, vectors, fidelity)

    _, example = inputs(ethanol)
    atoms_dim, edges_dim = torch.export.Dim("atoms", min=2), torch.export.Dim("edges", min=2)
    exported = torch.export.export(
        model, example,
        dynamic_shapes=({0: atoms_dim}, {1: edges_dim}, {0: edges_dim}, {0: atoms_dim}),
    ).module()
    shifted = ethanol.copy()
    shifted.positions += [3.0, 0.5, 0.2]
    bigger = ethanol + shifted
    for atoms in (ethanol, bigger):
        positions, args = inputs(atoms)
        e_eager = model(*args).sum()
        (f_eager,) = torch.autograd.grad(e_eager, positions)
        positions, args = inputs(atoms)
        e_export = exported(*args).sum()
        (f_export,) = torch.autograd.grad(e_export, positions)
        torch.testing.assert_close(e_export, e_eager, atol=1e-10, rtol=0)
        torch.testing.assert_close(f_export, f_eager, atol=1e-10, rtol=0)
