"""A committee of mfcalc potentials: the mean of their energies, forces and stress, and how much
they disagree.

    from mfcalc import MFCommittee
    atoms.calc = MFCommittee("ethanol-mf", fidelity="CCSD(T)")   # a model folder with committee.json
    atoms.calc = MFCommittee(["a.pt", "b.pt"], fidelity="CCSD(T)")

Each member is an ``MFCalculator`` (same options, same fidelity by name or alias) run on the same
structure. The committee's energy is the mean of the members' energies, so its forces (the mean of
theirs) are exactly minus its gradient and MD with a committee conserves energy like MD with one
model; it costs one force call per member. Averaging independently trained networks lowers the
error of each (ethanol-mf: two members of 8.29 and 8.21 meV/Å give 7.14 on the same held-out
CCSD(T) frames, see models/ethanol-mf/README.md).

Beside ASE's properties the results hold the members' disagreement, the usual signal for "this
structure needs a reference calculation":

- ``energy_std`` (eV): the standard deviation of the members' energies (over members, ddof 0);
- ``forces_std`` (N, 3): the same per force component;
- ``force_deviation`` (N,): sqrt(mean over members of |F_m - F_mean|^2) for each atom;
- ``max_force_deviation``: the largest of those (the "model deviation" by which DeePMD-kit's
  DP-GEN picks structures to label).

A folder is a committee when it holds ``committee.json``: ``{"members": ["model.pt",
"member-1.pt", ...]}``, paths relative to the folder.
"""

import json
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from .calculator import MFCalculator, exact_changes
from .modelfile import ModelFileError, resolve_model_path

COMMITTEE_FILE = "committee.json"

ModelList = Union[str, Path, Sequence[Union[str, Path]]]


def committee_members(models: ModelList) -> List[Path]:
    """The member model files of a committee. A list (or tuple) of models is taken as it is, each
    entry resolved like ``MFCalculator``'s ``model``; a single name, folder or file stands for the
    folder that holds it, which must have a ``committee.json`` listing its members."""
    if isinstance(models, (list, tuple)):
        paths = [resolve_model_path(m) for m in models]
    else:
        folder = resolve_model_path(models).parent
        manifest = folder / COMMITTEE_FILE
        if not manifest.is_file():
            raise ModelFileError(
                f"{str(models)!r} is a single model ({folder} has no {COMMITTEE_FILE}); give the committee "
                "as a list of models, MFCommittee(['a.pt', 'b.pt']), or write a committee.json there: "
                '{"members": ["model.pt", "member-1.pt"]}')
        try:
            listed = json.loads(manifest.read_text())["members"]
        except (ValueError, KeyError, TypeError) as error:
            raise ModelFileError(f"{manifest}: expected a JSON object with a 'members' list of model "
                                 f"files ({error})") from None
        paths = [folder / str(name) for name in listed]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ModelFileError(f"{manifest} lists member files that are not there: {missing}")
    if len(paths) < 2:
        raise ValueError(f"a committee needs at least two models, got {len(paths)}: {[str(p) for p in paths]}")
    return paths


class MFCommittee(Calculator):
    """ASE calculator: the mean and the spread of several mfcalc potentials (module docstring).

    Parameters
    ----------
    models: a list of models (names, folders or ``.pt`` files), or one name or folder whose
        ``committee.json`` lists them.
    fidelity: the level of theory every member predicts, by name or alias; ``None`` takes the
        first member's default. Every member must resolve it to the same fidelity.
    **options: passed to every member's ``MFCalculator`` (device, dtype, neighbor_list,
        compile, threads, check_domain, allow_unsupported_state).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, models: ModelList, fidelity: Optional[str] = None, **options: Any):
        super().__init__()
        self.paths = committee_members(models)
        self.members = [MFCalculator(path, fidelity=fidelity, **options) for path in self.paths]
        if fidelity is None:  # the members' own defaults may differ: all take the first one's
            self.fidelity = self.members[0].fidelity
        else:
            self._check_members()

    def _check_members(self) -> None:
        fidelities = {m.fidelity for m in self.members}
        if len(fidelities) > 1:
            raise ValueError(f"the committee's members predict different fidelities {sorted(fidelities)}; "
                             "name the level of theory in full (fidelity=...)")
        elements = {tuple(sorted(m.elements)) for m in self.members}
        if len(elements) > 1:
            raise ValueError("the committee's members know different elements "
                             f"{[sorted(m.elements) for m in self.members]}; a committee averages models "
                             "of the same chemistry")

    @property
    def fidelity(self) -> str:
        """The level of theory every member predicts (full name)."""
        return self.members[0].fidelity

    @fidelity.setter
    def fidelity(self, name: str) -> None:
        for member in self.members:
            member.fidelity = name  # raises, listing the choices, for a name a member lacks
        self._check_members()
        self.reset()

    @property
    def fidelities(self) -> List[str]:
        """The fidelities every member has, in the first member's order."""
        shared = set.intersection(*(set(m.fidelities) for m in self.members))
        return [f for f in self.members[0].fidelities if f in shared]

    @property
    def domain_warnings(self) -> List[str]:
        """The members' reasons (``MFCalculator.domain_warnings``) why the latest structure is
        unlike their training data, each reason once."""
        return list(dict.fromkeys(w for m in self.members for w in getattr(m, "domain_warnings", [])))

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> List[str]:
        if self.atoms is None:
            return list(all_changes)
        return exact_changes(self.atoms, atoms, set(self.ignored_changes), tol)

    def calculate(self, atoms: Optional[Atoms] = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        results = []
        for member in self.members:
            member.calculate(self.atoms, list(properties), list(all_changes))
            results.append(member.results)
        energy = np.array([r["energy"] for r in results])
        forces = np.stack([r["forces"] for r in results])
        mean_forces = forces.mean(axis=0)
        deviation = np.sqrt(((forces - mean_forces) ** 2).sum(axis=2).mean(axis=0))
        self.results = {
            "energy": float(energy.mean()),
            "free_energy": float(energy.mean()),
            "energies": np.mean([r["energies"] for r in results], axis=0),
            "forces": mean_forces,
            "energy_std": float(energy.std()),
            "forces_std": forces.std(axis=0),
            "force_deviation": deviation,
            "max_force_deviation": float(deviation.max()) if len(deviation) else 0.0,
        }
        if all("stress" in r for r in results):
            self.results["stress"] = np.mean([r["stress"] for r in results], axis=0)

    def __repr__(self) -> str:
        return f"MFCommittee({[str(p) for p in self.paths]}, fidelity={self.fidelity!r})"
