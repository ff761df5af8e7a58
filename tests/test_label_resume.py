"""Bad-input catalogue, labelling: resuming ``mfcalc label`` never reports work that was not done,
never mixes settings or structures in one file, recovers a record cut off by a kill, and a
SIGTERM (or SIGKILL) leaves no worker process behind.

Records "from before" are written here exactly as the previous label.py wrote them (the
structure's own info + label_index, fidelity, method, basis, charge, spin, program, seconds,
density_fit, energy and forces; no structure_hash) - the format of the CCSD(T) gradient labels
being computed for data/chno. Their energies are made up (-1000 - k eV) so that a test can tell
a kept record from a recomputed one.
"""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

pyscf = pytest.importorskip("pyscf")

from mfcalc.label import (  # noqa: E402
    _read_output,
    compute,
    label,
    match_records,
    requested_settings,
    structure_hash,
)

ROOT = Path(__file__).resolve().parent.parent
CHNO_INPUT = ROOT / "data" / "chno" / "pick3_heavy0-3_rounds.extxyz"  # the running job's input
CHEAP = "HF/sto-3g"


def waters(n, seed=0):
    out = []
    for k in range(n):
        atoms = molecule("H2O")
        atoms.rattle(0.05, seed=seed + k)  # full-precision positions, as from MD or sampling
        out.append(atoms)
    return out


def write_old_records(path, structures, indices, method=CHEAP, forces=True, fidelity=None, charge=0, spin=0):
    """Records as the previous label.py appended them, one write per finished structure."""
    name, basis = method.split("/")
    for index in indices:
        atoms = structures[index].copy()
        atoms.info.update(label_index=index, fidelity=fidelity or method, method=name.strip(), basis=basis.strip(),
                          charge=charge, spin=spin, program=f"PySCF {pyscf.__version__}", seconds=0.1,
                          density_fit=False)
        results = {"energy": -1000.0 - index}
        if forces:
            results["forces"] = np.full((len(atoms), 3), 0.01 * index)
        atoms.calc = SinglePointCalculator(atoms, **results)
        with open(path, "a") as handle:
            write(handle, atoms, format="extxyz")


def run_label(structures, out, **kwargs):
    kwargs.setdefault("progress", None)
    return label(structures, kwargs.pop("method", CHEAP), out, **kwargs)


def energies(frames):
    return [a.get_potential_energy() for a in frames]


def assert_untouched(path, before):
    assert path.read_bytes() == before, "a refused resume must leave the file as it was"


# ----------------------------------------------------------------- old files resume
def test_l01_the_running_jobs_format_resumes_without_redoing_anything(tmp_path, monkeypatch):
    """Real inputs (data/chno, 8-decimal positions, their own charge/spin/method info), records in
    the exact old format: every one is recognised, nothing is computed."""
    structures = read(str(CHNO_INPUT), index=":6")
    out = tmp_path / "ccsdt.extxyz"
    write_old_records(out, structures, range(6), method="CCSD(T)/cc-pVDZ")
    before = out.read_bytes()
    monkeypatch.setattr("mfcalc.label._run_jobs", lambda *a: pytest.fail("no structure should be relabelled"))
    frames = run_label(structures, out, method="CCSD(T)/cc-pVDZ", forces=True)
    assert energies(frames) == [-1000.0 - k for k in range(6)]
    assert [a.info["label_index"] for a in frames] == list(range(6))
    assert_untouched(out, before)


def test_l02_an_old_file_holding_part_of_the_input_gets_exactly_the_rest(tmp_path):
    structures = waters(5)
    out = tmp_path / "part.xyz"
    write_old_records(out, structures, [0, 2, 3], forces=False)
    frames = run_label(structures, out)
    assert [a.info["label_index"] for a in frames] == [0, 1, 2, 3, 4]
    assert energies(frames)[0] == -1000.0 and energies(frames)[2] == -1002.0  # kept, not recomputed
    for k in (1, 4):
        assert frames[k].get_potential_energy() == pytest.approx(compute(structures[k], CHEAP)["energy"], abs=1e-8)
    assert len(read(str(out), index=":")) == 5


def test_l03_a_reordered_input_is_matched_by_structure_not_by_index(tmp_path, monkeypatch):
    structures = waters(4)
    out = tmp_path / "order.xyz"
    write_old_records(out, structures, range(4), forces=False)
    monkeypatch.setattr("mfcalc.label._run_jobs", lambda *a: pytest.fail("nothing to relabel"))
    frames = run_label(structures[::-1], out)
    assert energies(frames) == [-1003.0, -1002.0, -1001.0, -1000.0]  # each structure keeps its own label


def test_l04_the_same_structure_twice_in_the_input_needs_two_records(tmp_path):
    structures = waters(2)
    structures.append(structures[0].copy())
    out = tmp_path / "twice.xyz"
    write_old_records(out, structures, [0, 1], forces=False)
    frames = run_label(structures, out)
    assert len(frames) == 3 and len(read(str(out), index=":")) == 3
    assert frames[2].get_potential_energy() == pytest.approx(compute(structures[0], CHEAP)["energy"], abs=1e-8)


def test_l05_new_records_carry_their_structure_hash_and_resume(tmp_path):
    structures = waters(3)
    out = tmp_path / "new.xyz"
    run_label(structures[:2], out)
    assert [a.info["structure_hash"] for a in read(str(out), index=":")] == [structure_hash(a) for a in structures[:2]]
    frames = run_label(structures, out)
    assert len(frames) == 3 and len(read(str(out), index=":")) == 3


# ----------------------------------------------------------------- another method or other structures
@pytest.mark.parametrize("change, message", [
    ({"method": "MP2/sto-3g"}, r"holds records for method HF, fidelity HF/sto-3g \(line 1\), not method MP2, "
                               r"fidelity MP2/sto-3g as asked; use another --out"),
    ({"method": "HF/6-31g"}, r"holds records for basis sto-3g, fidelity HF/sto-3g \(line 1\), "
                             r"not basis 6-31g, fidelity HF/6-31g"),
    ({"fidelity": "HF-min"}, r"holds records for fidelity HF/sto-3g \(line 1\), not fidelity HF-min as asked"),
    ({"forces": True}, r"holds records for energies only \(line 1\), not with forces as asked"),
    ({"method": "PBE/sto-3g", "density_fit": True}, r"not method PBE, fidelity PBE/sto-3g, density fitting as asked"),
    ({"charge": 2}, r"holds records for charge 0 \(line 1\), not charge 2 as asked"),
])
def test_l06_a_resume_with_other_settings_is_refused(tmp_path, change, message):
    """Before: records were matched by label_index only, so this reported success for work never done."""
    structures = waters(3)
    out = tmp_path / "other.xyz"
    write_old_records(out, structures, range(3), forces=False)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=message):
        run_label(structures, out, **change)
    assert_untouched(out, before)


def test_l07_a_resume_with_other_structures_is_refused(tmp_path):
    out = tmp_path / "structures.xyz"
    write_old_records(out, waters(3, seed=0), range(3), forces=False)
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"holds 3 record\(s\) of structures that are not in the input "
                                         r"\(first: line 1, H2O, label_index 0\); use another --out"):
        run_label(waters(3, seed=10), out)
    assert_untouched(out, before)


def test_l08_a_resume_with_fewer_structures_than_the_file_holds_is_refused(tmp_path):
    structures = waters(4)
    out = tmp_path / "fewer.xyz"
    write_old_records(out, structures, range(4), forces=False)
    with pytest.raises(ValueError, match=r"holds 1 record\(s\) of structures that are not in the input"):
        run_label(structures[:3], out)


def test_l09_a_file_not_written_by_label_is_refused_and_left_alone(tmp_path):
    """E.g. the input file given as --out by mistake."""
    out = tmp_path / "input.extxyz"
    out.write_bytes(CHNO_INPUT.read_bytes()[:20000])  # also ends inside a record
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"input\.extxyz, record at line 1 was not written by mfcalc label"):
        run_label(read(str(CHNO_INPUT), index=":3"), out, method="CCSD(T)/cc-pVDZ")
    assert_untouched(out, before)


def test_l10_a_record_whose_positions_were_edited_is_refused(tmp_path):
    structures = waters(2)
    out = tmp_path / "edited.xyz"
    run_label(structures, out)
    frames = read(str(out), index=":")
    frames[1].positions[0, 0] += 0.1  # the stored structure_hash now disagrees
    out.unlink()
    write(str(out), frames, format="extxyz")
    with pytest.raises(ValueError, match=r"record at line 6: its numbers or positions do not match its structure_hash"):
        run_label(structures, out)


def test_l11_extra_copies_of_a_record_warn_and_count_once(tmp_path, monkeypatch):
    structures = waters(2)
    out = tmp_path / "dup.xyz"
    write_old_records(out, structures, [0, 1, 1], forces=False)
    monkeypatch.setattr("mfcalc.label._run_jobs", lambda *a: pytest.fail("nothing to relabel"))
    with pytest.warns(RuntimeWarning, match=r"holds 1 extra record\(s\) of structures labelled twice"):
        frames = run_label(structures, out)
    assert len(frames) == 2


# ----------------------------------------------------------------- the structure key
def test_l12_structure_hash_survives_the_extxyz_round_trip_and_nothing_else(tmp_path):
    structures = waters(20, seed=100) + [molecule("CH3CH2OH")]
    structures[-1].positions += 1e6 / 3  # large coordinates too
    structures[0].positions[0] = [-0.0, 0.0, -1e-12]  # signed zeros
    write(str(tmp_path / "rt.xyz"), structures, format="extxyz")
    back = read(str(tmp_path / "rt.xyz"), index=":")
    assert [structure_hash(a) for a in back] == [structure_hash(a) for a in structures]
    base = structures[1]
    moved = base.copy()
    moved.positions[1, 2] += 2e-8
    swapped = base.copy()
    swapped.numbers = [8, 1, 1][::-1]
    others = {structure_hash(moved), structure_hash(swapped),
              structure_hash(base, charge=1), structure_hash(base, spin=2)}
    assert structure_hash(base) not in others and len(others) == 4


# ----------------------------------------------------------------- a record cut off by a kill
def cut_inside_last_record(path, where):
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n3\n") + 1  # the last record's count line (3 atoms)
    cut = {"count": start + 1, "comment": data.index(b"\n", start + 2) + 20, "atom line": len(data) - 30,
           "last digit": len(data) - 2}[where]
    path.write_bytes(data[:cut])


@pytest.mark.parametrize("where", ["count", "comment", "atom line", "last digit"])
def test_l13_a_record_cut_off_during_its_write_is_recovered(tmp_path, where):
    """Before: every later resume failed to read the file, or (cut inside the last number) took
    the shortened number. A record counts as complete only with its final newline."""
    structures = waters(3)
    out = tmp_path / "cut.xyz"
    write_old_records(out, structures, range(3), forces=False)
    cut_inside_last_record(out, where)
    if where != "last digit":
        with pytest.raises(Exception):
            read(str(out), index=":")  # what the previous resume did, and died of
    with pytest.warns(RuntimeWarning, match=r"cut\.xyz: the last record \(\d+ bytes\) was cut off while being "
                                            r"written .* the 2 complete records are kept"):
        frames = run_label(structures, out)
    assert energies(frames)[:2] == [-1000.0, -1001.0]
    assert frames[2].get_potential_energy() == pytest.approx(compute(structures[2], CHEAP)["energy"], abs=1e-8)
    assert len(read(str(out), index=":")) == 3 and _read_output(out)[1] is None


def test_l14_a_damaged_record_before_the_end_is_an_error_not_dropped(tmp_path):
    structures = waters(3)
    out = tmp_path / "damaged.xyz"
    write_old_records(out, structures, range(3), forces=False)
    lines = out.read_text().splitlines(keepends=True)
    lines[5] = "x\n"  # the second record's count line
    out.write_text("".join(lines))
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"damaged\.xyz, line 6: expected an atom count, found 'x'"):
        run_label(structures, out)
    assert_untouched(out, before)


def test_l15_a_second_run_into_the_same_file_is_refused_while_one_runs(tmp_path):
    out = tmp_path / "busy.xyz"
    write_old_records(out, waters(1), [0], forces=False)
    with open(out, "a") as other_run:
        fcntl.flock(other_run.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match=r"busy\.xyz is being written by another mfcalc label run"):
            run_label(waters(1), out)


def test_l16_match_records_counts_only_matching_records(tmp_path):
    structures = waters(3)
    out = tmp_path / "m.xyz"
    write_old_records(out, structures, [2, 0], forces=False)
    records, cut = _read_output(out)
    done = match_records([structure_hash(a) for a in structures], records, requested_settings(CHEAP), out)
    assert sorted(done) == [0, 2] and cut is None


# ----------------------------------------------------------------- stopping with workers
def children(pid):
    """Live child processes of ``pid`` (from /proc: no psutil here)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry))
    return found


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_label_and_wait_for_workers(tmp_path, n_structures=3000):
    structures = tmp_path / "waters.xyz"
    write(str(structures), waters(n_structures))
    out = tmp_path / "stopped.xyz"
    err = open(tmp_path / "stderr.txt", "w")  # a file, not a pipe: orphans would keep a pipe open
    run = subprocess.Popen([sys.executable, "-m", "mfcalc.cli", "label", str(structures), "--method", CHEAP,
                            "--workers", "2", "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        workers = children(run.pid)
        if len(workers) >= 2 and out.exists() and out.read_bytes().count(b"Properties=") >= 3:
            return run, workers, out, read(str(structures), index=":")
        assert run.poll() is None, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.1)
    run.kill()
    pytest.fail("label did not start two workers and write three records within 120 s")


def assert_gone(pids, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "worker processes survived their parent"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_l17_sigterm_with_two_workers_ends_the_workers_and_keeps_every_record(tmp_path):
    run, workers, out, structures = start_label_and_wait_for_workers(tmp_path)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 128 + signal.SIGTERM
    assert_gone(workers)
    lines = [line for line in (tmp_path / "stderr.txt").read_text().splitlines()
             if line.strip() and not line.startswith(f"{CHEAP}: ")]  # the progress line, rewritten with \r
    assert len(lines) == 1, lines  # one line, no traceback
    assert lines[0].startswith("mfcalc label: stopped by SIGTERM, workers ended; every finished record is in")
    records, cut = _read_output(out)
    assert cut is None and len(records) >= 3  # no half-written record
    done = match_records([structure_hash(a) for a in structures], records, requested_settings(CHEAP), out)
    assert len(done) == len(records)  # every record is kept for the resume


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_l18_sigkill_of_the_parent_ends_the_workers_too(tmp_path):
    run, workers, out, _ = start_label_and_wait_for_workers(tmp_path)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    assert_gone(workers)


def test_l19_a_signal_during_a_record_write_takes_effect_after_it():
    """The window is milliseconds, so it is tested directly: SIGINT inside the block is held.
    Python's own SIGINT handler is installed first: a process started in the background without
    job control (``nohup cmd &`` from a script) inherits SIGINT ignored, and then no signal arrives."""
    from mfcalc.label import _signals_deferred

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        reached_end_of_block = False
        with pytest.raises(KeyboardInterrupt):
            with _signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # a handler would have run by now
                reached_end_of_block = True
        assert reached_end_of_block
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_l20_sigterm_with_one_worker_stops_at_once_and_keeps_every_record(tmp_path):
    structures = tmp_path / "waters.xyz"
    write(str(structures), waters(3000))
    out = tmp_path / "one.xyz"
    run = subprocess.Popen([sys.executable, "-m", "mfcalc.cli", "label", str(structures), "--method", CHEAP,
                            "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out.exists() and out.read_bytes().count(b"Properties=") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == -signal.SIGTERM  # PySCF runs in this process: ended as usual
    records, cut = _read_output(out)
    assert cut is None and len(records) >= 3
