"""Bad-input catalogue, model files: every edit of an exported file is refused, naming the problem.

Before whole-file verification only the weights were checked: a cutoff edited in ``data.pkl``,
edited TorchScript code, fidelity names swapped in the JSON metadata, or a flipped byte whose zip
CRC was fixed all loaded silently and gave wrong energies. Each case below first shows that torch
itself still loads the tampered file (and, where it applies, that it computes something else),
then that ``load_model`` refuses it with a ModelFileError naming the entry or field.

Tampered archives are rewritten with Python's zipfile (not torch's 64-byte-aligned layout);
``test_f01`` shows that such a rewrite of an untouched file loads and verifies, so that the
refusals below come from the edits, not from the rewriting.
"""

import json
import shutil
import struct
import warnings
import zipfile

import numpy as np
import pytest
import torch
from ase.build import molecule

from mfcalc import ModelFileError, load_model
from mfcalc.modelfile import (
    ENTRY_HASHES,
    METADATA_HASHES,
    METADATA_NAME,
    ModelFileWarning,
    entry_hashes,
    export_model,
)

META_ENTRY = f"extra/{METADATA_NAME}"
DEBUG = "code/__torch__/mfcalc/forcefield.py.debug_pkl"  # source ranges for error messages only


# ----------------------------------------------------------------- helpers
def rewrite(src, dst, edit=lambda name, data: data, add=()):
    """Copy the archive ``src`` to ``dst`` entry by entry through ``edit(name, bytes)``, where
    name has no top-level folder; None drops the entry. zipfile writes fresh CRCs."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        prefix = zin.infolist()[0].filename.split("/", 1)[0]
        for info in zin.infolist():
            data = edit(info.filename.split("/", 1)[1], zin.read(info))
            if data is not None:
                zout.writestr(info, data)
        for name, data in add:
            zout.writestr(f"{prefix}/{name}", data)
    return dst


def edit_metadata(change):
    """An ``edit`` for rewrite() that changes the JSON metadata with ``change(meta)``."""
    def edit(name, data):
        if name != META_ENTRY:
            return data
        meta = json.loads(data)
        change(meta)
        return json.dumps(meta).encode()
    return edit


def read_meta(path):
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(META_ENTRY))
        return json.loads(archive.read(name))


def torch_energy_forces(path, atoms, fidelity=2):
    """What a TorchScript host gets from the file, with no mfcalc checks."""
    module = torch.jit.load(str(path))
    out = module.compute(torch.tensor(atoms.positions), torch.tensor(atoms.numbers),
                         torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool),
                         fidelity, False, "dense")
    return out["energy"].item(), out["forces"].detach().numpy()


@pytest.fixture
def atoms():
    a = molecule("CH3CH2OH")
    a.positions *= 1.5  # pairs near the 4 Å cutoff, where a cutoff edit shows
    return a


def binfloat(value):
    return b"G" + struct.pack(">d", value)  # pickle's BINFLOAT opcode


# ----------------------------------------------------------------- controls
def test_f01_a_zipfile_rewrite_of_an_untouched_file_loads_and_verifies(tiny_model, tmp_path, atoms):
    copy = rewrite(tiny_model, tmp_path / "copy.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelFileWarning)
        module, meta = load_model(copy)
    assert meta["fidelities"] == ["low", "mid", "high"]
    assert torch_energy_forces(copy, atoms)[0] == torch_energy_forces(tiny_model, atoms)[0]


def test_f02_a_renamed_file_still_verifies(tiny_model, tmp_path):
    renamed = tmp_path / "another-name.pt"
    shutil.copy(tiny_model, renamed)
    assert load_model(renamed)[1]["path"] == str(renamed)


def test_f03_export_is_deterministic_and_the_stored_hashes_are_the_files(forcefield_factory, tmp_path):
    first = export_model(forcefield_factory(seed=3), tmp_path / "a.pt", {"default_fidelity": "high"})
    second = export_model(forcefield_factory(seed=3), tmp_path / "b.pt", {"default_fidelity": "high"})
    assert first[ENTRY_HASHES] == second[ENTRY_HASHES]
    assert read_meta(tmp_path / "a.pt")[ENTRY_HASHES] == entry_hashes(tmp_path / "a.pt")
    assert any(name.startswith("code/") for name in first[ENTRY_HASHES])
    assert {"data.pkl", "constants.pkl", "version"} <= set(first[ENTRY_HASHES])


def test_f04_metadata_carried_over_from_a_base_model_gets_fresh_hashes(tiny_model, forcefield_factory, tmp_path):
    """Fine-tuning passes the base's metadata (with the base's hashes) to export_model."""
    _, base_meta = load_model(tiny_model)
    path = tmp_path / "finetuned.pt"
    export_model(forcefield_factory(seed=9), path, base_meta)
    _, meta = load_model(path)
    assert meta[ENTRY_HASHES] != base_meta[ENTRY_HASHES]


# ----------------------------------------------------------------- the pickled module (data.pkl)
def test_f05_cutoff_edited_in_data_pkl_is_refused(tiny_model, tmp_path, atoms):
    edited = rewrite(tiny_model, tmp_path / "cutoff.pt",
                     lambda n, d: d.replace(binfloat(4.0), binfloat(3.0)) if n == "data.pkl" else d)
    assert torch.jit.load(str(edited)).cutoff == 3.0  # torch loads it ...
    assert torch_energy_forces(edited, atoms)[0] != pytest.approx(torch_energy_forces(tiny_model, atoms)[0], abs=1e-6)
    with pytest.raises(ModelFileError, match=r"cutoff\.pt: the metadata gives cutoff 4\.0 but the module has 3\.0"):
        load_model(edited)  # ... mfcalc does not


def test_f06_a_constant_the_metadata_does_not_state_edited_in_data_pkl_is_refused(tiny_model, tmp_path, atoms):
    def edit_last_four(name, data):
        if name != "data.pkl":
            return data
        k = data.rindex(binfloat(4.0))  # not ForceField.cutoff (the first one): a model constant
        return data[:k] + binfloat(4.5) + data[k + 9:]

    edited = rewrite(tiny_model, tmp_path / "constant.pt", edit_last_four)
    assert torch.jit.load(str(edited)).cutoff == 4.0
    assert torch_energy_forces(edited, atoms)[0] != pytest.approx(torch_energy_forces(tiny_model, atoms)[0], abs=1e-6)
    with pytest.raises(ModelFileError,
                       match=r"constant\.pt: entry 'data\.pkl' differs from the exported one.*mfcalc export"):
        load_model(edited)


# ----------------------------------------------------------------- the TorchScript code
def test_f07_edited_torchscript_code_is_refused(tiny_model, tmp_path, atoms):
    code = "code/__torch__/mfcalc/forcefield.py"

    def flip_force_sign(name, data):
        if name != code:
            return data
        text, count = data.decode(), data.decode().count('"forces", torch.neg(')
        assert count == 1, "the exported force code changed: update this tampering"
        return text.replace('"forces", torch.neg(', '"forces", (').encode()

    edited = rewrite(tiny_model, tmp_path / "code.pt", flip_force_sign)
    np.testing.assert_allclose(torch_energy_forces(edited, atoms)[1], -torch_energy_forces(tiny_model, atoms)[1])
    with pytest.raises(ModelFileError, match=rf"code\.pt: entry '{code}' differs from the exported one"):
        load_model(edited)


# ----------------------------------------------------------------- the JSON metadata
def test_f08_two_fidelity_names_swapped_in_the_metadata_are_refused(tiny_model, tmp_path):
    def swap(meta):
        meta["fidelities"][0], meta["fidelities"][2] = meta["fidelities"][2], meta["fidelities"][0]

    edited = rewrite(tiny_model, tmp_path / "swapped.pt", edit_metadata(swap))
    torch.jit.load(str(edited))  # loads in torch: the energies would go out under the wrong names
    with pytest.raises(ModelFileError, match=r"swapped\.pt: the metadata gives fidelities \['high', 'mid', 'low'\] "
                                             r"but the module has \['low', 'mid', 'high'\]"):
        load_model(edited)


def test_f09_fidelities_swapped_in_the_metadata_config_are_refused(tiny_model, tmp_path):
    def swap(meta):
        meta["config"]["fidelities"] = ["mid", "low", "high"]

    edited = rewrite(tiny_model, tmp_path / "config.pt", edit_metadata(swap))
    with pytest.raises(ModelFileError, match=r"the metadata config gives fidelities \['mid', 'low', 'high'\]"):
        load_model(edited)


def test_f10_an_element_changed_in_the_metadata_is_refused(tiny_model, tmp_path):
    edited = rewrite(tiny_model, tmp_path / "elements.pt", edit_metadata(lambda m: m.update(elements=[1, 6, 7, 14])))
    with pytest.raises(ModelFileError, match=r"gives elements \[1, 6, 7, 14\] but the module has \[1, 6, 8, 14\]"):
        load_model(edited)


def test_f11_cutoff_changed_in_the_metadata_is_refused(tiny_model, tmp_path):
    edited = rewrite(tiny_model, tmp_path / "meta-cutoff.pt", edit_metadata(lambda m: m.update(cutoff=5.0)))
    with pytest.raises(ModelFileError, match=r"the metadata gives cutoff 5\.0 but the module has 4\.0"):
        load_model(edited)


@pytest.mark.parametrize("field, change", [
    ("aliases", lambda m: m["aliases"].update(HI="low")),
    ("default_fidelity", lambda m: m.update(default_fidelity="low")),
    ("test_errors", lambda m: m.update(test_errors={"high": {"forces_mae": 0.001}})),
    ("note", lambda m: m.update(note="added by hand")),
])
def test_f12_any_other_metadata_field_edited_is_refused(tiny_model, tmp_path, field, change):
    edited = rewrite(tiny_model, tmp_path / "field.pt", edit_metadata(change))
    state = "added" if field == "note" else "changed"
    with pytest.raises(ModelFileError, match=rf"field\.pt: metadata field '{field}' was {state} after export"):
        load_model(edited)


def test_f13_a_removed_metadata_hash_record_is_refused(tiny_model, tmp_path):
    edited = rewrite(tiny_model, tmp_path / "nohash.pt", edit_metadata(lambda m: m.pop(METADATA_HASHES)))
    with pytest.raises(ModelFileError, match=r"nohash\.pt: the metadata has entry hashes but no 'metadata_sha256'"):
        load_model(edited)


# ----------------------------------------------------------------- flipped bytes
def largest_tensor(path):
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        return info.filename.split("/", 1)[1], info


def test_f14_a_flipped_byte_in_a_tensor_with_its_crc_fixed_is_refused(tiny_model, tmp_path):
    name, _ = largest_tensor(tiny_model)

    def flip(n, data):
        return data[:100] + bytes([data[100] ^ 0x10]) + data[101:] if n == name else data

    edited = rewrite(tiny_model, tmp_path / "flipped.pt", flip)
    torch.jit.load(str(edited))
    with pytest.raises(ModelFileError, match=r"flipped\.pt: checksum mismatch, the weights are not the ones"):
        load_model(edited)


def data_offset(path, suffix):
    """Where the bytes of the archive entry whose name ends with ``suffix`` start in the file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
        archive.fp.seek(info.header_offset + 26)  # local header: name and extra-field lengths
        name_len, extra_len = struct.unpack("<HH", archive.fp.read(4))
    return info.header_offset + 30 + name_len + extra_len


def flip_in_place(src, dst, offset):
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def test_f15_a_flipped_byte_in_a_tensor_with_a_stale_crc_is_refused(tiny_model, tmp_path):
    name, _ = largest_tensor(tiny_model)
    edited = flip_in_place(tiny_model, tmp_path / "stale-crc.pt", data_offset(tiny_model, "/" + name) + 200)
    torch.jit.load(str(edited))  # torch does not check the CRC
    with pytest.raises(ModelFileError, match=r"stale-crc\.pt: checksum mismatch"):
        load_model(edited)


def test_f16_a_flipped_byte_outside_the_weights_with_a_stale_crc_is_refused(tiny_model, tmp_path):
    """``.data/serialization_id`` is not hashed (it depends on the metadata), but its CRC is checked."""
    edited = flip_in_place(tiny_model, tmp_path / "id.pt", data_offset(tiny_model, ".data/serialization_id"))
    torch.jit.load(str(edited))
    with pytest.raises(ModelFileError,
                       match=r"id\.pt: archive entry '\.data/serialization_id' is corrupted \(Bad CRC-32"):
        load_model(edited)


def test_f17_edited_debug_records_with_a_fixed_crc_are_refused(tiny_model, tmp_path):
    """Entries torch does not need to compute (source maps for error messages) are covered too."""
    def flip_near_the_end(name, data):
        return data[:-2] + bytes([data[-2] ^ 0x01]) + data[-1:] if name == DEBUG else data

    edited = rewrite(tiny_model, tmp_path / "debug.pt", flip_near_the_end)
    torch.jit.load(str(edited))
    with pytest.raises(ModelFileError, match=rf"entry '{DEBUG}' differs"):
        load_model(edited)


# ----------------------------------------------------------------- truncated, dropped, added
@pytest.mark.parametrize("keep", [0.5, 0.97, -22])
def test_f18_a_truncated_file_is_refused(tiny_model, tmp_path, keep):
    data = tiny_model.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(keep * len(data)) if keep > 0 else keep])
    with pytest.raises(ModelFileError,
                       match=r"cut\.pt is not a readable mfcalc model file \(truncated or corrupted\?\)"):
        load_model(cut)


def test_f19_a_dropped_entry_is_refused(tiny_model, tmp_path):
    dropped = "code/__torch__/mfcalc/neighbors.py.debug_pkl"
    edited = rewrite(tiny_model, tmp_path / "dropped.pt", lambda n, d: None if n == dropped else d)
    torch.jit.load(str(edited))  # torch does not need it
    with pytest.raises(ModelFileError, match=rf"dropped\.pt: entry '{dropped}' is missing"):
        load_model(edited)


def test_f20_an_added_entry_is_refused(tiny_model, tmp_path):
    edited = rewrite(tiny_model, tmp_path / "added.pt", add=[("extra/notes.txt", b"hello")])
    with pytest.raises(ModelFileError, match=r"added\.pt: entry 'extra/notes\.txt' was added"):
        load_model(edited)


def test_f21_an_entry_stored_twice_is_refused(tiny_model, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile: "Duplicate name"
        edited = rewrite(tiny_model, tmp_path / "twice.pt", add=[(DEBUG, b"\x80\x02).")])
    torch.jit.load(str(edited))
    with pytest.raises(ModelFileError, match=rf"twice\.pt: archive entry '{DEBUG}' appears twice"):
        load_model(edited)


# ----------------------------------------------------------------- files from before this check
def strip_whole_file_hashes(meta):
    meta.pop(ENTRY_HASHES)
    meta.pop(METADATA_HASHES)


def test_f22_a_file_from_before_whole_file_verification_loads_with_one_warning(tiny_model, tmp_path):
    old = rewrite(tiny_model, tmp_path / "old.pt", edit_metadata(strip_whole_file_hashes))
    with pytest.warns(ModelFileWarning, match=r"old\.pt predates whole-file verification.*"
                                              r"`mfcalc export CHECKPOINT -o model\.pt`"):
        load_model(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelFileWarning)
        load_model(old)  # once per file and process


def test_f23_a_file_from_before_still_gets_the_weight_and_consistency_checks(tiny_model, tmp_path):
    def old_and_swapped(meta):
        strip_whole_file_hashes(meta)
        meta["fidelities"] = ["mid", "low", "high"]

    edited = rewrite(tiny_model, tmp_path / "old-swapped.pt", edit_metadata(old_and_swapped))
    with pytest.raises(ModelFileError, match=r"the metadata gives fidelities \['mid', 'low', 'high'\]"):
        load_model(edited)


def test_f24_verify_false_reads_the_metadata_of_an_edited_file(tiny_model, tmp_path):
    """read_metadata (mfcalc info) opts out of the checks on purpose; load_model does not."""
    from mfcalc import read_metadata

    edited = rewrite(tiny_model, tmp_path / "info.pt", edit_metadata(lambda m: m.update(default_fidelity="low")))
    assert read_metadata(edited)["default_fidelity"] == "low"
    with pytest.raises(ModelFileError):
        load_model(edited)
