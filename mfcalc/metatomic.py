"""Export an mfcalc model as a metatomic ``AtomisticModel``: every fidelity in one file.

    mfcalc export chno-mf --format metatomic -o chno-mf-mta.pt

    from metatomic_ase import MetatomicCalculator
    calc = MetatomicCalculator("chno-mf-mta.pt", variants={"energy": variant_name("MP2/cc-pVDZ")})

The file has one output per fidelity, ``energy/<variant>``, and ``energy`` (the model's default
fidelity). metatomic's engines all read it and select the level of theory at run time: its ASE
calculator (``variants={"energy": ...}``), LAMMPS' ``pair_style metatomic`` (``variant`` keyword),
i-PI's metatomic driver and TorchSim.

Variant names. Fidelity names hold characters that engines' input files split on or parse
('/', ' ', ',', '(', ...): i-PI's driver options are comma-separated, LAMMPS splits on blanks, and
'/' already separates the quantity from the variant. ``variant_name`` writes a fidelity name
with letters, digits, '-' and '.' kept, and every other character as an escape starting with
'_'::

    '_' -> '__'    '/' -> '_s'    '(' -> '_l'    ')' -> '_r'
    '+' -> '_p'    ',' -> '_c'    ' ' -> '_w'    any other -> '_x<hex code point>_'

so "CCSD(T)/cc-pVDZ" is "CCSD_lT_r_scc-pVDZ", "PBE+TS" is "PBE_pTS" and "wB97x/6-31G(d)" is
"wB97x_s6-31G_ld_r". ``fidelity_name`` reverses it exactly (``fidelity_name(variant_name(x))
== x`` for every string), and the file's metadata (``extra["mfcalc-variants"]``, JSON) lists
every variant with its fidelity name, so nobody has to decode by hand: ``mfcalc info`` on the
mfcalc file or ``variants(path)`` on the exported one.

Units: energies in eV, lengths in Å (metatomic converts for engines in other units). Interaction
range: the cutoff times the number of message-passing layers (what a domain-decomposed engine
needs in its ghost shell); the neighbor list the model asks for is the cutoff itself (full and
strict). What the metatomic file cannot do that ``MFCalculator`` does: it has no charge/spin
or out-of-domain checks and no close-contact warnings (an engine calls only the network).

``metatomic-torch`` is an optional dependency (``pip install 'mfcalc[ecosystem]'``), imported
only when this module's functions run.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from .modelfile import build_forcefield, load_model
from .version import __version__

_ESCAPES = {"_": "_", "/": "s", "(": "l", ")": "r", "+": "p", ",": "c", " ": "w"}
_UNESCAPES = {code: char for char, code in _ESCAPES.items()}
_KEPT = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
PAINN = ("K. T. Schütt, O. T. Unke, M. Gastegger, Equivariant message passing for the prediction of tensorial "
         "properties and molecular spectra, ICML 2021 (PaiNN)")
METATOMIC = "metatomic: https://docs.metatensor.org/metatomic"


def variant_name(fidelity: str) -> str:
    """The metatomic variant of a fidelity name (see the module docstring for the mapping)."""
    if not fidelity:
        raise ValueError("a fidelity name cannot be empty")
    out = []
    for char in fidelity:
        if char in _KEPT:
            out.append(char)
        elif char in _ESCAPES:
            out.append("_" + _ESCAPES[char])
        else:
            out.append(f"_x{ord(char):x}_")
    return "".join(out)


def fidelity_name(variant: str) -> str:
    """The fidelity name of a metatomic variant written by ``variant_name`` (its exact inverse);
    ValueError for a string ``variant_name`` cannot have written."""
    out, k = [], 0
    while k < len(variant):
        char = variant[k]
        if char in _KEPT:
            out.append(char)
            k += 1
            continue
        code = variant[k + 1] if char == "_" and k + 1 < len(variant) else None
        if code in _UNESCAPES:
            out.append(_UNESCAPES[code])
            k += 2
        elif code == "x" and "_" in variant[k + 2:]:
            end = variant.index("_", k + 2)
            try:
                out.append(chr(int(variant[k + 2:end], 16)))
            except ValueError:
                raise ValueError(f"{variant!r} is not an mfcalc variant name (bad escape at {k})") from None
            k = end + 1
        else:
            raise ValueError(f"{variant!r} is not an mfcalc variant name (character {char!r} at {k})")
    name = "".join(out)
    if variant_name(name) != variant:  # e.g. '_x41_' for a plain 'A'
        raise ValueError(f"{variant!r} is not an mfcalc variant name (it would be written {variant_name(name)!r})")
    return name


def _references(meta: Dict[str, Any]) -> List[str]:
    sources = []
    for entry in meta.get("training_data", []):
        source = entry.get("source") if isinstance(entry, dict) else None
        if source:
            text = f"{entry.get('fidelity', '?')}: {source}"
            if text not in sources:
                sources.append(text)
    return sources


def build_atomistic_model(model: Union[str, Path], dtype: Optional[torch.dtype] = None):
    """The ``metatomic.torch.AtomisticModel`` of an mfcalc model file (name, directory or .pt),
    in ``dtype`` (None: the file's own), not yet saved."""
    from metatomic.torch import AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput

    from ._metatomic_module import MetatomicForceField

    scripted, meta = load_model(model)
    dtype = dtype or getattr(torch, meta["dtype"])
    forcefield = build_forcefield(meta["config"], scripted.state_dict()).to("cpu", dtype).eval()
    fidelities = list(meta["fidelities"])
    default = meta["default_fidelity"]
    names = {fidelity: variant_name(fidelity) for fidelity in fidelities}
    if len(set(names.values())) != len(names):  # cannot happen: the mapping is injective
        raise RuntimeError(f"two fidelities map to the same variant: {names}")
    index = {"energy": fidelities.index(default)}
    outputs = {"energy": ModelOutput(unit="eV", sample_kind="atom",
                                     description=f"energy at the model's default fidelity, {default}")}
    for k, fidelity in enumerate(fidelities):
        key = "energy/" + names[fidelity]
        index[key] = k
        outputs[key] = ModelOutput(unit="eV", sample_kind="atom", description=f"energy at fidelity {fidelity}")
    layers = int(meta["config"]["layers"])
    capabilities = ModelCapabilities(
        outputs=outputs,
        atomic_types=[int(z) for z in meta["elements"]],
        interaction_range=float(meta["cutoff"]) * layers,
        length_unit="angstrom",
        supported_devices=["cpu", "cuda"],
        dtype=str(dtype).replace("torch.", ""),
    )
    name = Path(meta["path"]).parent.name if Path(meta["path"]).name == "model.pt" else Path(meta["path"]).stem
    aliases = meta.get("aliases", {})
    description = (
        f"mfcalc multi-fidelity PaiNN ({layers} layers, cutoff {meta['cutoff']} Å); fidelities (output variant: "
        f"level of theory): " + "; ".join(f"{names[f]}: {f}" for f in fidelities)
        + f". 'energy' is the default fidelity, {default}."
    )
    metadata = ModelMetadata(
        name=name,
        description=description,
        authors=[str(a) for a in meta.get("authors", [])] or ["mfcalc contributors"],
        references={"model": _references(meta), "architecture": [PAINN],
                    "implementation": [f"mfcalc {meta.get('mfcalc_version', __version__)}", METATOMIC]},
        extra={
            "mfcalc-variants": json.dumps({names[f]: f for f in fidelities}),
            "mfcalc-default-fidelity": default,
            "mfcalc-aliases": json.dumps({alias: names[target] for alias, target in aliases.items()}),
            "mfcalc-checksum": str(meta.get("checksum", "")),
            "mfcalc-version": __version__,
        },
    )
    module = MetatomicForceField(forcefield.model, forcefield.species_of_z, index, float(meta["cutoff"])).eval()
    return AtomisticModel(module, metadata, capabilities)


def export_metatomic(model: Union[str, Path], path: Union[str, Path], dtype: Optional[torch.dtype] = None) -> Dict[str, str]:
    """Write the metatomic model of ``model`` (an mfcalc model name, directory or .pt file) to
    ``path``. Returns {variant: fidelity name} of the file (``energy`` is the default fidelity).

    ``dtype``: float32 or float64 (None: the mfcalc file's own); metatomic engines feed the
    model in this dtype."""
    atomistic = build_atomistic_model(model, dtype)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # metatomic records every TorchScript extension loaded in this process as one the model
    # needs; mfcalc loads vesin-torch for its own neighbor lists, which this module never calls
    # (the engine computes the pairs). Left in, an engine without vesin would refuse the file.
    loaded = torch.ops.loaded_libraries
    unused = {lib for lib in loaded if "vesin" in Path(lib).name}
    loaded.difference_update(unused)
    try:
        atomistic.save(str(tmp))
    finally:
        loaded.update(unused)
    if _archive_mentions(tmp, "vesin"):
        tmp.unlink()
        raise RuntimeError("the exported metatomic module calls vesin-torch; nothing was written")
    tmp.replace(path)
    return json.loads(atomistic.metadata().extra["mfcalc-variants"])


def _archive_mentions(path: Path, word: str) -> bool:
    """Whether the TorchScript code in the archive at ``path`` mentions ``word``."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return any(word in archive.read(name).decode(errors="replace")
                   for name in archive.namelist() if name.endswith(".py"))


def variants(path: Union[str, Path]) -> Dict[str, str]:
    """{variant: fidelity name} of a metatomic file written by ``export_metatomic``, read from
    its metadata without loading the model."""
    from metatomic.torch import read_model_metadata

    extra = read_model_metadata(str(path)).extra
    if "mfcalc-variants" not in extra:
        raise ValueError(f"{path} is a metatomic model but was not written by mfcalc")
    return json.loads(extra["mfcalc-variants"])
