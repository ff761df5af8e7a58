"""Model files: export holds every fidelity and its metadata, checkpoints are weights-only and
export from the command line. (Damaged, edited and too-new files: test_bad_input.py.)"""

import json
import subprocess
import sys

import pytest
import torch

from mfcalc import MFCalculator, load_model, read_metadata
from mfcalc.modelfile import FORMAT_VERSION, save_checkpoint


def test_metadata_is_complete(tiny_model):
    meta = read_metadata(tiny_model)
    assert meta["fidelities"] == ["low", "mid", "high"]
    assert meta["aliases"] == {"HI": "high", "LO": "low"}
    assert meta["elements"] == [1, 6, 8, 14]
    assert meta["cutoff"] == 4.0 and meta["dtype"] == "float64"
    assert meta["units"]["energy"] == "eV" and meta["format_version"] == FORMAT_VERSION
    for key in ("mfcalc_version", "torch_version", "training_data", "test_errors", "checksum"):
        assert key in meta


def test_one_file_holds_every_fidelity_and_the_neighbor_list(tiny_model, ethanol):
    module, meta = load_model(tiny_model)
    assert list(module.fidelities) == meta["fidelities"]
    pos = torch.tensor(ethanol.positions)
    args = (pos, torch.tensor(ethanol.numbers), torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool))
    energies = {module.compute(*args, f, False, "dense")["energy"].item() for f in range(3)}
    assert len(energies) == 3


def test_checkpoint_is_weights_only_and_exports_from_the_cli(tmp_path, forcefield_factory, ethanol):
    forcefield = forcefield_factory(seed=5)
    save_checkpoint(tmp_path / "ckpt.pt", forcefield, card=json.dumps({"test_errors": {}}))
    torch.load(tmp_path / "ckpt.pt", weights_only=True)  # no pickled code inside
    out = tmp_path / "exported.pt"
    run = subprocess.run(
        [sys.executable, "-m", "mfcalc.cli", "export", str(tmp_path / "ckpt.pt"), "-o", str(out),
         "--aliases", '{"best": "high"}', "--default-fidelity", "mid"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    calc = MFCalculator(out, fidelity="best", device="cpu")
    assert calc.fidelity == "high" and MFCalculator(out, device="cpu").fidelity == "mid"
    ethanol.calc = calc
    pos = torch.tensor(ethanol.positions)
    direct = forcefield.eval().compute(
        pos, torch.tensor(ethanol.numbers), torch.zeros(3, 3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.bool), 2,
    )
    assert ethanol.get_potential_energy() == pytest.approx(float(direct["energy"]), abs=1e-10)


def test_cli_reports_errors_in_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mfcalc.cli", "info", str(tmp_path / "nothing.pt")],
        capture_output=True, text=True,
    )
    assert run.returncode == 1
    assert run.stderr.startswith("mfcalc info: error: no model file at")
    assert len(run.stderr.strip().splitlines()) == 1
