"""mfcalc label on a Dask cluster (a LocalCluster of 2 worker processes here): the same records
as ``--workers 2``, and a client killed mid-run resumes with no lost and no duplicated frame."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.io import read, write

pytest.importorskip("pyscf")
pytest.importorskip("distributed")

from mfcalc.label import _read_output, label  # noqa: E402

from test_label_resume import CHEAP, alive, waters  # noqa: E402


def by_index(frames):
    return {int(a.info["label_index"]): a for a in frames}


def descendants(pid):
    """Every process below ``pid`` (children, grandchildren: a nanny and its worker)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def test_dask_local_gives_the_records_of_two_local_workers(tmp_path, capsys):
    structures = waters(6, seed=10)
    start = time.perf_counter()
    local = label(structures, CHEAP, tmp_path / "local.xyz", forces=True, workers=2, progress=None)
    local_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dask = label(structures, CHEAP, tmp_path / "dask.xyz", forces=True, dask="local", dask_workers=2, progress=None)
    dask_seconds = time.perf_counter() - start
    with capsys.disabled():  # what the run cost, for the record (not a benchmark: 6 tiny jobs)
        print(f"\n6 H2O HF/sto-3g gradients: --workers 2 {local_seconds:.1f} s, --dask local (2) {dask_seconds:.1f} s")
    assert len(local) == len(dask) == 6
    a, b = by_index(read(tmp_path / "local.xyz", index=":")), by_index(read(tmp_path / "dask.xyz", index=":"))
    assert sorted(a) == sorted(b) == list(range(6))
    for k in range(6):
        assert abs(a[k].get_potential_energy() - b[k].get_potential_energy()) < 1e-8
        np.testing.assert_allclose(a[k].get_forces(), b[k].get_forces(), rtol=0, atol=1e-8)
        for key in ("fidelity", "method", "basis", "charge", "spin", "program", "structure_hash", "density_fit"):
            assert a[k].info[key] == b[k].info[key]
    # a rerun on the cluster finds everything done and submits nothing
    assert len(label(structures, CHEAP, tmp_path / "dask.xyz", forces=True, dask="local", progress=None)) == 6
    assert len(read(tmp_path / "dask.xyz", index=":")) == 6


def test_dask_workers_needs_dask_and_a_dead_scheduler_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr("mfcalc.label.DASK_CONNECT_TIMEOUT", "1s")
    with pytest.raises(ValueError, match="--dask-workers"):
        label(waters(1), CHEAP, tmp_path / "x.xyz", dask_workers=2, progress=None)
    with pytest.raises(RuntimeError, match="no Dask scheduler answers"):
        label(waters(1), CHEAP, tmp_path / "y.xyz", dask="tcp://127.0.0.1:9", progress=None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_dask_client_resumes_with_no_lost_or_duplicated_frame(tmp_path):
    n = 80
    structures = tmp_path / "waters.xyz"
    write(str(structures), waters(n, seed=100))
    out = tmp_path / "out.xyz"
    command = [sys.executable, "-m", "mfcalc.cli", "label", str(structures), "--method", CHEAP, "--forces",
               "--out", str(out), "--dask", "local", "--dask-workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    err = open(tmp_path / "stderr.txt", "w")
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline, processes = time.time() + 120, []
    while time.time() < deadline:
        processes = descendants(run.pid) or processes
        if out.exists() and out.read_bytes().count(b"Properties=") >= 3:
            break
        assert run.poll() is None, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.02)
    else:
        run.kill()
        pytest.fail("the Dask run wrote no three records within 120 s")
    processes = descendants(run.pid) or processes
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    deadline = time.time() + 30  # the LocalCluster's processes end with their client
    while time.time() < deadline and any(alive(p) for p in processes):
        time.sleep(0.1)
    assert processes and not [p for p in processes if alive(p)], "Dask worker processes survived the client"
    records, _ = _read_output(out)
    assert 3 <= len(records) < n, "the run was not stopped part-way"
    print(f"killed after {len(records)} of {n} records")

    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{n} of {n} structures labelled" in resumed.stdout
    final = read(out, index=":")
    indices = [int(a.info["label_index"]) for a in final]
    assert sorted(indices) == list(range(n))  # every frame once: none lost, none twice
    kept = by_index(a for _, a in records)
    again = by_index(final)
    for k, record in kept.items():  # what the killed run finished was kept, not recomputed
        assert again[k].info["seconds"] == record.info["seconds"]
        assert again[k].get_potential_energy() == record.get_potential_energy()
