"""compile="auto": TorchScript from the first call, the compiled graph once a background thread
has built it and checked it against the TorchScript file (mfcalc.autocompile)."""

import argparse

import numpy as np
import pytest
import torch
from ase.build import bulk

from mfcalc import MFCalculator, autocompile
from mfcalc.autocompile import AutoCompiler, default_compile, parse_compile
from mfcalc.cli import compile_choice


def test_compile_argument_and_environment(monkeypatch):
    monkeypatch.delenv("MFCALC_COMPILE", raising=False)
    assert parse_compile(None) == "auto"
    for value, expected in (("0", False), ("1", True), ("auto", "auto"), ("NO", False)):
        monkeypatch.setenv("MFCALC_COMPILE", value)
        assert default_compile() == expected
    monkeypatch.setenv("MFCALC_COMPILE", "sometimes")
    with pytest.raises(ValueError, match="MFCALC_COMPILE must be 0, 1 or auto"):
        default_compile()
    for bad in ("yes", 1, 2.0):
        with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
            parse_compile(bad)
    assert [compile_choice(t) for t in ("auto", "yes", "no")] == ["auto", True, False]
    with pytest.raises(argparse.ArgumentTypeError):
        compile_choice("maybe")


def _moves(atoms, n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        atoms.positions += rng.normal(0, 0.01, atoms.positions.shape)
        yield atoms


def test_auto_switches_to_the_checked_compiled_graph_with_the_same_numbers(tiny_model, ethanol, monkeypatch):
    """The first calls run TorchScript; once the budget is spent a background compilation starts,
    is checked, and later calls of that atom count run compiled, with the TorchScript numbers."""
    monkeypatch.setattr(autocompile, "COMPILE_AFTER_S", 0.0)
    ref = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu", compile=False)
    auto = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu", compile="auto")
    potential = auto.potential
    assert potential.compile_status() == {} and repr(potential).count("compile='auto'") == 1
    a, b = ethanol.copy(), ethanol.copy()
    a.calc, b.calc = ref, auto
    b.get_forces()  # TorchScript; starts the compilation (budget 0 s)
    assert potential.compile_status()[9]["state"] in ("compiling", "ready")
    status = potential.wait_for_compile(timeout=600)
    assert status[9]["state"] == "ready", status
    assert potential.auto.module_for(9) is potential.auto.compiled
    assert potential.auto.module_for(7) is potential.scripted  # other sizes wait for their own turn
    for step in range(3):
        for atoms in (a, b):
            atoms.positions = ethanol.positions + 0.01 * step
        np.testing.assert_allclose(b.get_forces(), a.get_forces(), atol=1e-9)
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-9)
    assert potential.load_arguments()["compile"] == "auto"


class _Broken:
    def compute(self, positions, numbers, cell, pbc, fidelity, *args):
        raise RuntimeError("no C++ compiler found")


class _Wrong:
    def __init__(self, scripted):
        self.scripted = scripted

    def compute(self, positions, numbers, cell, pbc, fidelity, *args):
        out = dict(self.scripted.compute(positions, numbers, cell, pbc, fidelity, False, "dense", None))
        out["forces"] = out["forces"] + 0.01
        return out


@pytest.mark.parametrize("kind", ["fails", "disagrees"])
def test_a_failed_or_wrong_compilation_warns_once_and_stays_on_torchscript(tiny_model, ethanol, monkeypatch, kind):
    monkeypatch.setattr(autocompile, "COMPILE_AFTER_S", 0.0)
    calc = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu", compile="auto")
    potential = calc.potential
    potential.auto._build = (lambda: _Broken()) if kind == "fails" else (lambda: _Wrong(potential.scripted))
    ethanol.calc = calc
    expected = MFCalculator(tiny_model, fidelity="mid", dtype="float64", device="cpu", compile=False)
    with pytest.warns(RuntimeWarning, match="stay on the TorchScript file"):
        ethanol.get_forces()
        status = potential.wait_for_compile(timeout=60)
    assert status[9]["state"] == "failed"
    assert ("no C++ compiler" if kind == "fails" else "differ") in status[9]["reason"]
    for atoms in _moves(ethanol, 2):
        assert potential.auto.module_for(9) is potential.scripted
        np.testing.assert_allclose(atoms.get_forces(), expected.get_forces(atoms.copy()), atol=1e-12)


def test_what_auto_leaves_on_torchscript(tiny_model, monkeypatch):
    """Periodic cells, stress, large structures and CUDA never start a compilation; nor does a
    run that has not yet spent COMPILE_AFTER_S in force calls."""
    assert AutoCompiler.eligible(9, False, "auto", False)
    assert not AutoCompiler.eligible(9, True, "auto", False)
    assert not AutoCompiler.eligible(9, False, "auto", True)
    assert not AutoCompiler.eligible(9, False, "vesin", False)
    assert not AutoCompiler.eligible(1, False, "auto", False)
    assert not AutoCompiler.eligible(200, False, "auto", False)
    silicon = bulk("Si", "diamond", a=5.43)
    silicon.calc = MFCalculator(tiny_model, dtype="float64", device="cpu", compile="auto")
    silicon.get_forces()
    silicon.get_stress()
    assert silicon.calc.potential.compile_status() == {}
    monkeypatch.setattr(autocompile, "COMPILE_AFTER_S", 3600.0)
    from ase.build import molecule

    water = molecule("H2O")
    water.calc = MFCalculator(tiny_model, dtype="float64", device="cpu", compile="auto")
    for atoms in _moves(water, 3):
        atoms.get_forces()
    assert water.calc.potential.compile_status()[3]["state"] == "waiting"
    gpu = AutoCompiler(lambda: None, None, torch.device("cuda"), torch.float32)
    gpu.record(9, 10.0, ())
    assert gpu.status() == {}


def test_a_process_that_ends_while_compiling_waits_and_exits_cleanly(tiny_model, tmp_path):
    """Without the wait the C++ runtime aborts the interpreter under the compiler (SIGABRT,
    'terminate called without an active exception')."""
    import subprocess
    import sys

    script = tmp_path / "short.py"
    script.write_text(
        "import mfcalc.autocompile as A\n"
        "A.COMPILE_AFTER_S = 0.0\n"
        "from ase.build import molecule\n"
        "from mfcalc import MFCalculator\n"
        "atoms = molecule('CH3CH2OH')\n"
        f"atoms.calc = MFCalculator({str(tiny_model)!r}, dtype='float64', device='cpu', compile='auto')\n"
        "atoms.get_forces()\n"
        "print('state', atoms.calc.potential.compile_status()[9]['state'])\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "MFCALC_COMPILE"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "terminate called" not in out.stderr
    if "state compiling" in out.stdout:  # it was still compiling at the end of the script
        assert "waiting for it to finish before exiting" in out.stderr


def test_compiling_a_model_lifts_dynamos_recompile_limit(forcefield_factory):
    """Every model compiled in a process is a recompile of the same inner function; at dynamo's
    default limit (8) the 9th would silently run eagerly (pareto.py: 4.5 -> 19.9 ms/step)."""
    import torch

    from mfcalc.compiled import RECOMPILE_LIMIT, CompiledForceField

    config = torch._dynamo.config
    with config.patch(recompile_limit=8):  # dynamo's own patch: restored exactly afterwards
        CompiledForceField(forcefield_factory(seed=0))
        assert config.recompile_limit == RECOMPILE_LIMIT >= 64
    with config.patch(recompile_limit=10**6):  # never lowered
        CompiledForceField(forcefield_factory(seed=0))
        assert config.recompile_limit == 10**6
    assert isinstance(config.recompile_limit, int)
