"""Model files: training checkpoints (state dict + config) and exported TorchScript potentials.

An exported file is a TorchScript archive of ``ForceField`` (neighbor list -> model -> forces and
stress, every fidelity) with a JSON metadata record stored beside the code (``mfcalc.json``):
format version, fidelity names and aliases, elements, cutoff, units, dtype, mfcalc version,
training-data provenance, test errors, and a SHA-256 checksum of every parameter and buffer.
Loading checks the format version and the checksum before the model is used.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from . import __version__
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


class ModelFileError(RuntimeError):
    """A model file that cannot be used: missing, unreadable, corrupted or too new."""


def checksum(module: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes and float64 values of all parameters and buffers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
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
    scripted = torch.jit.script(forcefield)
    tmp = Path(str(path) + ".tmp")
    torch.jit.save(scripted, str(tmp), _extra_files={METADATA_NAME: json.dumps(meta, indent=1)})
    os.replace(tmp, path)
    return meta


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
        found = checksum(module)
        if found != meta.get("checksum"):
            raise ModelFileError(
                f"{path}: checksum mismatch, the weights are not the ones that were exported "
                f"(expected {str(meta.get('checksum'))[:12]}..., found {found[:12]}...); "
                f"the file is corrupted or was edited"
            )
    if dtype is None:
        dtype = getattr(torch, meta["dtype"])
    module = module.to(device=device, dtype=dtype)
    meta["path"] = str(path)
    return module, meta
