"""Model files: training checkpoints (state dict + config) and exported TorchScript potentials.

An exported file is a TorchScript archive of ``ForceField`` (neighbor list -> model -> forces and
stress, every fidelity) with a JSON metadata record stored beside the code (``mfcalc.json``):
format version, fidelity names and aliases, elements, cutoff, units, dtype, mfcalc version,
training-data provenance, test errors, a SHA-256 checksum of every parameter and buffer, and
(since whole-file verification) a SHA-256 of every other entry of the archive (``entry_sha256``:
the TorchScript code, the pickled module with its constants, the tensors, the version records;
not ``.data/serialization_id``, which torch derives from the metadata's CRC) and of every
metadata field (``metadata_sha256``).

Loading checks, in this order, before the model is used: the format version; the weights'
checksum; that the metadata's fidelities, elements and cutoff are the module's own; every archive
entry (reading it also checks its zip CRC-32) against ``entry_sha256``, naming an entry that
differs, is missing or was added; and every metadata field against ``metadata_sha256``. A file
exported before whole-file verification (no ``entry_sha256``) still loads after the weights and
consistency checks, with a one-time ``ModelFileWarning`` saying how to re-export it.
"""

import hashlib
import json
import os
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .version import __version__
from .forcefield import ForceField
from .model import MultiFidelityPaiNN

FORMAT_VERSION = 1
METADATA_NAME = "mfcalc.json"


def _shipped_models_dir() -> Path:
    """Where the shipped models are: the package data ``mfcalc.models`` of an installed mfcalc
    (a wheel, or an editable install, where it maps to the checkout's ``models/``), else the
    ``models/`` folder beside the package (a checkout on ``sys.path`` without installing)."""
    try:
        from . import models
    except ImportError:
        return Path(__file__).resolve().parent.parent / "models"
    return Path(models.__file__).resolve().parent


MODELS_DIR = _shipped_models_dir()
DEFAULT_MODEL = "chno-mf"  # what MFCalculator() and the command line load without a model name


ENTRY_HASHES = "entry_sha256"  # metadata key: {archive entry name: SHA-256 of its bytes}
METADATA_HASHES = "metadata_sha256"  # metadata key: {metadata field: SHA-256 of its JSON}
_HASH_KEYS = (ENTRY_HASHES, METADATA_HASHES)
_UNHASHED_ENTRIES = (f"extra/{METADATA_NAME}", ".data/serialization_id")  # both depend on the metadata
_REEXPORT_HINT = "re-export it from its checkpoint with `mfcalc export CHECKPOINT -o model.pt`"
_warned_unverified = set()  # paths already warned about in this process


class ModelFileError(RuntimeError):
    """A model file that cannot be used: missing, unreadable, corrupted or too new."""


class ModelFileWarning(UserWarning):
    """A model file that loads but cannot be verified in full."""


def checksum(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes and float64 values of all parameters and buffers, except those
    derived from the configuration (``mfcalc.model.CONFIG_BUFFERS``: a re-shipped model may set them
    anew, and a TorchScript file lists them where the eager module does not)."""
    from .model import CONFIG_BUFFERS

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if name.rsplit(".", 1)[-1] in CONFIG_BUFFERS:
            continue
        digest.update(name.encode())
        data = tensor.detach().cpu()
        if data.is_floating_point():
            data = data.to(torch.float64)  # the same file cast to float32 still verifies
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_forcefield(config: Dict[str, Any], state_dict: Optional[Dict[str, Any]] = None) -> ForceField:
    """A ForceField from a model configuration and, optionally, its trained weights."""
    forcefield = ForceField(MultiFidelityPaiNN(config))
    if state_dict is not None:
        forcefield.load_state_dict(state_dict)
    return forcefield


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Union[str, Path], forcefield: ForceField, **extra: Any) -> None:
    """Config + weights (+ anything JSON-like in ``extra``), readable with weights_only=True."""
    payload = {
        "mfcalc_version": __version__,
        "config": forcefield.model.config,
        "state_dict": forcefield.state_dict(),
        **extra,
    }
    tmp = Path(str(path) + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain data only)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds here
        raise ModelFileError(
            f"{path} is not a readable mfcalc checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise ModelFileError(f"{path} is a torch file but not an mfcalc checkpoint")
    return payload


# --------------------------------------------------------------------------- export
def export_model(
    forcefield: ForceField,
    path: Union[str, Path],
    metadata: Optional[Dict[str, Any]] = None,
    dtype: torch.dtype = torch.float64,
) -> Dict[str, Any]:
    """Script ``forcefield`` and write it with its metadata. Returns the metadata written."""
    forcefield = forcefield.to("cpu", dtype).eval()
    config = forcefield.model.config
    meta: Dict[str, Any] = {
        "aliases": {},
        "default_fidelity": config["fidelities"][-1],
        "training_data": [],
        "test_errors": {},
        **(metadata or {}),
    }
    meta.update(
        format_version=FORMAT_VERSION,
        mfcalc_version=__version__,
        torch_version=torch.__version__,
        fidelities=list(config["fidelities"]),
        elements=list(config["elements"]),
        cutoff=float(config["cutoff"]),
        dtype=str(dtype).replace("torch.", ""),
        units={"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom", "stress": "eV/Angstrom^3"},
        config=config,
        checksum=checksum(forcefield),
    )
    _check_aliases(meta)
    for key in _HASH_KEYS:
        meta.pop(key, None)  # a base model's hashes (fine-tuning) describe another file
    scripted = torch.jit.script(forcefield)
    tmp = Path(str(path) + ".tmp")
    _save(scripted, tmp, meta)  # the entries do not depend on the metadata: hash them, then
    meta[ENTRY_HASHES] = entry_hashes(tmp)  # save again with the hashes inside
    meta[METADATA_HASHES] = metadata_hashes(meta)
    _save(scripted, tmp, meta)
    if entry_hashes(tmp) != meta[ENTRY_HASHES]:
        tmp.unlink()
        raise RuntimeError(
            f"torch {torch.__version__} wrote different archive entries when saving the same module "
            f"twice, so {path} cannot carry whole-file hashes; nothing was written"
        )
    os.replace(tmp, path)
    return meta


def _save(scripted: torch.jit.ScriptModule, path: Path, meta: Dict[str, Any]) -> None:
    torch.jit.save(scripted, str(path), _extra_files={METADATA_NAME: json.dumps(meta, indent=1)})


def _entry_name(name: str) -> str:
    """An archive entry's name without torch's top-level folder (named after the file it was
    first saved as), so that a renamed file still verifies."""
    return name.split("/", 1)[1] if "/" in name else name


def entry_hashes(path: Union[str, Path]) -> Dict[str, str]:
    """SHA-256 of the bytes of every entry of a model archive, by entry name, except the two that
    depend on the metadata: the metadata itself and ``.data/serialization_id`` (torch derives it
    from the CRC-32 of every record written, the metadata included).

    Reading an entry (those two as well) checks its zip CRC-32. Raises ModelFileError naming an
    entry that cannot be read or appears twice."""
    hashes: Dict[str, str] = {}
    seen = set()
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = _entry_name(info.filename)
                if name in seen:
                    raise ModelFileError(f"{path}: archive entry {name!r} appears twice; the file was edited")
                seen.add(name)
                digest = _hash_entry(archive, info, path)
                if name not in _UNHASHED_ENTRIES:
                    hashes[name] = digest
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ModelFileError(f"{path} is not a readable zip archive (truncated or corrupted?): {err}") from None
    return hashes


def _hash_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Union[str, Path]) -> str:
    try:
        return hashlib.sha256(archive.read(info)).hexdigest()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:
        raise ModelFileError(
            f"{path}: archive entry {_entry_name(info.filename)!r} is corrupted ({err}); "
            f"the file was damaged or edited"
        ) from None


def metadata_hashes(meta: Dict[str, Any]) -> Dict[str, str]:
    """SHA-256 of the JSON of every metadata field except the hashes themselves (as it reads
    back from the file: the JSON round trip first, so tuples and int keys compare alike)."""
    plain = json.loads(json.dumps({k: v for k, v in meta.items() if k != METADATA_HASHES}))
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
            for key, value in plain.items()}


def _check_aliases(meta: Dict[str, Any]) -> None:
    names = set(meta["fidelities"])
    for alias, target in meta["aliases"].items():
        if target not in names:
            raise ValueError(f"alias {alias!r} points to {target!r}, which is not a fidelity {sorted(names)}")
        if alias in names:
            raise ValueError(f"alias {alias!r} is also a fidelity name")
    if meta["default_fidelity"] not in names:
        raise ValueError(f"default_fidelity {meta['default_fidelity']!r} is not one of {sorted(names)}")


# --------------------------------------------------------------------------- loading
def resolve_model_path(model: Union[str, Path]) -> Path:
    """A path to an exported file, a directory holding ``model.pt``, or a name in ``models/``."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "model.pt"
    if path.is_file():
        return path
    search = [Path(d) for d in os.environ.get("MFCALC_MODELS", "").split(os.pathsep) if d]
    search.append(MODELS_DIR)
    for directory in search:
        candidate = directory / str(model) / "model.pt"
        if candidate.is_file():
            return candidate
    known = sorted(p.parent.name for d in search if d.is_dir() for p in d.glob("*/model.pt"))
    raise ModelFileError(
        f"no model file at {str(model)!r} and no shipped model of that name; "
        f"shipped models: {known or 'none found'} (searched {[str(d) for d in search]})"
    )


def read_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The metadata of an exported model, without checking or loading the weights."""
    return load_model(path, verify=False)[1]


def load_model(
    model: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    verify: bool = True,
) -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """Load an exported model; check its format version and checksum; cast it.

    ``dtype=None`` keeps the dtype the model was exported in.
    """
    path = resolve_model_path(model)
    extra = {METADATA_NAME: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:  # noqa: BLE001
        raise ModelFileError(
            f"{path} is not a readable mfcalc model file (truncated or corrupted?): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    try:
        meta = json.loads(extra[METADATA_NAME])
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise ModelFileError(f"{path} is a TorchScript file but has no mfcalc metadata")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by mfcalc {meta.get('mfcalc_version', '?')} in model format "
            f"{meta['format_version']}; this mfcalc {__version__} reads format {FORMAT_VERSION} "
            f"and older. Upgrade mfcalc (pip install -U mfcalc)"
        )
    if verify:
        verify_model_file(path, module, meta)
    if dtype is None:
        dtype = getattr(torch, meta["dtype"])
    module = module.to(device=device, dtype=dtype)
    meta["path"] = str(path)
    return module, meta


# --------------------------------------------------------------------------- verification
def verify_model_file(path: Union[str, Path], module: torch.jit.ScriptModule, meta: Dict[str, Any]) -> None:
    """Every check of a loaded model file against its metadata; raises ModelFileError."""
    _check_weights(path, module, meta)
    _check_module_matches_metadata(path, module, meta)
    if ENTRY_HASHES not in meta:
        _warn_unverified(path)
        return
    _check_entries(path, meta[ENTRY_HASHES])
    _check_metadata_fields(path, meta)


def _check_weights(path: Union[str, Path], module: torch.jit.ScriptModule, meta: Dict[str, Any]) -> None:
    found = checksum(module)
    if found != meta.get("checksum"):
        raise ModelFileError(
            f"{path}: checksum mismatch, the weights are not the ones that were exported "
            f"(expected {str(meta.get('checksum'))[:12]}..., found {found[:12]}...); "
            f"the file is corrupted or was edited"
        )


def _module_facts(module: torch.jit.ScriptModule, path: Union[str, Path]) -> Dict[str, Any]:
    try:
        return {"fidelities": list(module.fidelities), "elements": [int(z) for z in module.elements],
                "cutoff": float(module.cutoff)}
    except AttributeError as err:
        raise ModelFileError(f"{path}: the TorchScript module is not an mfcalc ForceField ({err})") from None


def _check_module_matches_metadata(path: Union[str, Path], module: torch.jit.ScriptModule,
                                   meta: Dict[str, Any]) -> None:
    """The fidelities, elements and cutoff the metadata (and its config) state are the module's."""
    facts = _module_facts(module, path)
    places = [("metadata", meta), ("metadata config", meta.get("config") or {})]
    for where, source in places:
        for key, own in facts.items():
            if key not in source:
                continue
            stated = [int(z) for z in source[key]] if key == "elements" else source[key]
            stated = float(stated) if key == "cutoff" else stated
            if stated != own:
                raise ModelFileError(
                    f"{path}: the {where} gives {key} {stated} but the module has {own}; the file "
                    f"was edited after export and its metadata no longer describes its model; {_REEXPORT_HINT}"
                )


def _check_entries(path: Union[str, Path], expected: Dict[str, str]) -> None:
    found = entry_hashes(path)
    missing = sorted(set(expected) - set(found))
    added = sorted(set(found) - set(expected))
    changed = sorted(name for name in set(found) & set(expected) if found[name] != expected[name])
    problems = [_first_of(names, what) for names, what in
                [(changed, "differs from the exported one"), (missing, "is missing"), (added, "was added")] if names]
    if problems:
        raise ModelFileError(f"{path}: {'; '.join(problems)}; the file was damaged or edited after export, "
                             f"{_REEXPORT_HINT} or get the original file again")


def _first_of(names: List[str], what: str) -> str:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"entry {names[0]!r} {what}{more}"


def _check_metadata_fields(path: Union[str, Path], meta: Dict[str, Any]) -> None:
    expected = meta.get(METADATA_HASHES)
    if not isinstance(expected, dict):
        raise ModelFileError(f"{path}: the metadata has entry hashes but no {METADATA_HASHES!r}; the file was edited")
    found = metadata_hashes(meta)
    for key in sorted(set(expected) | set(found)):
        if found.get(key) != expected.get(key):
            state = "missing" if key not in found else "added" if key not in expected else "changed"
            raise ModelFileError(f"{path}: metadata field {key!r} was {state} after export; "
                                 f"{_REEXPORT_HINT} or get the original file again")


def _warn_unverified(path: Union[str, Path]) -> None:
    key = str(Path(path).resolve())
    if key in _warned_unverified:
        return
    _warned_unverified.add(key)
    warnings.warn(
        f"{path} predates whole-file verification: only its weights, fidelities, elements and cutoff "
        f"were checked, not its code or other metadata; {_REEXPORT_HINT}",
        ModelFileWarning, stacklevel=4,
    )
