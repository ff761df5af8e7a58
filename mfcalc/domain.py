"""A cheap out-of-domain signal: is a structure like the data the model was trained on?

``domain_statistics(structures, cutoff)`` summarises the training structures in a few tables,
stored in a model file's metadata under ``"domain"`` (``models/tools/add_domain_stats.py`` adds them to
an exported file without touching its weights):

- ``pair_min_distance``: for every element pair that came within the cutoff in any training
  structure, the shortest distance seen (Å), keyed ``"Z1-Z2"`` with Z1 <= Z2;
- ``max_force``: per element, the largest force magnitude among training frames with forces
  (eV/Å), keyed ``"Z"``;
- ``environments``: every bonding environment seen, an atom's element and its bonded
  neighbours' (bonded: closer than ``BOND_FACTOR`` (1.3) times the sum of covalent radii), as
  ``"6:1,1,1,6"`` (a C bonded to three H and a C);
- ``elements``, ``cutoff``, ``n_structures``, ``n_with_forces``: what they were computed on.

``DomainCheck(stats).reasons(numbers, positions, ...)`` lists, in words, what makes a structure
unlike the training data (an empty list: nothing found):

1. an element pair within the cutoff that no training structure had (e.g. O-O for a model
   trained on ethanol);
2. an atom whose bonding environment no training structure had (a bonding motif the model
   never saw: the aromatic C of benzene, C bonded to two C and one H, for ethanol-mf);
3. a pair closer than ``short_fraction`` (0.9) times the shortest such pair in training;
4. a force larger than ``force_factor`` (1.5) times the largest force on that element in
   training (needs the forces: the calculator passes its own).

It costs one pair search over the structure (numpy for small molecules, the cell list above
``SMALL``) and a few array operations: ~25-40 µs for ethanol. The calculator checks every new
system and then every ``calculator.DOMAIN_CHECK_EVERY`` (100) force calls, so an MD step pays
almost nothing (``MFCalculator(check_domain=False)`` skips it). It is a signal, not a guarantee: a
structure can pass every test and still be unlike the training data (a new
conformer of known motifs), and the tests say nothing about the fidelity asked for (the tables
pool every fidelity's structures). The fidelity spread of ``MFCalculator.predict_all_fidelities``
is a complementary, F times more expensive, signal.
"""

import functools
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from ase.data import chemical_symbols, covalent_radii

DOMAIN_FORMAT = 1
SMALL = 64  # molecules up to this many atoms: all pairs in numpy; above, the cell list
BOND_FACTOR = 1.3  # bonded: closer than this times the sum of covalent radii (C-H 1.39 Å, C-C 1.98 Å)


class OutOfDomainWarning(RuntimeWarning):
    """A structure unlike the model's training data (see mfcalc.domain)."""


def pair_key(z1: int, z2: int) -> str:
    """The table key of an element pair: ``"1-8"`` for H-O (smaller number first)."""
    a, b = sorted((int(z1), int(z2)))
    return f"{a}-{b}"


def pair_name(key: str) -> str:
    """``"1-8"`` -> ``"H-O"``."""
    return "-".join(chemical_symbols[int(z)] for z in key.split("-"))


def _unpack(structure: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """numbers, positions, cell, pbc, forces (or None) of an mfcalc ``Structure`` or ASE ``Atoms``."""
    if hasattr(structure, "get_positions"):  # ase.Atoms: forces from an attached (single-point) calculator
        forces = None
        calc = structure.calc
        if calc is not None and "forces" in getattr(calc, "results", {}):
            forces = np.asarray(calc.results["forces"])
        return structure.numbers, structure.positions, structure.cell.array, structure.pbc, forces
    forces = None if structure.forces is None else np.asarray(structure.forces)
    return (np.asarray(structure.numbers), np.asarray(structure.positions), np.asarray(structure.cell),
            np.asarray(structure.pbc, dtype=bool), forces)


@functools.lru_cache(maxsize=64)
def _upper_pairs(n: int) -> Tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


def pairs_within(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair closer than ``cutoff``, both directions (and periodic images): arrays i, j,
    distance."""
    n = len(positions)
    if not np.any(pbc) and n <= SMALL:
        i, j = _upper_pairs(n)
        d = np.sqrt(((positions[j] - positions[i]) ** 2).sum(axis=1))
        keep = d < cutoff
        i, j, d = i[keep], j[keep], d[keep]
        return np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([d, d])
    import torch

    from .neighbors import neighbor_list

    pos = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.float64))
    box = torch.from_numpy(np.ascontiguousarray(cell, dtype=np.float64))
    periodic = torch.from_numpy(np.asarray(pbc, dtype=bool))
    edge_index, shifts = neighbor_list(pos, box, periodic, float(cutoff), "vesin")
    i, j = edge_index[0].numpy(), edge_index[1].numpy()
    vectors = positions[j] - positions[i] + shifts.numpy() @ cell
    return i, j, np.sqrt((vectors**2).sum(axis=1))


def environments(numbers: np.ndarray, i: np.ndarray, j: np.ndarray, d: np.ndarray) -> List[str]:
    """Each atom's bonding environment (see the module docstring), from a full pair list."""
    numbers = np.asarray(numbers, dtype=np.int64)
    bonded = d < BOND_FACTOR * (covalent_radii[numbers[i]] + covalent_radii[numbers[j]])
    present = np.unique(numbers)
    column = np.searchsorted(present, numbers)
    counts = np.zeros((len(numbers), len(present)), dtype=np.int64)
    np.add.at(counts, (i[bonded], column[j[bonded]]), 1)
    rows, inverse = np.unique(np.column_stack([numbers, counts]), axis=0, return_inverse=True)
    names = [f"{row[0]}:" + ",".join(str(z) for z, c in zip(present.tolist(), row[1:]) for _ in range(c))
             for row in rows.tolist()]
    return [names[k] for k in np.ravel(inverse)]


def environment_text(name: str) -> str:
    """``"6:1,6,6"`` -> ``"C bonded to H, C, C"``."""
    z, neighbours = name.split(":")
    symbols = [chemical_symbols[int(x)] for x in neighbours.split(",") if x]
    return f"{chemical_symbols[int(z)]} bonded to {', '.join(symbols) if symbols else 'nothing'}"


def domain_statistics(structures: Iterable[Any], cutoff: float) -> Dict[str, Any]:
    """The training-domain tables (module docstring) of ``structures`` (mfcalc ``Structure``
    records or ASE ``Atoms``), for a model with this ``cutoff`` (Å)."""
    shortest: Dict[str, float] = {}
    strongest: Dict[str, float] = {}
    seen_environments: set = set()
    elements: set = set()
    n_structures = n_forces = 0
    for structure in structures:
        numbers, positions, cell, pbc, forces = _unpack(structure)
        numbers = np.asarray(numbers, dtype=np.int64)
        n_structures += 1
        elements.update(numbers.tolist())
        i, j, d = pairs_within(np.asarray(positions, np.float64), cell, pbc, cutoff)
        seen_environments.update(environments(numbers, i, j, d))
        if len(d):
            lo, hi = np.minimum(numbers[i], numbers[j]), np.maximum(numbers[i], numbers[j])
            for a, b in set(zip(lo.tolist(), hi.tolist())):
                key = f"{a}-{b}"
                value = float(d[(lo == a) & (hi == b)].min())
                shortest[key] = min(value, shortest.get(key, np.inf))
        if forces is not None:
            n_forces += 1
            magnitude = np.sqrt((np.asarray(forces, np.float64) ** 2).sum(axis=1))
            for z in np.unique(numbers).tolist():
                strongest[str(z)] = max(float(magnitude[numbers == z].max()), strongest.get(str(z), 0.0))
    if n_structures == 0:
        raise ValueError("domain_statistics needs at least one training structure, got none")
    return {
        "format": DOMAIN_FORMAT,
        "cutoff": float(cutoff),
        "n_structures": n_structures,
        "n_with_forces": n_forces,
        "elements": sorted(elements),
        "pair_min_distance": dict(sorted(shortest.items(), key=lambda kv: tuple(map(int, kv[0].split("-"))))),
        "max_force": dict(sorted(strongest.items(), key=lambda kv: int(kv[0]))),
        "bond_factor": BOND_FACTOR,
        "environments": sorted(seen_environments),
    }


# fraction of a pair's closest training distance below which "core_pair_radius: auto" clamps it
PAIR_CLAMP_FRACTION = 0.9


def pair_clamp_from_data(structures: Iterable[Any], cutoff: float, factor: float,
                         fraction: float = PAIR_CLAMP_FRACTION) -> Dict[str, float]:
    """``core_pair_radius`` for a model trained on ``structures``: each element pair's learned
    distance clamped below ``fraction`` x the closest distance of that pair in the data (rounded
    to 0.01 Å), where that lies beyond the generic clamp, ``factor`` x (sum of covalent
    radii). A network fitted on, say, H-H pairs no closer than 1.4 Å is unconstrained below
    them (ethanol-mf v6 gave -2e6 eV for two H atoms at 0.4 Å); clamped there, the ZBL core and the
    learned value at the clamp decide. Pairs that never occur keep the generic clamp."""
    shortest = domain_statistics(structures, cutoff)["pair_min_distance"]
    return pair_clamp_from_closest(shortest, factor, fraction)


def pair_clamp_from_closest(shortest: Dict[str, float], factor: float,
                            fraction: float = PAIR_CLAMP_FRACTION) -> Dict[str, float]:
    """``pair_clamp_from_data`` from the data's closest distance per element pair ("Z1-Z2" -> Å,
    the ``pair_min_distance`` table of a model file's domain statistics)."""
    from ase.data import covalent_radii

    radii: Dict[str, float] = {}
    for key, d in shortest.items():
        a, b = (int(z) for z in key.split("-"))
        radius = round(fraction * d, 2)
        if radius > factor * (covalent_radii[a] + covalent_radii[b]):
            radii[key] = float(radius)
    return radii


class DomainCheck:
    """Evaluates a structure (and its forces) against ``domain_statistics`` tables.

    ``short_fraction``: a pair closer than this fraction of the shortest training pair of its
    elements is flagged; ``force_factor``: a force above this multiple of the largest training
    force on its element is flagged. With the defaults (0.9, 1.5) none of ethanol-mf's 300
    held-out test frames is flagged, and every benzene frame is (its aromatic C).
    """

    def __init__(self, stats: Dict[str, Any], short_fraction: float = 0.9, force_factor: float = 1.5):
        missing = [key for key in ("cutoff", "pair_min_distance", "max_force") if key not in stats]
        if missing:
            raise ValueError(f"training-domain statistics lack {missing}; make them with "
                             "mfcalc.domain.domain_statistics (models/tools/add_domain_stats.py)")
        if int(stats.get("format", 0)) > DOMAIN_FORMAT:
            raise ValueError(f"domain statistics in format {stats.get('format')}; this mfcalc reads "
                             f"format {DOMAIN_FORMAT} and older (upgrade mfcalc)")
        self.stats = stats
        self.cutoff = float(stats["cutoff"])
        self.short_fraction = float(short_fraction)
        self.force_factor = float(force_factor)
        zs = sorted({int(z) for key in stats["pair_min_distance"] for z in key.split("-")}
                    | {int(z) for z in stats.get("elements", [])} | {int(z) for z in stats["max_force"]})
        size = len(zs) + 1  # the last row: elements the tables do not have
        self._index = np.full(len(chemical_symbols), len(zs), dtype=np.int64)  # Z -> row
        self._index[zs] = np.arange(len(zs))
        self._shortest = np.full((size, size), np.nan)  # nan: pair never seen within the cutoff
        for key, value in stats["pair_min_distance"].items():
            a, b = (self._index[int(z)] for z in key.split("-"))
            self._shortest[a, b] = self._shortest[b, a] = float(value)
        self._strongest = np.full(size, np.nan)  # nan: no training forces on this element
        for z, value in stats["max_force"].items():
            self._strongest[self._index[int(z)]] = float(value)
        radii = np.array([covalent_radii[z] for z in zs] + [0.0])
        self.bond_factor = float(stats.get("bond_factor", BOND_FACTOR))
        self._bond = self.bond_factor * (radii[:, None] + radii[None, :])
        self._environments = None  # statistics written without environments skip that test
        if "environments" in stats:
            self._environments = {self._parse_environment(name) for name in stats["environments"]}

    def _species(self, numbers: np.ndarray) -> np.ndarray:
        """Table rows of atomic numbers (anything not in the tables, or not an element, -> last)."""
        return np.take(self._index, numbers, mode="clip")  # 0 ('X') and 118 (Og) are unknown rows too

    def _parse_environment(self, name: str) -> bytes:
        """``"6:1,1,1,6"`` -> the key ``_environment_rows`` gives such an atom."""
        z, neighbours = name.split(":")
        row = np.zeros(len(self._strongest) + 1, dtype=np.int16)
        row[0] = self._index[int(z)]
        for x in filter(None, neighbours.split(",")):
            row[1 + self._index[int(x)]] += 1
        return row.tobytes()

    def reasons(
        self, numbers: Sequence[int], positions: np.ndarray, cell: Optional[np.ndarray] = None,
        pbc: Optional[np.ndarray] = None, forces: Optional[np.ndarray] = None,
    ) -> List[str]:
        """What makes this structure unlike the training data, one sentence each (at most one
        per test and element pair or element); an empty list when nothing is found."""
        numbers = np.asarray(numbers, dtype=np.int64)
        cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64)
        pbc = np.zeros(3, bool) if pbc is None else np.asarray(pbc, bool)
        i, j, d = pairs_within(np.asarray(positions, np.float64), cell, pbc, self.cutoff)
        species = self._species(numbers)
        out = self._pair_reasons(numbers, species, i, j, d)
        if self._environments is not None:
            out += self._environment_reasons(numbers, species, i, j, d)
        if forces is not None:
            out += self._force_reasons(numbers, species, np.asarray(forces, np.float64))
        return out

    def _pair_reasons(self, numbers, species, i, j, d) -> List[str]:
        limit = self._shortest[species[i], species[j]]
        unseen = np.isnan(limit)
        short = d < self.short_fraction * limit  # False where limit is nan
        out = []
        if unseen.any():
            for k in _first_per_pair(numbers, i, j, unseen):
                out.append(f"element pair {_pair_text(numbers, i[k], j[k])} is within the {self.cutoff:g} Å cutoff "
                           f"({d[k]:.2f} Å, atoms {i[k]} and {j[k]}): no training structure had this pair")
        if short.any():
            for k in _first_per_pair(numbers, i, j, short, by=d):
                out.append(f"{_pair_text(numbers, i[k], j[k])} distance {d[k]:.3f} Å (atoms {i[k]} and {j[k]}) is "
                           f"below {self.short_fraction:g} x the shortest in training ({limit[k]:.3f} Å)")
        return out

    def _environment_reasons(self, numbers, species, i, j, d) -> List[str]:
        n, width = len(numbers), len(self._strongest)
        bonded = d < self._bond[species[i], species[j]]
        counts = np.bincount(i[bonded] * width + species[j[bonded]], minlength=n * width).reshape(n, width)
        rows = np.column_stack([species, counts]).astype(np.int16)
        out, reported = [], set()
        for atom, row in enumerate(rows):
            key = row.tobytes()
            if key not in self._environments and key not in reported:
                reported.add(key)
                neighbours = np.sort(numbers[j[bonded & (i == atom)]])
                name = f"{numbers[atom]}:" + ",".join(map(str, neighbours.tolist()))
                out.append(f"atom {atom} ({environment_text(name)}, within {self.bond_factor:g} x covalent "
                           "radii): a bonding environment no training structure had")
        return out

    def _force_reasons(self, numbers, species, forces) -> List[str]:
        magnitude = np.sqrt((forces**2).sum(axis=1))
        limit = self._strongest[species]
        strong = magnitude > self.force_factor * limit  # False where limit is nan
        out = []
        if strong.any():
            for z in np.unique(numbers[strong]).tolist():
                members = np.where(strong & (numbers == z))[0]
                k = members[np.argmax(magnitude[members])]
                out.append(f"force {magnitude[k]:.2f} eV/Å on atom {k} ({chemical_symbols[z]}) is above "
                           f"{self.force_factor:g} x the largest {chemical_symbols[z]} force in training "
                           f"({limit[k]:.2f} eV/Å)")
        return out


def _pair_text(numbers: np.ndarray, i: int, j: int) -> str:
    return pair_name(pair_key(numbers[i], numbers[j]))


def _first_per_pair(numbers: np.ndarray, i: np.ndarray, j: np.ndarray, flagged: np.ndarray,
                    by: Optional[np.ndarray] = None) -> List[int]:
    """Indices of the flagged pairs, one per element pair (the one with the smallest ``by``)."""
    chosen: Dict[str, int] = {}
    for k in np.where(flagged)[0].tolist():
        key = pair_key(numbers[i[k]], numbers[j[k]])
        if key not in chosen or (by is not None and by[k] < by[chosen[key]]):
            chosen[key] = k
    return list(chosen.values())
