"""An mfcalc model as a TorchSim ``ModelInterface``: batched MD and relaxation in TorchSim.

    import torch_sim as ts
    from mfcalc.torchsim import MFModel

    model = MFModel("ethanol-mf", fidelity="CCSD(T)", device="cpu", dtype="float64")
    state = ts.io.atoms_to_state(molecules, model.device, model.dtype)
    final = ts.integrate(state, model, integrator=ts.nvt_langevin, n_steps=1000,
                         temperature=300, timestep=0.0005)      # TorchSim units: K, ps

``MFModel`` takes a model name or path (loaded as ``Potential.load``), a ``Potential`` or an
``MFCalculator``, a fidelity (one name for every system of a state, or one per system: a
state can mix levels of theory), device and dtype, and returns what TorchSim asks of a model:
``energy`` (n_systems,) in eV, ``forces`` (n_atoms, 3) in eV/Å and, with ``compute_stress``,
``stress`` (n_systems, 3, 3) in eV/Å^3 (ASE's sign: (1/V) dE/d(strain)). A molecule has no
stress: for a non-periodic state the stress is NaN, as TorchSim writes a stress it did not
compute.

The force path is the one ``ReplicaMD`` and ``Potential.evaluate_batch`` use, with the tensors
staying on the device:

* a non-periodic state whose systems all have the same number of atoms (replicas of one
  molecule, or isomers) goes through ``Potential.evaluate_replicas``: one batched all-pairs
  search inside every system, and with ``compile=True`` the dense compiled graph;
* any other state (periodic cells, molecules of different sizes) gets each system's pair list
  from the model file's own search and one flat-batch forward pass of the module, as
  ``Potential.evaluate_batch``.

Checks. Atomic numbers are checked against the model's elements once per atomic-number tensor
(ValueError naming the unknown elements), periodic cells once per cell (too small for the
neighbor search: ValueError). What ``MFCalculator`` does and this does not, as TorchSim's other
models: no charge/spin or out-of-domain checks, no close-contact warnings, no non-finite check
(a run that explodes shows NaN in TorchSim's state).

``torch-sim-atomistic`` is an optional dependency (``pip install 'mfcalc[ecosystem]'``); mfcalc
itself never imports this module. Tested with torch-sim-atomistic 0.3.0 (the newest release for
Python 3.11).
"""

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch

try:
    import torch_sim as ts
    from torch_sim.models.interface import ModelInterface
except ImportError as err:  # pragma: no cover - exercised only without torch-sim
    raise ImportError(
        f"mfcalc.torchsim needs TorchSim ({err}): pip install torch-sim-atomistic "
        "(or pip install 'mfcalc[ecosystem]')"
    ) from err

from .batching import flat_batch
from .neighbors import pick_backend
from .potential import Potential, check_cell, check_numbers, parse_dtype

FidelityChoice = Union[None, str, Sequence[str]]


class MFModel(ModelInterface):
    """A TorchSim model over an mfcalc ``Potential`` at one (or one per system) fidelity.

    ``model``: a shipped model name, a path, a ``Potential`` or an ``MFCalculator`` (whose
    potential, and fidelity unless ``fidelity`` is given, are used). ``fidelity``: a name or
    alias (None: the model's default), or a sequence with one per system of the states this
    model will see. ``device``/``dtype``/``compile``/``neighbor_list``/``threads``: as
    ``Potential.load`` (only for a model name or path; a loaded potential keeps its own).
    TorchSim states must be in the model's dtype and on its device (``model.dtype``,
    ``model.device``)."""

    def __init__(
        self,
        model: Union[str, Path, Potential, Any] = "chno-mf",
        fidelity: FidelityChoice = None,
        device: Union[str, torch.device] = "auto",
        dtype: Union[None, str, torch.dtype] = None,
        *,
        compute_forces: bool = True,
        compute_stress: bool = True,
        compile: bool = False,
        neighbor_list: str = "auto",
        threads: Union[None, int, str] = "auto",
    ):
        super().__init__()
        potential = getattr(model, "potential", None)
        if isinstance(potential, Potential):  # an MFCalculator
            fidelity = model.fidelity if fidelity is None else fidelity
        elif isinstance(model, Potential):
            potential = model
        else:
            potential = Potential.load(model, device=device, dtype=parse_dtype(dtype), compile=compile,
                                       neighbor_list=neighbor_list, threads=threads)
        self.potential = potential
        if fidelity is None or isinstance(fidelity, str):
            self.fidelities = [potential.resolve_fidelity(potential.default_fidelity if fidelity is None else fidelity)]
            self.per_system = False
        else:
            self.fidelities = [potential.resolve_fidelity(name) for name in fidelity]
            self.per_system = True
        indices = [potential.fidelities.index(name) for name in self.fidelities]
        self._fidelity_indices = torch.tensor(indices, dtype=torch.long, device=potential.device)
        self._device = potential.device
        self._dtype = potential.dtype
        self._compute_forces = bool(compute_forces)
        self._compute_stress = bool(compute_stress)
        self._memory_scales_with = "n_atoms_x_density"  # a radial cutoff
        self._checked_numbers: Optional[torch.Tensor] = None  # the atomic numbers last checked
        self._checked_cells: Optional[torch.Tensor] = None

    @property
    def fidelity(self) -> Union[str, list]:
        """The fidelity name (or the list of names, one per system)."""
        return list(self.fidelities) if self.per_system else self.fidelities[0]

    def __repr__(self) -> str:
        return f"MFModel({self.potential!r}, fidelity={self.fidelity!r})"

    # ------------------------------------------------------------------ checks
    def _fidelity_of_systems(self, n_systems: int) -> torch.Tensor:
        if not self.per_system:
            return self._fidelity_indices.expand(n_systems)
        if len(self.fidelities) != n_systems:
            raise ValueError(f"this MFModel has {len(self.fidelities)} fidelities (one per system), "
                             f"but the state has {n_systems} systems")
        return self._fidelity_indices

    def _check_numbers(self, numbers: torch.Tensor) -> None:
        if self._checked_numbers is numbers:
            return
        check_numbers(numbers.detach().cpu().numpy(), self.potential.elements)
        self._checked_numbers = numbers  # held, so that its id cannot be reused by another tensor

    def _check_cells(self, cells: torch.Tensor, pbc: torch.Tensor) -> None:
        if self._checked_cells is not None and self._checked_cells.shape == cells.shape \
                and torch.equal(self._checked_cells, cells):
            return
        pbc_np = pbc.cpu().numpy()
        for k, cell in enumerate(cells.detach().cpu().numpy().astype(np.float64)):
            try:
                check_cell(cell, pbc_np, self.potential.cutoff)
            except ValueError as err:
                raise ValueError(f"system {k}: {err}") from None
        self._checked_cells = cells.detach().clone()

    # ------------------------------------------------------------------ the force call
    def forward(self, state: Union["ts.SimState", Dict[str, torch.Tensor]], **_: Any) -> Dict[str, torch.Tensor]:
        """Energy (n_systems,), forces (n_atoms, 3) and (with ``compute_stress``) stress
        (n_systems, 3, 3) of every system of a TorchSim state (or a dict of its fields)."""
        if isinstance(state, dict):
            state = ts.SimState(**{"masses": torch.ones_like(state["positions"][:, 0]), **state})
        positions = state.positions
        if positions.dtype != self._dtype:
            raise TypeError(f"the state's positions are {positions.dtype}, this model is {self._dtype}: make the "
                            "state with model.dtype (ts.io.atoms_to_state(atoms, model.device, model.dtype))")
        if positions.device.type != self._device.type:
            raise ValueError(f"the state is on {positions.device}, this model on {self._device}")
        numbers = state.atomic_numbers.long()
        self._check_numbers(state.atomic_numbers)
        n_systems = state.n_systems
        fidelity = self._fidelity_of_systems(n_systems)
        pbc = torch.as_tensor(state.pbc, device=positions.device).bool()
        if pbc.ndim == 0:
            pbc = pbc.repeat(3)  # a real (3,) tensor: the pair search reads it as one
        periodic = bool(pbc.any())
        cells = state.row_vector_cell  # ASE's convention: one cell vector per row
        counts = torch.bincount(state.system_idx, minlength=n_systems)
        stress = self._compute_stress and periodic
        if not periodic and bool((counts == counts[0]).all()):
            r, n = n_systems, int(counts[0])
            energy, forces = self.potential.evaluate_replicas(positions.reshape(r, n, 3), numbers.reshape(r, n),
                                                              fidelity)
            out = {"energy": energy, "forces": forces.reshape(-1, 3)}
        else:
            if periodic:
                self._check_cells(cells, pbc)
            out = self._flat_batch(positions, numbers, cells, pbc, counts.tolist(), fidelity, stress)
        if self._compute_stress and not stress:  # a molecule has no stress
            out["stress"] = torch.full((n_systems, 3, 3), float("nan"), dtype=positions.dtype,
                                       device=positions.device)
        return out

    def _flat_batch(self, positions: torch.Tensor, numbers: torch.Tensor, cells: torch.Tensor, pbc: torch.Tensor,
                    counts: Sequence[int], fidelity: torch.Tensor, stress: bool) -> Dict[str, torch.Tensor]:
        """Each system's pair list from the model file's search, then one flat-batch forward
        (the path of ``Potential.evaluate_batch``, tensors kept on the device)."""
        potential = self.potential
        periodic = bool(pbc.any())
        parts_r = torch.split(positions, list(counts))
        parts_z = torch.split(numbers, list(counts))
        with potential.lock, potential.force_call(int(sum(counts))):
            edges, shifts = [], []
            for r, cell in zip(parts_r, cells):
                backend = potential.backend_for(r.shape[0], periodic)
                if backend == "torch-cluster":  # the model file's search serves this size
                    backend = pick_backend(r.shape[0], potential.device, periodic)
                e, s = potential.module.neighbor_list(r, cell, pbc, backend)
                edges.append(e)
                shifts.append(s)
            b = flat_batch(list(parts_r), list(parts_z), list(cells), edges, shifts, fidelity.tolist(),
                           potential.device)
            out = potential.module.forward(b["positions"], b["numbers"], b["cell"], b["edge_index"], b["shifts"],
                                           b["fidelity"], b["batch"], True, stress)
        result = {"energy": out["energy"], "forces": out["forces"]}
        if stress:
            result["stress"] = out["stress"]
        return result
