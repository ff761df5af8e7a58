"""Potential: a loaded mfcalc model, and the one force path every consumer goes through.

    potential = Potential.load("chno-mf", device="cpu")
    prepared = potential.prepare(atoms)              # every check, once, in one place
    out = potential.evaluate(prepared, potential.fidelity_index("CCSD(T)"))

A ``Potential`` owns the scripted module (and the compiled one: with ``compile=True`` from the
start, with ``compile="auto"``, the default, built in the background by mfcalc.autocompile), the
metadata, device, dtype, neighbor-list choice, thread policy and the fidelity name <-> index
mapping. ``prepare`` turns a structure into an immutable ``PreparedStructure`` (tensors on the
device) after checking it; ``evaluate`` (one structure), ``evaluate_batch`` (a flat batch, one
fidelity per structure) and ``evaluate_replicas`` (R molecules of N atoms, for replica MD)
dispatch to the right force path. ``MFCalculator`` (the ASE adapter), ``replicas.predict``,
``replicas.predict_all_fidelities`` and ``ReplicaMD`` are built on these.

The structure checks (atomic numbers, cell, positions, charge and spin) live here too, so that
every entry point refuses exactly the same structures with the same words.
"""

import contextlib
import difflib
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from .autocompile import AutoCompiler, parse_compile
from .batching import flat_batch
from .compiled import DENSE_GRAPH_MAX_ATOMS, CompiledForceField
from .modelfile import DEFAULT_MODEL, ModelFileError, build_forcefield, load_model
from .neighbors import BACKENDS, check_periodic_images, complete_cell, pick_backend, torch_cluster_neighbor_list
from .threads import ThreadPolicy

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOO_CLOSE = 0.1  # Å: closer pairs get a warning
MAX_Z = 118  # atomic numbers 1..118 are elements; ASE's 0 ('X') is a ghost atom
NEUTRAL_SINGLET = ((0, 1),)  # (charge, multiplicity) states of a model whose metadata names none
CHARGE_KEYS = ("charge", "total_charge")  # atoms.info keys ASE, fairchem and MACE users set
SPIN_KEYS = ("multiplicity", "spin")
# replicas per dense force call on a CPU: R * N * N of 64 ethanol replicas. Beyond it the
# (R, N, N, 3, F) tensors fall out of cache (ethanol, 2 threads: 64 replicas 28 ms per step,
# 256 replicas 181 ms in one call); one call for all of them on a GPU
DENSE_PAIRS_PER_CALL_CPU = 64 * 81


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be 'float32' or 'float64' (or None for the model's own), got {dtype!r}")


def parse_device(device: Union[str, torch.device]) -> torch.device:
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


# ---------------------------------------------------------------------- structure checks
# One set of checks for every entry point (MFCalculator.calculate, predict_all_fidelities,
# batch/predict, ReplicaMD): Potential.prepare calls these.
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


class UnsupportedStateWarning(RuntimeWarning):
    """A structure with a charge or spin the model cannot represent, predicted anyway
    (``allow_unsupported_state=True``)."""


# ---------------------------------------------------------------------- prepared structures
@dataclass(frozen=True)
class PreparedStructure:
    """One checked structure, ready for the force call (see ``Potential.prepare``).

    ``positions`` are centred on atom 0 (the model is translation invariant; centring in float64
    keeps float32 exact far from the origin). ``key`` identifies the system (numbers, cell,
    pbc): two prepared structures with the same key differ in their positions only.
    ``state_problem`` is the charge/spin problem predicted anyway under
    ``allow_unsupported_state=True`` (None for a structure the model represents)."""

    numbers: torch.Tensor  # (N,) int64, on the device
    positions: torch.Tensor  # (N, 3), device and dtype of the potential
    cell: torch.Tensor  # (3, 3)
    pbc: torch.Tensor  # (3,) bool
    backend: str  # the neighbor-list backend of this structure: dense, vesin or torch-cluster
    stress_defined: bool
    key: tuple
    state_key: tuple
    state_problem: Optional[str]
    arrays: Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # read-only copies: numbers,
    # centred positions (float64), cell, pbc

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def periodic(self) -> bool:
        return bool(self.arrays[3].any())

    def atoms(self) -> Atoms:
        """The structure as checked, as ASE Atoms (centred positions), for messages."""
        numbers, positions, cell, pbc = self.arrays
        return Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


def _structure_key(atoms: Atoms) -> tuple:
    return (atoms.numbers.tobytes(), atoms.cell.array.tobytes(), atoms.pbc.tobytes())


def _state_key(atoms: Atoms) -> tuple:
    initial = [atoms.arrays.get(name) for name in ("initial_charges", "initial_magmoms")]
    return (atoms.numbers.tobytes(), atoms.pbc.tobytes(),
            repr([atoms.info.get(k) for k in CHARGE_KEYS + SPIN_KEYS]),
            tuple(None if a is None else a.tobytes() for a in initial))


# ---------------------------------------------------------------------- the potential
class Potential:
    """A loaded multi-fidelity model: module, metadata, device, dtype, fidelities, force paths.

    Make one with ``Potential.load`` (arguments as ``MFCalculator``'s: model, device, dtype,
    compile, neighbor_list, threads). Calls from several threads are serialised by
    ``self.lock`` (one force call at a time). Pickles as its load arguments and the model
    file's checksum(s); the copy reloads the file and refuses a changed one.
    """

    def __init__(self, module, metadata: Dict[str, Any], device: torch.device, *,
                 compile: Union[None, bool, str] = None, neighbor_list: str = "auto",
                 threads: Union[None, int, str] = "auto"):
        if neighbor_list not in BACKENDS:
            raise ValueError(f"neighbor_list must be one of {BACKENDS}, got {neighbor_list!r}")
        compile = parse_compile(compile)
        self.lock = threading.RLock()
        self.scripted = module
        self.metadata = metadata
        self.device = device
        self.dtype: torch.dtype = next(module.parameters()).dtype
        self.compile_mode = compile  # True, False or "auto"
        self.compiled = compile is True
        self.module = self._compile(module) if self.compiled else module  # what the force calls run
        # compile="auto": TorchScript now, the compiled graph once it is ready (mfcalc.autocompile)
        self.auto: Optional[AutoCompiler] = (
            AutoCompiler(lambda: self._compile(self.scripted), module, device, self.dtype,
                         threads=lambda n_atoms: self.thread_policy.limit(n_atoms))
            if compile == "auto" else None)
        self.neighbor_backend = neighbor_list
        self.threads = threads
        self.thread_policy = ThreadPolicy(threads)
        self.fidelities: List[str] = list(metadata["fidelities"])
        self.aliases: Dict[str, str] = dict(metadata.get("aliases", {}))
        self.default_fidelity: str = self.resolve_fidelity(metadata.get("default_fidelity", self.fidelities[0]))
        self.elements: List[int] = list(metadata["elements"])
        self.cutoff: float = float(metadata["cutoff"])
        self.charge_states = [tuple(int(x) for x in state)
                              for state in metadata.get("charge_states", NEUTRAL_SINGLET)]
        self._replica_masks: Dict[int, torch.Tensor] = {}

    @classmethod
    def load(
        cls,
        model: Union[str, Path] = DEFAULT_MODEL,
        device: Union[str, torch.device] = "auto",
        dtype: Union[None, str, torch.dtype] = None,
        compile: Union[None, bool, str] = None,
        neighbor_list: str = "auto",
        threads: Union[None, int, str] = "auto",
    ) -> "Potential":
        """Load ``model`` (a shipped model name, a directory holding ``model.pt``, or a ``.pt``
        file) on ``device`` ("auto": CUDA when available) in ``dtype`` (None: the file's own).
        ``compile``: "auto" (the default; ``MFCALC_COMPILE`` in the environment can change it)
        runs the TorchScript file at once and switches small molecules to the compiled graph
        when a background thread has built and checked it (mfcalc.autocompile); True compiles
        energy + forces (+ stress) with torch.compile at the first call of each variant (tens of
        seconds); False runs the TorchScript file only. ``neighbor_list``: "auto", "dense",
        "vesin" or "torch-cluster". ``threads``: see ``mfcalc.threads``."""
        if neighbor_list not in BACKENDS:
            raise ValueError(f"neighbor_list must be one of {BACKENDS}, got {neighbor_list!r}")
        device = parse_device(device)
        module, metadata = load_model(model, device, parse_dtype(dtype))
        return cls(module, metadata, device, compile=compile, neighbor_list=neighbor_list, threads=threads)

    def _compile(self, scripted):
        """The same weights with energy + forces (+ stress) compiled as one graph by
        torch.compile (mfcalc.compiled): ~2x fewer milliseconds per small-molecule step on CPU.
        The first call of each variant compiles (tens of seconds, cached on disk after)."""
        eager = build_forcefield(self.metadata["config"], scripted.state_dict())
        return CompiledForceField(eager.to(self.device, self.dtype))

    @property
    def path(self) -> str:
        return str(self.metadata.get("path"))

    def load_arguments(self) -> Dict[str, Any]:
        """The ``Potential.load`` arguments that load this potential again (model by absolute path)."""
        return {"model": str(Path(self.metadata["path"]).resolve()), "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), "compile": self.compile_mode,
                "neighbor_list": self.neighbor_backend, "threads": self.threads}

    def checksums(self) -> Dict[str, Any]:
        return {key: value for key, value in self.metadata.items() if "checksum" in key}

    def __repr__(self) -> str:
        return (f"Potential({self.path!r}, device={str(self.device)!r}, dtype={str(self.dtype)[6:]!r}, "
                f"compile={self.compile_mode!r}, fidelities={self.fidelities})")

    def compile_status(self) -> Dict[int, Dict[str, Any]]:
        """With compile="auto": atom count -> state of its background compilation ("waiting",
        "compiling", "ready", "failed" with a reason), force-call seconds so far and compile
        seconds. Empty otherwise."""
        return self.auto.status() if self.auto is not None else {}

    def wait_for_compile(self, timeout: Optional[float] = None) -> Dict[int, Dict[str, Any]]:
        """With compile="auto": block until the background compilations started so far have
        finished; returns ``compile_status()``."""
        if self.auto is not None:
            self.auto.wait(timeout)
        return self.compile_status()

    # ------------------------------------------------------------------ processes
    def __getstate__(self) -> Dict[str, Any]:
        return {"load": self.load_arguments(), "checksums": self.checksums()}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        args = dict(state["load"])
        device = parse_device(args.pop("device"))
        module, metadata = load_model(args.pop("model"), device, parse_dtype(args.pop("dtype")))
        self.__init__(module, metadata, device, **args)
        if self.checksums() != state["checksums"]:
            raise ModelFileError(
                f"{state['load']['model']} changed since this potential was pickled (checksum "
                f"{str(state['checksums'].get('checksum'))[:12]}... then, "
                f"{str(self.checksums().get('checksum'))[:12]}... now): the copy would predict with "
                "other weights; load it again from the file as it is now"
            )

    # ------------------------------------------------------------------ fidelities
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

    def fidelity_index(self, name: Optional[str] = None) -> int:
        """Index of a fidelity given by name or alias (None: the model's default)."""
        return self.fidelities.index(self.resolve_fidelity(self.default_fidelity if name is None else name))

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self.fidelities):
            raise ValueError(f"fidelity index {index} out of range; this model has fidelities "
                             f"{list(enumerate(self.fidelities))}")
        return index

    # ------------------------------------------------------------------ structures
    def backend_for(self, n_atoms: int, periodic: bool) -> str:
        """The neighbor-list backend a structure of ``n_atoms`` gets ("auto" resolved)."""
        if self.neighbor_backend == "auto":
            return pick_backend(n_atoms, self.device, periodic)
        return self.neighbor_backend

    def prepare(self, atoms: Atoms, previous: Optional[PreparedStructure] = None,
                allow_unsupported_state: bool = False) -> PreparedStructure:
        """Every check a structure must pass before the model sees it, the same for every entry
        point: atomic numbers (1-118, known to the model), the periodic cell (independent
        vectors, not so small that the search needs more than MAX_PERIODIC_IMAGES images),
        finite positions, and a charge and spin the model can represent (ValueError naming the
        problem; with ``allow_unsupported_state`` the problem is kept in ``state_problem``
        instead). Returns the structure's tensors, ready for ``evaluate``.

        Pure: nothing of ``atoms`` is kept in the potential. ``previous``, a structure prepared
        before (an earlier MD step), lets the checks and tensors that depend on numbers, cell and
        pbc (or on the charge and spin) be reused when those have not changed."""
        key = _structure_key(atoms)
        same_system = previous is not None and previous.key == key
        if same_system:
            numbers, cell, pbc, backend = previous.numbers, previous.cell, previous.pbc, previous.backend
            numbers_np, _, cell_np, pbc_np = previous.arrays
            defined = previous.stress_defined
        else:
            check_numbers(atoms.numbers, self.elements)
            check_cell(atoms.cell.array, atoms.pbc, self.cutoff)
            numbers = torch.from_numpy(atoms.numbers.astype(np.int64)).to(self.device)
            cell = torch.from_numpy(atoms.cell.array.copy()).to(self.device, self.dtype)
            pbc = torch.from_numpy(atoms.pbc.copy()).to(self.device)
            backend = self.backend_for(len(atoms), bool(atoms.pbc.any()))
            numbers_np, cell_np, pbc_np = _frozen(atoms.numbers), _frozen(atoms.cell.array), _frozen(atoms.pbc)
            defined = stress_defined(atoms)
        check_positions(atoms.positions)
        state_key = _state_key(atoms)
        if previous is not None and previous.state_key == state_key:
            problem = previous.state_problem
        else:
            problem = charge_state_problem(atoms, self.charge_states)
        if problem is not None and not allow_unsupported_state:
            raise ValueError(problem + "; MFCalculator(..., allow_unsupported_state=True) predicts it anyway, "
                             "as the model sees it (without charge or spin)")
        centred = atoms.positions - atoms.positions[0]  # a new array: nobody else holds it
        positions = torch.from_numpy(centred).to(self.device, self.dtype)
        centred.setflags(write=False)
        return PreparedStructure(
            numbers=numbers, positions=positions, cell=cell, pbc=pbc, backend=backend, stress_defined=defined,
            key=key, state_key=state_key, state_problem=problem, arrays=(numbers_np, centred, cell_np, pbc_np),
        )

    def force_call(self, n_atoms: int) -> contextlib.ExitStack:
        """The context of a force call on ``n_atoms`` atoms (see ``force_call``)."""
        return force_call(self.module, self.thread_policy, n_atoms)

    def pairs(self, prepared: PreparedStructure) -> List[torch.Tensor]:
        """The structure's pair list, [edge_index, shifts], from its backend."""
        if prepared.backend == "torch-cluster":
            edge_index, shifts = torch_cluster_neighbor_list(prepared.positions, prepared.cell, prepared.pbc,
                                                             self.cutoff)
            return [edge_index, shifts]
        return self.module.neighbor_list(prepared.positions, prepared.cell, prepared.pbc, prepared.backend)

    # ------------------------------------------------------------------ force paths
    def evaluate(self, prepared: PreparedStructure, fidelity: int, forces: bool = True,
                 stress: bool = False) -> Dict[str, Any]:
        """Energy (float, eV), per-atom ``energies`` (N,), ``forces`` (N, 3, eV/Å) and, with
        ``stress`` (only where ``prepared.stress_defined``), the 3x3 ``stress`` (eV/Å^3) of one
        structure at fidelity index ``fidelity``, as float64 numpy arrays. The force path is the
        module's own (TorchScript, or the compiled graph with ``compile=True``); ``forces=False``
        evaluates the energy alone through the pair list. RuntimeWarning for a pair closer than
        TOO_CLOSE; FloatingPointError, naming the closest pair, for a non-finite result."""
        fidelity = self._check_index(fidelity)
        if stress and not prepared.stress_defined:
            raise ValueError("stress is not defined for this structure (see MFCalculator)")
        with self.lock, self.force_call(prepared.n_atoms):
            if forces or stress:
                edges = self.pairs(prepared) if prepared.backend == "torch-cluster" else None
                module, auto = self.module, False
                if self.auto is not None and edges is None and AutoCompiler.eligible(
                        prepared.n_atoms, prepared.periodic, prepared.backend, stress):
                    module = self.auto.module_for(prepared.n_atoms)
                    auto = module is self.scripted
                start = time.perf_counter()
                out = module.compute(prepared.positions, prepared.numbers, prepared.cell, prepared.pbc,
                                     fidelity, stress, prepared.backend, edges)
                if auto:  # a TorchScript call that the compiled graph could take over
                    self.auto.record(prepared.n_atoms, time.perf_counter() - start,
                                     (prepared.positions, prepared.numbers, prepared.cell, prepared.pbc, fidelity))
            else:
                out = self._forward([prepared], [fidelity], [self.pairs(prepared)], False, False)
                out["energy"] = out["energy"][0]
        if "min_distance" in out:
            warn_if_close(float(out["min_distance"]))
        result = {"energy": float(out["energy"]),
                  "energies": out["energies"].detach().cpu().numpy().astype(np.float64)}
        if forces or stress:
            result["forces"] = out["forces"].detach().cpu().numpy().astype(np.float64)
        check_finite_results(np.float64(result["energy"]), result.get("forces", np.zeros(0)), prepared.atoms())
        if "stress" in out:
            result["stress"] = out["stress"].detach().cpu().numpy().astype(np.float64)
        return result

    def _forward(self, prepared: Sequence[PreparedStructure], fidelities: Sequence[int],
                 pairs: Sequence[List[torch.Tensor]], forces: bool, stress: bool) -> Dict[str, torch.Tensor]:
        """The module's flat-batch ``forward`` over ``prepared`` with their pair lists."""
        b = flat_batch([p.positions for p in prepared], [p.numbers for p in prepared], [p.cell for p in prepared],
                       [e for e, _ in pairs], [s for _, s in pairs], fidelities, self.device)
        return self.module.forward(b["positions"], b["numbers"], b["cell"], b["edge_index"], b["shifts"],
                                   b["fidelity"], b["batch"], forces, stress)

    def evaluate_batch(self, prepared: Sequence[PreparedStructure], fidelity: Union[int, Sequence[int]],
                       numbered_from: Optional[int] = 0, stress: bool = True) -> List[Dict[str, Any]]:
        """Energy, forces (and with ``stress`` the 3x3 stress where defined) of many structures in one forward pass (a
        flat batch). ``fidelity``: one index for all, or one per structure (the same prepared
        structure may appear several times, e.g. once per fidelity; its pair list is searched
        once). One dict per structure, float64 numpy. Warnings and errors name the structure by
        its number from ``numbered_from`` (None: they name none, for copies of one structure)."""
        prepared = list(prepared)
        fidelities = [fidelity] * len(prepared) if np.ndim(fidelity) == 0 else list(fidelity)
        if len(fidelities) != len(prepared):
            raise ValueError(f"{len(fidelities)} fidelities for {len(prepared)} structures")
        fidelities = [self._check_index(f) for f in fidelities]
        with_stress = [stress and p.stress_defined for p in prepared]
        with self.lock, self.force_call(sum(p.n_atoms for p in prepared)):
            searched: Dict[int, List[torch.Tensor]] = {}
            for p in prepared:
                if id(p) not in searched:
                    searched[id(p)] = self._batch_pairs(p)
            pairs = [searched[id(p)] for p in prepared]
            out = self._forward(prepared, fidelities, pairs, True, any(with_stress))
        counts = [p.n_atoms for p in prepared]
        energy = out["energy"].detach().cpu().numpy().astype(np.float64)
        forces = np.split(out["forces"].detach().cpu().numpy().astype(np.float64), np.cumsum(counts)[:-1])
        shortest = self._shortest_pairs(prepared, pairs)
        results, checked = [], set()
        for k, p in enumerate(prepared):
            if numbered_from is None:
                close, finite = "", ""
            else:
                close, finite = f" in structure {numbered_from + k}", f" for structure {numbered_from + k}"
            if numbered_from is not None or id(p) not in checked:
                warn_if_close(shortest[k], close)
                checked.add(id(p))
            check_finite_results(energy[k], forces[k], p.atoms(), finite)
            r = {"energy": float(energy[k]), "forces": forces[k]}
            if with_stress[k]:
                r["stress"] = out["stress"][k].detach().cpu().numpy().astype(np.float64)
            results.append(r)
        return results

    def _batch_pairs(self, prepared: PreparedStructure) -> List[torch.Tensor]:
        """The pair list of one structure of a batch: from the model file's own search (a
        torch-cluster choice is served by the file's backend for that size)."""
        backend = prepared.backend
        if backend == "torch-cluster":
            backend = pick_backend(prepared.n_atoms, self.device, prepared.periodic)
        return self.module.neighbor_list(prepared.positions, prepared.cell, prepared.pbc, backend)

    @staticmethod
    def _shortest_pairs(prepared: Sequence[PreparedStructure], pairs: Sequence[List[torch.Tensor]]) -> np.ndarray:
        """The shortest pair distance of every structure (inf without pairs)."""
        shortest = []
        for p, (edge_index, shifts) in zip(prepared, pairs):
            if edge_index.shape[1] == 0:
                shortest.append(torch.full((), float("inf"), dtype=p.positions.dtype, device=p.positions.device))
                continue
            i, j = edge_index[0], edge_index[1]
            vectors = p.positions[j] - p.positions[i] + shifts @ p.cell
            shortest.append(vectors.norm(dim=1).min())
        return torch.stack(shortest).cpu().numpy().astype(np.float64)

    def reference_energies(self, prepared: PreparedStructure) -> np.ndarray:
        """The element reference energies of the structure at every fidelity (F,), eV: energies
        minus these are comparable across levels of theory."""
        species = self.scripted.species_of_z[prepared.numbers]
        return self.scripted.model.e0[:, species].sum(dim=1).detach().cpu().numpy().astype(np.float64)

    def evaluate_replicas(self, positions: torch.Tensor, numbers: torch.Tensor,
                          fidelity: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energy (R,) and forces (R, N, 3) of R non-periodic molecules of N atoms each, as
        tensors on the device (no host synchronisation): positions (R, N, 3), numbers (R, N),
        fidelity (R,) indices. For replica MD: the molecules are checked once, with ``prepare``,
        before the run; every pair within the cutoff interacts. With ``compile=True`` and
        N <= DENSE_GRAPH_MAX_ATOMS the dense compiled graph runs (no pair search, in
        cache-sized chunks on a CPU); otherwise the pair list of an all-pairs search."""
        r, n = positions.shape[0], positions.shape[1]
        with self.lock, self.force_call(r * n):
            if self.compiled and n <= DENSE_GRAPH_MAX_ATOMS:
                chunk = r if positions.device.type == "cuda" else max(1, DENSE_PAIRS_PER_CALL_CPU // (n * n))
                energy, forces = [], []
                for start in range(0, r, chunk):
                    part = slice(start, start + chunk)
                    out = self.module.molecules(positions[part], numbers[part], fidelity[part])
                    energy.append(out["energy"])
                    forces.append(out["forces"])
                return torch.cat(energy), torch.cat(forces)
            edge_index, shifts = self._replica_pairs(positions)
            batch = torch.arange(r, device=positions.device).repeat_interleave(n)
            flat = positions.reshape(-1, 3)
            if self.compiled:
                out = self.module.flat_molecules(flat, numbers.reshape(-1), edge_index, fidelity[batch])
                return out["energies"].view(r, n).sum(dim=1), out["forces"].view(r, n, 3)
            cells = torch.zeros((r, 3, 3), dtype=positions.dtype, device=positions.device)
            out = self.module.forward(flat, numbers.reshape(-1), cells, edge_index, shifts, fidelity, batch,
                                      True, False)
            return out["energy"], out["forces"].view(r, n, 3)

    def _replica_pairs(self, positions: torch.Tensor) -> List[torch.Tensor]:
        """All-pairs search inside every replica at once: (R, N, N) distances -> flat pairs."""
        n = positions.shape[1]
        local = self._replica_masks.get(n)
        if local is None or local.device != positions.device:
            local = torch.ones(n, n, dtype=torch.bool, device=positions.device).fill_diagonal_(False)
            self._replica_masks[n] = local
        d2 = (positions.unsqueeze(1) - positions.unsqueeze(2)).pow(2).sum(-1)
        mask = (d2 < self.cutoff**2) & local
        rep, i, j = mask.nonzero(as_tuple=True)
        edge_index = torch.stack([rep * n + i, rep * n + j])
        return [edge_index, torch.zeros((edge_index.shape[1], 3), dtype=positions.dtype, device=positions.device)]
