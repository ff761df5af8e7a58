"""`mfcalc sample`: MD at a cheap fidelity, then a diverse subset ready for `mfcalc label`."""

import subprocess
import sys

import numpy as np
import pytest
from ase.build import molecule
from ase.io import read

from mfcalc.sampling import descriptor, farthest_point, sample


def test_farthest_point_picks_the_corners_first():
    grid = np.array([[x, y] for x in np.linspace(0, 1, 11) for y in np.linspace(0, 1, 11)])
    picked = farthest_point(grid, 4)
    corners = {(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)}
    assert {tuple(np.round(grid[k], 6)) for k in picked} == corners
    assert len(set(farthest_point(grid, 121))) == 121  # every row once when asked for all


def test_weights_steer_the_choice():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert farthest_point(x, 1, weights=np.array([0.0, 1.0, 0.0, 0.0])) == [1]


def test_descriptor_is_invariant_for_periodic_cells_and_sees_distortions():
    from ase.build import bulk

    si = bulk("Si", "diamond", a=5.43)
    a = descriptor(si)
    b = descriptor(si.repeat((2, 1, 1)))  # same crystal, bigger cell, atoms in another order
    np.testing.assert_allclose(a, b, atol=1e-10)
    rattled = si.repeat((2, 2, 2))
    rattled.rattle(0.1, seed=0)
    assert np.linalg.norm(descriptor(rattled) - a) > 1e-3
    ethanol = molecule("CH3CH2OH")
    assert descriptor(ethanol).shape == (36,)


def test_sampled_frames_are_diverse_and_carry_their_provenance(tiny_model):
    frames = sample(molecule("CH3CH2OH"), model=str(tiny_model), fidelity="low", n=6, steps=400,
                    interval=5, temperature=300.0, log=None)
    assert len(frames) == 6
    assert all(f.calc is None for f in frames)
    steps = [f.info["md_step"] for f in frames]
    assert len(set(steps)) == 6 and min(steps) >= 40  # equilibration skipped
    assert all(f.info["sampled_fidelity"] == "low" for f in frames)
    assert all("fidelity_forces_spread_eV_per_A" in f.info for f in frames)
    # farthest-point picks are farther apart than six consecutive frames of the same run
    pool = sample(molecule("CH3CH2OH"), model=str(tiny_model), fidelity="low", n=72, steps=400,
                  interval=5, temperature=300.0, log=None)
    pool.sort(key=lambda f: f.info["md_step"])

    def min_gap(fs):
        d = np.array([descriptor(f) for f in fs])
        return min(np.linalg.norm(d[i] - d[j]) for i in range(len(d)) for j in range(i))

    assert min_gap(frames) > 2 * min_gap(pool[:6])


def test_spread_selection_and_bad_requests(tiny_model):
    frames = sample(molecule("CH3CH2OH"), model=str(tiny_model), fidelity="low", n=3, steps=200,
                    interval=5, select="spread", log=None)
    assert [f.info["selection"] for f in frames] == ["spread"] * 3
    with pytest.raises(ValueError, match="select must be one of"):
        sample(molecule("CH3CH2OH"), model=str(tiny_model), select="random", log=None)
    with pytest.raises(ValueError, match="raise steps to at least"):
        sample(molecule("CH3CH2OH"), model=str(tiny_model), n=50, steps=100, log=None)


def test_committee_selection_picks_where_the_members_disagree(tiny_model):
    """select="committee" on the shipped ethanol-mf committee: the MD runs with its first member,
    every pick records the committee's deviation, and the picks are more uncertain than plain
    farthest-point picks from the same pool (the same seed gives the same MD)."""
    from mfcalc import MFCommittee, ModelFileError

    run = dict(model="ethanol-mf", fidelity="CCSD(T)", n=4, steps=300, interval=5, temperature=600.0,
               log=None, seed=3)
    picked = sample(molecule("CH3CH2OH"), select="committee", **run)
    assert all(f.info["sampled_with"].endswith("model.pt") for f in picked)
    deviation = [f.info["committee_max_force_deviation_eV_per_A"] for f in picked]
    committee = MFCommittee("ethanol-mf", fidelity="CCSD(T)")
    committee.get_forces(picked[0])
    assert committee.results["max_force_deviation"] == pytest.approx(deviation[0], rel=1e-6)
    plain = sample(molecule("CH3CH2OH"), select="fps", **run)
    plain_deviation = []
    for frame in plain:
        committee.get_forces(frame)
        plain_deviation.append(committee.results["max_force_deviation"])
    assert np.mean(deviation) > np.mean(plain_deviation)
    with pytest.raises(ModelFileError, match="single model"):
        sample(molecule("CH3CH2OH"), model=str(tiny_model), select="committee", n=2, steps=100, log=None)


def test_command_line_writes_structures_that_label_reads(tiny_model, tmp_path):
    out = tmp_path / "picked.xyz"
    run = subprocess.run(
        [sys.executable, "-m", "mfcalc.cli", "sample", str(tiny_model), "CH3CH2OH", "--fidelity", "mid",
         "-n", "4", "--steps", "200", "--interval", "5", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    frames = read(str(out), index=":")
    assert len(frames) == 4 and frames[0].get_chemical_formula() == "C2H6O"
    assert "mfcalc label" in run.stdout
