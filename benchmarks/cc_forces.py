"""Are the model's coupled-cluster forces coupled-cluster forces? Every fidelity of a model against
real CCSD(T)/cc-pVDZ gradients (PySCF, all-electron: data/chno/ccsdt_ccpvdz_forces-heavy0-3.extxyz),
next to what running a cheaper method itself would cost on the same geometries (PBE/def2-SVP and
MP2/cc-pVDZ gradients computed with PySCF via `mfcalc label --forces`, see data/chno/README.md).

    python benchmarks/cc_forces.py [--model chno-mf] [--recipe recipes/chno-mf.yaml] [--out cc_forces]
    python benchmarks/cc_forces.py --model A.pt B.pt ...     # a committee (mfcalc.MFCommittee) of them

Frames are grouped by whether their molecule is held out of the model's training (the recipe's
``held_out`` test and val lists: every frame of them, at every fidelity, was out of training), a
frame the model trained on, or a frame of a training molecule labelled after the model was trained
(beyond the recipe's ``index`` for the reference file). Forces MAE in meV/Å over all force components; energies are compared after removing each
molecule's mean offset (the levels differ by whole hartrees), as the spread of the residual.
Writes benchmarks/results/<out>.md and .json.
"""

import argparse
from pathlib import Path

import numpy as np
import yaml
from ase.io import read
from ase.io.formats import string2index

from common import write_results

from mfcalc import MFCalculator, MFCommittee
from mfcalc.modelfile import read_metadata, resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
CHNO = ROOT / "data" / "chno"
REFERENCE = CHNO / "ccsdt_ccpvdz_forces-heavy0-3.extxyz"
CHEAP = {"PBE/def2-SVP (PySCF, RI-J)": CHNO / "pbe_def2svp_forces-ccframes.extxyz",
         "MP2/cc-pVDZ (PySCF)": CHNO / "mp2_ccpvdz_forces-ccframes.extxyz"}


def key(atoms) -> tuple:
    return tuple(atoms.numbers) + tuple(np.round(atoms.positions, 5).ravel())


def frames_by_key(path: Path) -> dict:
    return {key(a): a for a in read(path, ":")} if path.exists() else {}


def energy(atoms) -> float:
    return float(atoms.info.get("energy", atoms.get_potential_energy() if atoms.calc else np.nan))


def forces(atoms) -> np.ndarray:
    return np.asarray(atoms.arrays.get("forces", atoms.get_forces() if atoms.calc else None))


def errors(pred_f, ref_f, pred_e, ref_e, names) -> dict:
    """Forces MAE (meV/Å) and the std (meV) of the energy residual with each molecule's mean removed."""
    f = 1000 * np.mean(np.abs(np.concatenate([(p - r).ravel() for p, r in zip(pred_f, ref_f)])))
    residual = np.asarray(pred_e) - np.asarray(ref_e)
    centred = []
    for name in set(names):
        members = [i for i, n in enumerate(names) if n == name]
        centred += list(residual[members] - residual[members].mean())
    return {"forces_mae_meV_A": float(f), "energy_spread_meV": float(1000 * np.std(centred)), "n_frames": len(names)}


def by_molecule(frames, ref_f, pred_f, cheap: dict, outside: dict) -> dict:
    """Per molecule: forces MAE (meV/Å) of the model's default fidelity and of each cheaper method
    itself, the molecule's frame and atom counts, and the domain check's first reason (or '')."""
    rows = {}
    for name in sorted({a.info.get("name") for a in frames}):
        members = [i for i, a in enumerate(frames) if a.info.get("name") == name]
        mae = lambda pred: float(1000 * np.mean(np.abs(np.concatenate([(pred[i] - ref_f[i]).ravel() for i in members]))))
        row = {"n_frames": len(members), "n_atoms": len(frames[members[0]]), "model": mae(pred_f),
               "outside": "; ".join(outside.get(name, []))}
        for label, table in cheap.items():
            found = {i: table.get(key(frames[i])) for i in members}
            row[label] = mae({i: forces(x) for i, x in found.items()}) if all(x is not None for x in found.values()) else None
        rows[name] = row
    return rows


def trained_frames(recipe: dict, n_frames: int) -> set:
    """Indices of the reference file's frames the recipe trains on: its dataset entry for that
    file reads ``index`` (a slice such as ":90"; the labeller appends frames after a model is
    trained), every frame when it has none, none when the recipe does not read the file."""
    for entry in recipe.get("datasets", []):
        if Path(entry["path"]).name == REFERENCE.name:
            index = string2index(str(entry.get("index", ":")))
            return {index % n_frames} if isinstance(index, int) else set(range(n_frames)[index])
    return set()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="+", default=["chno-mf"],
                        help="a model, or several: their committee (mean of the members)")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "chno-mf.yaml"))
    parser.add_argument("--out", default="cc_forces")
    args = parser.parse_args()
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    held = set(recipe.get("held_out", {}).get("test", [])) | set(recipe.get("held_out", {}).get("val", []))
    reference = read(REFERENCE, ":")
    trained = trained_frames(recipe, len(reference))
    groups = {"held-out molecules": [a for a in reference if a.info.get("name") in held],
              "training molecules": [a for i, a in enumerate(reference)
                                     if a.info.get("name") not in held and i in trained],
              "new frames of training molecules": [a for i, a in enumerate(reference)
                                                   if a.info.get("name") not in held and i not in trained]}
    groups = {name: frames for name, frames in groups.items() if frames}
    meta = read_metadata(resolve_model_path(args.model[0]))
    model_label = " + ".join(args.model)
    cheap = {label: frames_by_key(path) for label, path in CHEAP.items()}
    default = meta.get("aliases", {}).get(meta["default_fidelity"], meta["default_fidelity"])
    results = {"model": model_label, "checksum": meta.get("checksum"), "groups": {}}
    for group, frames in groups.items():
        names = [a.info.get("name") for a in frames]
        ref_f = [forces(a) for a in frames]
        ref_e = [energy(a) for a in frames]
        rows, own_rows = {}, {}
        outside, default_f = {}, None
        for label, table in cheap.items():
            found = [table.get(key(a)) for a in frames]
            if all(x is not None for x in found):
                rows["method itself: " + label] = errors([forces(x) for x in found], ref_f,
                                                         [energy(x) for x in found], ref_e, names)
        for fidelity in meta["fidelities"]:
            if len(args.model) > 1:
                calc = MFCommittee(args.model, fidelity=fidelity, dtype="float64")
            else:
                calc = MFCalculator(args.model[0], fidelity=fidelity, dtype="float64")
            pred_f, pred_e = [], []
            for a in frames:
                b = a.copy()
                b.calc = calc
                pred_e.append(b.get_potential_energy())
                pred_f.append(b.get_forces())
                if fidelity == default:  # the model's own verdict on the frame (mfcalc.domain)
                    outside.setdefault(a.info.get("name"), calc.domain_warnings[:1])
            if fidelity == default:
                default_f = pred_f
            rows["model fidelity: " + fidelity] = errors(pred_f, ref_f, pred_e, ref_e, names)
            for label, table in cheap.items():  # the fidelity against its own method's gradients
                own = [table.get(key(a)) for a in frames]
                if label.split(" ")[0] == fidelity and all(x is not None for x in own):
                    own_rows[f"model fidelity {fidelity} vs {label} gradients"] = errors(
                        pred_f, [forces(x) for x in own], pred_e, [energy(x) for x in own], names)
        results["groups"][group] = {"molecules": sorted(set(names)), "rows": rows, "own_method": own_rows,
                                    "mean_abs_force_eV_A": float(np.mean(np.abs(np.concatenate([f.ravel() for f in ref_f])))),
                                    "by_molecule": by_molecule(frames, ref_f, default_f, cheap, outside)}
    lines = [f"# Forces against CCSD(T)/cc-pVDZ gradients (`python benchmarks/cc_forces.py --model "
             f"{' '.join(args.model)} --recipe {Path(args.recipe).name}`)", "",
             f"Model `{model_label}` (checksum of the first: {str(meta.get('checksum'))[:12]}). Reference: PySCF all-electron "
             "CCSD(T)/cc-pVDZ analytic gradients of distorted small molecules (data/chno). 'method itself' rows: "
             "that cheaper method run with PySCF on the same geometries (what skipping coupled cluster costs). "
             "Energy: std of the residual after removing each molecule's mean offset.", ""]
    for group, block in results["groups"].items():
        lines += [f"## {group} ({block['rows'][next(iter(block['rows']))]['n_frames']} frames; mean |F| "
                  f"{block['mean_abs_force_eV_A']:.2f} eV/Å)", "", ", ".join(block["molecules"]), "",
                  "| forces from | forces MAE (meV/Å) | energy spread (meV) |", "|---|---|---|"]
        for label, r in block["rows"].items():
            lines.append(f"| {label} | {r['forces_mae_meV_A']:.1f} | {r['energy_spread_meV']:.1f} |")
        if group == "held-out molecules":
            cheap_labels = list(CHEAP)
            lines += ["", f"Per molecule, forces MAE (meV/Å): the model's default fidelity ({default}) and each cheaper "
                      "method itself; 'outside' quotes the model's domain check (`calc.domain_warnings`, "
                      "mfcalc.domain) on the molecule's first frame:", "",
                      f"| molecule | frames | atoms | model {default} | " + " | ".join(cheap_labels) + " | outside the training domain |",
                      "|---|---|---|---|" + "---|" * len(cheap_labels) + "---|"]
            for name, r in block["by_molecule"].items():
                lines.append(f"| {name} | {r['n_frames']} | {r['n_atoms']} | {r['model']:.1f} | "
                             + " | ".join(f"{r[c]:.1f}" if r.get(c) is not None else "-" for c in cheap_labels)
                             + f" | {r['outside'] or 'no'} |")
        if block["own_method"]:
            lines += ["", "Each cheaper fidelity against its own method's gradients on the same frames:", "",
                      "| | forces MAE (meV/Å) | energy spread (meV) |", "|---|---|---|"]
            for label, r in block["own_method"].items():
                lines.append(f"| {label} | {r['forces_mae_meV_A']:.1f} | {r['energy_spread_meV']:.1f} |")
        lines.append("")
    write_results(args.out, "\n".join(lines), results)


if __name__ == "__main__":
    main()
