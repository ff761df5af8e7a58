"""The committed CHNO data set (data/chno): complete, consistent with its catalog, labels
reproducible by recomputing a few frames with the programs named in the data card."""

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mfcalc.data import read_extxyz, read_frames_npz

CHNO = Path(__file__).resolve().parent.parent / "data" / "chno"
MOLECULES = list(csv.DictReader(open(CHNO / "molecules.csv")))


@pytest.fixture(scope="module")
def xtb():
    return read_frames_npz(CHNO / "xtb_gfn2.npz", group_key="name")


def test_every_molecule_has_its_frames_with_xtb_labels(xtb):
    counts = Counter(s.group for s in xtb)
    assert set(counts) == {m["name"] for m in MOLECULES}
    assert set(counts.values()) == {100}
    assert {s.fidelity for s in xtb} == {"GFN2-xTB"}
    assert all(s.forces is not None and np.isfinite(s.forces).all() for s in xtb)
    # the formula of every frame is that of its SMILES
    smiles = {m["name"]: m["smiles"] for m in MOLECULES}
    rdkit = pytest.importorskip("rdkit.Chem")
    for name in list(counts)[::13]:
        mol = rdkit.AddHs(rdkit.MolFromSmiles(smiles[name]))
        expected = Counter(a.GetAtomicNum() for a in mol.GetAtoms())
        frame = next(s for s in xtb if s.group == name)
        assert Counter(frame.numbers.tolist()) == expected, name


def test_xtb_labels_recompute(xtb):
    """Two frames recomputed with tblite (GFN2-xTB, as in make_structures.py)."""
    pytest.importorskip("tblite")
    from ase import Atoms
    from tblite.ase import TBLite

    for s in (xtb[150], xtb[-1]):
        atoms = Atoms(numbers=s.numbers, positions=s.positions)
        atoms.calc = TBLite(method="GFN2-xTB", accuracy=1.0, charge=0, multiplicity=1,
                            electronic_temperature=300.0, verbosity=0)
        assert atoms.get_potential_energy() == pytest.approx(s.energy, abs=1e-4)
        assert np.abs(atoms.get_forces() - s.forces).max() < 1e-3


def test_label_inputs_are_nested_picks():
    """Picks are nested, so the levels of theory share geometries: the CCSD(T) inputs lie inside
    the PBE input (5 per molecule, <= 4 heavy atoms) and inside the MP2 input (3 per molecule,
    all molecules), whose frames of the <= 4-heavy-atom molecules lie inside the PBE input."""
    from ase.io import read

    def keys(name):
        return {(a.info["name"], a.positions.round(6).tobytes()) for a in read(str(CHNO / name), index=":")}

    pick3_all, pbe_input = keys("pick3_all.extxyz"), keys("pick5_heavy0-4.extxyz")
    assert keys("pick3_heavy0-3.extxyz") <= pick3_all
    assert keys("pick2_heavy4.extxyz") <= pbe_input and keys("pick2_heavy4.extxyz") <= pick3_all
    assert {k for k in pick3_all if k[0] in {n for n, _ in pbe_input}} <= pbe_input
    assert len(pick3_all) == 3 * len(MOLECULES)
    # the extra MP2-gradient pick (pick_extra.py) draws frames the other picks do not hold
    extra = keys("pick4extra_heavy0-4_rounds.extxyz")
    assert len(extra) == 280 and not extra & (pick3_all | pbe_input)


@pytest.mark.parametrize("pattern", ["pbe_def2svp-*.extxyz", "ccsdt_ccpvdz-*.extxyz", "ccsdt_ccpvdz_forces-*.extxyz",
                                     "mp2_ccpvdz-*.extxyz", "pbe_def2svp_forces-*.extxyz",
                                     "mp2_ccpvdz_forces-*.extxyz"])
def test_qm_labels_sit_on_the_xtb_geometries_and_recompute(xtb, pattern):
    pytest.importorskip("pyscf")
    from ase import Atoms
    from ase.io import read

    from mfcalc.label import compute

    paths = sorted(CHNO.glob(pattern))
    assert paths, f"no {pattern} in {CHNO}"
    by_name = {}
    for s in xtb:
        by_name.setdefault(s.group, []).append(s)
    for path in paths:
        frames = read(str(path), index=":")
        assert len({a.info["label_index"] for a in frames}) == len(frames)
        for a in frames:  # each labelled geometry is one of its molecule's xTB frames
            assert any(np.abs(a.positions - s.positions).max() < 1e-5 for s in by_name[a.info["name"]])
        smallest = min(frames, key=len)
        atoms = Atoms(numbers=smallest.numbers, positions=smallest.positions)
        method = f"{smallest.info['method']}/{smallest.info['basis']}"
        result = compute(atoms, method, forces="forces" in smallest.calc.results,
                         density_fit=bool(smallest.info.get("density_fit", False)))
        assert result["energy"] == pytest.approx(smallest.get_potential_energy(), abs=1e-5)
        if "forces" in result:
            assert np.abs(result["forces"] - smallest.get_forces()).max() < 1e-4
        records = read_extxyz(path, group_key="name")
        assert {r.fidelity for r in records} == {smallest.info["fidelity"]}
