"""Fine-tuning: a new fidelity joins without disturbing the old ones (embedding strategy), the
reference energies are refitted, every fidelity survives in the exported file, and the drift of
the old fidelities is measured when weights they share are trained."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import pytest
from ase.build import molecule

from mfcalc import MFCalculator
from mfcalc.data import read_extxyz, read_gdml_npz
from mfcalc.finetune import finetune, save_finetuned
from mfcalc.training import TrainSettings

DATA = Path(__file__).resolve().parent.parent / "data" / "ethanol"
FAST = TrainSettings(epochs=4, steps_per_epoch=5, batch_size=4, lr=1e-3, weight_decay=0.0, ema_decay=0.5, seed=0)


def predictions(path, fidelities):
    atoms = molecule("CH3CH2OH")
    out = {}
    for fid in fidelities:
        atoms.calc = MFCalculator(path, fidelity=fid, dtype="float64", device="cpu")
        out[fid] = (atoms.get_potential_energy(), atoms.get_forces().copy())
    return out


def test_new_fidelity_with_embedding_strategy_leaves_old_ones_untouched(tiny_model, tmp_path):
    data = read_gdml_npz(DATA / "ethanol_ccsd_t-300.npz", "CC")[:12]
    result = finetune(tiny_model, data, "CC", new_fidelity=True, strategy="embedding", settings=FAST,
                      aliases={"gold": "CC"}, log=lambda *a: None)
    path = save_finetuned(result, tmp_path / "ft")
    assert result.forcefield.fidelities == ["low", "mid", "high", "CC"]
    before = predictions(tiny_model, ["low", "mid", "high"])
    after = predictions(path, ["low", "mid", "high"])
    for fid in before:
        assert after[fid][0] == before[fid][0]
        np.testing.assert_array_equal(after[fid][1], before[fid][1])
    # the reference energies were refitted: the new fidelity lands near the CCSD(T) energies
    calc = MFCalculator(path, fidelity="gold", device="cpu")
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    assert abs(atoms.get_potential_energy() - np.mean([s.energy for s in data])) < 5.0
    assert result.report["val"] >= 2 and result.report["strategy"] == "embedding"


def test_full_strategy_with_replay_reports_drift(tiny_model, tmp_path):
    data = read_gdml_npz(DATA / "ethanol_ccsd_t-300.npz", "high")[:6]  # < 10 points: k-fold
    replay = read_extxyz(DATA / "ethanol_rmd17_pbe_def2svp-train1000.xyz", "low", index=":20")
    result = finetune(tiny_model, data, "high", strategy="full", replay=replay[:15], replay_val=replay[15:],
                      settings=FAST, log=lambda *a: None)
    drift = result.report["drift"]
    assert set(drift) == {"low"}
    assert drift["low"]["forces_mae_before"] > 0 and drift["low"]["forces_mae_after"] > 0
    assert result.report["train"] == 6 and result.report["val"] == 0


def test_bad_finetune_requests(tiny_model):
    data = read_gdml_npz(DATA / "ethanol_ccsd_t-300.npz", "CC")[:3]
    with pytest.raises(ValueError, match=r"fidelity 'CC' is not in the base model .*new_fidelity=True"):
        finetune(tiny_model, data, "CC")
    with pytest.raises(ValueError, match="strategy must be one of"):
        finetune(tiny_model, data, "CC", new_fidelity=True, strategy="lora")
    with pytest.raises(ValueError, match="already exists"):
        finetune(tiny_model, [s.__class__(**{**s.__dict__, "fidelity": "low"}) for s in data], "low", new_fidelity=True)


def test_a_new_element_joins_without_changing_the_others(tiny_model, forcefield_factory):
    from ase.build import molecule as build

    from mfcalc.finetune import add_elements, load_base

    forcefield, _ = load_base(tiny_model)
    grown = add_elements(forcefield, [7])  # N sits between C and O in the element order
    assert grown.elements == [1, 6, 7, 8, 14]
    atoms = build("CH3CH2OH")
    import torch

    args = (torch.tensor(atoms.positions), torch.tensor(atoms.numbers), torch.zeros(3, 3, dtype=torch.float64),
            torch.zeros(3, dtype=torch.bool))
    for f in range(3):
        a = forcefield.eval().compute(*args, f)
        b = grown.eval().compute(*args, f)
        assert float(a["energy"]) == pytest.approx(float(b["energy"]), abs=1e-10)


def test_a_new_elements_embedding_learns_in_every_strategy(tiny_model):
    """Under the embedding/readout strategies a new element's row must still train (it starts as
    the mean of the known rows), while the known elements' rows stay bit-identical."""
    from mfcalc.data import Structure
    from mfcalc.finetune import add_elements, load_base

    base, _ = load_base(tiny_model)
    rng = np.random.default_rng(0)
    atoms = molecule("CH3CN")  # N: not in the tiny model
    data = []
    for _ in range(12):  # a harmonic surface around the minimum: something the training can learn
        displacement = rng.normal(0, 0.05, atoms.positions.shape)
        data.append(Structure(positions=atoms.positions + displacement, numbers=atoms.numbers.copy(),
                              cell=np.zeros((3, 3)), pbc=np.zeros(3, bool),
                              energy=-10.0 + 20.0 * float((displacement ** 2).sum()),
                              forces=-40.0 * displacement, fidelity="CC"))
    result = finetune(tiny_model, data, "CC", new_fidelity=True, strategy="embedding", settings=FAST,
                      log=lambda *a: None)
    start = add_elements(base, [7]).model.species_embedding.weight.detach()
    after = result.forcefield.model.species_embedding.weight.detach()
    n = result.forcefield.elements.index(7)
    known = [i for i in range(len(result.forcefield.elements)) if i != n]
    assert torch.equal(after[known], start[known].to(after.dtype))
    assert float((after[n] - start[n]).abs().max()) > 1e-4


@pytest.mark.parametrize("source", ["low", "mid", "high"])
def test_closest_fidelity_from_energies_alone(tiny_model, source):
    """Energy-only points (the usual coupled-cluster case) pick the existing fidelity whose energy
    surface has their shape, whatever constant offset separates the reference energies."""
    from dataclasses import replace

    from mfcalc.data import Structure
    from mfcalc.finetune import closest_fidelity, load_base
    from mfcalc.training import to_graphs

    calc = MFCalculator(tiny_model, fidelity=source, dtype="float64", device="cpu")
    rng = np.random.default_rng(3)
    data = []
    for _ in range(8):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=int(rng.integers(1000)))
        atoms.calc = calc
        data.append(Structure(numbers=atoms.numbers.copy(), positions=atoms.positions.copy(),
                              energy=atoms.get_potential_energy() + 123.4, forces=None, fidelity="new"))
    forcefield, _ = load_base(tiny_model)
    graphs = to_graphs([replace(s, fidelity="low") for s in data], forcefield.fidelities, forcefield.cutoff)
    assert forcefield.fidelities[closest_fidelity(forcefield, graphs, range(3))] == source


def test_the_learning_rate_follows_how_far_the_base_starts():
    """A base already close to the new points (forces MAE << 0.1 eV/Å) is fine-tuned with a
    smaller step; a far one with the full rate; a flag still wins."""
    from mfcalc.finetune import LEARNING_RATES, finetune_settings

    full = LEARNING_RATES["full"]
    assert finetune_settings(40).lr == pytest.approx(full)
    assert finetune_settings(40, start_forces_mae=0.3).lr == pytest.approx(full)
    assert finetune_settings(40, start_forces_mae=0.035).lr == pytest.approx(full * 0.7)
    assert finetune_settings(40, start_forces_mae=0.001).lr == pytest.approx(full * 0.4)
    assert finetune_settings(40, start_forces_mae=0.001, lr=3e-3).lr == pytest.approx(3e-3)


def test_training_that_never_beats_its_start_returns_the_start(tiny_model):
    """Noise labels: no epoch improves on the validation points, so fine-tuning hands back the
    weights it started from (best epoch -1), not the first epoch's."""
    from mfcalc.data import Structure
    from mfcalc.finetune import load_base

    base, _ = load_base(tiny_model)
    calc = MFCalculator(tiny_model, fidelity="high", dtype="float64", device="cpu")
    rng = np.random.default_rng(1)
    data = []
    for _ in range(12):  # the base's own energies and forces, plus noise there is nothing to learn in
        atoms = molecule("CH3CH2OH")
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.calc = calc
        data.append(Structure(positions=atoms.positions.copy(), numbers=atoms.numbers.copy(), cell=np.zeros((3, 3)),
                              pbc=np.zeros(3, bool), energy=atoms.get_potential_energy() + rng.normal(0, 0.01),
                              forces=atoms.get_forces() + rng.normal(0, 1.0, atoms.positions.shape), fidelity="high"))
    result = finetune(tiny_model, data, "high", settings=replace(FAST, lr=0.05), log=lambda *a: None)
    assert result.report["best_epoch"] == -1
    for (name, a), b in zip(base.state_dict().items(), result.forcefield.state_dict().values()):
        torch.testing.assert_close(a.to(b.dtype), b, msg=name)  # the start, in the training dtype
