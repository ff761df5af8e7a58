"""Reference labels from quantum chemistry with PySCF (optional extra ``mfcalc[qm]``).

    structures -> PySCF (HF, any DFT functional, MP2, CCSD, CCSD(T)) -> energies (and forces by
    analytic gradients when asked) in eV and eV/Å -> an extended-XYZ file written one record at a
    time, so that a crash or Ctrl-C loses no finished point and a re-run continues.

A method is written "METHOD/BASIS", e.g. "CCSD(T)/cc-pVDZ", "PBE/def2-SVP", "B3LYP/6-31G*",
"MP2/cc-pVTZ", "HF/sto-3g". Every record stores the exact method, basis, charge, spin and the
PySCF version, and its fidelity name (the method string unless ``fidelity`` says otherwise).

``density_fit=True`` fits the two-electron integrals with PySCF's default auxiliary basis sets:
for DFT the Coulomb term (RI-J, as ORCA does by default for GGAs: for ethanol at PBE/def2-SVP it
is ~1.3x faster and lands within 0.7 meV of rMD17's ORCA total energy, 7 meV without it, forces
within 2 meV/Å); for MP2 both the Hartree-Fock reference (RI-JK) and the correlation energy
(RI-MP2, ``pyscf.mp.dfmp2``), energies only. Not offered for HF alone, CCSD or CCSD(T).
"""

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from ase import Atoms

from .units import BOHR_TO_ANGSTROM, HARTREE_TO_EV

WAVEFUNCTION_METHODS = ("HF", "MP2", "CCSD", "CCSD(T)")


def parse_method(method: str) -> Tuple[str, str]:
    """'CCSD(T)/cc-pVDZ' -> ('CCSD(T)', 'cc-pVDZ'), checking both against PySCF."""
    if method.count("/") != 1:
        raise ValueError(f"method must be written METHOD/BASIS (e.g. 'CCSD(T)/cc-pVDZ'), got {method!r}")
    name, basis = (part.strip() for part in method.split("/"))
    from pyscf import dft, gto

    try:
        gto.basis.load(basis, "H")
    except Exception:  # noqa: BLE001 - pyscf raises several kinds here
        raise ValueError(f"PySCF does not know the basis set {basis!r} (in {method!r})") from None
    if name.upper() not in WAVEFUNCTION_METHODS:
        try:
            dft.libxc.parse_xc(name)
        except Exception:  # noqa: BLE001
            raise ValueError(
                f"{name!r} is neither one of {WAVEFUNCTION_METHODS} nor a functional PySCF knows"
            ) from None
    return name, basis


def compute(atoms: Atoms, method: str, forces: bool = False, charge: int = 0, spin: int = 0,
            threads: int = 1, density_fit: bool = False) -> Dict[str, object]:
    """Energy (eV) and, with ``forces``, forces (eV/Å) of one structure."""
    from pyscf import cc, dft, gto, lib, mp, scf

    lib.num_threads(threads)
    name, basis = parse_method(method)
    check_density_fit(name, density_fit, forces, spin)
    mol = gto.M(
        atom=[(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)],
        unit="Angstrom", basis=basis, charge=charge, spin=spin, verbose=0,
    )
    upper = name.upper()
    if upper == "MP2" and density_fit:  # RI-MP2 on an RI-JK reference
        from pyscf.mp import dfmp2

        mf = scf.RHF(mol).density_fit().run()
        if not mf.converged:
            raise RuntimeError(f"SCF did not converge for {atoms.get_chemical_formula()} at {method}")
        return {"energy": float(dfmp2.DFMP2(mf).run().e_tot) * HARTREE_TO_EV}
    if upper in WAVEFUNCTION_METHODS:
        mf = (scf.RHF(mol) if spin == 0 else scf.UHF(mol)).run()
    else:
        mf = (dft.RKS(mol) if spin == 0 else dft.UKS(mol))
        mf.xc = name
        if density_fit:
            mf = mf.density_fit()
        mf = mf.run()
    if not mf.converged:
        raise RuntimeError(f"SCF did not converge for {atoms.get_chemical_formula()} at {method}")
    gradient = None
    if upper in ("HF",) or upper not in WAVEFUNCTION_METHODS:
        energy = mf.e_tot
        if forces:
            gradient = mf.nuc_grad_method().kernel()
    elif upper == "MP2":
        post = mp.MP2(mf).run()
        energy = post.e_tot
        if forces:
            gradient = post.nuc_grad_method().kernel()
    else:
        post = cc.CCSD(mf).run()
        if not post.converged:
            raise RuntimeError(f"CCSD did not converge for {atoms.get_chemical_formula()}")
        energy = post.e_tot
        if upper == "CCSD(T)":
            energy += post.ccsd_t()
            if forces:
                from pyscf.grad import ccsd_t as ccsd_t_grad

                gradient = ccsd_t_grad.Gradients(post).kernel()
        elif forces:
            gradient = post.nuc_grad_method().kernel()
    out: Dict[str, object] = {"energy": float(energy) * HARTREE_TO_EV}
    if gradient is not None:
        out["forces"] = -np.asarray(gradient) * HARTREE_TO_EV / BOHR_TO_ANGSTROM
    return out


def check_density_fit(name: str, density_fit: bool, forces: bool = False, spin: int = 0) -> None:
    if not density_fit:
        return
    if name.upper() in ("HF", "CCSD", "CCSD(T)"):
        raise ValueError(f"density fitting is offered for DFT functionals and MP2 (RI-MP2), not {name!r}")
    if name.upper() == "MP2" and (forces or spin != 0):
        raise ValueError("density-fitted MP2 (RI-MP2) is offered for closed-shell energies only "
                         "(spin=0, no forces); drop --forces or --density-fit")


def _work(job):
    index, atoms, method, forces, charge, spin, threads, density_fit = job
    start = time.perf_counter()
    try:
        result = compute(atoms, method, forces, charge, spin, threads, density_fit)
    except Exception as err:  # noqa: BLE001 - reported per structure, the others go on
        return index, None, f"{type(err).__name__}: {err}", time.perf_counter() - start
    return index, result, None, time.perf_counter() - start


def label(
    structures: Sequence[Atoms], method: str, out: Union[str, Path], forces: bool = False,
    fidelity: Optional[str] = None, charge: int = 0, spin: int = 0, workers: int = 1,
    threads_per_worker: int = 1, progress=sys.stderr, density_fit: bool = False,
) -> List[Atoms]:
    """Label ``structures`` and append them to ``out`` (extxyz) as they finish. Structures whose
    ``label_index`` is already in ``out`` are skipped, so an interrupted run continues."""
    import pyscf
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    check_density_fit(parse_method(method)[0], density_fit, forces, spin)  # fail before any work
    out = Path(out)
    done = set()
    if out.exists() and out.stat().st_size > 0:
        done = {int(a.info["label_index"]) for a in read(str(out), index=":") if "label_index" in a.info}
    todo = [(k, a) for k, a in enumerate(structures) if k not in done]
    name, basis = method.split("/")
    jobs = [(k, a.copy(), method, forces, charge, spin, threads_per_worker, density_fit) for k, a in todo]
    failures = []
    start = time.perf_counter()

    def finished(index, result, error, seconds, count):
        if error is not None:
            failures.append((index, error))
        else:
            atoms = structures[index].copy()
            atoms.info.update(
                label_index=index, fidelity=fidelity or method, method=name.strip(), basis=basis.strip(),
                charge=charge, spin=spin, program=f"PySCF {pyscf.__version__}", seconds=round(seconds, 2),
                density_fit=density_fit,
            )
            atoms.calc = SinglePointCalculator(atoms, **result)
            with open(out, "a") as handle:  # one finished point at a time, flushed to disk
                write(handle, atoms, format="extxyz")
                handle.flush()
                os.fsync(handle.fileno())
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress.write(f"\r{method}: {count}/{len(jobs)} new ({len(done)} done before), "
                           f"{elapsed / max(count, 1):.1f} s each, {len(failures)} failed")
            progress.flush()

    if workers <= 1:
        for count, job in enumerate(jobs, 1):
            finished(*_work(job), count)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for count, item in enumerate(pool.map(_work, jobs), 1):
                finished(*item, count)
    if progress is not None:
        progress.write("\n")
    for index, error in failures:
        print(f"structure {index} failed: {error}", file=sys.stderr)
    return read(str(out), index=":") if out.exists() and out.stat().st_size else []
