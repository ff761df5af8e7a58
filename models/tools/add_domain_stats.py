"""Add training-domain statistics (mfcalc.domain) to an exported model file, weights untouched.

    python models/tools/add_domain_stats.py ethanol-mf --recipe recipes/ethanol-mf.yaml          # prints them
    python models/tools/add_domain_stats.py ethanol-mf --recipe recipes/ethanol-mf.yaml --write  # and writes

The statistics (per element pair the shortest distance within the cutoff, per element the
largest force) are computed on the recipe's training split, loaded with mfcalc.recipe exactly as
training loaded it, and stored in the file's metadata under ``"domain"``; MFCalculator then warns
once when a structure falls outside them (``calc.domain_warnings``, ``calc.out_of_domain``).

Only the metadata entry of the archive is rewritten: every other entry (code, pickled module,
tensors) is copied byte for byte, so the weights' checksum and the whole-file entry hashes of
mfcalc.modelfile still verify; the metadata's own field hashes are recomputed for the new field.
The result is loaded and verified before it replaces anything (``-o`` writes elsewhere).
"""

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from ase.data import chemical_symbols

from mfcalc.domain import domain_statistics, pair_name
from mfcalc.modelfile import METADATA_NAME, load_model, resolve_model_path
from mfcalc.recipe import load_datasets, read_recipe

METADATA_ENTRY = f"extra/{METADATA_NAME}"


def training_structures(recipe_path: Path) -> List[Any]:
    """The training split of a recipe, as `mfcalc train` builds it."""
    return load_datasets(read_recipe(recipe_path), recipe_path.parent)["train"]


def with_metadata_field(meta: Dict[str, Any], key: str, value: Any) -> Dict[str, Any]:
    """``meta`` with ``key`` set, and its per-field hashes (if the file has them) recomputed."""
    from mfcalc import modelfile

    meta = dict(meta, **{key: value})
    meta.pop("path", None)  # added by load_model, not part of the file
    hashes_key = getattr(modelfile, "METADATA_HASHES", None)
    if hashes_key and hashes_key in meta:
        meta[hashes_key] = modelfile.metadata_hashes(meta)
    return meta


def rewrite_metadata(src: Path, dst: Path, meta: Dict[str, Any]) -> None:
    """Copy the archive ``src`` to ``dst`` entry by entry, replacing only the metadata entry."""
    replaced = 0
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, "w") as out:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.split("/", 1)[-1] == METADATA_ENTRY:
                data = json.dumps(meta, indent=1).encode()
                replaced += 1
            out.writestr(info, data)
    if replaced != 1:
        dst.unlink()
        raise ValueError(f"{src} has {replaced} metadata entries ({METADATA_ENTRY}), expected 1")


def add_domain_stats(model: str, recipe: Path, out: Optional[Path] = None) -> Dict[str, Any]:
    """Compute the statistics and write ``model`` (or ``out``) with them. Returns them."""
    path = resolve_model_path(model)
    _, meta = load_model(path)  # verified: never add a field to a file that does not check out
    stats = domain_statistics(training_structures(recipe), float(meta["cutoff"]))
    target = Path(out) if out is not None else path
    tmp = target.with_name(target.name + ".tmp")
    rewrite_metadata(path, tmp, with_metadata_field(meta, "domain", stats))
    try:
        _, written = load_model(tmp)
        if written["checksum"] != meta["checksum"] or written["domain"] != json.loads(json.dumps(stats)):
            raise RuntimeError(f"{tmp} did not read back with the same weights and statistics")
    except Exception:
        tmp.unlink()
        raise
    os.replace(tmp, target)
    return stats


def summary(stats: Dict[str, Any]) -> str:
    lines = [f"{stats['n_structures']} training structures ({stats['n_with_forces']} with forces), "
             f"cutoff {stats['cutoff']:g} Å"]
    lines += [f"  shortest {pair_name(k):6s} {v:.3f} Å" for k, v in stats["pair_min_distance"].items()]
    lines += [f"  largest force on {chemical_symbols[int(z)]:2s} {v:.2f} eV/Å" for z, v in stats["max_force"].items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("model", help="model name, directory or .pt file")
    parser.add_argument("--recipe", type=Path, required=True, help="the recipe the model was trained with")
    parser.add_argument("-o", "--out", type=Path, help="write here instead of replacing the model file")
    parser.add_argument("--write", action="store_true", help="write (without it: only print the statistics)")
    args = parser.parse_args(argv)
    if not args.write:
        _, meta = load_model(args.model)
        print(summary(domain_statistics(training_structures(args.recipe), float(meta["cutoff"]))))
        print("(not written: add --write)")
        return 0
    stats = add_domain_stats(args.model, args.recipe, args.out)
    print(summary(stats))
    print(f"wrote {args.out or resolve_model_path(args.model)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
