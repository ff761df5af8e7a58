"""MFCalculator: an ASE calculator for an exported mfcalc model at a chosen level of theory."""

import contextlib
import difflib
import warnings
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .modelfile import DEFAULT_MODEL, load_model
from .neighbors import BACKENDS

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOO_CLOSE = 0.1  # Å: closer pairs get a warning
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

    Properties: energy, free_energy (= energy), energies (per atom), forces, and stress for
    periodic cells, in eV and Å. ``calc.fidelity = "..."`` switches level of theory.
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
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if neighbor_list not in BACKENDS:
            raise ValueError(f"neighbor_list must be one of {BACKENDS}, got {neighbor_list!r}")
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
        close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
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
        if index != self._fidelity_index:
            self._fidelity_index = index
            self.reset()  # results belong to the old level of theory

    # ------------------------------------------------------------------ ASE interface
    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> List[str]:
        if self.atoms is None:
            return list(all_changes)
        return exact_changes(self.atoms, atoms, set(self.ignored_changes))

    def calculate(
        self,
        atoms: Optional[Atoms] = None,
        properties: List[str] = ("energy",),
        system_changes: List[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self._check_structure(atoms)
        positions = atoms.positions
        if not np.isfinite(positions).all():
            bad = np.where(~np.isfinite(positions).all(axis=1))[0]
            raise ValueError(f"positions of atom(s) {bad.tolist()[:10]} are NaN or infinite")
        periodic = bool(atoms.pbc.any())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError(
                "stress is defined for periodic cells only; this structure has pbc=False in "
                "every direction (set atoms.pbc and a cell to get a stress)"
            )
        # the model is translation invariant: centring in float64 keeps float32 exact far from
        # the origin (pair lists and shifts do not change under a common translation)
        positions = torch.from_numpy(positions - positions[0]).to(self.device, self.dtype)
        with script_execution(self.module):
            out = self.module.compute(
                positions,
                self._numbers,
                self._cell,
                self._pbc,
                self._fidelity_index,
                periodic,  # stress comes almost free with the forces; NPT and cell filters want both
                self._backend,
                self._edges(positions),
            )
        if "min_distance" in out and float(out["min_distance"]) < TOO_CLOSE:
            warnings.warn(
                f"two atoms are {float(out['min_distance']):.3g} Å apart (< {TOO_CLOSE} Å): the "
                "model was never trained on such contacts and its energy is meaningless there",
                RuntimeWarning, stacklevel=2,
            )
        forces = out["forces"].cpu().numpy().astype(np.float64)
        if not np.isfinite(forces).all():  # checked before anything is cached as a result
            raise FloatingPointError(
                "the model returned non-finite forces; two atoms may be on top of each other "
                f"(smallest distance {self._min_distance(atoms):.3g} Å)"
            )
        energy = float(out["energy"])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["energies"].cpu().numpy().astype(np.float64),
            "forces": forces,
        }
        if "stress" in out:
            stress = out["stress"].cpu().numpy().astype(np.float64)
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)

    # ------------------------------------------------------------------ helpers
    def _edges(self, positions: torch.Tensor) -> Optional[List[torch.Tensor]]:
        """None lets the model file search neighbors itself; torch-cluster runs here."""
        if self._backend != "torch-cluster":
            return None
        from .neighbors import torch_cluster_neighbor_list

        edge_index, shifts = torch_cluster_neighbor_list(positions, self._cell, self._pbc, self.cutoff)
        return [edge_index, shifts]

    def _check_structure(self, atoms: Atoms) -> None:
        """Checks that depend on numbers, cell and pbc only; cached until one of them changes."""
        key = (atoms.numbers.tobytes(), atoms.cell.array.tobytes(), atoms.pbc.tobytes())
        if key == self._checked_structure:
            return
        self._checked_structure = None
        if len(atoms) == 0:
            raise ValueError("the structure has no atoms")
        unknown = sorted(set(atoms.numbers.tolist()) - set(self.elements))
        if unknown:
            from ase.data import chemical_symbols as sym

            raise ValueError(
                f"element(s) {[sym[z] for z in unknown]} are not in this model; it knows "
                f"{[sym[z] for z in self.elements]}"
            )
        if atoms.pbc.any():
            periodic_rows = atoms.cell.array[atoms.pbc]
            gram = periodic_rows @ periodic_rows.T
            if np.linalg.det(gram) < 1e-6:
                raise ValueError(
                    f"the cell vectors of the periodic directions (pbc={atoms.pbc.tolist()}) "
                    f"are zero or linearly dependent: cell={atoms.cell.array.tolist()}; set a "
                    "cell with non-zero volume, or pbc=False for a molecule"
                )
        self._numbers = torch.from_numpy(atoms.numbers.astype(np.int64)).to(self.device)
        self._cell = torch.from_numpy(atoms.cell.array.copy()).to(self.device, self.dtype)
        self._pbc = torch.from_numpy(atoms.pbc.copy()).to(self.device)
        backend = self.neighbor_backend
        if backend == "auto":
            from .neighbors import pick_backend

            backend = pick_backend(len(atoms), self.device, bool(atoms.pbc.any()))
        self._backend = backend
        self._checked_structure = key

    @staticmethod
    def _min_distance(atoms: Atoms) -> float:
        if len(atoms) < 2:
            return float("inf")
        d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
        return float(d[np.triu_indices(len(atoms), 1)].min())

    # ------------------------------------------------------------------ many structures at once
    def batch(self, structures, max_atoms: int = 20000) -> List[Dict[str, Any]]:
        """Energy, forces (and stress if periodic) of many structures at this calculator's
        fidelity, in flat batches of up to ``max_atoms`` atoms per forward pass."""
        from .replicas import predict

        return predict(self, structures, max_atoms=max_atoms)

    # ------------------------------------------------------------------ every fidelity at once
    def predict_all_fidelities(self, atoms: Atoms) -> Dict[str, Any]:
        """Energy and forces at every fidelity from one batched pass, and their spread.

        Returns a dict with ``fidelities`` (names), ``energy`` (F,) total energies in eV,
        ``forces`` (F, N, 3), ``relative_energy`` (F,) energies minus each fidelity's
        element reference energies (comparable across methods), ``energy_spread`` (std of
        ``relative_energy``, eV) and ``forces_spread`` (N,) RMS over components of the std
        of the forces across fidelities, eV/Å: a cheap disagreement signal.
        """
        self._check_structure(atoms)
        n_fid, n_atoms = len(self.fidelities), len(atoms)
        positions = torch.from_numpy(atoms.positions - atoms.positions[0]).to(self.device, self.dtype)
        edge_index, shifts = self.module.neighbor_list(
            positions, self._cell, self._pbc,
            "vesin" if self._backend == "torch-cluster" else self._backend,
        )
        n_edges = edge_index.shape[1]
        offsets = (torch.arange(n_fid, device=self.device) * n_atoms).repeat_interleave(n_edges)
        with script_execution(self.module):
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
        energy = out["energy"].detach().cpu().numpy().astype(np.float64)
        forces = out["forces"].detach().cpu().numpy().astype(np.float64).reshape(n_fid, n_atoms, 3)
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
