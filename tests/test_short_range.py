"""Short range: every element pair is repulsive and monotonic as two atoms are pushed together,
and the core (clamped learned part + ZBL) changes nothing at ordinary distances."""

import itertools

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.data import covalent_radii

from mfcalc.model import zbl_energy


def dimer_curve(forcefield, z1, z2, distances, fidelity=0):
    energies, forces = [], []
    for d in distances:
        positions = torch.tensor([[0.0, 0.0, 0.0], [d, 0.0, 0.0]], dtype=torch.float64)
        out = forcefield.compute(positions, torch.tensor([z1, z2]), torch.zeros(3, 3, dtype=torch.float64),
                                 torch.zeros(3, dtype=torch.bool), fidelity)
        energies.append(float(out["energy"]))
        forces.append(float(out["forces"][1, 0]))
    return np.array(energies), np.array(forces)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_pair_is_repulsive_and_monotonic_inside_the_core(forcefield_factory, seed):
    forcefield = forcefield_factory(seed=seed).eval()
    model = forcefield.model
    for z1, z2 in itertools.combinations_with_replacement(forcefield.elements, 2):
        core = model.core_radius_factor * (covalent_radii[z1] + covalent_radii[z2])
        distances = np.linspace(0.02, core, 60)
        for fidelity in range(len(forcefield.fidelities)):
            energies, forces = dimer_curve(forcefield, z1, z2, distances, fidelity)
            assert np.isfinite(energies).all() and np.isfinite(forces).all()
            assert (np.diff(energies) < 0).all(), (z1, z2, fidelity, energies)
            assert (forces > 0).all(), (z1, z2, fidelity)  # the second atom is pushed away


def test_the_core_changes_nothing_at_ordinary_distances(forcefield_factory):
    forcefield = forcefield_factory(seed=4).eval()
    without = forcefield_factory(seed=4).eval()
    without.model.use_core = False
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=3)
    args = (torch.tensor(atoms.positions), torch.tensor(atoms.numbers), torch.zeros(3, 3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.bool), 1)
    a, b = forcefield.compute(*args), without.compute(*args)
    assert float(a["energy"]) == float(b["energy"])
    assert torch.equal(a["forces"], b["forces"])


def test_the_core_is_smooth_across_its_radii(forcefield_factory):
    """Energy and force continuous through the clamp radius and the ZBL switch radius."""
    forcefield = forcefield_factory(seed=5).eval()
    model = forcefield.model
    total = covalent_radii[8] + covalent_radii[1]
    h = 1e-5
    for radius in (model.core_radius_factor * total, model.core_switch_factor * total):
        energies, forces = dimer_curve(forcefield, 8, 1, radius + np.array([-h, 0.0, h, -1e-8, 1e-8]))
        left, right = (energies[1] - energies[0]) / h, (energies[2] - energies[1]) / h
        assert abs(left - right) < 0.01 * abs(left) + 1e-3, (radius, left, right)  # no kink
        assert abs(forces[4] - forces[3]) < 1e-3 * abs(forces[3]) + 1e-6  # no force jump
        assert forces[1] == pytest.approx(-0.5 * (left + right), rel=1e-3)  # F = -dE/dr


def test_zbl_matches_the_published_screening():
    # H-H at 0.5 Å: a = 0.4685 / (2 * 1**0.23) = 0.23425 Å
    x = 0.5 / 0.23425
    phi = (0.18175 * np.exp(-3.19980 * x) + 0.50986 * np.exp(-0.94229 * x)
           + 0.28022 * np.exp(-0.40290 * x) + 0.02817 * np.exp(-0.20162 * x))
    expected = 14.3996454784 / 0.5 * phi
    one = torch.tensor([1.0], dtype=torch.float64)
    assert float(zbl_energy(torch.tensor([0.5], dtype=torch.float64), one, one)) == pytest.approx(expected, rel=1e-12)


def test_the_dense_layout_has_the_same_core(forcefield_factory):
    forcefield = forcefield_factory(seed=6).eval()
    atoms = Atoms("HHOC", positions=[[0, 0, 0], [0.15, 0, 0], [1.2, 0.3, 0], [0.2, 0.9, 0.1]])
    positions = torch.tensor(atoms.positions).unsqueeze(0)
    species = forcefield.species_of_z[torch.tensor(atoms.numbers)].unsqueeze(0)
    dense, _ = forcefield.model.dense_energies(species, positions, torch.tensor([2]))
    flat = forcefield.compute(positions[0], torch.tensor(atoms.numbers), torch.zeros(3, 3, dtype=torch.float64),
                              torch.zeros(3, dtype=torch.bool), 2)["energies"]
    torch.testing.assert_close(dense[0].detach(), flat, atol=1e-9, rtol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", ["chno-mf", "ethanol-mf"])
def test_shipped_models_are_repulsive_at_short_range(name):
    """Every element pair, every fidelity: the dimer energy rises monotonically as the two atoms
    are pushed from 0.6 x the sum of their covalent radii (inside every real bond) to 0.05 Å,
    and stays finite (chno-mf before the core: H2 at 0.1 Å was -4e12 eV)."""
    from mfcalc import MFCalculator

    # odd-electron dimers (C-H) are radicals the model cannot represent: asked for anyway, as a scan
    calc = MFCalculator(name, device="cpu", dtype="float64", check_domain=False, allow_unsupported_state=True)
    for z1, z2 in itertools.combinations_with_replacement(calc.elements, 2):
        top = 0.6 * (covalent_radii[z1] + covalent_radii[z2])
        distances = np.linspace(0.05, top, 40)
        energies = np.array([
            calc.predict_all_fidelities(Atoms([z1, z2], positions=[[0, 0, 0], [d, 0, 0]]))["energy"]
            for d in distances
        ])  # (distances, fidelities)
        assert np.isfinite(energies).all()
        rising = np.diff(energies, axis=0) < 0
        bad = [calc.fidelities[f] for f in range(energies.shape[1]) if not rising[:, f].all()]
        assert not bad, f"{z1}-{z2} not monotonic below {top:.2f} Å at {bad}"


@pytest.mark.parametrize("squeeze", [1.0, 0.4])
def test_the_model_file_skips_the_core_only_when_no_pair_reaches_it(tiny_model, forcefield_factory, squeeze):
    """The TorchScript file skips the core terms when every pair is beyond them (a CPU shortcut):
    it must agree with the eager network, which always computes them, with and without close pairs."""
    from mfcalc import load_model

    scripted, _ = load_model(tiny_model)
    eager = forcefield_factory().eval()  # the weights of tiny_model (same seed)
    atoms = molecule("CH3CH2OH")
    atoms.positions *= squeeze
    args = (torch.tensor(atoms.positions), torch.tensor(atoms.numbers), torch.zeros(3, 3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.bool), 2)
    a, b = scripted.compute(*args), eager.compute(*args)
    torch.testing.assert_close(a["energy"], b["energy"], atol=1e-9, rtol=0)
    torch.testing.assert_close(a["forces"], b["forces"], atol=1e-9, rtol=0)
    radii = torch.tensor(covalent_radii[atoms.numbers])
    reach = eager.model.core_switch_factor * (radii[:, None] + radii[None])
    distance = torch.cdist(args[0], args[0]) + 100 * torch.eye(len(atoms))
    assert bool((distance < reach).any()) == (squeeze < 1.0)  # both branches of the file are taken


def test_a_pair_radius_clamps_only_that_pair(forcefield_factory, tmp_path):
    """core_pair_radius {"1-1": 1.2}: below 1.2 Å two H atoms see the learned part clamped (flat
    once the tanh saturates), every other pair is as before; the TorchScript file agrees with the
    eager network (its skip-the-core shortcut must notice pairs inside the wider clamp), and a
    checkpoint loaded under a config with other radii takes the config's."""
    from mfcalc import load_model
    from mfcalc.modelfile import build_forcefield, export_model

    base = forcefield_factory(seed=6).eval()
    config = {**base.model.config, "core_pair_radius": {"1-1": 1.2}}
    paired = build_forcefield(config, base.state_dict()).double().eval()
    assert float(paired.model.clamp_radius[0, 0]) == 1.2
    assert torch.equal(paired.model.clamp_radius[1:, 1:], base.model.clamp_radius[1:, 1:])
    hh = np.array([0.5, 0.7, 0.9])  # inside the clamp, outside the ZBL switch (0.65 x 0.62 = 0.40 Å)
    flat, _ = dimer_curve(paired, 1, 1, hh)
    free, _ = dimer_curve(base, 1, 1, hh)
    assert np.ptp(flat) < 1e-4 < np.ptp(free)
    for z1, z2 in [(1, 6), (6, 8), (8, 8)]:  # other pairs: unchanged
        d = np.array([0.6, 1.0, 1.5])
        assert np.array_equal(dimer_curve(paired, z1, z2, d)[0], dimer_curve(base, z1, z2, d)[0])
    path = tmp_path / "paired.pt"
    export_model(paired, path, metadata={"aliases": {}, "default_fidelity": paired.fidelities[0]}, dtype=torch.float64)
    scripted, _ = load_model(path)
    for d in (0.9, 1.1, 1.3, 2.0):  # the shortcut skips the core only at 1.3 and 2.0
        positions = torch.tensor([[0.0, 0.0, 0.0], [d, 0.0, 0.0], [0.0, 2.9, 0.0]], dtype=torch.float64)
        args = (positions, torch.tensor([1, 1, 8]), torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool), 1)
        a, b = scripted.compute(*args), paired.compute(*args)
        torch.testing.assert_close(a["energy"], b["energy"], atol=1e-9, rtol=0)
        torch.testing.assert_close(a["forces"], b["forces"], atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="core_pair_radius keys are element pairs"):
        build_forcefield({**base.model.config, "core_pair_radius": {"H-H": 1.2}})
    with pytest.raises(ValueError, match="the model's elements are"):
        build_forcefield({**base.model.config, "core_pair_radius": {"7-7": 1.2}})
    with pytest.raises(ValueError, match="'auto' is for recipes"):
        build_forcefield({**base.model.config, "core_pair_radius": "auto"})
