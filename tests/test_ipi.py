"""i-PI drives mfcalc force clients: a few steps of path-integral MD with two `mfcalc ipi`
clients on a UNIX socket, every process bounded by a timeout; the forces i-PI received are
MFCalculator's (checked through the potential energy i-PI reports for the first step)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from ase.build import molecule

pytest.importorskip("ipi")

from mfcalc import MFCalculator  # noqa: E402
from mfcalc.ipi import nvt_input, read_bead_xyz, read_properties, write_xyz  # noqa: E402
from mfcalc.cli import main  # noqa: E402


def test_two_clients_serve_a_few_pimd_steps(tmp_path, tiny_model):
    atoms = molecule("H2O")
    atoms.rattle(0.02, seed=3)
    write_xyz(tmp_path / "start.xyz", atoms)
    address = f"mfcalc-test-{os.getpid()}"
    (tmp_path / "input.xml").write_text(nvt_input("start.xyz", address, beads=4, steps=5, prefix="run", stride=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(["i-pi", "input.xml"], cwd=tmp_path, stdout=open(tmp_path / "i-pi.log", "w"),
                              stderr=subprocess.STDOUT, env=env)
    command = [sys.executable, "-m", "mfcalc.cli", "ipi", str(tiny_model), "--fidelity", "mid", "--structure",
               str(tmp_path / "start.xyz"), "--address", address, "--unix", "--timeout", "60", "--threads", "1"]
    clients = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for _ in range(2)]
    try:
        assert server.wait(timeout=120) == 0, (tmp_path / "i-pi.log").read_text()[-3000:]
        outputs = [c.communicate(timeout=30) for c in clients]
    finally:
        for process in [server, *clients]:
            if process.poll() is None:
                process.kill()
                process.wait()
    calls = []
    for client, (_, err) in zip(clients, outputs):
        assert client.returncode == 0, err
        calls.append(int(err.split("after")[1].split()[0]))
    assert sum(calls) == 4 * 6 and min(calls) > 0  # 4 beads x (5 steps + the first), both clients served
    properties = read_properties(tmp_path / "run.out")
    assert list(properties["step"]) == [0, 1, 2, 3, 4, 5]
    # step 0: every bead at the starting geometry: i-PI's potential (per bead) is MFCalculator's
    beads = [read_bead_xyz(tmp_path / f"run.pos_{b}.xyz")[0] for b in range(4)]
    expected = []
    for positions in beads:
        copy = atoms.copy()
        copy.positions = positions
        copy.calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu")
        expected.append(copy.get_potential_energy())
    # to 2 meV: i-PI prints 5 decimals of positions and energy, and ASE's and i-PI's Hartree
    # differ in the 7th digit (1e-7 x 2064 eV); the other fidelities are 3 eV away
    assert properties["potential"][0] == pytest.approx(np.mean(expected), abs=2e-3)


def test_no_server_is_one_error_line(tmp_path, tiny_model, capsys):
    code = main(["ipi", str(tiny_model), "--structure", "H2O", "--address", f"nobody-{os.getpid()}", "--unix",
                 "--timeout", "0.3"])
    assert code == 1
    assert "no i-PI server at /tmp/ipi_nobody" in capsys.readouterr().err
