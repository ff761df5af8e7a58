"""Reference labels from quantum chemistry with PySCF (optional extra ``mfcalc[qm]``).

    structures -> PySCF (HF, any DFT functional, MP2, CCSD, CCSD(T)) -> energies (and forces by
    analytic gradients when asked) in eV and eV/Å -> an extended-XYZ file written one record at a
    time, so that a crash or Ctrl-C loses no finished point and a re-run continues.

Resuming: a record in the output counts as done for an input frame when its structure hash
(atomic numbers, positions to 1e-8 Å - the precision extxyz stores -, charge and spin) and its
settings (method, basis, fidelity name, density fitting, forces or not) match. An output holding
records of other settings or of structures that are not in the input is refused ("use another
--out"), never mixed. Records written before the hash was stored (``structure_hash``) are keyed by
the hash of their own numbers and positions. A last record cut off by a kill during its write is
dropped with a warning and cut from the file; a damaged record before the end is an error.
Only one ``mfcalc label`` writes into one output at a time (an exclusive lock on it).

Stopping: a SIGTERM or SIGINT that arrives while a record is written takes effect once it is
written. With ``workers > 1`` the parent answers either signal by terminating the worker
processes, saying so in one line and exiting (status 143 for SIGTERM; KeyboardInterrupt for
SIGINT); a worker also ends when its parent dies in any other way, SIGKILL included (Linux:
PR_SET_PDEATHSIG). With one worker PySCF runs in this process and a signal ends it as usual.

On a Dask cluster (``dask="tcp://scheduler:8786"``, or ``dask="local"`` for a LocalCluster of
``dask_workers`` processes on this machine; optional extra ``mfcalc[ecosystem]``): each structure
is one task (``_work``, the same function the local workers run), sent to the cluster's workers,
which need mfcalc and PySCF installed. Results come back to this process, which alone writes the
output, one finished record at a time as above: the same file, the same resume and the same
lock. A killed client loses only the structures in flight (the cluster drops the tasks of a
client that is gone; a local cluster's processes end with it). A task whose worker died
(``KilledWorker``) counts as a failed structure, retried by the next run. dask-jobqueue's
``SLURMCluster``/``PBSCluster`` give a scheduler address to pass here (see the README).

A method is written "METHOD/BASIS", e.g. "CCSD(T)/cc-pVDZ", "PBE/def2-SVP", "B3LYP/6-31G*",
"MP2/cc-pVTZ", "HF/sto-3g". Every record stores the exact method, basis, charge, spin and the
PySCF version, and its fidelity name (the method string unless ``fidelity`` says otherwise).

``density_fit=True`` fits the two-electron integrals with PySCF's default auxiliary basis sets:
for DFT the Coulomb term (RI-J, as ORCA does by default for GGAs: for ethanol at PBE/def2-SVP it
is ~1.3x faster and lands within 0.7 meV of rMD17's ORCA total energy, 7 meV without it, forces
within 2 meV/Å); for MP2 both the Hartree-Fock reference (RI-JK) and the correlation energy
(RI-MP2, ``pyscf.mp.dfmp2``), energies only. Not offered for HF alone, CCSD or CCSD(T).
"""

import contextlib
import hashlib
import io
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

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


POSITION_DECIMALS = 8  # extxyz writes positions as %16.8f: a record read back hashes like its input
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
DASK_CONNECT_TIMEOUT = "30s"  # for a scheduler address that does not answer


# --------------------------------------------------------------------------- what a record is
def structure_hash(atoms: Atoms, charge: int = 0, spin: int = 0) -> str:
    """SHA-256 of the atomic numbers, the positions to 1e-8 Å (as extxyz stores them), the charge
    and the spin: the key by which a labelled record is matched to an input structure."""
    digest = hashlib.sha256()
    digest.update(f"{len(atoms)}:".encode())
    digest.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    digest.update(" ".join(_coordinate_text(x) for x in np.asarray(atoms.positions, float).ravel()).encode())
    digest.update(f" charge={int(charge)} spin={int(spin)}".encode())
    return digest.hexdigest()


def _coordinate_text(x: float) -> str:
    text = f"{x:.{POSITION_DECIMALS}f}"
    return text.lstrip("-") if float(text) == 0.0 else text  # -0.00000000 and 0.00000000 alike


def requested_settings(method: str, fidelity: Optional[str] = None, forces: bool = False,
                       density_fit: bool = False, charge: int = 0, spin: int = 0) -> Dict[str, object]:
    """The settings a record must have been labelled with to count as done for this run."""
    name, basis = (part.strip() for part in method.split("/"))
    return {"method": name, "basis": basis, "fidelity": fidelity or method, "density_fit": bool(density_fit),
            "forces": bool(forces), "charge": int(charge), "spin": int(spin)}


def record_settings(record: Atoms) -> Dict[str, object]:
    """The settings a record was labelled with (old records: no density_fit key means none)."""
    info = record.info
    results = record.calc.results if record.calc is not None else {}
    return {"method": str(info.get("method")), "basis": str(info.get("basis")), "fidelity": str(info.get("fidelity")),
            "density_fit": bool(info.get("density_fit", False)), "forces": "forces" in results,
            "charge": int(info.get("charge", 0)), "spin": int(info.get("spin", 0))}


def _describe(settings: Dict[str, object], keys: Sequence[str]) -> str:
    words = {"forces": ("with forces", "energies only"), "density_fit": ("density fitting", "no density fitting")}
    return ", ".join(words[k][0 if settings[k] else 1] if k in words else f"{k} {settings[k]}" for k in keys)


# --------------------------------------------------------------------------- reading the output
def _split_records(data: bytes, out: Path) -> Tuple[List[Tuple[int, str]], int]:
    """(first line, text) of every complete extxyz record in ``data``, and the byte offset where
    the complete records end (before a record cut off during its write)."""
    records: List[Tuple[int, str]] = []
    pos, line = 0, 1
    content_end = len(data.rstrip())  # trailing blank lines are not a record
    while pos < content_end:
        count_end = data.find(b"\n", pos)
        if count_end < 0:
            break  # the count line itself was cut off
        count = data[pos:count_end].strip()
        if not count.isdigit():
            found = count[:40].decode(errors="replace")
            raise ValueError(f"{out}, line {line}: expected an atom count, found {found!r}; it is not an "
                             f"extxyz file written by mfcalc label: use another --out")
        end = pos
        for _ in range(int(count) + 2):
            newline = data.find(b"\n", end)
            if newline < 0:
                return records, pos
            end = newline + 1
        records.append((line, data[pos:end].decode()))
        pos, line = end, line + int(count) + 2
    return records, pos if pos < content_end else len(data)


def _parse_record(text: str, line: int, out: Path) -> Atoms:
    from ase.io import read

    try:
        return read(io.StringIO(text), format="extxyz")
    except Exception as err:  # noqa: BLE001 - ASE raises many kinds
        raise ValueError(f"{out}, record at line {line} cannot be read ({type(err).__name__}: {err}); "
                         f"repair or remove that record, or use another --out") from None


def _read_output(out: Path) -> Tuple[List[Tuple[int, Atoms]], Optional[int]]:
    """(first line, record) of every complete record of ``out``, and the byte offset to cut the
    file back to when its last record was cut off during its write (a killed run), else None."""
    data = out.read_bytes()
    blocks, end = _split_records(data, out)
    return [(line, _parse_record(text, line, out)) for line, text in blocks], (end if end < len(data) else None)


def _drop_cut_off_record(handle: TextIO, out: Path, end: int, kept: int) -> None:
    """Cut ``out`` back to its last complete record (one ftruncate: no state in between)."""
    size = os.fstat(handle.fileno()).st_size
    warnings.warn(f"{out}: the last record ({size - end} bytes) was cut off while being written (a run was "
                  f"killed); dropped it, the {kept} complete records are kept and its structure is labelled again",
                  RuntimeWarning, stacklevel=3)
    handle.flush()
    os.ftruncate(handle.fileno(), end)
    os.fsync(handle.fileno())


@contextlib.contextmanager
def _locked_output(out: Path) -> Iterator[TextIO]:
    """``out`` opened for appending (created if missing), locked against a second label run."""
    with open(out, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield handle
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{out} is being written by another mfcalc label run (it holds the file's "
                               f"lock); wait for it to finish or use another --out") from None
        yield handle


# --------------------------------------------------------------------------- matching for a resume
def _record_hash(record: Atoms, line: int, out: Path) -> str:
    settings = record_settings(record)
    key = structure_hash(record, settings["charge"], settings["spin"])
    stored = record.info.get("structure_hash")
    if stored is not None and str(stored) != key:
        raise ValueError(f"{out}, record at line {line}: its numbers or positions do not match its structure_hash "
                         f"(edited after labelling?); remove that record or use another --out")
    return key


def _check_settings(record: Atoms, line: int, wanted: Dict[str, object], out: Path) -> None:
    if "label_index" not in record.info or "method" not in record.info:
        raise ValueError(f"{out}, record at line {line} was not written by mfcalc label (no label_index/method); "
                         f"use another --out")
    found = record_settings(record)
    differ = [key for key in wanted if found[key] != wanted[key]]
    if differ:
        raise ValueError(f"{out} holds records for {_describe(found, differ)} (line {line}), not "
                         f"{_describe(wanted, differ)} as asked; use another --out "
                         f"(or the same settings to continue it)")


def match_records(hashes: Sequence[str], records: Sequence[Tuple[int, Atoms]], wanted: Dict[str, object],
                  out: Path) -> Dict[int, Atoms]:
    """Input index -> its record in ``out``, for every input structure already labelled.

    Refuses (ValueError) an output with records of other settings or of structures that are not
    in the input. Extra copies of a record (two runs into one file) are ignored with a warning."""
    for line, record in records:
        _check_settings(record, line, wanted, out)
    free: Dict[str, List[int]] = {}
    for index, key in enumerate(hashes):
        free.setdefault(key, []).append(index)
    done: Dict[int, Atoms] = {}
    strangers: List[Tuple[int, Atoms]] = []
    extra = 0
    for line, record in records:
        candidates = free.get(_record_hash(record, line, out))
        if candidates is None:
            strangers.append((line, record))
        elif not candidates:
            extra += 1
        else:
            index = record.info["label_index"]
            done[candidates.pop(candidates.index(index) if index in candidates else 0)] = record
    if strangers:
        line, record = strangers[0]
        raise ValueError(f"{out} holds {len(strangers)} record(s) of structures that are not in the input (first: "
                         f"line {line}, {record.get_chemical_formula()}, label_index {record.info['label_index']}); "
                         f"use another --out, or the input it was labelled from")
    if extra:
        warnings.warn(f"{out} holds {extra} extra record(s) of structures labelled twice (two runs into one "
                      f"file?); each input structure uses one of them", RuntimeWarning, stacklevel=3)
    return done


# --------------------------------------------------------------------------- workers and signals
def _work(job):
    """Label one structure; the time returned is CPU seconds (all threads of the computation),
    which, unlike wall time, does not grow while the job is paused or waits for a core."""
    index, atoms, method, forces, charge, spin, threads, density_fit = job
    start = time.process_time()
    try:
        result = compute(atoms, method, forces, charge, spin, threads, density_fit)
    except Exception as err:  # noqa: BLE001 - reported per structure, the others go on
        return index, None, f"{type(err).__name__}: {err}", time.process_time() - start
    return index, result, None, time.process_time() - start


def _worker_start(parent: int) -> None:
    """In each worker: the parent handles Ctrl-C and SIGTERM; die with the parent (``parent``:
    its pid when forked from it, else 0)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if parent:
        _die_with_parent()
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass  # no prctl: the parent's signal handler is the only guard


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the worker processes now (terminate, then kill)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
    if manager is not None:  # let it close its pipes before the interpreter's exit hook uses them
        manager.join(timeout=10)


class _Stopper:
    """The parent's SIGTERM/SIGINT handler while workers run: end the workers, say so in one
    line, exit (SystemExit 128+N for SIGTERM, KeyboardInterrupt for SIGINT)."""

    def __init__(self, pool: ProcessPoolExecutor, out: Path):
        self.pool, self.out = pool, out

    def __call__(self, signum: int, frame) -> None:
        _stop_pool(self.pool)
        print(f"\nmfcalc label: stopped by {signal.Signals(signum).name}, workers ended; every finished record "
              f"is in {self.out}: run the same command again to continue", file=sys.stderr)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signal_handlers(handler: Callable) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT inside the block (main thread only: elsewhere Python
    cannot set handlers and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """A SIGTERM or SIGINT that arrives inside the block takes effect right after it, with the
    handler that was in place (so that a record is never half-written)."""
    caught: List[int] = []
    with _signal_handlers(lambda signum, frame: caught.append(signum)):
        yield
    if caught:
        signal.raise_signal(caught[0])


def _run_jobs(jobs: List[tuple], workers: int, out: Path, on_result: Callable, dask: Optional[str] = None,
              dask_workers: Optional[int] = None) -> None:
    """Run ``_work`` on every job, calling ``on_result(*result)`` as each finishes. One worker:
    in this process, as before (a forked child can hang in OpenMP when this process used PySCF
    with threads); more: in forked worker processes that a signal to the parent ends too. With
    ``dask``: as tasks on that Dask cluster (see ``_run_jobs_dask``)."""
    if dask is not None:
        _run_jobs_dask(jobs, dask, dask_workers or workers, on_result)
        return
    if workers <= 1:
        for job in jobs:
            on_result(*_work(job))
        return
    from concurrent.futures import as_completed

    context = _fork_context()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_start,
                               initargs=(os.getpid() if context is not None else 0,))
    try:
        with _signal_handlers(_Stopper(pool, out)):
            futures = [pool.submit(_work, job) for job in jobs]
            for future in as_completed(futures):
                on_result(*future.result())
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown()


def _dask_client(address: str, n_workers: int):
    """(client, cluster) for ``address``: "local" starts a LocalCluster of ``n_workers``
    single-threaded worker processes on this machine (PySCF's threads are the job's own), closed
    with the client; anything else is the address of a running scheduler (cluster None)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise ImportError("mfcalc label --dask needs dask.distributed: pip install 'mfcalc[ecosystem]'",
                          name="distributed") from err
    if address == "local":
        import logging

        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        return Client(cluster), cluster
    try:
        return Client(address, timeout=DASK_CONNECT_TIMEOUT), None
    except OSError as err:
        raise RuntimeError(f"no Dask scheduler answers at {address!r} ({err}); start one (dask scheduler, "
                           f"or dask-jobqueue's SLURMCluster) or use --dask local") from None


def _run_jobs_dask(jobs: List[tuple], address: str, n_workers: int, on_result: Callable) -> None:
    """Every job as one task on a Dask cluster; ``on_result`` runs here, in the client, as each
    task finishes (in the order they finish). A task that failed outside ``_work`` (its worker
    died, or the cluster lost it) is reported as a failed structure."""
    from distributed import as_completed

    client, cluster = _dask_client(address, n_workers)
    futures = {}
    try:
        for job in jobs:  # pure=False: a rerun submits again instead of reusing a cached result
            futures[client.submit(_work, job, pure=False, key=f"mfcalc-label-{job[0]}-{os.getpid()}")] = job[0]
        for future in as_completed(list(futures)):
            if future.status == "finished":
                on_result(*future.result())
            else:
                err = future.exception()
                on_result(futures[future], None, f"{type(err).__name__} (on the Dask cluster): {err}", 0.0)
            future.release()
    finally:
        client.cancel(list(futures))
        client.close()
        if cluster is not None:
            cluster.close()


def _fork_context():
    """Workers forked from this process where the platform can (what the parent check in
    _worker_start assumes; Python 3.14 would otherwise start them from a fork server), else
    the default start method."""
    import multiprocessing

    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


# --------------------------------------------------------------------------- labelling
def label(
    structures: Sequence[Atoms], method: str, out: Union[str, Path], forces: bool = False,
    fidelity: Optional[str] = None, charge: int = 0, spin: int = 0, workers: int = 1,
    threads_per_worker: int = 1, progress=sys.stderr, density_fit: bool = False,
    dask: Optional[str] = None, dask_workers: Optional[int] = None,
) -> List[Atoms]:
    """Label ``structures`` and append them to ``out`` (extxyz) as they finish; return the records
    of the input structures (input order; failed ones are missing). Structures whose record is
    already in ``out`` (same structure hash and settings) are skipped, so an interrupted run
    continues; an ``out`` of other settings or other structures is refused.

    ``dask``: a Dask scheduler address, or "local" for a LocalCluster of ``dask_workers``
    (default ``workers``) processes; the structures run there instead of in local workers."""
    if dask is not None and not str(dask).strip():
        raise ValueError("dask must be a scheduler address (e.g. tcp://host:8786) or 'local'")
    if dask_workers is not None and dask is None:
        raise ValueError("dask_workers (--dask-workers) is for dask='local' (--dask local)")
    check_density_fit(parse_method(method)[0], density_fit, forces, spin)  # fail before any work
    out = Path(out)
    wanted = requested_settings(method, fidelity, forces, density_fit, charge, spin)
    hashes = [structure_hash(atoms, charge, spin) for atoms in structures]
    with _locked_output(out) as handle:
        records, cut = _read_output(out)
        done = match_records(hashes, records, wanted, out)  # refused: the file is left as it was
        if cut is not None:
            _drop_cut_off_record(handle, out, cut, len(records))
        jobs = [(k, a.copy(), method, forces, charge, spin, threads_per_worker, density_fit)
                for k, a in enumerate(structures) if k not in done]
        new = _label_jobs(jobs, structures, hashes, wanted, workers, handle, out, progress, len(done),
                          dask=dask, dask_workers=dask_workers)
    return [record for _, record in sorted({**done, **new}.items())]


def _label_jobs(jobs, structures, hashes, wanted, workers, handle, out, progress, before, dask=None,
                dask_workers=None) -> Dict[int, Atoms]:
    """Run the jobs, append each finished record to ``handle``; report progress and failures."""
    new: Dict[int, Atoms] = {}
    failures: List[Tuple[int, str]] = []
    start = time.perf_counter()

    def finished(index, result, error, seconds):
        if error is not None:
            failures.append((index, error))
        else:
            new[index] = _make_record(structures[index], index, result, wanted, hashes[index], seconds)
            with _signals_deferred():
                _append(handle, new[index])
        _report(progress, wanted, len(new) + len(failures), len(jobs), before, len(failures), start)

    if jobs:
        _run_jobs(jobs, workers, out, finished, dask=dask, dask_workers=dask_workers)
    if progress is not None:
        progress.write("\n")
    for index, error in sorted(failures):
        print(f"structure {index} failed: {error}", file=sys.stderr)
    return new


def _make_record(structure: Atoms, index: int, result: Dict[str, object], wanted: Dict[str, object],
                 key: str, seconds: float) -> Atoms:
    import pyscf
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = structure.copy()
    atoms.info.update(
        label_index=index, fidelity=wanted["fidelity"], method=wanted["method"], basis=wanted["basis"],
        charge=wanted["charge"], spin=wanted["spin"], program=f"PySCF {pyscf.__version__}",
        seconds=round(seconds, 2), density_fit=wanted["density_fit"], structure_hash=key,
    )
    atoms.calc = SinglePointCalculator(atoms, **result)
    return atoms


def _append(handle: TextIO, atoms: Atoms) -> None:
    """One finished record, flushed to disk."""
    from ase.io import write

    write(handle, atoms, format="extxyz")
    handle.flush()
    os.fsync(handle.fileno())


def _report(progress, wanted, count, total, before, failed, start) -> None:
    if progress is None:
        return
    elapsed = time.perf_counter() - start
    progress.write(f"\r{wanted['method']}/{wanted['basis']}: {count}/{total} new ({before} done before), "
                   f"{elapsed / max(count, 1):.1f} s each, {failed} failed")
    progress.flush()
