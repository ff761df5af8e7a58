"""Loaders convert units at the door; a recipe trains, evaluates and exports end to end."""

import json

import numpy as np
import pytest
import torch
import yaml

from mfcalc import MFCalculator, read_metadata
from mfcalc.data import read_extxyz, read_gdml_npz, split_indices
from mfcalc.recipe import run_recipe
from mfcalc.finetune import load_base
from mfcalc.model import SIZES
from mfcalc.modelfile import load_checkpoint
from mfcalc.training import evaluate, fit_reference, sampling_weights, to_graphs
from mfcalc.units import KCAL_PER_MOL_TO_EV

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "ethanol"


def test_kcal_per_mol_loaders_convert_to_ev():
    xyz = read_extxyz(DATA / "ethanol_md17_pbe_ts-2000.xyz", "PBE+TS", energy_unit="kcal/mol", index=":3")
    assert xyz[0].energy == pytest.approx(-97195.01189948035 * KCAL_PER_MOL_TO_EV)
    assert xyz[0].forces[0, 0] == pytest.approx(26.23068692 * KCAL_PER_MOL_TO_EV)
    npz = read_gdml_npz(DATA / "ethanol_ccsd_t-300.npz", "CCSD(T)")
    assert len(npz) == 300 and npz[0].energy == pytest.approx(-97089.07088252 * KCAL_PER_MOL_TO_EV)
    ev = read_extxyz(DATA / "ethanol_rmd17_pbe_def2svp-train1000.xyz", "PBE", index=":1")
    assert ev[0].energy == pytest.approx(-4209.4657843064815)
    with pytest.raises(ValueError, match="unknown energy unit 'kcal'"):
        read_gdml_npz(DATA / "ethanol_ccsd_t-300.npz", "x", energy_unit="kcal")


def test_splits_are_disjoint_and_reproducible():
    a = split_indices(300, [180, 20, 100], seed=0)
    b = split_indices(300, [180, 20, 100], seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(set(np.concatenate(a))) == 300
    with pytest.raises(ValueError, match="add up to more"):
        split_indices(10, [8, 5])


def test_reference_energies_and_sampling():
    records = read_gdml_npz(DATA / "ethanol_ccsd_t-300.npz", "hi")[:20]
    records += read_extxyz(DATA / "ethanol_rmd17_pbe_def2svp-train1000.xyz", "lo", index=":80")
    graphs = to_graphs(records, ["lo", "hi"], 5.0)
    ref = fit_reference(graphs, 2, [1, 6, 8])
    counts = np.array([6, 2, 1])  # H, C, O in ethanol
    for f, fid in enumerate(["lo", "hi"]):
        mean = np.mean([r.energy for r in records if r.fidelity == fid])
        assert float(ref["e0"][f].numpy() @ counts) == pytest.approx(mean, abs=1e-6)
    p = sampling_weights(graphs, 2, temperature=0.0)
    assert p.sum() == pytest.approx(1.0)
    assert p[:20].sum() == pytest.approx(0.5)  # 20 hi points drawn as often as 80 lo points


def test_recipe_trains_and_exports(tmp_path):
    recipe = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "ethanol-mf.yaml").read_text())
    for entry in recipe["datasets"]:
        entry["path"] = str(Path(__file__).resolve().parent.parent / "recipes" / entry["path"])
        entry.update(train=30, val=5, test=10)
    # the shipped recipe's network, named by its size instead of its options
    assert {k: recipe["model"][k] for k in SIZES["accurate"]} == SIZES["accurate"]
    recipe["model"] = {"size": "accurate", "features": 16, "layers": 1,
                       "core_pair_radius": recipe["model"]["core_pair_radius"]}
    recipe["training"].update(epochs=2, steps_per_epoch=5, batch_size=4)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(recipe))
    card = run_recipe(str(path), output=str(tmp_path / "out"), log=lambda *a: None)
    assert set(card["test_errors"]) == {"PBE+TS", "PBE/def2-SVP", "CCSD(T)/cc-pVTZ"}
    meta = read_metadata(tmp_path / "out" / "model.pt")
    assert meta["aliases"]["CCSD(T)"] == "CCSD(T)/cc-pVTZ"
    assert meta["test_errors"]["CCSD(T)/cc-pVTZ"]["n"] == 10
    assert json.loads((tmp_path / "out" / "card.json").read_text())["epochs_run"] == 2
    # the recipe's core_pair_radius: auto became 0.9 x each pair's closest training distance
    # (the domain statistics of the same training frames), where that exceeds the generic clamp
    config = load_checkpoint(tmp_path / "out" / "checkpoint.pt")["config"]
    assert (config["max_l"], config["radial_mlp"], config["radial_basis"], config["features"]) == (2, 64, 8, 16)
    radii = config["core_pair_radius"]
    closest = meta["domain"]["pair_min_distance"]
    assert set(radii) == {"1-1", "1-6", "1-8", "6-6", "6-8"} and set(radii) <= set(closest)
    for pair, radius in radii.items():
        assert radius == round(0.9 * closest[pair], 2) < closest[pair]
    calc = MFCalculator(tmp_path / "out", fidelity="CCSD(T)", device="cpu")
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    assert np.isfinite(atoms.get_forces()).all()


def _smoke_recipe(tmp_path, epochs=2):
    root = Path(__file__).resolve().parent.parent
    recipe = yaml.safe_load((root / "recipes" / "ethanol-mf.yaml").read_text())
    for entry in recipe["datasets"]:
        entry["path"] = str(root / "recipes" / entry["path"])
        entry.update(train=20, val=4, test=4)
    recipe["model"].update(features=8, layers=1)
    recipe["training"].update(epochs=epochs, steps_per_epoch=3, batch_size=4)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_resume_continues_where_it_stopped(tmp_path):
    recipe = _smoke_recipe(tmp_path, epochs=4)
    full = run_recipe(str(recipe), output=str(tmp_path / "full"), log=lambda *a: None)
    run_recipe(str(recipe), output=str(tmp_path / "part"), overrides={"epochs": 4, "max_minutes": 0.0}, log=lambda *a: None)
    # the cut-short run stopped after one epoch; resuming finishes the same schedule
    resumed = run_recipe(str(recipe), output=str(tmp_path / "part"), log=lambda *a: None, resume=True)
    assert resumed["epochs_run"] == full["epochs_run"] == 4
    a = read_metadata(tmp_path / "full" / "model.pt")["checksum"]
    b = read_metadata(tmp_path / "part" / "model.pt")["checksum"]
    assert a == b
    log = (tmp_path / "part" / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,minutes,lr") and len(log) == 5
    assert "Reproduce: `mfcalc train recipes/smoke.yaml`" in (tmp_path / "full" / "README.md").read_text()


def test_the_card_says_which_flags_overrode_the_recipe():
    from mfcalc.recipe import reproduce_command

    card = {"recipe": "chno-mf.yaml", "overrides": {"epochs": 6, "meta": "reptile", "steps_per_epoch": 300}}
    assert reproduce_command(card) == "mfcalc train recipes/chno-mf.yaml --epochs 6 --meta reptile --steps-per-epoch 300"
    assert reproduce_command({"recipe": "old.yaml"}) == "mfcalc train recipes/old.yaml"  # cards written before


def test_torchrun_two_processes_hold_identical_weights(tmp_path):
    import subprocess
    import sys

    recipe = _smoke_recipe(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "-m", "mfcalc.cli", "train", str(recipe), "-o", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = json.loads((tmp_path / "ddp" / "ranks.json").read_text())
    assert ranks["world_size"] == 2
    assert ranks["checksums"][0] == ranks["checksums"][1]
    assert (tmp_path / "ddp" / "model.pt").exists()


def test_reptile_meta_learning_runs_from_the_command_line(tmp_path):
    import subprocess
    import sys

    recipe = _smoke_recipe(tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "mfcalc.cli", "train", str(recipe), "-o", str(tmp_path / "meta"), "--meta", "reptile"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    card = json.loads((tmp_path / "meta" / "card.json").read_text())
    assert card["training_settings"]["meta"] == "reptile"
    assert set(card["test_errors"]) == {"PBE+TS", "PBE/def2-SVP", "CCSD(T)/cc-pVTZ"}


def test_ase_db_and_transition1x_loaders(tmp_path):
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.db import connect

    from mfcalc.data import read_ase_db, read_transition1x_json

    db_path = tmp_path / "set.db"
    with connect(str(db_path)) as db:
        for k in range(3):
            atoms = molecule("H2O")
            atoms.calc = SinglePointCalculator(atoms, energy=-10.0 * (k + 1), forces=np.full((3, 3), 0.5))
            db.write(atoms)
    records = read_ase_db(db_path, "lo", energy_unit="kcal/mol")
    assert len(records) == 3 and records[1].energy == pytest.approx(-20.0 * KCAL_PER_MOL_TO_EV)
    assert records[0].forces[0, 0] == pytest.approx(0.5 * KCAL_PER_MOL_TO_EV)
    root = Path(__file__).resolve().parent.parent / "data" / "transition1x_ccsd"
    cc = read_transition1x_json(root / "ccsd_tz_rxn0103.json", "CCSD/cc-pVTZ")
    dft = read_transition1x_json(root / "ccsd_tz_rxn0103.json", "wB97x/6-31G(d)", energy_key="wB97x.energy")
    assert len(cc) == len(dft) == 252 and cc[0].forces is None
    assert cc[0].energy == pytest.approx(-8760.856897027214)
    assert len(read_transition1x_json(root / "ccsd_dz_rxn1961.json", "CCSD/cc-pVDZ")) == 268


def test_exporting_a_trained_checkpoint_keeps_aliases_and_default_fidelity(tmp_path):
    import subprocess
    import sys

    recipe = _smoke_recipe(tmp_path, epochs=1)
    run_recipe(str(recipe), output=str(tmp_path / "run"), log=lambda *a: None)
    out = tmp_path / "again.pt"
    run = subprocess.run([sys.executable, "-m", "mfcalc.cli", "export", str(tmp_path / "run" / "checkpoint.pt"),
                          "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    first, again = read_metadata(tmp_path / "run" / "model.pt"), read_metadata(out)
    assert again["aliases"] == first["aliases"] and again["aliases"]["CCSD(T)"] == "CCSD(T)/cc-pVTZ"
    assert again["default_fidelity"] == first["default_fidelity"] == "CCSD(T)/cc-pVTZ"
    assert again["checksum"] == first["checksum"]


def _named_frames(path, names=("water", "ammonia", "methane"), per=4, formulas=("H2O", "NH3", "CH4")):
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for name, formula in zip(names, formulas):
        for k in range(per):
            atoms = molecule(formula)
            atoms.rattle(0.02, seed=k)
            atoms.info["name"] = name
            atoms.calc = SinglePointCalculator(atoms, energy=-float(k), forces=np.zeros((len(atoms), 3)))
            frames.append(atoms)
    write(str(path), frames, format="extxyz")


def test_held_out_molecules_keep_all_their_frames_out_of_training(tmp_path):
    from mfcalc.recipe import load_datasets

    _named_frames(tmp_path / "a.extxyz")
    _named_frames(tmp_path / "b.extxyz.xz")  # compressed files read too
    recipe = {
        "held_out": {"test": ["water"], "val": ["ammonia"]},
        "datasets": [{"path": "a.extxyz", "fidelity": "lo", "split_by": "name"},
                     {"path": "b.extxyz.xz", "fidelity": "hi", "split_by": "name", "train": 2, "seed": 1}],
    }
    splits = load_datasets(recipe, tmp_path, by_dataset=True)
    assert {s.group for s in splits["test"]} == {"water"} and len(splits["test"]) == 8
    assert {s.group for s in splits["val"]} == {"ammonia"} and len(splits["val"]) == 8
    assert {s.group for s in splits["train"]} == {"methane"} and len(splits["train"]) == 4 + 2
    assert len(splits["test:0"]) == len(splits["test:1"]) == 4
    recipe["held_out"]["test"] = ["watr"]
    with pytest.raises(ValueError, match=r"\['watr'\] are in no dataset with split_by"):
        load_datasets(recipe, tmp_path)
    recipe["held_out"]["test"] = ["ammonia"]
    with pytest.raises(ValueError, match="listed as test and val"):
        load_datasets(recipe, tmp_path)
    recipe["held_out"] = {"test": ["water"]}
    from ase.io import read
    from mfcalc.data import write_frames_npz

    write_frames_npz(tmp_path / "c.npz", read(str(tmp_path / "a.extxyz"), ":"), info_keys=["name"])
    recipe["datasets"].append({"path": "c.npz", "format": "frames-npz", "fidelity": "lo", "split_by": "name"})
    splits = load_datasets(recipe, tmp_path, by_dataset=True)
    extxyz, npz = splits["test:0"], splits["test:2"]
    assert [s.group for s in npz] == [s.group for s in extxyz] == ["water"] * 4
    assert all(np.allclose(a.positions, b.positions, atol=1e-6) and a.energy == b.energy
               and np.allclose(a.forces, b.forces) and (a.numbers == b.numbers).all() for a, b in zip(extxyz, npz))
    recipe["datasets"][0]["split_by"] = "molecule"
    with pytest.raises(KeyError, match="no info key 'molecule'"):
        load_datasets(recipe, tmp_path)


def test_card_lists_each_held_out_molecule(tmp_path):
    """run_recipe's card: one row per held-out test molecule and dataset split by molecule, each
    the errors of that molecule's frames alone; the README shows them as a table."""
    from mfcalc.recipe import load_datasets

    names = ("water", "ammonia", "methane", "methanol", "formaldehyde")
    formulas = ("H2O", "NH3", "CH4", "CH3OH", "H2CO")
    _named_frames(tmp_path / "a.extxyz", names, per=3, formulas=formulas)
    _named_frames(tmp_path / "b.extxyz", names, per=2, formulas=formulas)
    recipe = {
        "output": "run", "model": {"features": 8, "layers": 1},
        "held_out": {"test": ["water", "methane"], "val": ["formaldehyde"]},
        "datasets": [{"path": "a.extxyz", "fidelity": "lo", "split_by": "name"},
                     {"path": "b.extxyz", "fidelity": "hi", "split_by": "name"}],
        "training": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    card = run_recipe(str(tmp_path / "r.yaml"), log=lambda *a: None)
    rows = card["test_errors_by_molecule"]
    assert [(r["dataset"], r["molecule"], r["n"]) for r in rows] == [
        ("a.extxyz", "water", 3), ("a.extxyz", "methane", 3), ("b.extxyz", "water", 2), ("b.extxyz", "methane", 2)]
    forcefield = load_base(tmp_path / "run" / "model.pt")[0].double()
    splits = load_datasets(recipe, tmp_path, by_dataset=True)
    methane = [s for s in splits["test:1"] if s.group == "methane"]
    direct = evaluate(forcefield, to_graphs(methane, ["lo", "hi"], forcefield.cutoff), ["lo", "hi"])["hi"]
    assert rows[3]["energy_mae"] == pytest.approx(direct["energy_mae"], rel=1e-6)
    readme = (tmp_path / "run" / "README.md").read_text()
    assert "### Held-out molecules, one by one" in readme and "| methane | " in readme


def test_reference_energies_of_a_one_molecule_fidelity_borrow_from_a_broad_one():
    """'hi' has one composition (ethanol) only, 'lo' many: hi's references reproduce its own data
    exactly as the minimum-norm fit does, and for other compositions land near the truth (lo's
    per-element energies plus a small per-element shift) instead of whole atomic energies off;
    'far' (other energy scale) does not serve as the prior."""
    from types import SimpleNamespace

    import torch

    rng = np.random.default_rng(0)
    elements = [1, 6, 7, 8]
    true = {"lo": np.array([-13.6, -1029.0, -1484.0, -2041.0]), "far": np.array([-10.7, -48.8, -71.0, -103.0])}
    true["hi"] = true["lo"] + np.array([-0.05, -0.9, -1.1, -1.3])
    compositions = [[1, 1, 8], [6, 1, 1, 1, 1], [7, 1, 1, 1], [6, 8, 1, 1], [7, 7], [6, 7, 1]]
    ethanol = [6, 6, 8, 1, 1, 1, 1, 1, 1]
    graphs = []
    for fid, f, comps in [("lo", 0, compositions), ("far", 1, compositions), ("hi", 2, [ethanol] * 5)]:
        for numbers in comps * 2:
            e = sum(true[fid][elements.index(z)] for z in numbers) + rng.normal(0, 0.01)
            graphs.append(SimpleNamespace(fidelity=f, numbers=torch.tensor(numbers), energy=e, forces=None))
    e0 = fit_reference(graphs, 3, elements)["e0"].numpy()
    counts = lambda numbers: np.array([numbers.count(z) for z in elements])  # noqa: E731
    hi_mean = np.mean([g.energy for g in graphs if g.fidelity == 2])
    assert counts(ethanol) @ e0[2] == pytest.approx(hi_mean, abs=1e-6)  # own data: as before
    pyridine = [6] * 5 + [7] + [1] * 5
    truth = counts(pyridine) @ true["hi"]
    assert abs(counts(pyridine) @ e0[2] - truth) < 3.0  # eV; the minimum-norm fit misses by ~1500
    minimum_norm = np.linalg.lstsq(np.array([counts(ethanol)]), [hi_mean], rcond=None)[0]
    assert abs(counts(pyridine) @ minimum_norm - truth) > 1000


@pytest.mark.parametrize("network", ["l1", "l2"])
def test_same_size_batches_train_through_the_dense_layout_with_the_same_loss(forcefield_factory, network):
    """A batch of same-size molecules goes through ForceField.dense_forward (no pair list): the
    loss and every parameter gradient equal those of the pair-list path; a mixed-size or periodic
    batch keeps the pair list."""
    import torch
    from dataclasses import replace

    from mfcalc.training import TrainSettings, _batch_loss, collate

    frames = read_extxyz(DATA / "ethanol_rmd17_pbe_def2svp-train1000.xyz", "mid", index=":4")
    frames[1] = replace(frames[1], fidelity="high")
    forcefield = forcefield_factory(seed=2, network=network).train()
    graphs = to_graphs(frames, forcefield.fidelities, forcefield.cutoff)
    batch = collate(graphs, torch.float64)
    assert "dense_positions" in batch
    flat = {k: v for k, v in batch.items() if not k.startswith("dense_")}
    settings = TrainSettings(energy_weight=3.0)
    weights = torch.ones(len(forcefield.fidelities), dtype=torch.float64)
    results = []
    for b in (batch, flat):
        forcefield.zero_grad()
        out, e_loss, f_loss, loss = _batch_loss(forcefield, b, weights, settings, torch.float64)
        loss.backward()
        results.append((out, loss.detach(), [p.grad.clone() for p in forcefield.parameters() if p.grad is not None]))
    (dense_out, dense_loss, dense_grads), (flat_out, flat_loss, flat_grads) = results
    torch.testing.assert_close(dense_out["forces"], flat_out["forces"], atol=1e-10, rtol=0)
    torch.testing.assert_close(dense_loss, flat_loss, atol=1e-12, rtol=1e-10)
    assert len(dense_grads) == len(flat_grads) > 10
    for a, b in zip(dense_grads, flat_grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    water = read_extxyz(DATA / "ethanol_rmd17_pbe_def2svp-train1000.xyz", "mid", index=":1")[0]
    small = replace(water, numbers=water.numbers[:3], positions=water.positions[:3], forces=water.forces[:3])
    assert "dense_positions" not in collate(to_graphs([frames[0], small], forcefield.fidelities, forcefield.cutoff))
    boxed = replace(frames[0], cell=np.eye(3) * 30.0, pbc=np.ones(3, bool))
    assert "dense_positions" not in collate(to_graphs([frames[0], boxed], forcefield.fidelities, forcefield.cutoff))


def test_last_stage_switches_the_energy_weight(forcefield_factory, monkeypatch):
    """final_energy_weight applies from epoch round((1 - final_fraction) x epochs) on, to every
    optimiser step of those epochs and no other; model selection keeps the first weight."""
    import mfcalc.training as training
    from mfcalc.training import TrainSettings, stage_settings, train

    settings = TrainSettings(epochs=5, steps_per_epoch=2, batch_size=2, energy_weight=1.0,
                             final_energy_weight=100.0, final_fraction=0.4, dtype="float64")
    assert [stage_settings(settings, e).energy_weight for e in range(5)] == [1, 1, 1, 100, 100]
    assert stage_settings(TrainSettings(energy_weight=3.0), 10**6).energy_weight == 3.0

    seen = []
    step = training._sgd_step
    monkeypatch.setattr(training, "_sgd_step", lambda ff, b, w, s, *a: seen.append(s.energy_weight) or step(ff, b, w, s, *a))
    frames = read_extxyz(DATA / "ethanol_rmd17_pbe_def2svp-train1000.xyz", "mid", index=":6")
    logged = []
    summary = train(forcefield_factory(seed=0), frames[:4], frames[4:], settings, log=logged.append)
    assert seen == [1.0] * 6 + [100.0] * 4
    assert sum("last stage from epoch 3: energy weight 1 -> 100" in line for line in logged) == 1
    for record in summary["history"]:  # the score is the validation error with energy weight 1
        m = record["val"]["mid"]
        assert record["score"] == pytest.approx(m["energy_mae_per_atom"] + m["forces_mae"])


def test_a_non_finite_step_is_skipped_and_leaves_the_weights_unchanged(forcefield_factory, monkeypatch):
    """One batch whose loss overflows (NaN) must not write NaN into the weights: the step is skipped,
    counted in the history and logged; training goes on and ends with finite weights."""
    import torch

    import mfcalc.training as training
    from mfcalc.training import TrainSettings, _sgd_step, collate, train

    frames = read_extxyz(DATA / "ethanol_rmd17_pbe_def2svp-train1000.xyz", "mid", index=":6")
    forcefield = forcefield_factory(seed=0).train()
    batch = collate(to_graphs(frames[:2], forcefield.fidelities, forcefield.cutoff), torch.float64)
    forcefield.double()
    parameters = list(forcefield.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    before = [p.detach().clone() for p in parameters]
    weights = torch.ones(len(forcefield.fidelities), dtype=torch.float64)
    nan_batch = dict(batch, energy=batch["energy"] * float("nan"))
    *_, stepped = _sgd_step(forcefield, nan_batch, weights, TrainSettings(), torch.float64, optimizer, parameters, 1)
    assert not stepped and all(torch.equal(a, b) for a, b in zip(before, parameters))
    *_, stepped = _sgd_step(forcefield, batch, weights, TrainSettings(), torch.float64, optimizer, parameters, 1)
    assert stepped and not all(torch.equal(a, b) for a, b in zip(before, parameters))

    calls = []
    loss_of = training._batch_loss

    def overflow_on_calls_3_and_4(*args):
        out, e_loss, f_loss, loss = loss_of(*args)
        calls.append(1)
        return (out, e_loss, f_loss, loss * float("nan")) if len(calls) in (3, 4) else (out, e_loss, f_loss, loss)

    monkeypatch.setattr(training, "_batch_loss", overflow_on_calls_3_and_4)
    logged = []
    settings = TrainSettings(epochs=3, steps_per_epoch=3, batch_size=2, dtype="float64")
    summary = train(forcefield_factory(seed=0), frames[:4], frames[4:], settings, log=logged.append)
    assert [r["skipped_steps"] for r in summary["history"]] == [1, 1, 0]
    assert sum("step skipped" in line for line in logged) == 2
    assert all(np.isfinite(r["train_forces_loss"]) and np.isfinite(r["score"]) for r in summary["history"])


def test_training_that_stays_non_finite_stops_with_what_to_change(forcefield_factory, monkeypatch):
    import mfcalc.training as training
    from mfcalc.training import TrainingDiverged, TrainSettings, train

    loss_of = training._batch_loss
    monkeypatch.setattr(training, "_batch_loss",
                        lambda *a: (lambda o, e, f, l: (o, e, f, l * float("inf")))(*loss_of(*a)))
    frames = read_extxyz(DATA / "ethanol_rmd17_pbe_def2svp-train1000.xyz", "mid", index=":6")
    settings = TrainSettings(epochs=3, steps_per_epoch=4, batch_size=2, dtype="float64", max_nonfinite_steps=6)
    with pytest.raises(TrainingDiverged, match=r"not finite for 6 steps in a row \(epoch 1, step 1.*a batch of 2 "
                                               r"structures \(mid; 9-9 atoms.*Lower the learning rate"):
        train(forcefield_factory(seed=0), frames[:4], frames[4:], settings, log=lambda *a: None)


def test_non_finite_labels_are_refused_before_training(forcefield_factory):
    from dataclasses import replace

    from mfcalc.training import TrainSettings, train

    frames = read_extxyz(DATA / "ethanol_rmd17_pbe_def2svp-train1000.xyz", "mid", index=":6")
    frames[2] = replace(frames[2], energy=float("nan"))
    forces = frames[3].forces.copy()
    forces[0, 0] = np.inf
    frames[3] = replace(frames[3], forces=forces)
    with pytest.raises(ValueError, match=r"2 training structure\(s\) have non-finite .*#2 \(mid: energy\), "
                                         r"#3 \(mid: forces\); remove those frames"):
        train(forcefield_factory(seed=0), frames[:4], frames[4:], TrainSettings(epochs=1), log=lambda *a: None)


def test_start_from_continues_from_a_checkpoint_without_refitting(tmp_path):
    """``start_from``: the network, weights and reference energies are the checkpoint's. At a learning
    rate of zero the continued model is the checkpoint itself, and the card names where it started."""
    first = _smoke_recipe(tmp_path, epochs=1)
    run_recipe(str(first), output=str(tmp_path / "a"), log=lambda *a: None)
    recipe = yaml.safe_load(first.read_text())
    del recipe["model"]
    recipe["start_from"] = str(tmp_path / "a" / "checkpoint.pt")
    recipe["training"].update(lr=0.0, seed=3)
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(recipe))
    card = run_recipe(str(path), output=str(tmp_path / "b"), log=lambda *a: None)
    a, b = read_metadata(tmp_path / "a" / "model.pt"), read_metadata(tmp_path / "b" / "model.pt")
    assert b["checksum"] == a["checksum"] == card["start_from"]["checksum"]
    assert card["start_from"]["path"] == recipe["start_from"]
    assert card["start_from"]["network"]["features"] == 8  # the first run's network, in the card and README
    assert '"features": 8' in (tmp_path / "b" / "README.md").read_text()
    assert f"after training the checkpoint it starts from, `{recipe['start_from']}`" in (tmp_path / "b" / "README.md").read_text()
    # with a learning rate the second stage moves the weights, from the checkpoint's
    recipe["training"].update(lr=1e-3)
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(str(path), output=str(tmp_path / "c"), log=lambda *a: None)
    start = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["state_dict"]
    moved = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert torch.equal(moved["model.e0"], start["model.e0"])  # reference energies are not refitted
    assert any(not torch.equal(moved[k], start[k]) for k in start if start[k].is_floating_point())


def test_start_from_refuses_a_model_block_and_other_fidelities(tmp_path):
    first = _smoke_recipe(tmp_path, epochs=1)
    run_recipe(str(first), output=str(tmp_path / "a"), log=lambda *a: None)
    recipe = yaml.safe_load(first.read_text())
    recipe["start_from"] = str(tmp_path / "a" / "checkpoint.pt")
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="remove `model:`"):
        run_recipe(str(path), output=str(tmp_path / "b"), log=lambda *a: None)
    del recipe["model"]
    recipe["datasets"] = recipe["datasets"][::-1]  # the same data, fidelities in another order
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="checkpoint's order"):
        run_recipe(str(path), output=str(tmp_path / "b"), log=lambda *a: None)
