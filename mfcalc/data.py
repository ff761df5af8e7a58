"""Loaders: reference data from files -> ``Structure`` records in eV and Å, each tagged with
its fidelity. Units are converted here and nowhere else; every loader names its input unit.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .units import energy_to_ev


@dataclass
class Structure:
    """One labelled configuration. Energies in eV, forces in eV/Å; forces may be absent."""

    numbers: np.ndarray  # (N,) int
    positions: np.ndarray  # (N, 3) Å
    fidelity: str
    energy: float  # eV
    forces: Optional[np.ndarray] = None  # (N, 3) eV/Å
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    group: Optional[str] = None  # e.g. the molecule's name: a recipe can hold out whole groups

    def __len__(self) -> int:
        return len(self.numbers)


def read_extxyz(
    path: Union[str, Path],
    fidelity: Optional[str] = None,
    energy_unit: str = "eV",
    energy_key: str = "energy",
    forces_key: Optional[str] = "forces",
    index: str = ":",
    group_key: Optional[str] = None,
) -> List[Structure]:
    """Extended XYZ (also ``.gz``/``.bz2``/``.xz`` compressed). Energies and forces in
    ``energy_unit`` (and ``energy_unit``/Å), converted to eV. ``forces_key=None`` (or frames
    without forces) gives energy-only records. ``fidelity=None`` takes each frame's ``fidelity``
    info key (as `mfcalc label` writes it). ``group_key`` names the info key (e.g. ``name``) whose
    value becomes ``Structure.group``, so that splits can keep a molecule's frames together."""
    from ase.io import read

    factor = energy_to_ev(energy_unit)
    frames = read(str(path), index=index, format="extxyz")
    out = []
    for k, atoms in enumerate(frames):
        calc_results = atoms.calc.results if atoms.calc is not None else {}
        if energy_key in atoms.info:
            energy = atoms.info[energy_key]
        elif energy_key in calc_results:
            energy = calc_results[energy_key]
        else:
            raise KeyError(
                f"{path}: frame {k} has no energy under key {energy_key!r}; "
                f"info keys: {sorted(atoms.info)}, calculator keys: {sorted(calc_results)}"
            )
        forces = None
        if forces_key is not None:
            if forces_key in atoms.arrays:
                forces = atoms.arrays[forces_key]
            elif forces_key in calc_results:
                forces = calc_results[forces_key]
        level = fidelity if fidelity is not None else atoms.info.get("fidelity")
        if level is None:
            raise KeyError(f"{path}: frame {k} has no 'fidelity' info key; pass fidelity=...")
        if group_key is not None and group_key not in atoms.info:
            raise KeyError(f"{path}: frame {k} has no info key {group_key!r} to group by; "
                           f"info keys: {sorted(atoms.info)}")
        out.append(
            Structure(
                numbers=atoms.numbers.astype(np.int64),
                positions=atoms.positions.astype(np.float64),
                fidelity=str(level),
                energy=float(energy) * factor,
                forces=None if forces is None else np.asarray(forces, np.float64) * factor,
                cell=atoms.cell.array.astype(np.float64),
                pbc=atoms.pbc.copy(),
                group=None if group_key is None else str(atoms.info[group_key]),
            )
        )
    return out


def write_frames_npz(path: Union[str, Path], frames: Sequence, info_keys: Sequence[str] = ()) -> None:
    """Many labelled ASE frames (any molecules) in one compressed flat ``.npz`` that
    ``read_frames_npz`` reads: ``n_atoms`` (F,), ``numbers`` (A,), ``positions`` and ``forces``
    (A, 3, float32: 1e-6 Å / 1e-6 relative, far below any label's noise), ``energy`` (F,
    float64, eV) and one (F,) array per name in ``info_keys`` (strings or numbers). Measured on
    3000 CHNO frames: 0.84 MB, against 1.07 MB as xz-compressed extended XYZ and 5.0 MB plain,
    and it loads without parsing text. ``path`` may be an open binary file."""
    frames = list(frames)
    arrays = {
        "n_atoms": np.array([len(a) for a in frames], np.int32),
        "numbers": np.concatenate([a.numbers for a in frames]).astype(np.uint8),
        "positions": np.concatenate([a.positions for a in frames]).astype(np.float32),
        "energy": np.array([a.get_potential_energy() for a in frames], np.float64),
    }
    if all("forces" in (a.calc.results if a.calc else {}) for a in frames):
        arrays["forces"] = np.concatenate([a.get_forces() for a in frames]).astype(np.float32)
    for key in info_keys:
        values = [a.info[key] for a in frames]
        arrays[f"info_{key}"] = np.array(values, dtype=str if isinstance(values[0], str) else None)
    np.savez_compressed(path, **arrays)


def read_frames_npz(
    path: Union[str, Path], fidelity: Optional[str] = None, energy_unit: str = "eV",
    group_key: Optional[str] = None,
) -> List[Structure]:
    """A flat ``.npz`` of many molecules written by ``write_frames_npz`` (energies in
    ``energy_unit``, converted to eV). ``fidelity=None`` takes the per-frame ``info_fidelity``
    array; ``group_key`` names the per-frame ``info_<key>`` array that becomes ``Structure.group``."""
    with np.load(path) as npz:  # every array read once: NpzFile decompresses on each access
        data = {key: npz[key] for key in npz.files}
    factor = energy_to_ev(energy_unit)
    ends = np.cumsum(data["n_atoms"])
    starts = ends - data["n_atoms"]
    if fidelity is None and "info_fidelity" not in data:
        raise KeyError(f"{path}: no per-frame 'info_fidelity' array; pass fidelity=...")
    if group_key is not None and f"info_{group_key}" not in data:
        raise KeyError(f"{path}: no info key {group_key!r} to group by; info keys: "
                       f"{sorted(k[5:] for k in data if k.startswith('info_'))}")
    numbers = data["numbers"].astype(np.int64)
    positions = data["positions"].astype(np.float64)
    forces = data["forces"].astype(np.float64) * factor if "forces" in data else None
    energies = data["energy"].astype(np.float64) * factor
    fidelities = [fidelity] * len(energies) if fidelity is not None else data["info_fidelity"].tolist()
    groups = data[f"info_{group_key}"].tolist() if group_key is not None else [None] * len(energies)
    return [
        Structure(
            numbers=numbers[a:b].copy(),
            positions=positions[a:b].copy(),
            fidelity=str(fidelities[k]),
            energy=float(energies[k]),
            forces=None if forces is None else forces[a:b].copy(),
            group=None if groups[k] is None else str(groups[k]),
        )
        for k, (a, b) in enumerate(zip(starts, ends))
    ]


def read_gdml_npz(
    path: Union[str, Path], fidelity: str, energy_unit: str = "kcal/mol"
) -> List[Structure]:
    """sGDML / mbGDML ``.npz``: ``R`` (Å), ``z``, ``E`` and ``F`` in ``energy_unit``
    (kcal/mol for the published sets), converted to eV."""
    data = np.load(path, allow_pickle=True)  # mbGDML stores some metadata as objects
    factor = energy_to_ev(energy_unit)
    positions = np.asarray(data["R"], np.float64)
    numbers = np.asarray(data["z"], np.int64)
    energies = np.asarray(data["E"], np.float64).reshape(-1) * factor
    forces = np.asarray(data["F"], np.float64) * factor if "F" in data.files else None
    return [
        Structure(
            numbers=numbers.copy(),
            positions=positions[k],
            fidelity=fidelity,
            energy=float(energies[k]),
            forces=None if forces is None else forces[k],
        )
        for k in range(len(positions))
    ]


def read_rmd17_npz(
    path: Union[str, Path], fidelity: str, labels: str = "revised", energy_unit: str = "kcal/mol"
) -> List[Structure]:
    """Revised MD17 ``.npz`` (Christensen & von Lilienfeld 2020, as packaged in rmd17-npz):
    ``nuclear_charges``, ``coords`` (Å), and in ``energy_unit`` (kcal/mol, and kcal/mol/Å for
    forces) ``energies``/``forces`` (``labels="revised"``: PBE/def2-SVP, ORCA) or
    ``old_energies``/``old_forces`` (``labels="original"``: MD17's PBE+vdW-TS, FHI-aims, same
    frames), converted to eV."""
    keys = {"revised": ("energies", "forces"), "original": ("old_energies", "old_forces")}
    if labels not in keys:
        raise ValueError(f"labels must be 'revised' or 'original', got {labels!r}")
    data = np.load(path)
    factor = energy_to_ev(energy_unit)
    numbers = np.asarray(data["nuclear_charges"], np.int64)
    positions = np.asarray(data["coords"], np.float64)
    energies = np.asarray(data[keys[labels][0]], np.float64).reshape(-1) * factor
    forces = np.asarray(data[keys[labels][1]], np.float64) * factor
    return [
        Structure(numbers=numbers.copy(), positions=positions[k], fidelity=fidelity,
                  energy=float(energies[k]), forces=forces[k])
        for k in range(len(positions))
    ]


def read_ase_db(
    path: Union[str, Path], fidelity: str, energy_unit: str = "eV", selection: Optional[str] = None
) -> List[Structure]:
    """An ASE database (``ase.db``); energies/forces from each row's calculator results, in
    ``energy_unit``, converted to eV. ``selection`` is ASE's query string (e.g. "natoms<20")."""
    from ase.db import connect

    factor = energy_to_ev(energy_unit)
    out = []
    with connect(str(path)) as db:
        for row in db.select(selection):
            if row.get("energy") is None:
                raise KeyError(f"{path}: row {row.id} has no energy")
            forces = row.get("forces")
            out.append(
                Structure(
                    numbers=np.asarray(row.numbers, np.int64),
                    positions=np.asarray(row.positions, np.float64),
                    fidelity=fidelity,
                    energy=float(row.energy) * factor,
                    forces=None if forces is None else np.asarray(forces, np.float64) * factor,
                    cell=np.asarray(row.cell, np.float64),
                    pbc=np.asarray(row.pbc, bool),
                )
            )
    return out


def read_transition1x_json(
    path: Union[str, Path], fidelity: str, energy_key: str = "ccsd.energy", energy_unit: str = "eV"
) -> List[Structure]:
    """CCSD-Transition1x json (a list of records with ``positions``, ``atomic_numbers`` and
    energies under keys such as ``ccsd.energy`` or ``wB97x.energy``, eV). Energy-only: records
    whose calculation failed (``success`` false or energy null) are skipped."""
    import json

    factor = energy_to_ev(energy_unit)
    records = json.loads(Path(path).read_text())
    out = []
    for r in records:
        energy = r.get(energy_key)
        if energy is None or r.get("success") is False:
            continue
        out.append(
            Structure(
                numbers=np.asarray(r["atomic_numbers"], np.int64),
                positions=np.asarray(r["positions"], np.float64),
                fidelity=fidelity,
                energy=float(energy) * factor,
            )
        )
    if not out:
        raise ValueError(f"{path}: no record has a value under {energy_key!r}")
    return out


def split_indices(
    n: int, sizes: Sequence[int], seed: int = 0
) -> List[np.ndarray]:
    """Disjoint random index sets of the given sizes (the rest is dropped), reproducible."""
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} add up to more than the {n} records")
    order = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for size in sizes:
        out.append(np.sort(order[start : start + size]))
        start += size
    return out


def count_by_fidelity(structures: Sequence[Structure]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for s in structures:
        counts[s.fidelity] = counts.get(s.fidelity, 0) + 1
    return counts
