"""MFCalculator: an ASE calculator for an exported mfcalc model at a chosen level of theory.

The model itself is a ``mfcalc.potential.Potential``; this module is the ASE adapter over it:
ASE's state check and result caching, the chosen fidelity, the charge/spin and training-domain
warnings, a lock for threads and pickling for processes.
"""

import functools
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .domain import DomainCheck, OutOfDomainWarning
from .modelfile import DEFAULT_MODEL, ModelFileError
from .potential import (  # noqa: F401  (the structure checks, re-exported where they were)
    CHARGE_KEYS, DTYPES, MAX_Z, NEUTRAL_SINGLET, SPIN_KEYS, TOO_CLOSE, Potential, PreparedStructure,
    UnsupportedStateWarning, charge_state_problem, check_cell, check_finite_results, check_numbers,
    check_positions, closest_pair, force_call, parse_device, parse_dtype, script_execution, state_text,
    stress_defined, warn_if_close,
)
from .replicas import predict, predict_all_fidelities

DOMAIN_CHECK_EVERY = 100  # force calls between out-of-domain checks of an unchanged system
# the per-atom arrays whose change invalidates results (ASE's all_changes less cell and pbc)
ARRAY_CHANGES = [name for name in all_changes if name not in ("cell", "pbc")]
_parse_dtype, _parse_device = parse_dtype, parse_device  # their names before mfcalc.potential
LOAD_DEFAULTS = {"device": "auto", "dtype": None, "neighbor_list": "auto", "compile": None, "threads": "auto"}


def _differ(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    """``a`` and ``b`` differ by more than ``tol`` anywhere (ASE: not allclose(rtol=0, atol=tol));
    exact equality is tried first, the common case of an unchanged array costing nothing more."""
    if np.array_equal(a, b):
        return False
    if tol <= 0 or np.shape(a) != np.shape(b) or a.dtype == bool:
        return True
    return not bool(np.all(np.abs(np.subtract(a, b, dtype=np.float64)) <= tol))


def exact_changes(old: Atoms, new: Atoms, ignored: Optional[set] = None, tol: float = 0.0) -> List[str]:
    """ASE's ``compare_atoms``, at a fraction of its cost (MD calls this three times per step).

    Same names, same meaning: only the properties in ASE's ``all_changes`` count (positions,
    numbers, cell, pbc, initial charges and magnetic moments; momenta or other per-atom arrays do
    not). With ``tol`` 0 (the default) one that differs at all has changed; with ``tol`` > 0 one
    whose values all lie within ``tol`` of the old ones has not (ASE's absolute tolerance).
    """
    changes = []
    if _differ(old.cell.array, new.cell.array, tol):
        changes.append("cell")
    if not np.array_equal(old.pbc, new.pbc):
        changes.append("pbc")
    arrays_old, arrays_new = old.arrays, new.arrays
    for key in ARRAY_CHANGES:
        a, b = arrays_old.get(key), arrays_new.get(key)
        if a is None and b is None:
            continue
        if a is None or b is None or _differ(a, b, tol):
            changes.append(key)
    if ignored:
        changes = [c for c in changes if c not in ignored]
    return changes



def undefined_stress_error(atoms: Atoms) -> PropertyNotImplementedError:
    """Why a structure has no stress, and what to set to get one."""
    if not atoms.pbc.any():
        return PropertyNotImplementedError(
            "stress is defined for periodic cells only; this structure has pbc=False in "
            "every direction (set atoms.pbc and a cell to get a stress)"
        )
    zero = [d for d in range(3) if not atoms.pbc[d] and np.linalg.norm(atoms.cell.array[d]) < 1e-9] or [2]
    example = [20 if k == zero[0] else 0 for k in range(3)]
    return PropertyNotImplementedError(
        f"stress is not defined for this structure: pbc={atoms.pbc.tolist()} and the cell row(s) {zero} of "
        "its non-periodic direction(s) are zero, so the cell has no volume to divide dE/d(strain) by; "
        f"set them to the vacuum length the stress should refer to (e.g. atoms.cell[{zero[0]}] = {example}; "
        "energy and forces do not depend on it)"
    )




def _locked(method):
    """Run ``method`` holding the calculator's lock: one structure at a time per calculator."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


def _delegated(name: str, doc: str) -> property:
    """A read-only attribute of the calculator that is the potential's."""
    return property(lambda self: getattr(self.potential, name), doc=doc)


class MFCalculator(Calculator):
    """ASE calculator for a multi-fidelity mfcalc potential.

    Parameters
    ----------
    model: a shipped model name (``"ethanol-mf"``; default ``modelfile.DEFAULT_MODEL``), a
        directory holding ``model.pt``, or a path to an exported ``.pt`` file.
    fidelity: level of theory to predict, by name or alias (``"CCSD(T)"``); ``None`` takes the
        model's declared default. An unknown name raises: there is no silent fallback.
    device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
    dtype: ``"float32"``, ``"float64"`` or None for the dtype the model was exported in.
    neighbor_list: ``"auto"``, ``"dense"``, ``"vesin"`` or ``"torch-cluster"``.
    compile: ``"auto"`` (default): the TorchScript file from the first call, and for small
        molecules (non-periodic, up to ``compiled.DENSE_GRAPH_MAX_ATOMS`` atoms, CPU) a
        background thread that compiles energy and forces into one graph once a run has spent
        ``autocompile.COMPILE_AFTER_S`` (3 s) in force calls, checks it against the TorchScript file and then switches to it
        (about 4x fewer ms per step; ``calc.potential.compile_status()`` says where it is;
        mfcalc.autocompile). ``True``: the compiled graph from the first call, which then takes
        30-40 s (cached on disk for later runs). ``False``: TorchScript only. None takes the
        default, which ``MFCALC_COMPILE=0/1/auto`` in the environment can change.
    threads: intra-op threads of each force call (mfcalc.threads): ``"auto"`` (default) runs
        systems of fewer than ``threads.SINGLE_THREAD_BELOW`` atoms on one thread and larger
        ones on torch's thread count, lowered to the cores other processes leave free, so a busy
        machine never collapses a run; an integer fixes the count; None leaves torch's setting.
        The caller's setting is restored after every call.
    allow_unsupported_state: the model has no charge or spin input; by default a structure it
        cannot represent (a charge or spin in ``atoms.info``, non-zero initial charges or
        magnetic moments, an odd-electron molecule) raises ValueError. True turns that into one
        RuntimeWarning and predicts the structure as the model sees it (neutral closed shell).
        The states a model was trained on come from its metadata ``charge_states`` (a list of
        [charge, multiplicity]); absent, neutral singlet.
    check_domain: when the model file carries training-domain statistics (metadata ``domain``,
        see mfcalc.domain), check structures against them (every new system, then every
        ``DOMAIN_CHECK_EVERY``-th force call): ``calc.domain_warnings`` lists the reasons for the
        last one checked, and the first structure with any gives one
        ``OutOfDomainWarning`` (a RuntimeWarning) per calculator. ``calc.out_of_domain(atoms)``
        asks explicitly.

    Properties: energy, free_energy (= energy), energies (per atom), forces, and stress for
    periodic cells, in eV and Å. ``calc.fidelity = "..."`` switches level of theory. Stress is
    (1/V) dE/d(strain) with V the volume of the cell as given: for a slab or wire, the rows of
    the non-periodic directions set V (a vacuum length); if they are zero the stress is not
    defined and asking for it raises PropertyNotImplementedError (energy and forces work).

    The model itself is a ``mfcalc.Potential`` (``calc.potential``): ``model`` may be one
    already loaded (then device, dtype, neighbor_list, compile and threads are its own and must
    be left at their defaults). Every entry point (ASE's get_* and calculate,
    ``predict_all_fidelities``, ``batch``, ``replicas.predict``, ``ReplicaMD``) runs the same
    checks (``Potential.prepare``).
    Threads: one calculator may be shared; its calls are serialised by a lock (one force call
    at a time; ASE's own calculators are not thread-safe at all). Processes: a calculator
    pickles (``multiprocessing``) as its constructor arguments; the copy reloads the model
    file by path and refuses to start if the file's checksum has changed.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model: Union[str, Path, Potential] = DEFAULT_MODEL,
        fidelity: Optional[str] = None,
        device: Union[str, torch.device] = "auto",
        dtype: Union[None, str, torch.dtype] = None,
        neighbor_list: str = "auto",
        compile: Union[None, bool, str] = None,
        allow_unsupported_state: bool = False,
        check_domain: bool = True,
        threads: Union[None, int, str] = "auto",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self._lock = threading.RLock()
        load = {"device": device, "dtype": dtype, "neighbor_list": neighbor_list, "compile": compile,
                "threads": threads}
        if isinstance(model, Potential):
            changed = sorted(k for k, v in load.items() if v != LOAD_DEFAULTS[k])
            if changed:
                raise ValueError(f"MFCalculator(potential, ...): {', '.join(changed)} belong to the potential "
                                 "already loaded; pass them to Potential.load instead")
            self.potential = model
        else:
            self.potential = Potential.load(model, **load)
        self._fidelity_index = -1
        self.fidelity = self.potential.default_fidelity if fidelity is None else fidelity
        self._prepared: Optional[PreparedStructure] = None  # the structure of the latest calculate
        self.allow_unsupported_state = bool(allow_unsupported_state)
        self._state_warned = False
        self._init_domain(check_domain)
        self._init_args = {"allow_unsupported_state": self.allow_unsupported_state,
                           "check_domain": bool(check_domain),
                           **{k: v for k, v in kwargs.items() if k != "atoms"}}

    # the potential's, for code written against the calculator
    metadata = _delegated("metadata", "The model file's metadata (its path under 'path').")
    device = _delegated("device", "The torch device the model runs on.")
    dtype = _delegated("dtype", "The floating-point dtype the model runs in.")
    fidelities = _delegated("fidelities", "The model's fidelity names, in index order.")
    aliases = _delegated("aliases", "Alias -> fidelity name.")
    elements = _delegated("elements", "The atomic numbers the model knows.")
    cutoff = _delegated("cutoff", "The model's cutoff radius, Å.")
    neighbor_backend = _delegated("neighbor_backend", "The neighbor-list choice (auto, dense, vesin, torch-cluster).")
    thread_policy = _delegated("thread_policy", "The threads of each force call (mfcalc.threads).")
    charge_states = _delegated("charge_states", "The (charge, multiplicity) states the model was trained on.")

    @property
    def module(self):
        """The module the force calls run (TorchScript, or the compiled force field)."""
        return self.potential.module

    @module.setter
    def module(self, module) -> None:
        self.potential.module = module

    # ------------------------------------------------------------------ fidelity
    def resolve_fidelity(self, name: str) -> str:
        """The fidelity a name or alias stands for; ValueError listing the choices otherwise."""
        return self.potential.resolve_fidelity(name)

    @property
    def fidelity(self) -> str:
        """The level of theory this calculator predicts (full name)."""
        return self.fidelities[self._fidelity_index]

    @fidelity.setter
    def fidelity(self, name: str) -> None:
        index = self.potential.fidelity_index(name)
        with self._lock:
            if index != self._fidelity_index:
                self._fidelity_index = index
                self.reset()  # results belong to the old level of theory

    @property
    def fidelity_index(self) -> int:
        """Index of ``fidelity`` in ``fidelities``."""
        return self._fidelity_index

    # ------------------------------------------------------------------ ASE interface
    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> List[str]:
        """What changed since the last calculation, as ASE's ``compare_atoms`` with absolute
        tolerance ``tol`` (rtol 0), at a fraction of its cost (``exact_changes``)."""
        if self.atoms is None:
            return list(all_changes)
        return exact_changes(self.atoms, atoms, set(self.ignored_changes), tol)

    @_locked
    def get_property(self, name, atoms=None, allow_calculation=True):
        # the whole state check -> calculate -> read results sequence under the lock: another
        # thread must not swap the structure or the results in between
        return super().get_property(name, atoms, allow_calculation)

    @_locked
    def calculate(
        self,
        atoms: Optional[Atoms] = None,
        properties: List[str] = ("energy",),
        system_changes: List[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        prepared = self.check_structure(atoms)
        want_stress = self._stress_wanted(prepared, atoms, properties)
        out = self.potential.evaluate(prepared, self._fidelity_index, stress=want_stress)
        forces = out["forces"]
        self.results = {
            "energy": out["energy"],
            "free_energy": out["energy"],
            "energies": out["energies"],
            "forces": forces,
        }
        if "stress" in out:
            self.results["stress"] = full_3x3_to_voigt_6_stress(out["stress"])
        self._check_domain(atoms, forces, prepared.key)

    @staticmethod
    def _stress_wanted(prepared: PreparedStructure, atoms: Atoms, properties: Sequence[str]) -> bool:
        """Compute stress wherever it is defined (it comes almost free with the forces; NPT and
        cell filters want both); PropertyNotImplementedError, saying why, where asked for and
        not defined (molecules; slabs and wires whose non-periodic cell rows are zero)."""
        if "stress" in properties and not prepared.stress_defined:
            raise undefined_stress_error(atoms)
        return prepared.stress_defined

    # ------------------------------------------------------------------ structure
    @_locked
    def check_structure(self, atoms: Atoms) -> PreparedStructure:
        """Every check a structure must pass before the model sees it (``Potential.prepare``):
        atomic numbers (1-118, known to the model), the periodic cell (independent vectors, not
        so small that the search needs more than MAX_PERIODIC_IMAGES images), finite positions,
        and a charge and spin the model can represent. ValueError naming the problem otherwise.
        Returns the prepared structure, kept as this calculator's latest: what depends on
        numbers, cell and pbc (or on the charge and spin) is reused while they do not change."""
        prepared = self.potential.prepare(atoms, self._prepared, self.allow_unsupported_state)
        if prepared.state_problem is not None and not self._state_warned:
            self._state_warned = True
            warnings.warn(prepared.state_problem + " (allow_unsupported_state=True: predicted without charge or "
                          "spin; this warning is shown once per calculator)", UnsupportedStateWarning, stacklevel=3)
        self._prepared = prepared
        return prepared

    def backend_for(self, atoms: Atoms) -> str:
        """The neighbor-list backend this calculator uses for ``atoms`` ("auto" resolved)."""
        return self.potential.backend_for(len(atoms), bool(atoms.pbc.any()))

    # ------------------------------------------------------------------ training domain
    def _init_domain(self, enabled: bool) -> None:
        self.domain = None
        self.domain_warnings: List[str] = []  # reasons the last structure checked looked out of domain
        self._domain_warned = False
        self._domain_structure: Optional[tuple] = None  # the system (numbers, cell, pbc) last checked
        self._domain_calls = 0
        if enabled and "domain" in self.metadata:
            self.domain = self._domain_from_metadata()

    def _domain_from_metadata(self):
        try:
            return DomainCheck(self.metadata["domain"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelFileError(f"{self.metadata['path']}: its training-domain statistics (metadata "
                                 f"'domain') are unusable: {err}") from None

    def _model_name(self) -> str:
        path = Path(self.metadata["path"])
        return path.parent.name if path.name == "model.pt" else path.name

    def _check_domain(self, atoms: Atoms, forces: np.ndarray, system: tuple) -> None:
        """Record why ``atoms`` looks unlike the training data; warn the first time only. Checked
        for every new system (numbers, cell or pbc changed) and then every DOMAIN_CHECK_EVERY-th
        force call (an MD run drifting out of the domain is seen within that many steps; each
        check costs ~25-70 µs, 2-4% of a small-molecule step)."""
        if self.domain is None:
            return
        self._domain_calls += 1
        if system == self._domain_structure and self._domain_calls < DOMAIN_CHECK_EVERY:
            return
        self._domain_structure, self._domain_calls = system, 0
        self.domain_warnings = self.domain.reasons(atoms.numbers, atoms.positions, atoms.cell.array,
                                                   atoms.pbc, forces)
        if self.domain_warnings and not self._domain_warned:
            self._domain_warned = True
            more = len(self.domain_warnings) - 1
            warnings.warn(
                f"{atoms.get_chemical_formula()} is unlike the training data of {self._model_name()}: "
                f"{self.domain_warnings[0]}{f' (and {more} more)' if more else ''}; its predictions "
                "there are unreliable. calc.domain_warnings lists the reasons for the latest structure; "
                "this warning is shown once per calculator",
                OutOfDomainWarning, stacklevel=4,
            )

    def out_of_domain(self, atoms: Atoms) -> List[str]:
        """Why ``atoms`` is unlike this model's training data (mfcalc.domain), one sentence per
        reason; an empty list when nothing is found. Computes the forces (they are one test).
        ModelFileError if the model file carries no training-domain statistics."""
        check = self.domain
        if check is None:
            if "domain" not in self.metadata:
                raise ModelFileError(
                    f"{self.metadata['path']} has no training-domain statistics (metadata 'domain'); "
                    "add them with python models/tools/add_domain_stats.py MODEL --recipe RECIPE --write"
                )
            check = self._domain_from_metadata()
        forces = self.get_forces(atoms)
        return check.reasons(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, forces)

    # ------------------------------------------------------------------ processes
    def _checksums(self) -> Dict[str, Any]:
        return self.potential.checksums()

    def __getstate__(self) -> Dict[str, Any]:
        """Constructor arguments (model by absolute path) and the file's checksum(s); the module
        itself (TorchScript or compiled) is reloaded by the copy, not pickled."""
        init = dict(self.potential.load_arguments(), **self._init_args, fidelity=self.fidelity)
        return {"init": init, "checksums": self._checksums(), "atoms": self.atoms,
                "results": dict(self.results)}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(**state["init"])
        if self._checksums() != state["checksums"]:
            raise ModelFileError(
                f"{state['init']['model']} changed since this calculator was pickled (checksum "
                f"{str(state['checksums'].get('checksum'))[:12]}... then, "
                f"{str(self._checksums().get('checksum'))[:12]}... now): the copy would predict with "
                "other weights; make the calculator again from the file as it is now"
            )
        self.atoms, self.results = state["atoms"], state["results"]

    # ------------------------------------------------------------------ many structures at once
    @_locked
    def batch(self, structures, max_atoms: int = 20000) -> List[Dict[str, Any]]:
        """Energy, forces (and stress if periodic) of many structures at this calculator's
        fidelity, in flat batches of up to ``max_atoms`` atoms per forward pass
        (``replicas.predict``; this calculator's cached structure and results are untouched)."""
        return predict(self, structures, max_atoms=max_atoms)

    # ------------------------------------------------------------------ every fidelity at once
    @_locked
    def predict_all_fidelities(self, atoms: Atoms) -> Dict[str, Any]:
        """Energy and forces at every fidelity from one batched pass, and their spread
        (``replicas.predict_all_fidelities``, which describes the result)."""
        return predict_all_fidelities(self, atoms)
