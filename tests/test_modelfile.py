"""Model files: export holds every fidelity and its metadata; loading verifies format and
checksum and refuses damaged, edited or too-new files with a message naming the file."""

import json
import subprocess
import sys

import pytest
import torch

from mfcalc import MFCalculator, ModelFileError, load_model, read_metadata
from mfcalc.modelfile import FORMAT_VERSION, METADATA_NAME, save_checkpoint


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


def test_truncated_file(tiny_model, tmp_path):
    data = tiny_model.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"truncated\.pt is not a readable mfcalc model file"):
        MFCalculator(bad)


def test_garbage_file(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelFileError, match="garbage.pt is not a readable"):
        load_model(bad)


def _resave(src, dst, edit_meta=None, edit_module=None):
    extra = {METADATA_NAME: ""}
    module = torch.jit.load(str(src), _extra_files=extra)
    meta = json.loads(extra[METADATA_NAME])
    if edit_meta:
        edit_meta(meta)
    if edit_module:
        edit_module(module)
    torch.jit.save(module, str(dst), _extra_files={METADATA_NAME: json.dumps(meta)})


def test_file_from_a_newer_mfcalc(tiny_model, tmp_path):
    newer = tmp_path / "newer.pt"
    _resave(tiny_model, newer, edit_meta=lambda m: m.update(format_version=FORMAT_VERSION + 1, mfcalc_version="9.0"))
    with pytest.raises(ModelFileError, match=r"written by mfcalc 9.0 .*Upgrade mfcalc"):
        load_model(newer)


def test_edited_weights_fail_the_checksum(tiny_model, tmp_path):
    edited = tmp_path / "edited.pt"

    def edit(module):
        with torch.no_grad():
            dict(module.named_parameters())["model.readout.0.weight"][0, 0] += 1e-3

    _resave(tiny_model, edited, edit_module=edit)
    with pytest.raises(ModelFileError, match="edited.pt: checksum mismatch"):
        load_model(edited)


def test_missing_model_lists_shipped_ones(tmp_path):
    with pytest.raises(ModelFileError, match="no shipped model of that name"):
        MFCalculator("ethanol-mff")


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
