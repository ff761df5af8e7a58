"""metatomic export: one file with every fidelity, read by metatomic's own ASE calculator.

The reference is MFCalculator on the same mfcalc file: energies, forces and stress must agree to
float64 round-off for every fidelity, on a molecule and on a small triclinic periodic cell.
"""

import json
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("metatomic.torch")
metatomic_ase = pytest.importorskip("metatomic_ase")

from mfcalc import MFCalculator  # noqa: E402
from mfcalc.cli import main  # noqa: E402
from mfcalc.metatomic import export_metatomic, fidelity_name, variant_name, variants  # noqa: E402

from conftest import FIDELITIES, make_forcefield  # noqa: E402

CHNO_FIDELITIES = ["GFN2-xTB", "PBE/def2-SVP", "CCSD(T)/cc-pVDZ", "MP2/cc-pVDZ", "PBE+TS", "CCSD(T)/cc-pVTZ",
                   "MP2/def2-TZVP", "CCSD/cc-pVDZ", "CCSD/cc-pVTZ", "wB97x/6-31G(d)"]


@pytest.fixture(scope="module")
def mta_file(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("metatomic") / "tiny-mta.pt"
    export_metatomic(tiny_model, path)
    return path


def _results(atoms, calc, stress):
    atoms = atoms.copy()
    atoms.calc = calc
    out = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if stress:
        out["stress"] = atoms.get_stress()
    return out


@pytest.mark.parametrize("fidelity", FIDELITIES + [None])
@pytest.mark.parametrize("system", ["ethanol", "silicon_small_cell"])
def test_every_fidelity_matches_mfcalculator(mta_file, tiny_model, fidelity, system, request):
    atoms = request.getfixturevalue(system)
    periodic = bool(atoms.pbc.any())
    variant = None if fidelity is None else variant_name(fidelity)  # None: the plain "energy" output
    ours = _results(atoms, MFCalculator(tiny_model, fidelity=fidelity, dtype="float64", device="cpu"), periodic)
    theirs = _results(atoms, metatomic_ase.MetatomicCalculator(mta_file, variants={"energy": variant}), periodic)
    assert abs(theirs["energy"] - ours["energy"]) < 1e-8
    np.testing.assert_allclose(theirs["forces"], ours["forces"], rtol=0, atol=1e-9)
    if periodic:
        assert np.abs(ours["stress"]).max() > 1e-5  # a real stress, not zeros on both sides
        np.testing.assert_allclose(theirs["stress"], ours["stress"], rtol=0, atol=1e-11)


def test_fidelities_really_differ_through_metatomic(mta_file, ethanol):
    energies = [_results(ethanol, metatomic_ase.MetatomicCalculator(mta_file, variants={"energy": v}), False)["energy"]
                for v in FIDELITIES]
    assert len({round(e, 6) for e in energies}) == len(FIDELITIES)


def test_per_atom_energies_and_selected_atoms(mta_file, tiny_model, ethanol):
    from metatensor.torch import Labels
    from metatomic.torch import ModelOutput

    ours = ethanol.copy()
    ours.calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu")
    per_atom = ours.get_potential_energies()
    calc = metatomic_ase.MetatomicCalculator(mta_file, variants={"energy": "mid"})
    theirs = ethanol.copy()
    theirs.calc = calc
    np.testing.assert_allclose(theirs.get_potential_energies(), per_atom, rtol=0, atol=1e-9)
    chosen = [0, 2, 5]  # domain decomposition: only these atoms' energies, all atoms as neighbours
    selected = Labels(["system", "atom"], torch.tensor([[0, i] for i in chosen], dtype=torch.int32))
    out = calc.run_model(ethanol, {"energy/mid": ModelOutput(unit="eV", sample_kind="system")}, selected)
    assert float(out["energy/mid"].block().values[0, 0].detach()) == pytest.approx(per_atom[chosen].sum(), abs=1e-9)


def test_unknown_variant_is_metatomic_s_error(mta_file):
    with pytest.raises(ValueError, match="variant 'PBE' for output 'energy' not found"):
        metatomic_ase.MetatomicCalculator(mta_file, variants={"energy": "PBE"})


def test_capabilities_metadata_and_no_extensions(mta_file, tiny_model):
    from metatomic.torch import load_atomistic_model, read_model_metadata

    model = load_atomistic_model(str(mta_file))
    caps = model.capabilities()
    assert set(caps.outputs) >= {"energy", "energy/low", "energy/mid", "energy/high"}
    assert caps.atomic_types == [1, 6, 8, 14]
    assert caps.length_unit == "angstrom" and caps.dtype == "float64"
    assert all(caps.outputs[k].unit == "eV" for k in ("energy", "energy/low"))
    assert caps.interaction_range == pytest.approx(2 * 4.0)  # 2 message-passing layers x cutoff
    (request,) = model.requested_neighbor_lists()
    assert request.cutoff == pytest.approx(4.0) and request.full_list and request.strict
    meta = read_model_metadata(str(mta_file))
    assert meta.references["model"] == ["x: random weights"]  # the card's data sources
    assert meta.authors
    assert variants(mta_file) == {"low": "low", "mid": "mid", "high": "high"}
    assert json.loads(meta.extra["mfcalc-aliases"]) == {"HI": "high", "LO": "low"}
    with zipfile.ZipFile(mta_file) as archive:  # an engine without vesin-torch can load it
        name = next(n for n in archive.namelist() if n.endswith("extra/extensions"))
        assert json.loads(archive.read(name)) == []


@pytest.mark.parametrize("name", CHNO_FIDELITIES + ["a_b", "x__y", "_", "é/ü", "Å", "a b,c", "q[1]=2", "_x41_"])
def test_variant_names_are_reversible_and_plain(name):
    variant = variant_name(name)
    assert fidelity_name(variant) == name
    assert all(c.isascii() and (c.isalnum() or c in "-._") for c in variant)


def test_variant_names_examples_and_bad_input():
    assert variant_name("CCSD(T)/cc-pVDZ") == "CCSD_lT_r_scc-pVDZ"
    assert variant_name("PBE+TS") == "PBE_pTS"
    assert len({variant_name(n) for n in CHNO_FIDELITIES}) == len(CHNO_FIDELITIES)
    for bad in ["a/b", "a_", "_q", "_x41_", "_xzz_"]:
        with pytest.raises(ValueError):
            fidelity_name(bad)
    with pytest.raises(ValueError):
        variant_name("")


def test_cli_export_from_model_and_checkpoint(tiny_model, tmp_path, capsys, ethanol):
    from mfcalc.modelfile import save_checkpoint

    out = tmp_path / "a.pt"
    assert main(["export", str(tiny_model), "--format", "metatomic", "-o", str(out)]) == 0
    assert "energy/<variant>" in capsys.readouterr().out
    assert main(["export", str(tiny_model), "--format", "metatomic", "-o", str(out)]) == 1  # exists: --force
    checkpoint = tmp_path / "ckpt.pt"
    forcefield = make_forcefield()
    forcefield.model.config["fidelities"] = ["CCSD(T)/cc-pVDZ", "PBE+TS", "low"]
    save_checkpoint(checkpoint, forcefield, card=json.dumps({"default_fidelity": "PBE+TS"}))
    out2 = tmp_path / "b.pt"
    assert main(["export", str(checkpoint), "--format", "metatomic", "-o", str(out2)]) == 0
    assert variants(out2) == {"CCSD_lT_r_scc-pVDZ": "CCSD(T)/cc-pVDZ", "PBE_pTS": "PBE+TS", "low": "low"}
    default = _results(ethanol, metatomic_ase.MetatomicCalculator(out2), False)["energy"]
    named = _results(ethanol, metatomic_ase.MetatomicCalculator(out2, variants={"energy": "PBE_pTS"}), False)["energy"]
    assert default == named
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "c.pt")]) == 0  # the default format is unchanged
    assert "fidelities" in capsys.readouterr().out
