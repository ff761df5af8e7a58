"""MFCalculator: an ASE calculator for an exported mfcalc model at a chosen level of theory."""

import contextlib
import difflib
import functools
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress

from .modelfile import DEFAULT_MODEL, ModelFileError, load_model
from .neighbors import BACKENDS, check_periodic_images, complete_cell
from .threads import ThreadPolicy

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOO_CLOSE = 0.1  # Å: closer pairs get a warning
MAX_Z = 118  # atomic numbers 1..118 are elements; ASE's 0 ('X') is a ghost atom
NEUTRAL_SINGLET = ((0, 1),)  # (charge, multiplicity) states of a model whose metadata names none
CHARGE_KEYS = ("charge", "total_charge")  # atoms.info keys ASE, fairchem and MACE users set
SPIN_KEYS = ("multiplicity", "spin")
DOMAIN_CHECK_EVERY = 100  # force calls between out-of-domain checks of an unchanged system
# the per-atom arrays whose change invalidates results (ASE's all_changes less cell and pbc)
ARRAY_CHANGES = [name for name in all_changes if name not in ("cell", "pbc")]


def _parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be 'float32' or 'float64' (or None for the model's own), got {dtype!r}")


def _parse_device(device: Union[str, torch.device]) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(device)!r} was asked for, but this torch ({torch.__version__}) sees no "
            "CUDA GPU; use device='cpu' (or 'auto', which picks CUDA only when there is one)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {str(device)!r}")
    return device


def script_execution(module):
    """The context to call ``module`` in: TorchScript runs without the JIT executor's profiling and
    optimisation passes. For small molecules they cost more than they save (ms per ASE MD step,
    chno-mf, 2 threads, alternating runs: ethanol 4.49 -> 3.91 float32, 5.61 -> 4.56 float64;
    aspirin 7.66 -> 6.18, 12.81 -> 9.58); for a 576-atom water box it makes no difference
    (335 vs 341 ms). The flag is restored on exit. Compiled force paths run as they are."""
    if isinstance(module, torch.jit.ScriptModule):
        return torch.jit.optimized_execution(False)
    return contextlib.nullcontext()


def force_call(module, policy: ThreadPolicy, n_atoms: int) -> contextlib.ExitStack:
    """The context of every force call: ``script_execution`` and the thread policy for
    ``n_atoms`` atoms (both restored on exit)."""
    stack = contextlib.ExitStack()
    stack.enter_context(script_execution(module))
    stack.enter_context(policy.limit(n_atoms))
    return stack


def exact_changes(old: Atoms, new: Atoms, ignored: Optional[set] = None) -> List[str]:
    """ASE's ``compare_atoms`` with exact equality instead of ``np.allclose``.

    Same names, same meaning: only the properties in ASE's ``all_changes`` count (positions,
    numbers, cell, pbc, initial charges and magnetic moments; momenta or other per-atom arrays do
    not), and one that differs at all has changed. A fraction of the cost: MD calls this three
    times per step.
    """
    changes = []
    if not np.array_equal(old.cell.array, new.cell.array):
        changes.append("cell")
    if not np.array_equal(old.pbc, new.pbc):
        changes.append("pbc")
    arrays_old, arrays_new = old.arrays, new.arrays
    for key in ARRAY_CHANGES:
        a, b = arrays_old.get(key), arrays_new.get(key)
        if a is None and b is None:
            continue
        if a is None or b is None or not np.array_equal(a, b):
            changes.append(key)
    if ignored:
        changes = [c for c in changes if c not in ignored]
    return changes


# ---------------------------------------------------------------------- structure checks
# One set of checks for every entry point (calculate, predict_all_fidelities, batch/predict,
# ReplicaMD): MFCalculator.check_structure calls these.
def check_numbers(numbers: np.ndarray, elements: Sequence[int]) -> None:
    """Every atomic number is an element (1-118) that the model knows."""
    if len(numbers) == 0:
        raise ValueError("the structure has no atoms")
    bad = (numbers < 0) | (numbers > MAX_Z)
    if bad.any():
        raise ValueError(
            f"atomic number(s) {sorted(set(numbers[bad].tolist()))} (atom(s) {np.where(bad)[0].tolist()[:10]}) "
            f"are not elements: atomic numbers run from 1 (H) to {MAX_Z} (Og); this model knows "
            f"{list(elements)} ({[chemical_symbols[z] for z in elements]})"
        )
    unknown = sorted(set(numbers.tolist()) - set(elements))
    if unknown:
        ghost = (" Atomic number 0 ('X') is ASE's ghost/dummy atom, not an element: remove it "
                 "(del atoms[atoms.numbers == 0])." if 0 in unknown else "")
        raise ValueError(
            f"element(s) {[chemical_symbols[z] for z in unknown]} are not in this model; it knows "
            f"{[chemical_symbols[z] for z in elements]}.{ghost}"
        )


def check_cell(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> None:
    """Periodic directions have independent cell vectors, and not so short that the neighbor
    search would need more periodic images than ``neighbors.MAX_PERIODIC_IMAGES``."""
    if not pbc.any():
        return
    periodic_rows = cell[pbc]
    gram = periodic_rows @ periodic_rows.T
    if np.linalg.det(gram) < 1e-6:
        raise ValueError(
            f"the cell vectors of the periodic directions (pbc={pbc.tolist()}) "
            f"are zero or linearly dependent: cell={cell.tolist()}; set a "
            "cell with non-zero volume, or pbc=False for a molecule"
        )
    pbc_t = torch.from_numpy(pbc.copy())
    check_periodic_images(complete_cell(torch.from_numpy(cell.astype(np.float64)), pbc_t), pbc_t, cutoff)


def check_positions(positions: np.ndarray) -> None:
    """Positions are finite numbers."""
    finite = np.isfinite(positions)
    if not finite.all():
        bad = np.where(~finite.all(axis=1))[0]
        raise ValueError(f"positions of atom(s) {bad.tolist()[:10]} are NaN or infinite")


def _info_number(atoms: Atoms, keys: Sequence[str]) -> Tuple[Optional[str], Optional[float]]:
    """The first of ``keys`` in ``atoms.info`` and its value as a number (None, None if absent)."""
    for key in keys:
        if key in atoms.info and atoms.info[key] is not None:
            value = atoms.info[key]
            try:
                return key, float(value)
            except (TypeError, ValueError):
                raise ValueError(f"atoms.info[{key!r}] = {value!r} is not a number") from None
    return None, None


def state_text(states: Sequence[Sequence[int]]) -> str:
    """``[(0, 1)]`` -> ``"neutral singlet"``; ``[(1, 2)]`` -> ``"charge +1 doublet"``."""
    spins = {1: "singlet", 2: "doublet", 3: "triplet", 4: "quartet"}
    return ", ".join(f"{'neutral' if c == 0 else f'charge {c:+d}'} {spins.get(m, f'multiplicity {m}')}"
                     for c, m in states)


def _multiplicity(atoms: Atoms, electrons: Optional[int]) -> Tuple[Optional[str], Optional[float], str]:
    """The spin multiplicity 2S+1 set in ``atoms.info``: (key, value, how it was read), or
    (None, None, "") when none is set.

    'multiplicity' is 2S+1. 'spin' means 2S to PySCF and to ``mfcalc label`` (0: singlet) and
    2S+1 to fairchem (1: singlet); for a molecule exactly one reading fits the electron count,
    and that one is taken. For a periodic cell 0 reads as a singlet and other values as 2S+1.
    """
    key, value = _info_number(atoms, SPIN_KEYS[:1])
    if key is not None:
        return key, value, "multiplicity 2S+1"
    key, value = _info_number(atoms, SPIN_KEYS[1:])
    if key is None:
        return None, None, ""
    if value != int(value):
        return key, value, "spin"
    if electrons is None:
        return (key, 1.0, "2S") if value == 0 else (key, value, "2S+1")
    if (electrons + int(value) + 1) % 2 == 1 or value == 0:
        return key, value + 1, "2S"
    return key, value, "2S+1"


def charge_state_problem(atoms: Atoms, states: Sequence[Sequence[int]] = NEUTRAL_SINGLET) -> Optional[str]:
    """Why the model cannot represent this structure's charge or spin, or None if it can.

    ``states``: the (charge, multiplicity) pairs the model was trained on (default: neutral
    singlet). Read from ``atoms.info`` ('charge' or 'total_charge'; 'multiplicity' or 'spin', see
    ``_multiplicity``), for molecules the electron count (an odd number is a radical), and the
    per-atom initial charges and magnetic moments.
    """
    trained = f"this model was trained on {state_text(states)} structures only"
    charge_key, charge = _info_number(atoms, CHARGE_KEYS)
    charge = 0.0 if charge is None else charge
    if charge != int(charge):
        return f"atoms.info[{charge_key!r}] = {charge:g}: a charge must be a whole number of electrons"
    allowed_charges = sorted({c for c, _ in states})
    if int(charge) not in allowed_charges:
        return (f"atoms.info[{charge_key!r}] = {charge:+g}, but {trained} and it has no charge input (it would "
                f"predict the structure as if it had charge {allowed_charges[0]}); pass a structure with "
                f"charge {allowed_charges[0]} (or remove the key)")
    molecule = not atoms.pbc.any()  # electron parity only means something for a finite molecule
    electrons = int(atoms.numbers.sum()) - int(charge) if molecule else None
    formula = f"{atoms.get_chemical_formula()} (charge {int(charge):+d}, {electrons} electrons)"
    spin_key, multiplicity, how = _multiplicity(atoms, electrons)
    if spin_key is not None and (multiplicity != int(multiplicity) or multiplicity < 1):
        return (f"atoms.info[{spin_key!r}] = {atoms.info[spin_key]!r} is not a spin state: "
                "the multiplicity 2S+1 is a whole number >= 1 (2S >= 0)")
    if molecule and multiplicity is None:
        multiplicity = 1 if electrons % 2 == 0 else 2
        if (int(charge), multiplicity) not in states:
            return (f"{formula} has an odd number of electrons: it is a radical (doublet or higher spin), "
                    f"but {trained} (closed shell: an even number of electrons); add or remove a "
                    "hydrogen to close the shell")
        return _initial_arrays_problem(atoms, trained)
    if molecule and (electrons + int(multiplicity)) % 2 == 0:
        return (f"atoms.info[{spin_key!r}] = {atoms.info[spin_key]!r} is impossible for {formula}: an "
                f"{'even' if electrons % 2 == 0 else 'odd'} number of electrons needs an "
                f"{'odd' if electrons % 2 == 0 else 'even'} multiplicity 2S+1")
    if multiplicity is not None and (int(charge), int(multiplicity)) not in states:
        reading = f" (read as {how}: multiplicity {int(multiplicity)})" if spin_key == "spin" else ""
        return (f"atoms.info[{spin_key!r}] = {atoms.info[spin_key]!r}{reading}, but {trained} and it has no spin "
                "input (it would predict the closed-shell state); remove the key for a closed-shell structure")
    return _initial_arrays_problem(atoms, trained)


def _initial_arrays_problem(atoms: Atoms, trained: str) -> Optional[str]:
    """Non-zero per-atom initial charges or magnetic moments: inputs the model has not got."""
    for name, remove in (("initial_charges", "set_initial_charges(None)"),
                         ("initial_magmoms", "set_initial_magnetic_moments(None)")):
        values = atoms.arrays.get(name)
        if values is not None and np.any(values != 0):
            on = np.where(np.any(np.reshape(values, (len(atoms), -1)) != 0, axis=1))[0].tolist()
            return (f"the structure has non-zero {name} (atom(s) {on[:10]}, sum {np.sum(values):+g}), but this "
                    f"model has no per-atom charge or spin input ({trained}) and would ignore them: remove "
                    f"them (atoms.{remove}) or set them to 0")
    return None


def closest_pair(atoms: Atoms) -> Tuple[float, int, int]:
    """Shortest interatomic distance (periodic images included) and its two atoms; inf for one
    atom. For error messages: no more than a cheap search within 2 Å in large systems."""
    if len(atoms) < 2:
        return float("inf"), -1, -1
    if len(atoms) <= 500 or not atoms.pbc.any():
        d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
        d[np.diag_indices(len(atoms))] = np.inf
        i, j = np.unravel_index(np.argmin(d), d.shape)
        return float(d[i, j]), int(min(i, j)), int(max(i, j))
    from ase.neighborlist import neighbor_list as ase_neighbor_list

    i, j, d = ase_neighbor_list("ijd", atoms, 2.0)
    if len(d) == 0:
        return float("inf"), -1, -1
    k = int(np.argmin(d))
    return float(d[k]), int(i[k]), int(j[k])


def warn_if_close(min_distance: float, where: str = "") -> None:
    """RuntimeWarning for a pair closer than TOO_CLOSE (the model never saw such contacts)."""
    if min_distance < TOO_CLOSE:
        warnings.warn(
            f"two atoms{where} are {min_distance:.3g} Å apart (< {TOO_CLOSE} Å): the "
            "model was never trained on such contacts and its energy is meaningless there",
            RuntimeWarning, stacklevel=3,
        )


def check_finite_results(energy: np.ndarray, forces: np.ndarray, atoms: Atoms, where: str = "") -> None:
    """FloatingPointError, naming the closest pair, if the model returned NaN or inf: checked
    before anything is cached as a result (coincident atoms give 0/0 in the pair directions)."""
    if np.isfinite(forces).all() and np.isfinite(energy).all():
        return
    what = "forces" if not np.isfinite(forces).all() else "energy"
    d, i, j = closest_pair(atoms)
    if d < 1e-6:
        raise FloatingPointError(f"the model returned non-finite {what}{where}: atoms {i} and {j} are on top of "
                                 f"each other (smallest distance {d:.3g} Å); move them apart")
    raise FloatingPointError(
        f"the model returned non-finite {what}{where} (smallest distance {d:.3g} Å, atoms {i} and {j}): the "
        "structure is outside anything the model can evaluate; check the positions (units: Å) and the cell"
    )


def stress_defined(atoms: Atoms) -> bool:
    """Stress is (1/V) dE/d(strain): defined for a periodic structure whose cell, with the rows of
    non-periodic directions as given, has a volume (a slab with a vacuum row: yes; a slab whose
    non-periodic row is zero: no)."""
    return bool(atoms.pbc.any()) and abs(np.linalg.det(atoms.cell.array)) > 1e-9


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
    compile: compile energy and forces together with ``torch.compile`` instead of running the
        TorchScript file (opt-in: the first call takes tens of seconds to compile, cached on
        disk for later runs; then about twice as fast for small molecules on CPU, see
        benchmarks/md_speed.py).
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

    Every entry point (ASE's get_* and calculate, ``predict_all_fidelities``, ``batch``,
    ``replicas.predict``, ``ReplicaMD``) runs the same checks (``check_structure``).
    Threads: one calculator may be shared; its calls are serialised by a lock (one force call
    at a time; ASE's own calculators are not thread-safe at all). Processes: a calculator
    pickles (``multiprocessing``) as its constructor arguments; the copy reloads the model
    file by path and refuses to start if the file's checksum has changed.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        fidelity: Optional[str] = None,
        device: Union[str, torch.device] = "auto",
        dtype: Union[None, str, torch.dtype] = None,
        neighbor_list: str = "auto",
        compile: bool = False,
        allow_unsupported_state: bool = False,
        check_domain: bool = True,
        threads: Union[None, int, str] = "auto",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if neighbor_list not in BACKENDS:
            raise ValueError(f"neighbor_list must be one of {BACKENDS}, got {neighbor_list!r}")
        self._lock = threading.RLock()
        self.thread_policy = ThreadPolicy(threads)
        self.device = _parse_device(device)
        self.module, self.metadata = load_model(model, self.device, _parse_dtype(dtype))
        self.dtype = next(self.module.parameters()).dtype
        if compile:
            self.module = self._compiled(self.module)
        self.neighbor_backend = neighbor_list
        self.fidelities: List[str] = list(self.metadata["fidelities"])
        self.aliases: Dict[str, str] = dict(self.metadata.get("aliases", {}))
        self.elements: List[int] = list(self.metadata["elements"])
        self.cutoff: float = float(self.metadata["cutoff"])
        self._fidelity_index = -1
        self.fidelity = self.metadata["default_fidelity"] if fidelity is None else fidelity
        self._checked_structure: Optional[tuple] = None
        self.allow_unsupported_state = bool(allow_unsupported_state)
        self.charge_states = [tuple(int(x) for x in state)
                              for state in self.metadata.get("charge_states", NEUTRAL_SINGLET)]
        self._state_warned = False
        self._checked_state: Optional[tuple] = None
        self._init_domain(check_domain)
        self._init_args = {"model": str(Path(self.metadata["path"]).resolve()), "device": str(self.device),
                           "neighbor_list": neighbor_list, "compile": bool(compile),
                           "allow_unsupported_state": self.allow_unsupported_state,
                           "check_domain": bool(check_domain), "threads": threads,
                           **{k: v for k, v in kwargs.items() if k != "atoms"}}

    def _compiled(self, scripted):
        """The same weights with energy + forces (+ stress) compiled as one graph by
        torch.compile (mfcalc.compiled): ~2x fewer milliseconds per small-molecule step on CPU.
        The first call of each variant compiles (tens of seconds, cached on disk after)."""
        from .compiled import CompiledForceField
        from .modelfile import build_forcefield

        eager = build_forcefield(self.metadata["config"], scripted.state_dict())
        return CompiledForceField(eager.to(self.device, self.dtype))

    # ------------------------------------------------------------------ fidelity
    def resolve_fidelity(self, name: str) -> str:
        """The fidelity a name or alias stands for; ValueError listing the choices otherwise."""
        if name in self.fidelities:
            return name
        if name in self.aliases:
            return self.aliases[name]
        choices = self.fidelities + sorted(self.aliases)
        same_letters = [c for c in choices if c.casefold() == str(name).casefold()]
        close = same_letters or difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        if same_letters:
            hint += " (fidelity names and aliases are case-sensitive)"
        alias_text = ", ".join(f"{a!r} -> {t!r}" for a, t in sorted(self.aliases.items()))
        raise ValueError(
            f"unknown fidelity {name!r} for model {self.metadata.get('path')}.{hint} "
            f"Available fidelities: {self.fidelities}"
            + (f"; aliases: {alias_text}" if alias_text else "")
        )

    @property
    def fidelity(self) -> str:
        """The level of theory this calculator predicts (full name)."""
        return self.fidelities[self._fidelity_index]

    @fidelity.setter
    def fidelity(self, name: str) -> None:
        index = self.fidelities.index(self.resolve_fidelity(name))
        with self._lock:
            if index != self._fidelity_index:
                self._fidelity_index = index
                self.reset()  # results belong to the old level of theory

    # ------------------------------------------------------------------ ASE interface
    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> List[str]:
        if self.atoms is None:
            return list(all_changes)
        return exact_changes(self.atoms, atoms, set(self.ignored_changes))

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
        self.check_structure(atoms)
        want_stress = self._stress_wanted(atoms, properties)
        # the model is translation invariant: centring in float64 keeps float32 exact far from
        # the origin (pair lists and shifts do not change under a common translation)
        positions = torch.from_numpy(atoms.positions - atoms.positions[0]).to(self.device, self.dtype)
        with force_call(self.module, self.thread_policy, len(positions)):
            out = self.module.compute(
                positions,
                self._numbers,
                self._cell,
                self._pbc,
                self._fidelity_index,
                want_stress,
                self._backend,
                self._edges(positions),
            )
        if "min_distance" in out:
            warn_if_close(float(out["min_distance"]))
        forces = out["forces"].cpu().numpy().astype(np.float64)
        energy = float(out["energy"])
        check_finite_results(np.float64(energy), forces, atoms)  # before anything is cached
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["energies"].cpu().numpy().astype(np.float64),
            "forces": forces,
        }
        if "stress" in out:
            stress = out["stress"].cpu().numpy().astype(np.float64)
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
        self._check_domain(atoms, forces)

    @staticmethod
    def _stress_wanted(atoms: Atoms, properties: Sequence[str]) -> bool:
        """Compute stress wherever it is defined (it comes almost free with the forces; NPT and
        cell filters want both); PropertyNotImplementedError, saying why, where asked for and
        not defined (molecules; slabs and wires whose non-periodic cell rows are zero)."""
        defined = stress_defined(atoms)
        if "stress" in properties and not defined:
            raise undefined_stress_error(atoms)
        return defined

    # ------------------------------------------------------------------ helpers
    def _edges(self, positions: torch.Tensor) -> Optional[List[torch.Tensor]]:
        """None lets the model file search neighbors itself; torch-cluster runs here."""
        if self._backend != "torch-cluster":
            return None
        from .neighbors import torch_cluster_neighbor_list

        edge_index, shifts = torch_cluster_neighbor_list(positions, self._cell, self._pbc, self.cutoff)
        return [edge_index, shifts]

    def check_structure(self, atoms: Atoms) -> None:
        """Every check a structure must pass before the model sees it, the same for every entry
        point: atomic numbers (1-118, known to the model), the periodic cell (independent
        vectors, not so small that the search needs more than MAX_PERIODIC_IMAGES images),
        finite positions, and a charge and spin the model can represent. ValueError naming the
        problem otherwise. Leaves the structure's tensors ready for the force call."""
        self._check_structure(atoms)
        check_positions(atoms.positions)
        self._check_charge_state(atoms)

    def _check_charge_state(self, atoms: Atoms) -> None:
        """Cached until the numbers, pbc, the charge/spin keys of ``atoms.info`` or the initial
        charges and moments change (an MD step changes none of them)."""
        initial = [atoms.arrays.get(name) for name in ("initial_charges", "initial_magmoms")]
        key = (atoms.numbers.tobytes(), atoms.pbc.tobytes(),
               repr([atoms.info.get(k) for k in CHARGE_KEYS + SPIN_KEYS]),
               tuple(None if a is None else a.tobytes() for a in initial))
        if key == self._checked_state:
            return
        problem = charge_state_problem(atoms, self.charge_states)
        if problem is None:
            self._checked_state = key
            return
        if not self.allow_unsupported_state:
            raise ValueError(problem + "; MFCalculator(..., allow_unsupported_state=True) predicts it anyway, "
                             "as the model sees it (without charge or spin)")
        if not self._state_warned:
            self._state_warned = True
            warnings.warn(problem + " (allow_unsupported_state=True: predicted without charge or spin; "
                          "this warning is shown once per calculator)", RuntimeWarning, stacklevel=3)
        self._checked_state = key

    def _check_structure(self, atoms: Atoms) -> None:
        """Checks that depend on numbers, cell and pbc only; cached until one of them changes."""
        key = (atoms.numbers.tobytes(), atoms.cell.array.tobytes(), atoms.pbc.tobytes())
        if key == self._checked_structure:
            return
        self._checked_structure = None
        check_numbers(atoms.numbers, self.elements)
        check_cell(atoms.cell.array, atoms.pbc, self.cutoff)
        self._numbers = torch.from_numpy(atoms.numbers.astype(np.int64)).to(self.device)
        self._cell = torch.from_numpy(atoms.cell.array.copy()).to(self.device, self.dtype)
        self._pbc = torch.from_numpy(atoms.pbc.copy()).to(self.device)
        backend = self.neighbor_backend
        if backend == "auto":
            from .neighbors import pick_backend

            backend = pick_backend(len(atoms), self.device, bool(atoms.pbc.any()))
        self._backend = backend
        self._checked_structure = key

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
        from .domain import DomainCheck

        try:
            return DomainCheck(self.metadata["domain"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelFileError(f"{self.metadata['path']}: its training-domain statistics (metadata "
                                 f"'domain') are unusable: {err}") from None

    def _model_name(self) -> str:
        path = Path(self.metadata["path"])
        return path.parent.name if path.name == "model.pt" else path.name

    def _check_domain(self, atoms: Atoms, forces: np.ndarray) -> None:
        """Record why ``atoms`` looks unlike the training data; warn the first time only. Checked
        for every new system (numbers, cell or pbc changed) and then every DOMAIN_CHECK_EVERY-th
        force call (an MD run drifting out of the domain is seen within that many steps; each
        check costs ~25-70 µs, 2-4% of a small-molecule step)."""
        if self.domain is None:
            return
        self._domain_calls += 1
        if self._checked_structure == self._domain_structure and self._domain_calls < DOMAIN_CHECK_EVERY:
            return
        self._domain_structure, self._domain_calls = self._checked_structure, 0
        self.domain_warnings = self.domain.reasons(atoms.numbers, atoms.positions, atoms.cell.array,
                                                   atoms.pbc, forces)
        if self.domain_warnings and not self._domain_warned:
            from .domain import OutOfDomainWarning

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
        return {key: value for key, value in self.metadata.items() if "checksum" in key}

    def __getstate__(self) -> Dict[str, Any]:
        """Constructor arguments (model by absolute path) and the file's checksum(s); the module
        itself (TorchScript or compiled) is reloaded by the copy, not pickled."""
        init = dict(self._init_args, fidelity=self.fidelity, dtype=str(self.dtype).replace("torch.", ""))
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
        fidelity, in flat batches of up to ``max_atoms`` atoms per forward pass."""
        from .replicas import predict

        return predict(self, structures, max_atoms=max_atoms)

    # ------------------------------------------------------------------ every fidelity at once
    @_locked
    def predict_all_fidelities(self, atoms: Atoms) -> Dict[str, Any]:
        """Energy and forces at every fidelity from one batched pass, and their spread.

        Returns a dict with ``fidelities`` (names), ``energy`` (F,) total energies in eV,
        ``forces`` (F, N, 3), ``relative_energy`` (F,) energies minus each fidelity's
        element reference energies (comparable across methods), ``energy_spread`` (std of
        ``relative_energy``, eV) and ``forces_spread`` (N,) RMS over components of the std
        of the forces across fidelities, eV/Å: a cheap disagreement signal. The structure is
        checked as in ``calculate`` (``check_structure``).
        """
        self.check_structure(atoms)
        n_fid, n_atoms = len(self.fidelities), len(atoms)
        positions = torch.from_numpy(atoms.positions - atoms.positions[0]).to(self.device, self.dtype)
        edge_index, shifts = self.module.neighbor_list(
            positions, self._cell, self._pbc,
            "vesin" if self._backend == "torch-cluster" else self._backend,
        )
        n_edges = edge_index.shape[1]
        offsets = (torch.arange(n_fid, device=self.device) * n_atoms).repeat_interleave(n_edges)
        with force_call(self.module, self.thread_policy, n_fid * n_atoms):
            out = self.module.forward(
                positions.repeat(n_fid, 1),
                self._numbers.repeat(n_fid),
                self._cell.unsqueeze(0).expand(n_fid, 3, 3).contiguous(),
                edge_index.repeat(1, n_fid) + offsets,
                shifts.repeat(n_fid, 1),
                torch.arange(n_fid, device=self.device),
                torch.arange(n_fid, device=self.device).repeat_interleave(n_atoms),
                True,
                False,
            )
        if "min_distance" in out:
            warn_if_close(float(out["min_distance"]))
        energy = out["energy"].detach().cpu().numpy().astype(np.float64)
        forces = out["forces"].detach().cpu().numpy().astype(np.float64).reshape(n_fid, n_atoms, 3)
        check_finite_results(energy, forces, atoms)
        species = self.module.species_of_z[self._numbers]
        reference = self.module.model.e0[:, species].sum(dim=1).detach().cpu().numpy()
        relative = energy - reference.astype(np.float64)
        return {
            "fidelities": list(self.fidelities),
            "energy": energy,
            "forces": forces,
            "relative_energy": relative,
            "energy_spread": float(relative.std()),
            "forces_spread": np.sqrt((forces.std(axis=0) ** 2).mean(axis=1)),
        }
