"""MD that explodes stops while it happens, with a one-line reason and a hint, and keeps the
trajectory written so far (issue #17, section 3, "MD that explodes silently").

The end-to-end runs use the small random-weight model (tests/conftest.py): a 20 fs time step
lets its atoms fly apart within a few steps, and ethanol squeezed to half its size (far outside
any training data) heats past 5000 K; both are deterministic (fixed seed). The checks one by
one run on ASE's Lennard-Jones calculator: the guard works with any ASE dynamics."""

import io
import subprocess
import sys

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.lj import LennardJones
from ase.io import read
from ase.md.verlet import VelocityVerlet

from mfcalc.mdguard import MDGuard, MDInstabilityError, nearest_neighbour_distances
from mfcalc.workflows import run_md


def squeezed_ethanol(factor: float = 0.5) -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.positions *= factor
    return atoms


def lj_trimer(distance: float = 1.12) -> Atoms:
    """Three LJ atoms (sigma 1 Å, epsilon 1 eV) in a triangle near the minimum."""
    atoms = Atoms("Ar3", positions=[[0, 0, 0], [distance, 0, 0], [distance / 2, distance * 0.866, 0]])
    atoms.calc = LennardJones(sigma=1.0, epsilon=1.0, rc=5.0, smooth=True)
    return atoms


def frames_of(err: MDInstabilityError, interval: int) -> int:
    """Frames a writer at ``interval`` wrote before the guard stopped the run at ``err.step``
    (the guard runs before the writer, so the failing step itself is not written)."""
    return len(range(0, err.step, interval))


# ----------------------------------------------------------------- end to end (run_md)
def test_a_20_fs_time_step_stops_early_and_keeps_the_trajectory(tiny_model, tmp_path):
    out = tmp_path / "md.traj"
    with pytest.raises(MDInstabilityError) as caught:
        run_md("CH3CH2OH", model=str(tiny_model), fidelity="high", timestep=20.0, steps=200, interval=2,
               out=str(out), device="cpu", log=io.StringIO())
    err = caught.value
    message = str(err)
    assert "\n" not in message
    assert message.startswith(f"MD became unstable at step {err.step}: ")
    # which check fires first depends on the (random-weight) network; each names its reason
    assert any(reason in message for reason in ("no neighbour within", "temperature", "forces", "energy changed"))
    assert "smaller time step (now 20 fs" in message
    assert 0 < err.step < 50  # while it happens, not after 200 steps
    frames = read(str(out), index=":")
    assert len(frames) == frames_of(err, 2) and f"kept {len(frames)} frames" in message
    assert all(np.isfinite(f.positions).all() for f in frames)
    assert np.isfinite(frames[-1].get_potential_energy())  # the frames carry their energies


def test_a_squeezed_molecule_far_outside_the_data_is_stopped(tiny_model, tmp_path):
    """Ethanol at 0.7x its size (C-H 0.76 Å, just outside the short-range core) at 500 K:
    depending on the network it overheats,
    hits the force limit or flies apart; whichever comes first, it is stopped early with a
    reason and the frames before it are kept."""
    out = tmp_path / "md.xyz"
    with pytest.raises(MDInstabilityError) as caught:
        run_md(squeezed_ethanol(0.7), model=str(tiny_model), fidelity="high", temperature=500.0, timestep=0.5,
               steps=1000, interval=5, out=str(out), device="cpu", log=io.StringIO())
    err = caught.value
    assert any(word in err.reason for word in ("temperature", "force", "energy jumped", "neighbour", "grew"))
    assert "outside the model's training domain" in err.hint and "lower temperature" in err.hint
    assert 0 < err.step < 500
    frames = read(str(out), index=":")
    assert len(frames) == frames_of(err, 5) and f"kept {len(frames)} frames" in str(err)
    assert "(extended XYZ)" in str(err)


def test_a_start_far_inside_the_repulsive_wall_stops_at_step_0(tiny_model, tmp_path):
    out = tmp_path / "md.traj"
    with pytest.raises(MDInstabilityError, match=r"at step 0: .*kept no frames") as caught:
        run_md(squeezed_ethanol(0.25), model=str(tiny_model), fidelity="high", temperature=500.0, steps=100,
               out=str(out), device="cpu", log=io.StringIO())
    assert caught.value.step == 0


def test_a_normal_run_is_not_stopped_and_says_where_it_wrote(tiny_model, tmp_path):
    out = tmp_path / "md.traj"
    log = io.StringIO()
    atoms = run_md("CH3CH2OH", model=str(tiny_model), fidelity="high", temperature=300.0, timestep=0.5,
                   steps=100, interval=10, out=str(out), device="cpu", log=log)
    assert len(read(str(out), index=":")) == 11
    assert f"wrote 11 frames (every 10 steps, last at step 100) in {out} (ASE trajectory)" in log.getvalue()
    assert atoms.get_temperature() < 1000


def test_the_command_line_prints_one_line_exits_1_and_keeps_the_frames(tiny_model, tmp_path):
    out = tmp_path / "md.traj"
    run = subprocess.run(
        [sys.executable, "-m", "mfcalc.cli", "md", "CH3CH2OH", "--model", str(tiny_model), "--fidelity", "high",
         "--timestep", "20", "--steps", "200", "--interval", "1", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("mfcalc md: error: MD became unstable at step")
    assert "Traceback" not in run.stderr
    step = int(errors[0].split("at step ")[1].split(":")[0])
    assert len(read(str(out), index=":")) == step  # steps 0 .. step-1


def test_no_guard_lets_atoms_leave_but_keeps_the_energy_checks(tiny_model, tmp_path):
    log = io.StringIO()
    run_md("CH3CH2OH", model=str(tiny_model), fidelity="high", timestep=2.0, steps=30, interval=10,
           out=str(tmp_path / "free.xyz"), device="cpu", log=log, check_geometry=False)
    assert "wrote 4 frames" in log.getvalue()
    with pytest.raises(MDInstabilityError, match="temperature|force"):
        run_md(squeezed_ethanol(), model=str(tiny_model), fidelity="high", temperature=500.0, steps=500,
               out=str(tmp_path / "hot.xyz"), device="cpu", log=io.StringIO(), check_geometry=False)


def test_sampling_md_is_guarded_too(tiny_model):
    from mfcalc.sampling import sample

    with pytest.raises(MDInstabilityError, match="smaller time step"):
        sample(molecule("CH3CH2OH"), model=str(tiny_model), fidelity="low", n=3, steps=300, interval=5,
               timestep=20.0, log=None)


# ----------------------------------------------------------------- each check (any ASE dynamics)
def test_a_huge_force_stops_at_step_0():
    atoms = lj_trimer(distance=0.6)  # squeezed far inside the repulsive wall
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    dyn.attach(MDGuard(atoms, temperature=300, timestep=1.0), interval=1)
    with pytest.raises(MDInstabilityError, match=r"at step 0: force .* eV/Å on atom \d \(Ar\) \(limit 50 eV/Å\)"):
        dyn.run(10)


def test_non_finite_energy_is_caught():
    class NaNAfter(LennardJones):
        calls = 0

        def calculate(self, *args, **kwargs):
            super().calculate(*args, **kwargs)
            NaNAfter.calls += 1
            if NaNAfter.calls > 3:
                self.results["energy"] = float("nan")

    atoms = lj_trimer()
    atoms.calc = NaNAfter(sigma=1.0, epsilon=1.0, rc=5.0)
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    dyn.attach(MDGuard(atoms, temperature=10, step=lambda: dyn.nsteps), interval=1)
    with pytest.raises(MDInstabilityError, match="the potential energy is nan"):
        dyn.run(20)


def test_non_finite_positions_are_caught_without_calling_the_calculator():
    atoms = lj_trimer()
    guard = MDGuard(atoms, temperature=10)
    atoms.positions[1, 0] = np.inf
    with pytest.raises(MDInstabilityError, match=r"position of atom 1 \(Ar\) is NaN or infinite"):
        guard()


def test_a_temperature_far_above_the_target_is_caught():
    atoms = lj_trimer()
    atoms.set_velocities(np.array([[30.0, 0, 0], [-30.0, 0, 0], [0, 30.0, 0]]) * units.Ang / units.fs)
    assert atoms.get_temperature() > 5000
    with pytest.raises(MDInstabilityError, match=r"temperature .* K \(limit 5000 K\)"):
        MDGuard(atoms, temperature=300, max_isolation=None, max_growth=None)()
    MDGuard(atoms, temperature=300, max_temperature=None, max_force=None)()  # switched off: passes


def test_an_absurd_energy_step_is_caught():
    atoms = lj_trimer()
    guard = MDGuard(atoms, temperature=10, max_force=None)
    guard()
    atoms.positions[1] = [0.8, 0.0, 0.0]  # 1.12 -> 0.8 Å: the LJ wall, ~+10 eV in one step
    with pytest.raises(MDInstabilityError, match=r"the potential energy jumped .* eV/atom, limit 1\)"):
        guard()


def test_an_atom_flying_off_and_a_structure_coming_apart_are_caught():
    atoms = lj_trimer()
    guard = MDGuard(atoms, temperature=10, step=lambda: 7)
    atoms.positions[2] += [0.0, 10.0, 0.0]
    with pytest.raises(MDInstabilityError, match=r"at step 7: atom 2 \(Ar\) has no neighbour within 4") as caught:
        guard()
    assert "--no-guard" in caught.value.hint  # intended bond breaking has a way out
    atoms = lj_trimer()
    guard = MDGuard(atoms, temperature=10, max_isolation=None)
    atoms.positions *= 6.0  # radius 0.65 -> 3.9 Å, above 3x max(0.65, 1 Å)
    with pytest.raises(MDInstabilityError, match="grew to a radius of .* more than 3x its initial size"):
        guard()


def test_periodic_cells_have_no_geometry_check_and_a_calm_state_passes():
    atoms = lj_trimer()
    atoms.cell, atoms.pbc = [12.0, 12.0, 12.0], True
    guard = MDGuard(atoms, temperature=10)
    atoms.positions[2] += [0.0, 5.0, 0.0]  # an atom alone in its cell is no instability
    guard()
    assert guard.problem() is None and guard.check_geometry is False


def test_limits_follow_the_target_and_the_starting_structure():
    atoms = lj_trimer()
    assert MDGuard(atoms, temperature=300).max_temperature == 5000
    assert MDGuard(atoms, temperature=2000).max_temperature == 20000
    spread = Atoms("Ar2", positions=[[0, 0, 0], [6.0, 0, 0]])  # starts with atoms 6 Å apart
    assert MDGuard(spread, temperature=10).max_isolation == pytest.approx(9.0)
    np.testing.assert_allclose(nearest_neighbour_distances(spread.positions), [6.0, 6.0])
