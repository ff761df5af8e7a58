"""The bad-input catalogue: every way a user can hand mfcalc something wrong, and what happens.

Each case asserts the exception type and that the message names the problem (and, where it
helps, what would be right). Hard edges that are *not* errors (single atom, cell shorter than
the cutoff, mixed PBC, far from the origin, many atoms) are checked for correct results.
"""

import json
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError

from mfcalc import MFCalculator, ModelFileError, load_model
from mfcalc.modelfile import FORMAT_VERSION, METADATA_NAME
from mfcalc.neighbors import neighbor_list

from helpers import energy


# ----------------------------------------------------------------- fidelity
def test_01_unknown_fidelity_lists_fidelities_and_aliases(tiny_model):
    with pytest.raises(ValueError, match=r"unknown fidelity 'CCSD'.*\['low', 'mid', 'high'\].*'HI' -> 'high'"):
        MFCalculator(tiny_model, fidelity="CCSD", device="cpu")


def test_02_alias_typo_suggests_the_close_match(tiny_model):
    with pytest.raises(ValueError, match=r"unknown fidelity 'hihg'.*Did you mean 'high'"):
        MFCalculator(tiny_model, fidelity="hihg", device="cpu")


def test_03_failed_runtime_switch_keeps_the_old_fidelity(calc):
    with pytest.raises(ValueError, match="unknown fidelity 'Hi'"):
        calc.fidelity = "Hi"
    assert calc.fidelity == "high"


def test_04_fidelity_given_as_a_number(tiny_model):
    with pytest.raises(ValueError, match=r"unknown fidelity 2.*Available fidelities"):
        MFCalculator(tiny_model, fidelity=2, device="cpu")


# ----------------------------------------------------------------- structures
def test_05_element_not_in_the_model(calc):
    with pytest.raises(ValueError, match=r"\['Cl'\] are not in this model; it knows \['H', 'C', 'O', 'Si'\]"):
        energy(calc, molecule("CH3Cl"))


def test_06_ghost_atom_x(calc):
    atoms = Atoms("XH", positions=[[0, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match=r"\['X'\] are not in this model"):
        energy(calc, atoms)


def test_07_empty_structure(calc):
    with pytest.raises(ValueError, match="the structure has no atoms"):
        energy(calc, Atoms())


def test_08_single_atom_is_not_an_error(calc):
    atoms = Atoms("C", positions=[[1, 2, 3]])
    assert np.isfinite(energy(calc, atoms))
    np.testing.assert_array_equal(atoms.get_forces(), np.zeros((1, 3)))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_09_non_finite_positions(calc, ethanol, value):
    ethanol.positions[4, 2] = value
    with pytest.raises(ValueError, match=r"positions of atom\(s\) \[4\] are NaN or infinite"):
        energy(calc, ethanol)


def test_10_atoms_closer_than_a_tenth_of_an_angstrom_warn(calc, ethanol):
    ethanol.positions[1] = ethanol.positions[0] + [0.05, 0, 0]
    with pytest.warns(RuntimeWarning, match=r"two atoms are 0.05 Å apart"):
        energy(calc, ethanol)
    assert np.isfinite(ethanol.get_forces()).all()


def test_11_atoms_on_top_of_each_other_never_give_nan_silently(calc, ethanol):
    ethanol.positions[1] = ethanol.positions[0]
    ethanol.calc = calc
    with pytest.raises(FloatingPointError, match=r"non-finite forces.*smallest distance 0 Å"):
        with pytest.warns(RuntimeWarning, match="two atoms are 0 Å apart"):
            ethanol.get_forces()


def test_12_periodic_cell_with_zero_volume(calc, ethanol):
    ethanol.cell = [[5, 0, 0], [10, 0, 0], [0, 0, 5]]
    ethanol.pbc = True
    with pytest.raises(ValueError, match=r"cell vectors of the periodic directions .* zero or linearly dependent"):
        energy(calc, ethanol)


def test_13_periodic_direction_without_a_cell_vector(calc, ethanol):
    ethanol.pbc = [True, False, False]  # cell left at zero
    with pytest.raises(ValueError, match=r"pbc=\[True, False, False\].*zero or linearly dependent"):
        energy(calc, ethanol)


def test_14_cell_shorter_than_the_cutoff_is_correct_not_an_error(calc):
    small = bulk("Si", "diamond", a=5.43)  # 3.8 Å cell vectors, 4 Å cutoff: many images
    small.rattle(0.05, seed=0)
    big = small.repeat((3, 2, 2))
    assert energy(calc, big) == pytest.approx(12 * energy(calc, small), rel=1e-10)


def test_15_mixed_pbc_is_correct(calc):
    slab = bulk("Si", "diamond", a=5.43, cubic=True)
    slab.pbc = [True, True, False]
    slab.rattle(0.05, seed=1)
    e1 = energy(calc, slab.copy())
    moved = slab.copy()
    moved.positions[:, 2] += 37.0  # the aperiodic direction has no images
    assert energy(calc, moved) == pytest.approx(e1, abs=1e-9)
    doubled = slab.repeat((2, 1, 1))
    assert energy(calc, doubled) == pytest.approx(2 * e1, rel=1e-10)


def test_16_far_from_the_origin_in_float32(tiny_model, ethanol):
    calc32 = MFCalculator(tiny_model, fidelity="high", dtype="float32", device="cpu")
    e0 = energy(calc32, ethanol)
    f0 = ethanol.get_forces()
    far = ethanol.copy()
    far.positions += [1.0e6, -2.0e6, 3.0e5]
    assert energy(calc32, far) == pytest.approx(e0, abs=1e-4)
    np.testing.assert_allclose(far.get_forces(), f0, atol=1e-4)


def test_17_stress_on_a_non_periodic_system(calc, ethanol):
    ethanol.calc = calc
    with pytest.raises(PropertyNotImplementedError, match="stress is defined for periodic cells only"):
        ethanol.get_stress()


def test_18_ten_thousand_atoms_memory_stays_bounded(tiny_model):
    """10 000 atoms: `auto` uses the cell list (memory linear in the number of pairs), and the
    dense search refuses sizes that would need more than a few GB instead of swapping."""
    rng = np.random.default_rng(0)
    n = 10_000
    length = (n / 0.1) ** (1 / 3)  # 0.1 atoms per Å^3, like water
    atoms = Atoms(["O", "H", "H"] * (n // 3) + ["O"], positions=rng.uniform(0, length, (n, 3)),
                  cell=[length] * 3, pbc=True)
    atoms.positions = np.round(atoms.positions, 1)
    # remove contacts below 0.7 Å so the random gas is physical enough
    keep = np.ones(n, bool)
    from ase.neighborlist import neighbor_list as ase_nl

    i, j = ase_nl("ij", atoms, 0.7)
    keep[np.unique(np.maximum(i, j))] = False
    atoms = atoms[keep]
    calc = MFCalculator(tiny_model, fidelity="low", dtype="float32", device="cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    atoms.calc = calc
    assert np.isfinite(atoms.get_forces()).all()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 3000, f"{len(atoms)} atoms took {grown_mb:.0f} MB"
    with pytest.raises(ValueError, match=r"dense all-pairs neighbor search of \d+ atoms .* use neighbor_list='vesin'"):
        neighbor_list(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array),
                      torch.tensor(atoms.pbc), 4.0, "dense")


# ----------------------------------------------------------------- options
def test_19_unsupported_dtype(tiny_model):
    with pytest.raises(ValueError, match=r"dtype must be 'float32' or 'float64'.*float16"):
        MFCalculator(tiny_model, dtype=torch.float16)


def test_20_unknown_device(tiny_model):
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu' or 'cuda\[:N\]', got 'tpu'"):
        MFCalculator(tiny_model, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_21_cuda_on_a_machine_without_cuda(tiny_model):
    with pytest.raises(RuntimeError, match="sees no CUDA GPU; use device='cpu'"):
        MFCalculator(tiny_model, device="cuda")


def test_22_unknown_neighbor_list(tiny_model):
    with pytest.raises(ValueError, match=r"neighbor_list must be one of .*'vesin'.*got 'kdtree'"):
        MFCalculator(tiny_model, neighbor_list="kdtree")


# ----------------------------------------------------------------- model files
def test_23_model_name_that_does_not_exist():
    with pytest.raises(ModelFileError, match=r"no model file at 'ethanol-mff'.*shipped models: \[.*'ethanol-mf'"):
        MFCalculator("ethanol-mff")


def test_24_truncated_model_file(tiny_model, tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(tiny_model.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match=r"truncated\.pt is not a readable mfcalc model file \(truncated or corrupted\?\)"):
        MFCalculator(bad)


def test_25_corrupted_model_file(tiny_model, tmp_path):
    data = bytearray(tiny_model.read_bytes())
    for k in range(2000, len(data) - 2000, 997):  # flip bytes all through the archive
        data[k] ^= 0xFF
    bad = tmp_path / "corrupted.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"corrupted\.pt"):
        MFCalculator(bad)


def _resave(src, dst, edit_meta=None, edit_module=None):
    extra = {METADATA_NAME: ""}
    module = torch.jit.load(str(src), _extra_files=extra)
    meta = json.loads(extra[METADATA_NAME])
    if edit_meta:
        edit_meta(meta)
    if edit_module:
        edit_module(module)
    torch.jit.save(module, str(dst), _extra_files={METADATA_NAME: json.dumps(meta)})


def test_26_model_file_from_a_newer_mfcalc(tiny_model, tmp_path):
    newer = tmp_path / "newer.pt"
    _resave(tiny_model, newer, edit_meta=lambda m: m.update(format_version=FORMAT_VERSION + 1, mfcalc_version="9.0"))
    with pytest.raises(ModelFileError, match=r"newer\.pt was written by mfcalc 9\.0 .* Upgrade mfcalc"):
        load_model(newer)


def test_27_edited_weights_fail_the_checksum(tiny_model, tmp_path):
    edited = tmp_path / "edited.pt"

    def edit(module):
        with torch.no_grad():
            dict(module.named_parameters())["model.readout.0.weight"][0, 0] += 1e-3

    _resave(tiny_model, edited, edit_module=edit)
    with pytest.raises(ModelFileError, match=r"edited\.pt: checksum mismatch"):
        load_model(edited)


def test_28_torchscript_file_without_mfcalc_metadata(tmp_path):
    other = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(other))
    with pytest.raises(ModelFileError, match=r"other\.pt is a TorchScript file but has no mfcalc metadata"):
        load_model(other)


def test_29_checkpoint_passed_where_a_model_file_is_expected(tmp_path, forcefield_factory):
    from mfcalc.modelfile import save_checkpoint

    save_checkpoint(tmp_path / "ckpt.pt", forcefield_factory())
    with pytest.raises(ModelFileError, match=r"ckpt\.pt is not a readable mfcalc model file"):
        MFCalculator(tmp_path / "ckpt.pt")


# ----------------------------------------------------------------- MD and the command line
def test_30_trajectory_stays_readable_when_md_raises(calc, tmp_path):
    from ase.io import Trajectory, read
    from ase.md.verlet import VelocityVerlet

    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    path = tmp_path / "crash.traj"
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    with Trajectory(str(path), "w", atoms) as traj:
        dyn.attach(traj.write, interval=5)

        def blow_up():
            if dyn.nsteps == 23:
                atoms.positions[0] = np.nan
        dyn.attach(blow_up, interval=1)
        with pytest.raises(ValueError, match="NaN or infinite"):
            dyn.run(100)
    frames = read(str(path), index=":")
    assert len(frames) == 5 and np.isfinite(frames[-1].positions).all()


def test_31_command_line_errors_are_one_line_with_exit_code_1(tiny_model):
    run = subprocess.run(
        [sys.executable, "-m", "mfcalc.cli", "md", "CH3CH2OH", "--model", str(tiny_model),
         "--fidelity", "hgh", "--steps", "2"], capture_output=True, text=True,
    )
    assert run.returncode == 1
    assert run.stderr.strip().startswith("mfcalc md: error: unknown fidelity 'hgh'")
    assert len(run.stderr.strip().splitlines()) == 1
