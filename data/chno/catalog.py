"""The CHNO molecule list (molecules.csv): loading, checks, family counts and the label budget.

    python data/chno/catalog.py            # check molecules.csv; exit status 1 on any problem
    python data/chno/catalog.py --readme   # also rewrite the generated sections of README.md

Checks: every SMILES parses with RDKit and has no backslash (extxyz would lose it); only H, C,
N, O; at most 9 heavy atoms; neutral; closed shell (no radical electrons, even electron count);
names unique and file-name safe; no molecule twice (isomeric canonical SMILES); every family
known and the main families with >= 10 members; the L-amino acids are (S) at C-alpha; ethanol,
water, methane and ammonia are present.

The budget model (see README.md, "CPU-time budget") scales single-core times measured for ethanol
with the number of basis functions; it is an estimate for planning, not a measurement.
"""

import argparse
import csv
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence

HERE = Path(__file__).resolve().parent
CSV = HERE / "molecules.csv"
README = HERE / "README.md"

MAX_HEAVY = 9
ELEMENTS = {"H", "C", "N", "O"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+-]*$")
#: families the issue asks for, each with at least MIN_PER_FAMILY molecules
MAIN_FAMILIES = (
    "alcohol", "ether", "aldehyde_ketone", "acid_ester", "amine", "amide", "nitrile", "aromatic",
    "heterocycle", "multifunctional",
)
OTHER_FAMILIES = ("small", "alkane", "alkene", "alkyne", "imine_oxime_nitro")
FAMILIES = MAIN_FAMILIES + OTHER_FAMILIES
MIN_PER_FAMILY = 10
REQUIRED = ("ethanol", "water", "methane", "ammonia")
FAMILY_NOTES = {
    "small": "water, ammonia, H2, N2, CO, CO2, H2O2, hydrazine, hydroxylamine, N2O, HNCO",
    "alkane": "linear, branched, cyclic and strained (cyclopropane, bicyclopentane, cubane)",
    "alkene": "mono-, di- and cyclic alkenes, allene, cis/trans 2-butene",
    "alkyne": "acetylene to 1-pentyne, conjugated enynes",
    "alcohol": "primary, secondary, tertiary, cyclic, unsaturated, diols, glycerol",
    "ether": "acyclic, vinyl, acetal, and cyclic (oxirane to 1,4-dioxane)",
    "aldehyde_ketone": "aldehydes, ketones, enones, 1,2-dicarbonyls, ketene, benzoquinone",
    "acid_ester": "carboxylic acids and diacids, esters, lactones, carbonates, an anhydride",
    "amine": "primary/secondary/tertiary, diamines, hydrazines, saturated N rings, morpholine",
    "amide": "primary/secondary/tertiary amides, lactams, oxamide",
    "nitrile": "alkyl, unsaturated and di-nitriles, HCN, cyanogen, cyanamide",
    "aromatic": "substituted benzenes: alkyl, OH, OMe, CHO, COMe, COOH, NH2, NHMe, CONH2, CN, NO2",
    "heterocycle": "azines, azoles, oxazoles, oxadiazoles, furans, nucleobases, fused bicyclics",
    "multifunctional": "amino acids (neutral form), urea, biuret, hydroxy acids/ketones, amino alcohols",
    "imine_oxime_nitro": "imines, oximes, amidines, nitro compounds, methyl nitrate and nitrite",
}

#: contracted basis functions per element (pure d); def2-SVP and cc-pVDZ agree for H, C, N, O:
#: H 2s1p = 5, C/N/O 3s2p1d = 14
NBASIS_DZ = {"H": 5, "C": 14, "N": 14, "O": 14}
NBASIS_REF = 72  # ethanol, C2H6O

#: single-core seconds for ethanol on this project's build machine (PySCF, one thread), and the
#: power of the basis size each is scaled with (an assumption, see README.md)
REFERENCE_COSTS = {
    "PBE/def2-SVP energy+forces": (13.0, 3),
    "MP2/cc-pVDZ energy": (11.0, 5),  # the measured MP2 *gradient* time: an upper bound
    "CCSD(T)/cc-pVDZ energy": (21.0, 7),
    "CCSD(T)/cc-pVDZ energy+forces": (519.0, 7),
}
MIN_SECONDS = 1.0  # floor per PySCF call for tiny molecules (start-up, SCF): an assumption

#: GFN2-xTB (tblite 0.8.0) energy+forces, one thread, median of a few calls near the minimum,
#: measured on this machine with `make_structures.py --budget` (README.md); used by --dry-run
#: through the fit seconds = XTB_A * n_atoms ** XTB_P
XTB_MEASURED = {"water": (3, 0.00050), "ethanol": (9, 0.00113), "nonane": (29, 0.00697)}
XTB_A, XTB_P = 1.18e-4, 1.17


def load(path: Path = CSV) -> List[Dict[str, str]]:
    """Rows of molecules.csv as dicts with keys name, smiles, family."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in ("name", "smiles", "family"):
            row[key] = (row.get(key) or "").strip()
    return rows


def rdkit_mol(smiles: str, hydrogens: bool = True):
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse SMILES {smiles!r}")
    return Chem.AddHs(mol) if hydrogens else mol


def composition(smiles: str) -> Counter:
    """Element counts including hydrogens."""
    return Counter(atom.GetSymbol() for atom in rdkit_mol(smiles).GetAtoms())


def n_heavy(smiles: str) -> int:
    return sum(n for el, n in composition(smiles).items() if el != "H")


def n_basis(smiles: str, table: Dict[str, int] = NBASIS_DZ) -> int:
    return sum(table[el] * n for el, n in composition(smiles).items())


def formula(smiles: str) -> str:
    comp = composition(smiles)
    order = ["C", "H"] + sorted(el for el in comp if el not in ("C", "H"))
    return "".join(f"{el}{comp[el] if comp[el] > 1 else ''}" for el in order if comp.get(el))


def check(rows: Sequence[Dict[str, str]]) -> List[str]:
    """Problems found in ``rows`` (empty when all is well)."""
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    problems = []
    names, canon = Counter(), {}
    for k, row in enumerate(rows, start=2):  # line numbers of the CSV
        name, smi, fam = row["name"], row["smiles"], row["family"]
        where = f"line {k} ({name or '?'})"
        names[name] += 1
        if not NAME_RE.match(name):
            problems.append(f"{where}: name must match {NAME_RE.pattern}")
        if fam not in FAMILIES:
            problems.append(f"{where}: unknown family {fam!r}")
        if "\\" in smi:
            # ASE (3.29) writes extxyz info strings without escaping backslashes and reads "\C" as
            # "C", which would silently drop a cis/trans mark: write e.g. C(/C)=C/C for C/C=C\C
            problems.append(f"{where}: backslash in SMILES (use the equivalent form with '/' only)")
        mol = Chem.MolFromSmiles(smi)
        if mol is None:
            problems.append(f"{where}: RDKit cannot parse {smi!r}")
            continue
        molh = Chem.AddHs(mol)
        elements = {a.GetSymbol() for a in molh.GetAtoms()}
        if not elements <= ELEMENTS:
            problems.append(f"{where}: elements {sorted(elements - ELEMENTS)} not in H, C, N, O")
        heavy = sum(a.GetAtomicNum() > 1 for a in molh.GetAtoms())
        if heavy > MAX_HEAVY:
            problems.append(f"{where}: {heavy} heavy atoms > {MAX_HEAVY}")
        if Chem.GetFormalCharge(molh) != 0:
            problems.append(f"{where}: net charge {Chem.GetFormalCharge(molh)}")
        if Descriptors.NumRadicalElectrons(molh) != 0:
            problems.append(f"{where}: has radical electrons")
        if (sum(a.GetAtomicNum() for a in molh.GetAtoms()) - Chem.GetFormalCharge(molh)) % 2:
            problems.append(f"{where}: odd electron count (open shell)")
        key = Chem.MolToSmiles(mol, isomericSmiles=True)
        if key in canon:
            problems.append(f"{where}: same molecule as {canon[key]} ({key})")
        canon[key] = name
        if name.startswith("L-"):
            # L-amino acids: C-alpha (bonded to N and to the carboxyl C) is (S); L-lactic acid has
            # no match and is not checked
            from rdkit.Chem import rdCIPLabeler

            rdCIPLabeler.AssignCIPLabels(mol)
            patt = Chem.MolFromSmarts("[NX3;H2,H1][CX4]C(=O)[OH]")
            for match in mol.GetSubstructMatches(patt):
                atom = mol.GetAtomWithIdx(match[1])
                label = atom.GetProp("_CIPCode") if atom.HasProp("_CIPCode") else "none"
                if label != "S":
                    problems.append(f"{where}: C-alpha is {label}, expected S for an L-amino acid")
    for name, count in names.items():
        if count > 1:
            problems.append(f"name {name!r} appears {count} times")
    fams = Counter(row["family"] for row in rows)
    for fam in MAIN_FAMILIES:
        if fams[fam] < MIN_PER_FAMILY:
            problems.append(f"family {fam!r} has {fams[fam]} molecules (< {MIN_PER_FAMILY})")
    for name in REQUIRED:
        if name not in names:
            problems.append(f"required molecule {name!r} missing")
    return problems


# ---------------------------------------------------------------- budget (README.md tables)

def qm_seconds(smiles: str, label: str) -> float:
    """Estimated single-core seconds of one PySCF call for ``label`` (a REFERENCE_COSTS key)."""
    seconds, power = REFERENCE_COSTS[label]
    return max(MIN_SECONDS, seconds * (n_basis(smiles) / NBASIS_REF) ** power)


def xtb_seconds(n_atoms: int) -> float:
    return XTB_A * n_atoms ** XTB_P


#: the planned label sets: (label, which molecules, frames per molecule). Frames are picked with
#: `make_structures.py --combine ... --pick K`, whose picks are nested (the K=4 set lies inside
#: the K=15 set), so the CCSD(T) frames also have MP2 and PBE labels, and the MP2 frames PBE ones.
PLAN = (
    ("PBE/def2-SVP energy+forces", "all", 15),
    ("MP2/cc-pVDZ energy", "all", 4),
    ("CCSD(T)/cc-pVDZ energy", "heavy<=4", 4),
)
EXAMPLES = ("water", "ethanol", "butane", "benzene", "L-leucine", "nonane", "purine")

def _select(rows, which):
    if which == "all":
        return list(rows)
    limit = int(which.split("<=")[1])
    return [r for r in rows if n_heavy(r["smiles"]) <= limit]


def family_table(rows) -> str:
    fams = Counter(r["family"] for r in rows)
    lines = ["| family | molecules | examples / scope |", "|---|---:|---|"]
    for fam in FAMILIES:
        lines.append(f"| {fam} | {fams[fam]} | {FAMILY_NOTES[fam]} |")
    lines.append(f"| **total** | **{len(rows)}** | |")
    heavy = Counter(n_heavy(r["smiles"]) for r in rows)
    lines.append("")
    lines.append("Heavy atoms per molecule: " + ", ".join(f"{h}: {heavy[h]}" for h in sorted(heavy)) + ".")
    return "\n".join(lines)


def molecule_list(rows) -> str:
    out = []
    for fam in FAMILIES:
        members = [r for r in rows if r["family"] == fam]
        out.append(f"- **{fam}** ({len(members)}): " + ", ".join(
            f"{r['name']} ({formula(r['smiles'])})" for r in members))
    return "\n".join(out)


def budget_table(rows, xtb_calls_per_molecule) -> str:
    """Markdown table of the planned labels; ``xtb_calls_per_molecule(row) -> (calls, frames)``."""
    lines = [
        "| labels | molecules | frames | scaling from ethanol | CPU-hours (1 core) | mean s / frame "
        "| largest s / frame |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    calls = frames = seconds = 0.0
    worst = 0.0
    for r in rows:
        c, f = xtb_calls_per_molecule(r)
        n_atoms = sum(composition(r["smiles"]).values())
        calls += c
        frames += f
        seconds += c * xtb_seconds(n_atoms)
        worst = max(worst, c * xtb_seconds(n_atoms) / f)
    lines.append(
        f"| GFN2-xTB energy+forces (tblite), generated with the structures | {len(rows)} | {int(frames)} | "
        f"measured, ~N_atoms^{XTB_P:g} | {seconds / 3600:.1f} | {seconds / frames:.2f} | {worst:.2f} |")
    total = seconds
    for label, which, per in PLAN:
        chosen = _select(rows, which)
        secs = [qm_seconds(r["smiles"], label) for r in chosen]
        power = REFERENCE_COSTS[label][1]
        n = len(chosen) * per
        lines.append(
            f"| {label} ({which}, {per} per molecule) | {len(chosen)} | {n} | N_basis^{power} | "
            f"{per * sum(secs) / 3600:.1f} | {per * sum(secs) / n:.0f} | {max(secs):.0f} |")
        total += per * sum(secs)
    lines.append(f"| **total** | | | | **{total / 3600:.0f}** | | |")
    _, which, per = PLAN[-1]
    grad = [qm_seconds(r["smiles"], "CCSD(T)/cc-pVDZ energy+forces") for r in _select(rows, which)]
    lines.append("")
    lines.append(
        f"Not planned, for comparison: CCSD(T)/cc-pVDZ *gradients* for the same {which} frames would "
        f"take {per * sum(grad) / 3600:.0f} CPU-hours (519 s for ethanol, ~25x the energy).")
    return "\n".join(lines)


def cost_examples(rows) -> str:
    """Estimated seconds per call for a few molecules (the model behind the budget)."""
    by_name = {r["name"]: r for r in rows}
    labels = list(REFERENCE_COSTS)
    lines = ["| molecule | atoms | heavy | N_basis (DZ) | GFN2-xTB | " + " | ".join(labels) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(labels)]
    for name in EXAMPLES:
        smi = by_name[name]["smiles"]
        n_atoms = sum(composition(smi).values())
        measured = XTB_MEASURED.get(name)
        xtb = f"{1000 * (measured[1] if measured else xtb_seconds(n_atoms)):.1f} ms"
        xtb += " (measured)" if measured else ""
        lines.append(f"| {name} ({formula(smi)}) | {n_atoms} | {n_heavy(smi)} | {n_basis(smi)} | {xtb} | "
                     + " | ".join(f"{qm_seconds(smi, lab):,.0f} s" for lab in labels) + " |")
    return "\n".join(lines)


#: label files made with `mfcalc label` (label_index, seconds, method, basis in every frame's info)
LABEL_FILES = ("ccsdt_ccpvdz-*.extxyz", "ccsdt_ccpvdz_forces-*.extxyz", "mp2_ccpvdz-*.extxyz", "mp2_ccpvdz_forces-*.extxyz",
               "pbe_def2svp-*.extxyz", "pbe_def2svp_forces-*.extxyz")


def density_fit_label(info) -> str:
    """How a label file's integrals were fitted (mfcalc label --density-fit)."""
    if not info.get("density_fit"):
        return "no"
    return "RI-JK + RI-MP2" if str(info.get("method", "")).upper() == "MP2" else "RI-J"


def labels_table() -> str:
    """What has been labelled so far, read from the label files themselves: frames, molecules,
    and the CPU time PySCF reported per frame (one core each)."""
    from ase.io import read

    lines = ["| file | fidelity | density fit | forces | molecules | frames | heavy atoms | CPU-hours | mean s / frame |",
             "|---|---|---|---|---:|---:|---|---:|---:|"]
    for pattern in LABEL_FILES:
        for path in sorted(HERE.glob(pattern)):
            frames = read(str(path), index=":")
            if not frames:
                continue
            seconds = [float(a.info.get("seconds", 0.0)) for a in frames]
            heavy = [int((a.numbers > 1).sum()) for a in frames]
            has_forces = "forces" in (frames[0].calc.results if frames[0].calc else {})
            lines.append(
                f"| `{path.name}` | {frames[0].info['fidelity']} | "
                f"{density_fit_label(frames[0].info)} | {'yes' if has_forces else 'no'} | "
                f"{len({a.info['name'] for a in frames})} | {len(frames)} | {min(heavy)}-{max(heavy)} | "
                f"{sum(seconds) / 3600:.2f} | {sum(seconds) / len(seconds):.1f} |"
            )
    return "\n".join(lines)


def replace_section(text: str, tag: str, body: str) -> str:
    start, end = f"<!-- BEGIN {tag} (generated by catalog.py --readme) -->", f"<!-- END {tag} -->"
    if start not in text or end not in text:
        raise KeyError(f"README.md lacks the markers for {tag!r}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", default=str(CSV))
    parser.add_argument("--readme", action="store_true", help="rewrite the generated sections of README.md")
    args = parser.parse_args(argv)
    rows = load(Path(args.csv))
    problems = check(rows)
    for p in problems:
        print("PROBLEM:", p)
    fams = Counter(r["family"] for r in rows)
    print(f"{len(rows)} molecules, {len(problems)} problems; families: "
          + ", ".join(f"{f} {fams[f]}" for f in FAMILIES))
    if args.readme and not problems:
        sys.path.insert(0, str(HERE))
        from make_structures import Protocol, estimate_calls

        protocol = Protocol()

        def per_molecule(row):
            n_atoms = sum(composition(row["smiles"]).values())
            return estimate_calls(protocol, n_atoms)["total"], protocol.frames

        text = README.read_text()
        text = replace_section(text, "families", family_table(rows))
        text = replace_section(text, "molecules", molecule_list(rows))
        text = replace_section(text, "budget", budget_table(rows, per_molecule))
        text = replace_section(text, "costs", cost_examples(rows))
        text = replace_section(text, "labels", labels_table())
        README.write_text(text)
        print(f"rewrote the generated sections of {README}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
