"""MFCommittee: the mean of several potentials is a potential (forces = -grad of the mean energy,
stress by finite strain), and its spread is the members' disagreement."""

import json

import numpy as np
import pytest
import torch
from ase.build import bulk

from helpers import numeric_forces, numeric_stress
from mfcalc import MFCalculator, MFCommittee, ModelFileError, export_model

from conftest import ALIASES, make_forcefield


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two random-weight models of the same architecture (different seeds) in one folder."""
    folder = tmp_path_factory.mktemp("committee")
    for k, name in enumerate(["model.pt", "member-1.pt"]):
        export_model(make_forcefield(seed=10 + k), folder / name,
                     metadata={"aliases": ALIASES, "default_fidelity": "high"}, dtype=torch.float64)
    return folder


def _options():
    return {"dtype": "float64", "device": "cpu", "compile": False}


def test_committee_is_the_mean_of_its_members_and_its_spread_is_theirs(members, ethanol):
    paths = [members / "model.pt", members / "member-1.pt"]
    committee = MFCommittee(paths, fidelity="high", **_options())
    ethanol.calc = committee
    energy, forces = ethanol.get_potential_energy(), ethanol.get_forces()
    singles = [MFCalculator(p, fidelity="high", **_options()) for p in paths]
    e = np.array([s.get_potential_energy(ethanol) for s in singles])
    f = np.stack([s.get_forces(ethanol) for s in singles])
    assert abs(e[0] - e[1]) > 1e-3  # the members do differ, so the spread means something
    assert energy == pytest.approx(e.mean(), abs=1e-10)
    np.testing.assert_allclose(forces, f.mean(axis=0), atol=1e-10)
    r = committee.results
    assert r["energy_std"] == pytest.approx(abs(e[0] - e[1]) / 2, rel=1e-9)
    np.testing.assert_allclose(r["forces_std"], np.abs(f[0] - f[1]) / 2, atol=1e-12)
    per_atom = np.linalg.norm(f[0] - f[1], axis=1) / 2
    np.testing.assert_allclose(r["force_deviation"], per_atom, atol=1e-12)
    assert r["max_force_deviation"] == pytest.approx(per_atom.max(), rel=1e-9)
    np.testing.assert_allclose(r["energies"].sum(), energy, atol=1e-9)


def test_committee_forces_and_stress_are_derivatives_of_its_energy(members):
    committee = MFCommittee([members / "model.pt", members / "member-1.pt"], fidelity="high", **_options())
    atoms = bulk("Si", "diamond", a=5.43) * (1, 1, 2)
    atoms.rattle(0.05, seed=3)
    atoms.calc = committee
    np.testing.assert_allclose(atoms.get_forces(), numeric_forces(atoms, committee), atol=1e-6)
    stress = atoms.get_stress(voigt=False)
    np.testing.assert_allclose(stress, numeric_stress(atoms, committee), atol=1e-6)


def test_a_folder_is_a_committee_when_committee_json_lists_its_members(members, ethanol, tmp_path):
    with pytest.raises(ModelFileError, match="single model .*committee.json"):
        MFCommittee(members, **_options())
    (members / "committee.json").write_text(json.dumps({"members": ["model.pt", "member-1.pt"]}))
    try:
        from_folder = MFCommittee(members, fidelity="high", **_options())
        from_list = MFCommittee([members / "model.pt", members / "member-1.pt"], fidelity="high", **_options())
        assert from_folder.get_potential_energy(ethanol) == from_list.get_potential_energy(ethanol)
        (members / "committee.json").write_text(json.dumps({"members": ["model.pt", "member-2.pt"]}))
        with pytest.raises(ModelFileError, match="not there.*member-2.pt"):
            MFCommittee(members, **_options())
        (members / "committee.json").write_text("[1, 2]")
        with pytest.raises(ModelFileError, match="'members' list"):
            MFCommittee(members, **_options())
    finally:
        (members / "committee.json").unlink()


def test_fidelity_switches_every_member_and_bad_committees_are_refused(members, ethanol):
    committee = MFCommittee([members / "model.pt", members / "member-1.pt"], **_options())
    assert committee.fidelity == "high"  # the members' default
    high = committee.get_potential_energy(ethanol)
    committee.fidelity = "low"
    assert {m.fidelity for m in committee.members} == {"low"}
    assert committee.get_potential_energy(ethanol) != high  # results were reset with the fidelity
    with pytest.raises(ValueError, match="fidelit"):
        committee.fidelity = "no-such-level"
    with pytest.raises(ValueError, match="at least two models"):
        MFCommittee([members / "model.pt"], **_options())
