"""Configurations of the CHNO molecules (molecules.csv) with GFN2-xTB energies and forces.

Per molecule, reproducibly (all random streams are seeded from --seed and the molecule's name, so
a molecule's frames do not depend on which other molecules are run, in what order, or by how many
workers):

1. SMILES -> 3D: RDKit ETKDGv3 embeds ``--conformers`` conformers, MMFF94 (UFF where MMFF lacks
   parameters) optimises them, the lowest is kept.
2. GFN2-xTB relaxation (tblite's ASE calculator, one thread) to ``--fmax``; the bonding must still
   be that of the SMILES (else the molecule fails and is reported). A finite-difference Hessian
   (central differences, translations and rotations projected out) checks it is a minimum: if a
   mode is imaginary beyond 50i cm^-1 (a saddle, e.g. an eclipsed methyl), the structure is pushed
   0.1 Å along it and relaxed again (at most 3 times; ``saddle_escapes``, ``lowest_wavenumber``).
3. Sampling, the relaxed minimum being frame 0:
   a. Langevin MD with GFN2-xTB at each of ``--temperatures`` (0.5 fs steps, friction 0.01/fs,
      fixed centre of mass): ``--equilibration`` steps, then one frame every ``--stride`` steps.
      A frame whose bonding differs from the SMILES (a bond stretched past 1.6x the sum of
      covalent radii, or two unbonded atoms closer than 1.0x) is dropped, and the run restarts from
      the minimum with new velocities (``md_segment`` counts restarts).
   b. Normal-mode sampling: displacements along the normal modes of that Hessian, drawn from
      the harmonic oscillators' thermal distribution at each temperature. By default the
      *quantum* one, <Q_i^2> = (hbar w_i / 2) coth(hbar w_i / 2kT) / w_i^2, which includes the
      zero-point spread that classical MD at 300 K misses (an O-H stretch's zero-point motion
      equals classical motion at ~2600 K); ``--nm-statistics classical`` gives kT / w_i^2.
      Modes softer than ``--nm-soft-cutoff`` (300 cm^-1: torsions, ring puckering,
      large-amplitude bends) are not displaced: straight-line steps along them stretch bonds
      (a methyl torsion displaced this way at 1000 K cost cis-2-butene 4 eV instead of the
      harmonic 1.8 eV), and MD samples them properly. With them left out the mean xTB energy of
      the draws matches their mean harmonic energy (nm_harmonic_energy) within ~5% (tested on
      cis-2-butene, L-alanine, nonane at 300 and 1000 K). A draw that breaks or makes
      a bond is redrawn (every tenth failed draw shrinks all amplitudes by 0.8: ``nm_scale``).
   Of the ``--frames`` per molecule, one is the minimum, ``--md-fraction`` of the rest come from MD
   and the others from normal modes, both split evenly over the temperatures.
4. Every frame carries GFN2-xTB energy and forces (eV, eV/Å) and ``info`` keys: name, smiles,
   family, sampling (minimum | md | normal_mode), temperature_K, seed (of the random stream that
   made it), frame, md_step/md_segment or nm_statistics/nm_scale/nm_harmonic_energy, fidelity
   and method "GFN2-xTB", program, charge, spin, tblite_version, rdkit_version, ase_version and
   protocol (a hash of all settings; ``protocol-<hash>.json`` in the output folder holds them).

Output: ``OUT/<name>.extxyz``, written to a temporary file and renamed when the molecule is done,
so a file that exists is complete. A re-run skips molecules whose file exists with the same
protocol; one made with other settings is reported and kept unless ``--overwrite``.

    python data/chno/make_structures.py --dry-run                   # plan and estimated CPU time
    python data/chno/make_structures.py --budget --names water,ethanol  # measure xTB cost first
    python data/chno/make_structures.py --workers 2                 # everything, 2 processes
    python data/chno/make_structures.py --names methanol,water --frames 3 --equilibration 10 \\
        --stride 5 --out /tmp/chno-test
    # one file for labelling; picks are nested (--pick 5 lies inside --pick 15):
    python data/chno/make_structures.py --combine pbe_set.extxyz --pick 15
    mfcalc label pbe_set.extxyz --method PBE/def2-SVP --forces --out pbe_def2svp.extxyz

Every process uses ``--threads`` OpenMP/BLAS threads (default: $OMP_NUM_THREADS, else 1).
"""

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import catalog  # noqa: E402  (numpy-free at import time, like this module)

STAGE_EMBED, STAGE_MD, STAGE_NM, STAGE_PICK = 0, 1, 2, 3


@dataclass(frozen=True)
class Protocol:
    """Every setting that changes the frames; its hash is stored with each frame."""

    method: str = "GFN2-xTB"
    accuracy: float = 1.0
    electronic_temperature: float = 300.0
    conformers: int = 10
    fmax: float = 0.002  # eV/Å, xTB relaxation
    relax_steps: int = 2000
    frames: int = 100  # per molecule, including the minimum (the committed set; 200 was the first plan)
    md_fraction: float = 0.5
    temperatures: Tuple[float, ...] = (300.0, 600.0, 1000.0)
    timestep: float = 0.5  # fs
    friction: float = 0.01  # 1/fs
    equilibration: int = 400  # steps before the first frame, and after every restart
    stride: int = 100  # steps between frames (50 fs)
    max_restarts: int = 20  # per temperature
    nm_statistics: str = "quantum"
    nm_soft_cutoff: float = 300.0  # cm^-1: softer modes are left to MD
    hessian_delta: float = 0.005  # Å
    imaginary_tolerance: float = 50.0  # cm^-1: a stronger imaginary mode at the minimum is escaped
    nm_max_tries: int = 200
    break_mult: float = 1.6
    form_mult: float = 1.0
    seed: int = 2026

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return f"{zlib.crc32(text.encode()):08x}"

    def split(self) -> Tuple[List[int], List[int]]:
        """Frames per temperature from MD and from normal modes."""
        rest = max(self.frames - 1, 0)
        n_md = int(round(rest * self.md_fraction))
        n_nm = rest - n_md
        nt = len(self.temperatures)
        md = [n_md // nt + (k < n_md % nt) for k in range(nt)]
        nm = [n_nm // nt + (k < n_nm % nt) for k in range(nt)]
        return md, nm


def estimate_calls(protocol: Protocol, n_atoms: int) -> Dict[str, int]:
    """xTB energy+force calls for one molecule (no restarts; relaxation a rough guess)."""
    md, nm = protocol.split()
    calls = {
        "relax": min(protocol.relax_steps, 20 + 3 * n_atoms),
        "hessian": 6 * n_atoms,
        "md": sum(protocol.equilibration + 1 + count * protocol.stride for count in md if count),
        "normal_modes": sum(nm),
    }
    calls["total"] = sum(calls.values())
    return calls


def stream_seed(base: int, name: str, *tags: int) -> int:
    import numpy as np

    seq = np.random.SeedSequence([int(base), zlib.crc32(name.encode()), *(int(t) for t in tags)])
    return int(seq.generate_state(1, dtype=np.uint32)[0])


def versions() -> Dict[str, str]:
    from importlib.metadata import version

    import ase
    import rdkit

    return {"tblite_version": version("tblite"), "rdkit_version": rdkit.__version__,
            "ase_version": ase.__version__}


# ------------------------------------------------------------------ structure helpers

def embed(smiles: str, seed: int, conformers: int):
    """(numbers, positions Å, bonds as index pairs, force field used) of the lowest conformer."""
    import numpy as np
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed & 0x7FFFFFFF
    cids = list(AllChem.EmbedMultipleConfs(mol, numConfs=conformers, params=params))
    if not cids:
        params.useRandomCoords = True
        cids = list(AllChem.EmbedMultipleConfs(mol, numConfs=conformers, params=params))
    if not cids:
        raise RuntimeError(f"RDKit could not embed {smiles!r}")
    ff = "none"
    energies = [0.0] * len(cids)
    try:
        if AllChem.MMFFHasAllMoleculeParams(mol):
            result = AllChem.MMFFOptimizeMoleculeConfs(mol, maxIters=2000)
            ff = "MMFF94"
        elif AllChem.UFFHasAllMoleculeParams(mol):
            result = AllChem.UFFOptimizeMoleculeConfs(mol, maxIters=2000)
            ff = "UFF"
        else:
            result = None
        if result is not None:
            energies = [e for _, e in result]
    except Exception:  # noqa: BLE001 - tiny molecules (H2, CO) can lack force-field terms
        ff = "none"
    best = cids[int(np.argmin(energies))]
    positions = mol.GetConformer(best).GetPositions()
    numbers = [a.GetAtomicNum() for a in mol.GetAtoms()]
    bonds = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]
    return np.array(numbers), positions, bonds, ff


def bonding_problem(atoms, bonds, break_mult: float, form_mult: float) -> Optional[str]:
    """None if the geometry still has the SMILES' bonds (and no others), else what changed."""
    import numpy as np
    from ase.data import covalent_radii

    d = atoms.get_all_distances()
    r = covalent_radii[atoms.numbers]
    limit = r[:, None] + r[None, :]
    bonded = np.zeros_like(d, dtype=bool)
    for i, j in bonds:
        bonded[i, j] = bonded[j, i] = True
        if d[i, j] > break_mult * limit[i, j]:
            return f"bond {atoms[i].symbol}{i}-{atoms[j].symbol}{j} stretched to {d[i, j]:.2f} Å"
    close = (~bonded) & (d < form_mult * limit)
    np.fill_diagonal(close, False)
    if close.any():
        i, j = np.argwhere(close)[0]
        return f"unbonded {atoms[i].symbol}{i}...{atoms[j].symbol}{j} at {d[i, j]:.2f} Å"
    return None


def make_calculator(protocol: Protocol):
    """tblite's ASE calculator, counting its calls and their time."""
    from tblite.ase import TBLite

    class Counted(TBLite):
        calls = 0
        seconds = 0.0

        def calculate(self, *args, **kwargs):
            start = time.perf_counter()
            super().calculate(*args, **kwargs)
            self.calls += 1
            self.seconds += time.perf_counter() - start

    return Counted(method=protocol.method, accuracy=protocol.accuracy, charge=0, multiplicity=1,
                   electronic_temperature=protocol.electronic_temperature, verbosity=0)


def thermalize(atoms, temperature: float, rng) -> None:
    """Maxwell-Boltzmann momenta, zero total momentum and angular momentum."""
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.28
        vd.thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    vd.Stationary(atoms)
    if len(atoms) > 1:
        vd.ZeroRotation(atoms)


def langevin(atoms, protocol: Protocol, temperature: float, rng):
    """ASE Langevin with the centre of mass held by a FixCom constraint (as mfcalc.workflows)."""
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    atoms.set_constraint(FixCom())
    return Langevin(atoms, protocol.timestep * units.fs, temperature_K=temperature,
                    friction=protocol.friction / units.fs, fixcm=False, rng=rng)


def snapshot(atoms, **info):
    """A constraint-free copy with the current energy and (unconstrained) forces."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    energy = atoms.get_potential_energy()
    forces = atoms.get_forces(apply_constraint=False)
    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions.copy())
    frame.info.update(info)
    frame.calc = SinglePointCalculator(frame, energy=float(energy), forces=forces.copy())
    return frame


def hessian(atoms, delta: float):
    """Central-difference Hessian (eV/Å^2), symmetrised."""
    import numpy as np

    x0 = atoms.positions.copy()
    n = len(atoms)
    h = np.zeros((3 * n, 3 * n))
    for i in range(n):
        for c in range(3):
            grads = []
            for sign in (1.0, -1.0):
                x = x0.copy()
                x[i, c] += sign * delta
                atoms.set_positions(x)
                grads.append(-atoms.get_forces(apply_constraint=False).ravel())
            h[3 * i + c] = (grads[0] - grads[1]) / (2 * delta)
    atoms.set_positions(x0)
    return 0.5 * (h + h.T)


HBAR_OMEGA_EV = None  # set on first use: hbar * (ASE angular frequency unit) in eV
EV_PER_WAVENUMBER = 1.239841984e-4  # h c in eV cm


def normal_modes(atoms, h):
    """Vibrational eigenvalues lambda = omega^2 (eV / (Å^2 amu)) and Cartesian-space mass-weighted
    eigenvectors (3N x N_vib), translations and rotations projected out."""
    import numpy as np

    m = atoms.get_masses()
    sq = np.repeat(np.sqrt(m), 3)
    hmw = h / np.outer(sq, sq)
    r = atoms.positions - atoms.get_center_of_mass()
    ext = []
    for a in range(3):
        v = np.zeros((len(atoms), 3))
        v[:, a] = np.sqrt(m)
        ext.append(v.ravel())
    for a in range(3):
        e = np.zeros(3)
        e[a] = 1.0
        ext.append((np.cross(e, r) * np.sqrt(m)[:, None]).ravel())
    u, s, _ = np.linalg.svd(np.array(ext).T, full_matrices=True)
    rank = int((s > 1e-6 * s.max()).sum())
    basis = u[:, rank:]
    lam, vec = np.linalg.eigh(basis.T @ hmw @ basis)
    return lam, basis @ vec


def hbar_omega_ev(lam):
    """hbar * omega in eV for lambda = omega^2 in eV / (Å^2 amu)."""
    import numpy as np
    from ase import units

    # ASE's time unit is Å sqrt(amu / eV); hbar in eV times that unit:
    hbar = units._hbar / units._e * 1e15 * units.fs
    return hbar * np.sqrt(np.abs(lam))


def mode_variances(lam, temperature: float, statistics: str, soft_cutoff: float):
    """<Q_i^2> (Å^2 amu) of the harmonic oscillators at ``temperature``; 0 for modes softer than
    ``soft_cutoff`` cm^-1 (and for imaginary ones)."""
    import numpy as np
    from ase import units

    hw = hbar_omega_ev(lam)
    stiff = (lam > 0) & (hw >= soft_cutoff * EV_PER_WAVENUMBER)
    lam_s, hw_s = np.where(stiff, lam, 1.0), np.where(stiff, hw, 1.0)
    kt = units.kB * temperature
    if statistics == "classical":
        var = kt / lam_s
    elif statistics == "quantum":
        var = (hw_s / 2) / np.tanh(hw_s / (2 * kt)) / lam_s
    else:
        raise ValueError(f"nm_statistics must be quantum or classical, got {statistics!r}")
    return np.where(stiff, var, 0.0)


#: per-frame info kept in the flat .npz (the sampling settings themselves are in protocol-*.json)
NPZ_INFO_KEYS = ("name", "smiles", "family", "sampling", "temperature_K", "frame", "fidelity", "protocol")


def write_atomically(path: Path, frames) -> None:
    """extxyz (or, for a ``.npz`` path, mfcalc's flat frames-npz with ``NPZ_INFO_KEYS``) written to a
    temporary file in the same folder, flushed, then renamed onto ``path``: ``path`` either does
    not exist or holds every frame."""
    from ase.io import write

    path = Path(path)
    npz = path.suffix == ".npz"
    handle = tempfile.NamedTemporaryFile("wb" if npz else "w", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            if npz:
                from mfcalc.data import write_frames_npz

                write_frames_npz(handle, frames, info_keys=NPZ_INFO_KEYS)
            else:
                write(handle, frames, format="extxyz")
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ one molecule

def run_molecule(row: Dict[str, str], protocol: Protocol, out_dir: str) -> Dict[str, object]:
    """Make and write ``out_dir/<name>.extxyz``; returns statistics (raises on failure)."""
    import numpy as np
    from ase import Atoms
    from ase.optimize import BFGS

    start = time.perf_counter()
    name, smiles, family = row["name"], row["smiles"], row["family"]
    digest = protocol.digest()
    common = dict(name=name, smiles=smiles, family=family, fidelity=protocol.method,
                  method=protocol.method, charge=0, spin=0, protocol=digest, **versions())
    common["program"] = f"tblite {common['tblite_version']}"

    seed = stream_seed(protocol.seed, name, STAGE_EMBED)
    numbers, positions, bonds, ff = embed(smiles, seed, protocol.conformers)
    atoms = Atoms(numbers=numbers, positions=positions)
    calc = make_calculator(protocol)
    atoms.calc = calc
    relax_steps, escapes, hessian_calls = 0, 0, 0
    while True:
        opt = BFGS(atoms, logfile=None, maxstep=0.1)
        if not opt.run(fmax=protocol.fmax, steps=protocol.relax_steps):
            raise RuntimeError(f"{name}: xTB relaxation not converged in {protocol.relax_steps} steps")
        relax_steps += opt.nsteps
        problem = bonding_problem(atoms, bonds, protocol.break_mult, protocol.form_mult)
        if problem:
            raise RuntimeError(f"{name}: xTB relaxation changed the bonding of {smiles}: {problem}")
        before = calc.calls
        lam, modes = normal_modes(atoms, hessian(atoms, protocol.hessian_delta))
        hessian_calls += calc.calls - before
        lowest = float(np.sign(lam[0]) * hbar_omega_ev(lam[0]) / EV_PER_WAVENUMBER) if len(lam) else 0.0
        if lowest > -protocol.imaginary_tolerance or escapes >= 3:
            break
        # a saddle point (e.g. an eclipsed methyl): step down the imaginary mode, relax again
        escapes += 1
        step = (modes[:, 0] / np.sqrt(np.repeat(atoms.get_masses(), 3))).reshape(-1, 3)
        atoms.set_positions(atoms.positions + 0.1 * step / np.abs(step).max())
    relax_calls = calc.calls - hessian_calls
    minimum = atoms.copy()
    masses = np.repeat(minimum.get_masses(), 3)
    frames = [snapshot(atoms, sampling="minimum", temperature_K=0.0, seed=seed, force_field=ff,
                       relax_steps=relax_steps, saddle_escapes=escapes, lowest_wavenumber=round(lowest, 1),
                       **common)]

    md_counts, nm_counts = protocol.split()
    restarts = 0
    for temperature, count in zip(protocol.temperatures, md_counts):
        if not count:
            continue
        seed = stream_seed(protocol.seed, name, STAGE_MD, round(temperature))
        rng = np.random.default_rng(seed)
        taken, segment = [], 0
        while len(taken) < count:
            if segment > protocol.max_restarts:
                raise RuntimeError(f"{name}: MD at {temperature:g} K changed the bonding "
                                   f"{segment} times; last: {problem}")
            md_atoms = minimum.copy()
            md_atoms.calc = calc
            thermalize(md_atoms, temperature, rng)
            dyn = langevin(md_atoms, protocol, temperature, rng)
            try:
                dyn.run(protocol.equilibration)
                while len(taken) < count:
                    dyn.run(protocol.stride)
                    problem = bonding_problem(md_atoms, bonds, protocol.break_mult, protocol.form_mult)
                    if problem:
                        break
                    taken.append(snapshot(md_atoms, sampling="md", temperature_K=float(temperature),
                                          seed=seed, md_step=int(dyn.nsteps), md_segment=segment,
                                          **common))
            except Exception as err:  # noqa: BLE001 - e.g. an SCF failure far from equilibrium
                problem = f"{type(err).__name__}: {err}"
            if len(taken) < count:
                segment += 1
                restarts += 1
        frames.extend(taken)

    if sum(nm_counts):
        for temperature, count in zip(protocol.temperatures, nm_counts):
            if not count:
                continue
            seed = stream_seed(protocol.seed, name, STAGE_NM, round(temperature))
            rng = np.random.default_rng(seed)
            sigma = np.sqrt(mode_variances(lam, temperature, protocol.nm_statistics,
                                           protocol.nm_soft_cutoff))
            taken, tries, scale = 0, 0, 1.0
            while taken < count:
                q = rng.standard_normal(len(sigma)) * sigma * scale
                trial = Atoms(numbers=minimum.numbers,
                              positions=minimum.positions + ((modes @ q) / np.sqrt(masses)).reshape(-1, 3))
                if bonding_problem(trial, bonds, protocol.break_mult, protocol.form_mult):
                    tries += 1
                    if tries > protocol.nm_max_tries:
                        raise RuntimeError(f"{name}: {tries} normal-mode draws at {temperature:g} K "
                                           "changed the bonding")
                    if tries % 10 == 0:
                        scale *= 0.8
                    continue
                trial.calc = calc
                frames.append(snapshot(
                    trial, sampling="normal_mode", temperature_K=float(temperature), seed=seed,
                    nm_statistics=protocol.nm_statistics, nm_scale=round(scale, 6),
                    nm_harmonic_energy=float(0.5 * np.sum(np.abs(lam) * q**2)), **common))
                taken += 1

    for k, frame in enumerate(frames):
        frame.info["frame"] = k
    out = Path(out_dir) / f"{name}.extxyz"
    write_atomically(out, frames)
    freqs = hbar_omega_ev(lam) / EV_PER_WAVENUMBER * np.sign(lam) if len(lam) else np.zeros(1)
    return {
        "name": name, "atoms": len(minimum), "frames": len(frames), "xtb_calls": calc.calls,
        "relax_calls": relax_calls, "hessian_calls": hessian_calls, "md_restarts": restarts,
        "saddle_escapes": escapes,
        "xtb_seconds": calc.seconds, "seconds": time.perf_counter() - start,
        "lowest_wavenumber": float(freqs.min()), "highest_wavenumber": float(freqs.max()),
    }


def _job(args):
    row, protocol, out_dir = args
    try:
        return row["name"], run_molecule(row, protocol, out_dir), None
    except Exception as err:  # noqa: BLE001 - reported, the other molecules go on
        return row["name"], None, f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------ selection, status, budget

def select(rows, names=None, span=None, families=None, max_heavy=None, min_heavy=None):
    chosen = list(enumerate(rows))
    if span:
        lo, _, hi = span.partition(":")
        keep = set(range(len(rows))[slice(int(lo) if lo else None, int(hi) if hi else None)]) \
            if ":" in span else {int(span)}
        chosen = [(k, r) for k, r in chosen if k in keep]
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = set(wanted) - {r["name"] for r in rows}
        if unknown:
            raise SystemExit(f"not in the molecule list: {', '.join(sorted(unknown))}")
        chosen = [(k, r) for k, r in chosen if r["name"] in wanted]
    if families:
        fams = {f.strip() for f in families.split(",")}
        chosen = [(k, r) for k, r in chosen if r["family"] in fams]
    if max_heavy is not None:
        chosen = [(k, r) for k, r in chosen if catalog.n_heavy(r["smiles"]) <= max_heavy]
    if min_heavy is not None:
        chosen = [(k, r) for k, r in chosen if catalog.n_heavy(r["smiles"]) >= min_heavy]
    return [r for _, r in chosen]


def status(row, out_dir: Path, digest: str) -> str:
    """'todo', 'done' or 'other-protocol:<hash>'."""
    path = out_dir / f"{row['name']}.extxyz"
    if not path.exists():
        return "todo"
    from ase.io import read

    found = read(str(path), index=0, format="extxyz").info.get("protocol")
    return "done" if found == digest else f"other-protocol:{found}"


def measure_xtb(row, protocol: Protocol, calls: int = 3) -> float:
    """Median seconds of one xTB energy+forces call near the MMFF geometry (one warm-up call)."""
    import numpy as np
    from ase import Atoms

    numbers, positions, _, _ = embed(row["smiles"], 1, 1)
    atoms = Atoms(numbers=numbers, positions=positions)
    atoms.calc = make_calculator(protocol)
    rng = np.random.default_rng(0)
    times = []
    for k in range(calls + 1):
        atoms.set_positions(positions + rng.normal(0, 0.01, positions.shape))
        start = time.perf_counter()
        atoms.get_potential_energy()
        atoms.get_forces()
        if k:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def print_plan(rows, protocol: Protocol, out_dir: Path, measure: bool) -> None:
    digest = protocol.digest()
    total_calls = total_seconds = frames = 0
    todo = 0
    print(f"{'molecule':<28} {'atoms':>5} {'status':>10} {'xTB calls':>9} {'ms/call':>8} {'CPU s':>7}"
          f"{'  (measured)' if measure else '  (ms/call from the fit in catalog.py)'}")
    for row in rows:
        n_atoms = sum(catalog.composition(row["smiles"]).values())
        state = status(row, out_dir, digest)
        per_call = measure_xtb(row, protocol) if measure else catalog.xtb_seconds(n_atoms)
        calls = estimate_calls(protocol, n_atoms)["total"]
        print(f"{row['name']:<28} {n_atoms:>5} {state:>10} {calls:>9} {1000 * per_call:>8.2f} "
              f"{calls * per_call:>7.1f}")
        if state == "todo":
            todo += 1
            total_calls += calls
            total_seconds += calls * per_call
            frames += protocol.frames
    md, nm = protocol.split()
    print(f"\n{len(rows)} molecules selected, {todo} to do: {frames} frames "
          f"(per molecule: 1 minimum, MD {md}, normal modes {nm} at {list(protocol.temperatures)} K), "
          f"{total_calls} xTB calls, about {total_seconds / 3600:.2f} CPU-hours on one thread "
          "(restarts not counted)")


def stratum_order(strata) -> list:
    """Minimum first, then MD and normal-mode strata alternating, the normal-mode temperatures
    rotated by one (300, 600, 1000 K: min, md 300, nm 1000, md 600, nm 300, md 1000, nm 600), so
    that a few picks already span methods and temperatures."""
    md = sorted(k for k in strata if k[0] == "md")
    nm = sorted(k for k in strata if k[0] == "normal_mode")
    nm = nm[-1:] + nm[:-1]
    order = [k for k in strata if k[0] == "minimum"]
    for pair in zip(md, nm):
        order.extend(pair)
    order += md[len(nm):] + nm[len(md):]
    return order + sorted(k for k in strata if k not in order)


def combine(rows, out_dir: Path, target: Path, pick: Optional[int], seed: int, rounds: bool = False) -> None:
    """Concatenate the molecules' frames (CSV order) into ``target``; with ``pick``, K frames per
    molecule taken round-robin over the (sampling, temperature) strata in ``stratum_order``,
    randomly (seeded) within a stratum, so the picks for K lie inside those for any larger K.
    ``rounds``: write the first pick of every molecule, then the second of every molecule, ...,
    smallest molecules (fewest atoms) first within a round (same frames, other order), so a
    labelling run cut off part-way has covered the most molecules for its CPU time."""
    import numpy as np
    from ase.io import read

    missing = [r["name"] for r in rows if not (out_dir / f"{r['name']}.extxyz").exists()]
    if missing:
        raise SystemExit(f"{len(missing)} molecules have no frames yet: {', '.join(missing[:10])} ...")
    per_molecule = []
    for row in rows:
        frames = read(str(out_dir / f"{row['name']}.extxyz"), index=":", format="extxyz")
        if pick is not None:
            rng = np.random.default_rng(stream_seed(seed, row["name"], STAGE_PICK))
            strata = {}
            for k, f in enumerate(frames):
                strata.setdefault((f.info["sampling"], f.info["temperature_K"]), []).append(k)
            queues = [list(rng.permutation(strata[key])) for key in stratum_order(strata)]
            order = []
            while any(queues):
                for q in queues:
                    if q:
                        order.append(int(q.pop(0)))
            frames = [frames[k] for k in order[:pick]]
        per_molecule.append(frames)
    if rounds:
        depth = max((len(f) for f in per_molecule), default=0)
        by_size = sorted(per_molecule, key=lambda f: len(f[0]) if f else 0)  # stable: CSV order within a size
        out = [f[k] for k in range(depth) for f in by_size if k < len(f)]
    else:
        out = [frame for frames in per_molecule for frame in frames]
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, out)
    print(f"wrote {len(out)} frames of {len(rows)} molecules to {target}")


# ------------------------------------------------------------------ command line

def parse_args(argv=None):
    d = Protocol()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sel = p.add_argument_group("which molecules (all selectors combine)")
    sel.add_argument("--csv", default=str(catalog.CSV))
    sel.add_argument("--names", help="comma-separated names from the CSV")
    sel.add_argument("--range", dest="span", help="rows START:END of the CSV (0-based, end excluded), or one row")
    sel.add_argument("--families", help="comma-separated families")
    sel.add_argument("--max-heavy", type=int, help="at most this many heavy atoms")
    sel.add_argument("--min-heavy", type=int, help="at least this many heavy atoms")
    smp = p.add_argument_group("sampling")
    smp.add_argument("--frames", type=int, default=d.frames, help="frames per molecule, the minimum included")
    smp.add_argument("--md-fraction", type=float, default=d.md_fraction,
                     help="share of the non-minimum frames from MD (the rest: normal modes)")
    smp.add_argument("--temperatures", default=",".join(f"{t:g}" for t in d.temperatures), help="K, comma-separated")
    smp.add_argument("--equilibration", type=int, default=d.equilibration, help="MD steps before the first frame")
    smp.add_argument("--stride", type=int, default=d.stride, help="MD steps between frames")
    smp.add_argument("--timestep", type=float, default=d.timestep, help="fs")
    smp.add_argument("--friction", type=float, default=d.friction, help="1/fs")
    smp.add_argument("--nm-statistics", choices=("quantum", "classical"), default=d.nm_statistics)
    smp.add_argument("--nm-soft-cutoff", type=float, default=d.nm_soft_cutoff,
                     help="cm^-1: modes softer than this are not displaced (left to MD)")
    smp.add_argument("--conformers", type=int, default=d.conformers, help="ETKDG conformers, lowest MMFF kept")
    smp.add_argument("--fmax", type=float, default=d.fmax, help="eV/Å for the xTB relaxation")
    smp.add_argument("--seed", type=int, default=d.seed)
    run = p.add_argument_group("running")
    run.add_argument("--out", default=str(HERE / "structures"), help="output folder")
    run.add_argument("--workers", type=int, default=1, help="molecules in parallel (processes)")
    run.add_argument("--threads", type=int, help="OpenMP/BLAS threads per process (default $OMP_NUM_THREADS or 1)")
    run.add_argument("--overwrite", action="store_true", help="remake files made with other settings")
    run.add_argument("--dry-run", action="store_true", help="print the plan and estimated CPU time, run nothing")
    run.add_argument("--budget", action="store_true",
                     help="like --dry-run, but measure the xTB cost of each selected molecule (a few calls)")
    run.add_argument("--combine", metavar="FILE", help="concatenate the selected molecules' frames into FILE")
    run.add_argument("--pick", type=int, help="with --combine: this many frames per molecule (nested in K)")
    run.add_argument("--rounds", action="store_true",
                     help="with --combine: first pick of every molecule, then the second, ... (for labelling "
                          "runs that may stop part-way)")
    args = p.parse_args(argv)
    args.protocol = Protocol(
        frames=args.frames, md_fraction=args.md_fraction,
        temperatures=tuple(float(t) for t in args.temperatures.split(",") if t.strip()),
        equilibration=args.equilibration, stride=args.stride, timestep=args.timestep, friction=args.friction,
        nm_statistics=args.nm_statistics, nm_soft_cutoff=args.nm_soft_cutoff,
        conformers=args.conformers, fmax=args.fmax, seed=args.seed,
    )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # before numpy/tblite load; inherited by the workers

    rows = catalog.load(Path(args.csv))
    problems = catalog.check(rows)
    if problems:
        raise SystemExit("molecules.csv has problems (run catalog.py):\n" + "\n".join(problems))
    rows = select(rows, args.names, args.span, args.families, args.max_heavy, args.min_heavy)
    out_dir = Path(args.out)
    protocol = args.protocol
    if args.combine:
        combine(rows, out_dir, Path(args.combine), args.pick, protocol.seed, args.rounds)
        return 0
    if args.dry_run or args.budget:
        print_plan(rows, protocol, out_dir, measure=args.budget)
        return 0

    digest = protocol.digest()
    todo = []
    for row in rows:
        state = status(row, out_dir, digest)
        if state == "done":
            continue
        if state != "todo" and not args.overwrite:
            print(f"skip {row['name']}: its file was made with protocol {state.split(':')[1]} "
                  f"(now {digest}); --overwrite remakes it")
            continue
        todo.append(row)
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
        settings = out_dir / f"protocol-{digest}.json"
        if not settings.exists():
            settings.write_text(json.dumps({"protocol": digest, **asdict(protocol), **versions()}, indent=1) + "\n")
    print(f"{len(rows)} molecules selected, {len(rows) - len(todo)} skipped, {len(todo)} to make in {out_dir} "
          f"(protocol {digest}, {args.workers} worker(s) x {threads} thread(s))", flush=True)
    jobs = [(row, protocol, str(out_dir)) for row in todo]
    failures = []
    start = time.perf_counter()

    def report(count, name, stats, error):
        if error:
            failures.append((name, error))
            print(f"[{count}/{len(jobs)}] {name}: FAILED {error}", flush=True)
            return
        print(f"[{count}/{len(jobs)}] {name}: {stats['frames']} frames, {stats['atoms']} atoms, "
              f"{stats['xtb_calls']} xTB calls ({1000 * stats['xtb_seconds'] / max(stats['xtb_calls'], 1):.2f} ms "
              f"each), {stats['md_restarts']} MD restarts, {stats['saddle_escapes']} saddle escapes, "
              f"modes {stats['lowest_wavenumber']:.0f}.."
              f"{stats['highest_wavenumber']:.0f} cm^-1, {stats['seconds']:.1f} s", flush=True)

    if args.workers <= 1:
        for count, job in enumerate(jobs, 1):
            report(count, *_job(job))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_job, job) for job in jobs]
            for count, fut in enumerate(as_completed(futures), 1):
                report(count, *fut.result())
    print(f"done in {time.perf_counter() - start:.1f} s; {len(failures)} failed"
          + "".join(f"\n  {n}: {e}" for n, e in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
