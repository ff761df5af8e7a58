"""Batched prediction equals one-by-one evaluation; replica MD equals ASE's integrators."""

import numpy as np
import pytest
from ase import units
from ase.build import bulk, molecule
from ase.md.verlet import VelocityVerlet

from mfcalc import MFCalculator, ReplicaMD, predict
from mfcalc.workflows import thermalized_copies


def test_batch_equals_one_by_one(tiny_model):
    calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu")
    si = bulk("Si", "diamond", a=5.43)
    si.rattle(0.05, seed=0)
    structures = [molecule("CH3CH2OH"), molecule("H2O"), si, molecule("CH4")]
    structures[0].rattle(0.05, seed=1)
    batched = calc.batch(structures)
    small_chunks = predict(calc, structures, max_atoms=10)  # forces several forward passes
    for atoms, b, c in zip(structures, batched, small_chunks):
        atoms.calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu")
        assert b["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(b["forces"], atoms.get_forces(), atol=1e-9)
        assert c["energy"] == pytest.approx(b["energy"], abs=1e-9)
        if atoms.pbc.any():
            np.testing.assert_allclose(b["stress"], atoms.get_stress(), atol=1e-9)


def test_replica_velocity_verlet_matches_ase(tiny_model, tmp_path):
    replicas = thermalized_copies(molecule("CH3CH2OH"), 3, 300)
    md = ReplicaMD(tiny_model, replicas, fidelity="low", timestep=0.5, friction=0.0, dtype="float64", device="cpu")
    md.run(20, trajectory=str(tmp_path / "rep{k}.traj"), interval=10)
    for k in (0, 2):
        ref = replicas[k].copy()
        ref.set_velocities(replicas[k].get_velocities())
        ref.calc = MFCalculator(tiny_model, fidelity="low", dtype="float64", device="cpu")
        VelocityVerlet(ref, 0.5 * units.fs).run(20)
        np.testing.assert_allclose(md.positions[k].numpy(), ref.positions, atol=1e-9)
        np.testing.assert_allclose(md.velocities[k].numpy(), ref.get_velocities(), atol=1e-9)
    from ase.io import read

    frames = read(str(tmp_path / "rep1.traj"), index=":")
    assert len(frames) == 2 and frames[-1].get_potential_energy() == pytest.approx(float(md.energy[1]))


def test_replica_langevin_thermalises(tiny_model):
    replicas = [molecule("CH3CH2OH") for _ in range(16)]
    md = ReplicaMD(tiny_model, replicas, fidelity="high", timestep=0.1, temperature=500, friction=0.05,
                   dtype="float32", device="cpu", seed=3)
    md.run(200)
    temps = []
    for _ in range(20):
        md.run(10)
        temps.append(md.temperatures().mean())
    assert 400 < np.mean(temps) < 600


def test_replicas_reject_mixed_sizes_and_cells(tiny_model):
    with pytest.raises(ValueError, match="same number of atoms"):
        ReplicaMD(tiny_model, [molecule("CH4"), molecule("H2O")], device="cpu")
    with pytest.raises(ValueError, match="non-periodic molecules"):
        ReplicaMD(tiny_model, [bulk("Si")], device="cpu")


def test_compiled_replicas_follow_the_same_trajectory(tiny_model):
    """ReplicaMD with a compile=True calculator (dense fused graph, replicas in chunks) gives
    the trajectory of the TorchScript path (pair list, all replicas in one call)."""
    replicas = thermalized_copies(molecule("CH3CH2OH"), 2, 300)
    runs = []
    for compile in (False, True):
        calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu", compile=compile)
        md = ReplicaMD(calc, [a.copy() for a in replicas], timestep=0.5, friction=0.0)
        md.chunk = 1  # compiled: one replica per dense force call, then concatenated
        md.run(5)
        runs.append((md.positions.numpy().copy(), md.energy.numpy().copy()))
    np.testing.assert_allclose(runs[1][0], runs[0][0], atol=1e-10)
    np.testing.assert_allclose(runs[1][1], runs[0][1], atol=1e-9)
