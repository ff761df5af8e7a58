"""An i-PI force client: ``mfcalc ipi MODEL --fidelity F --structure FILE --address ADDR [--unix]``.

i-PI (https://ipi-code.org) runs the dynamics - path-integral MD, thermostats, replica
exchange - and asks force clients over a socket for the energy, forces and virial of each
bead. This client is ASE's ``SocketClient`` (the i-PI protocol, with its Bohr/Hartree
conversions) driving an ``MFCalculator`` at one fidelity. i-PI sends positions and the cell only,
so the client reads the atomic numbers (and pbc) from ``structure``, the same structure i-PI
starts from. Any number of clients may connect to one i-PI server: i-PI hands each a bead.

A molecule (pbc false in the structure) gets a zero virial; a periodic structure gets the
stress as virial (for NPT). Loopback TCP (``--address localhost --port 31415``) or a UNIX socket
(``--unix``: ``/tmp/ipi_<ADDR>``, i-PI's ``<ffsocket mode="unix">`` naming) only.
"""

import time
from typing import Optional

from ase import Atoms


def connect(address: str, unix: bool, port: Optional[int], timeout: float):
    """ASE's SocketClient connected to i-PI, retried until ``timeout`` seconds (i-PI opens its
    socket a moment after it starts)."""
    from ase.calculators.socketio import SocketClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            if unix:
                return SocketClient(unixsocket=address)
            return SocketClient(host=address, port=port)
        except OSError as err:  # not there yet: FileNotFoundError, ConnectionRefusedError
            if time.monotonic() > deadline:
                where = f"/tmp/ipi_{address}" if unix else f"{address}:{port}"
                raise RuntimeError(f"no i-PI server at {where} after {timeout:g} s ({err}); start i-PI first "
                                   "(i-pi input.xml) with the same address") from None
            time.sleep(0.1)


def run_client(atoms: Atoms, model: str, fidelity: Optional[str], address: str, unix: bool = False,
               port: Optional[int] = 31415, timeout: float = 60.0, dtype: Optional[str] = None,
               device: str = "auto", threads="auto") -> int:
    """Serve forces of ``model`` at ``fidelity`` for ``atoms`` (template: numbers, pbc) to i-PI
    until it says EXIT or closes the socket. Returns the number of force calls served."""
    from .calculator import MFCalculator

    atoms = atoms.copy()
    atoms.calc = MFCalculator(model, fidelity=fidelity, dtype=dtype, device=device, threads=threads)
    client = connect(address, unix, port, timeout)
    calls = 0
    try:
        for _ in client.irun(atoms, use_stress=bool(atoms.pbc.any())):
            calls += 1
    finally:
        client.close()
    return calls


# --------------------------------------------------------------------------- i-PI inputs
def write_xyz(path, atoms: Atoms, box: float = 20.0) -> None:
    """``atoms`` as the xyz file i-PI starts from (Å; a molecule gets a ``box`` Å cubic cell,
    which i-PI needs and the client ignores for pbc false)."""
    import numpy as np

    if atoms.pbc.any():
        a, b, c, alpha, beta, gamma = atoms.cell.cellpar()
    else:
        a = b = c = box
        alpha = beta = gamma = 90.0
    lines = [str(len(atoms)),
             f"# CELL(abcABC): {a:.8f} {b:.8f} {c:.8f} {alpha:.5f} {beta:.5f} {gamma:.5f} "
             "positions{angstrom} cell{angstrom}"]
    for symbol, (x, y, z) in zip(atoms.get_chemical_symbols(), np.asarray(atoms.positions, float)):
        lines.append(f"{symbol:2s} {x:16.8f} {y:16.8f} {z:16.8f}")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def nvt_input(structure_xyz, address: str, beads: int = 8, temperature: float = 300.0, steps: int = 300,
              timestep: float = 0.5, tau: float = 20.0, seed: int = 31415, prefix: str = "simulation",
              stride: int = 5, unix: bool = True, port: int = 31415, latency: float = 1e-4) -> str:
    """An i-PI input (XML text): NVT (path-integral MD with ``beads`` > 1, classical MD with 1)
    of a molecule started from ``structure_xyz`` (see ``write_xyz``), PILE-L thermostat
    (centroid time constant ``tau`` fs, the internal modes critically damped), forces from
    socket clients at ``address``. Writes ``<prefix>.out`` every step (step, time in fs,
    temperature in K, the centroid-virial kinetic energy, the kinetic energy of the beads and the
    potential, in eV) and every ``stride`` steps the positions of every bead in Å
    (``<prefix>.pos_<bead>.xyz``)."""
    mode = "unix" if unix else "inet"
    port_line = "" if unix else f"\n    <port>{port}</port>"
    return f"""<simulation verbosity="low" safe_stride="{10 * steps + 10}">
  <output prefix="{prefix}">
    <properties stride="1" filename="out"> [ step, time{{femtosecond}}, temperature{{kelvin}},
      kinetic_cv{{electronvolt}}, kinetic_md{{electronvolt}}, potential{{electronvolt}} ] </properties>
    <trajectory filename="pos" stride="{stride}" format="xyz" cell_units="angstrom"> positions{{angstrom}} </trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
  <ffsocket name="mfcalc" mode="{mode}" pbc="false">
    <address>{address}</address>{port_line}
    <latency>{latency}</latency>
  </ffsocket>
  <system>
    <initialize nbeads="{beads}">
      <file mode="xyz" units="angstrom">{structure_xyz}</file>
      <velocities mode="thermal" units="kelvin">{temperature}</velocities>
    </initialize>
    <forces><force forcefield="mfcalc"/></forces>
    <motion mode="dynamics">
      <dynamics mode="nvt">
        <timestep units="femtosecond">{timestep}</timestep>
        <thermostat mode="pile_l"><tau units="femtosecond">{tau}</tau></thermostat>
      </dynamics>
    </motion>
    <ensemble><temperature units="kelvin">{temperature}</temperature></ensemble>
  </system>
</simulation>
"""


def read_properties(path):
    """The columns of an i-PI ``.out`` file by name (units stripped): {name: numpy array}."""
    import re

    import numpy as np

    names = []
    rows = []
    with open(path) as handle:
        for line in handle:
            if line.startswith("#"):
                match = re.search(r"-->\s*(\S+)", line)
                if match:
                    names.append(match.group(1).split("{")[0])
            elif line.strip():
                rows.append([float(x) for x in line.split()])
    data = np.array(rows).reshape(-1, len(names))
    return {name: data[:, k] for k, name in enumerate(names)}


def read_bead_xyz(path):
    """Frames of an i-PI xyz trajectory: a list of (N, 3) position arrays (Å)."""
    import numpy as np

    frames = []
    with open(path) as handle:
        lines = handle.read().splitlines()
    k = 0
    while k < len(lines) and lines[k].strip():
        n = int(lines[k])
        frames.append(np.array([[float(x) for x in line.split()[1:4]] for line in lines[k + 2:k + 2 + n]]))
        k += n + 2
    return frames
