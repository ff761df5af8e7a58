"""mfcalc models in TorchSim (mfcalc.torchsim.MFModel): the same numbers as MFCalculator, and MD
that runs in TorchSim's own integrators."""

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk, molecule

ts = pytest.importorskip("torch_sim")

from mfcalc import MFCalculator, Potential, ReplicaMD  # noqa: E402
from mfcalc.torchsim import MFModel  # noqa: E402
from mfcalc.workflows import thermalized_copies  # noqa: E402

TOL = 1e-8  # eV, eV/Å, eV/Å^3 (float64)


def reference(model_path, fidelity, atoms):
    atoms = atoms.copy()
    atoms.calc = MFCalculator(model_path, fidelity=fidelity, dtype="float64", device="cpu")
    ref = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.any():
        ref["stress"] = atoms.get_stress(voigt=False)
    return ref


def assert_matches(out, structures, refs):
    start = 0
    for k, (atoms, ref) in enumerate(zip(structures, refs)):
        n = len(atoms)
        assert out["energy"][k].item() == pytest.approx(ref["energy"], abs=TOL)
        np.testing.assert_allclose(out["forces"][start:start + n].numpy(), ref["forces"], atol=TOL)
        if "stress" in ref:
            np.testing.assert_allclose(out["stress"][k].numpy(), ref["stress"], atol=TOL)
        start += n


@pytest.mark.parametrize("fidelity", ["low", "mid", "high", None])
def test_different_molecules_equal_mfcalculator(tiny_model, fidelity):
    """Molecules of different sizes: per-system pair lists, one flat-batch forward."""
    structures = [molecule("CH3CH2OH"), molecule("H2O"), molecule("CH4"), molecule("CH3COCH3")]
    for k, atoms in enumerate(structures):
        atoms.rattle(0.05, seed=k)
    model = MFModel(tiny_model, fidelity=fidelity, device="cpu", dtype="float64")
    out = model(ts.io.atoms_to_state(structures, model.device, model.dtype))
    assert out["energy"].shape == (4,) and out["forces"].shape == (sum(map(len, structures)), 3)
    assert torch.isnan(out["stress"]).all()  # molecules: no stress
    assert_matches(out, structures, [reference(tiny_model, fidelity or "high", a) for a in structures])


def test_same_size_molecules_equal_mfcalculator(tiny_model):
    """Systems of one size (replicas, isomers): the batched path of ReplicaMD."""
    structures = []
    for seed in range(3):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.1, seed=seed)
        structures.append(atoms)
    structures.append(molecule("CH3OCH3"))  # an isomer: 9 atoms too
    model = MFModel(tiny_model, fidelity="mid", device="cpu", dtype="float64", compute_stress=False)
    out = model(ts.io.atoms_to_state(structures, model.device, model.dtype))
    assert "stress" not in out
    assert_matches(out, structures, [reference(tiny_model, "mid", a) for a in structures])


def test_periodic_cells_equal_mfcalculator(tiny_model, silicon_small_cell):
    """Periodic cells (a triclinic cell smaller than twice the cutoff, atoms outside it): energy,
    forces and stress."""
    other = bulk("Si", "diamond", a=5.43, cubic=True)
    other.rattle(0.05, seed=4)
    structures = [silicon_small_cell, other]
    model = MFModel(tiny_model, fidelity="low", device="cpu", dtype="float64")
    state = ts.io.atoms_to_state(structures, model.device, model.dtype)
    refs = [reference(tiny_model, "low", a) for a in structures]
    for _ in range(5):  # a stride-0 pbc tensor once gave the pair search wrong pairs from the 3rd call on
        out = model(state)
        assert out["stress"].shape == (2, 3, 3)
        assert_matches(out, structures, refs)


def test_one_fidelity_per_system_and_loaded_models(tiny_model, ethanol):
    """A state can mix levels of theory; a Potential or an MFCalculator works as the model."""
    fidelities = ["low", "HI", "mid"]  # an alias too
    model = MFModel(tiny_model, fidelity=fidelities, device="cpu", dtype="float64")
    out = model(ts.io.atoms_to_state([ethanol] * 3, model.device, model.dtype))
    assert model.fidelity == ["low", "high", "mid"]
    assert_matches(out, [ethanol] * 3, [reference(tiny_model, f, ethanol) for f in ("low", "high", "mid")])
    with pytest.raises(ValueError, match="one per system"):
        model(ts.io.atoms_to_state([ethanol] * 2, model.device, model.dtype))
    calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu")
    potential = Potential.load(tiny_model, device="cpu", dtype="float64")
    for m in (MFModel(calc), MFModel(potential, fidelity="mid")):
        assert m.fidelity == "mid" and m.dtype == torch.float64
        assert_matches(m(ts.io.atoms_to_state([ethanol], m.device, m.dtype)), [ethanol],
                       [reference(tiny_model, "mid", ethanol)])


def test_refuses_unknown_elements_wrong_dtype_and_fidelity(tiny_model):
    model = MFModel(tiny_model, device="cpu", dtype="float64")
    with pytest.raises(ValueError, match="not in this model"):
        model(ts.io.atoms_to_state([molecule("NH3")], model.device, model.dtype))
    with pytest.raises(TypeError, match="float32"):
        model(ts.io.atoms_to_state([molecule("H2O")], model.device, torch.float32))
    with pytest.raises(ValueError, match="unknown fidelity"):
        MFModel(tiny_model, fidelity="CCSD(T)", device="cpu")


def test_torchsim_nve_matches_replica_md_and_langevin_runs():
    """ethanol-mf, 3 ethanol replicas: TorchSim's velocity Verlet from the same velocities as
    ReplicaMD (friction 0) follows the same trajectory and conserves energy; TorchSim's
    Langevin integrator (ts.integrate) runs and stays finite."""
    replicas = thermalized_copies(molecule("CH3CH2OH"), 3, 300)
    model = MFModel("ethanol-mf", fidelity="CCSD(T)/cc-pVTZ", device="cpu", dtype="float64")
    dt = torch.tensor(0.5 * units.fs, dtype=model.dtype)  # ASE's time unit = TorchSim's internal one
    init, update = ts.nve(model=model, dt=dt, kT=torch.tensor(300 * units.kB, dtype=model.dtype))
    state = init(ts.io.atoms_to_state(replicas, model.device, model.dtype))
    state.momenta = torch.tensor(np.concatenate([a.get_momenta() for a in replicas]), dtype=model.dtype)
    start = state.energy + ts.calc_kinetic_energy(masses=state.masses, momenta=state.momenta,
                                                  system_idx=state.system_idx)
    for _ in range(20):
        state = update(state)
    end = state.energy + ts.calc_kinetic_energy(masses=state.masses, momenta=state.momenta,
                                                system_idx=state.system_idx)
    assert torch.isfinite(state.positions).all()
    assert (end - start).abs().max().item() < 5e-3  # eV per 9-atom molecule over 10 fs

    md = ReplicaMD(model.potential, replicas, fidelity="CCSD(T)/cc-pVTZ", timestep=0.5, friction=0.0)
    md.run(20)
    np.testing.assert_allclose(state.positions.numpy(), md.positions.reshape(-1, 3).numpy(), atol=1e-8)
    np.testing.assert_allclose(state.energy.numpy(), md.energy.numpy(), atol=1e-8)

    initial = ts.io.atoms_to_state(replicas, model.device, model.dtype)
    final = ts.integrate(initial, model, integrator=ts.nvt_langevin, n_steps=10, temperature=300,
                         timestep=0.0005, seed=0)  # TorchSim's units: K, ps
    assert final.n_systems == 3
    assert torch.isfinite(final.positions).all() and torch.isfinite(final.energy).all()
    assert (final.positions - initial.positions).abs().max().item() < 0.5  # 5 fs at 300 K: small moves


@pytest.mark.filterwarnings("ignore:`compute_requested_neighbors` is deprecated")
def test_torchsim_metatomic_wrapper_reads_the_export_at_the_default_fidelity(tiny_model, tmp_path):
    """The other route: TorchSim's own metatomic wrapper on `mfcalc export --format metatomic`.
    It asks for the `energy` output only, i.e. the model's default fidelity."""
    pytest.importorskip("metatomic.torch")
    import warnings

    from mfcalc.metatomic import export_metatomic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch_sim warns that metatrain (for .ckpt files) is missing
        from torch_sim.models.metatomic import MetatomicModel
    export_metatomic(tiny_model, tmp_path / "tiny-mta.pt", dtype=torch.float64)
    model = MetatomicModel(str(tmp_path / "tiny-mta.pt"), device="cpu", compute_stress=False)
    structures = [molecule("CH3CH2OH"), molecule("H2O")]
    out = model(ts.io.atoms_to_state(structures, model.device, model.dtype))
    assert_matches(out, structures, [reference(tiny_model, "high", a) for a in structures])
