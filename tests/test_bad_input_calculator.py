"""Bad-input catalogue, part 2: the calculator and every in-process entry point (issue #17, §3).

Continues tests/test_bad_input.py (cases 01-31) with cases c01...: inputs the model cannot
represent (charge, spin, radicals, atomic numbers outside 1-118), the other entry points
(predict_all_fidelities, batch / replicas.predict, ReplicaMD) checking exactly like calculate(),
threads and processes, tiny periodic cells, mixed PBC with a zero cell row, the out-of-domain
signal, and fidelity names in the wrong case. Each case asserts the error (type and a message
naming the problem) or the correct value.
"""

import importlib.util
import multiprocessing
import pickle
import re
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.io import read, write

from mfcalc import MFCalculator, ModelFileError, ReplicaMD, load_model, predict
from mfcalc.domain import DomainCheck, OutOfDomainWarning, domain_statistics
from mfcalc.neighbors import MAX_PERIODIC_IMAGES, neighbor_list
from mfcalc.workflows import thermalize

from helpers import energy

ROOT = Path(__file__).resolve().parent.parent


def water_radical():
    atoms = molecule("OH")
    atoms.set_initial_magnetic_moments(None)  # ase.build gives radicals a moment: test the electron count
    return atoms


# ===================================================================== 1. what the model cannot represent
@pytest.mark.parametrize("key", ["charge", "total_charge"])
@pytest.mark.parametrize("value", [1, -1, 2.0])
def test_c01_a_charge_in_info_is_refused(calc, ethanol, key, value):
    ethanol.info[key] = value
    with pytest.raises(ValueError, match=rf"atoms.info\['{key}'\] = {re.escape(f'{value:+g}')}, but this model was trained on "
                                         r"neutral singlet structures only.*no charge input"):
        energy(calc, ethanol)


@pytest.mark.parametrize("key, value, reading", [
    ("multiplicity", 3, ""),
    ("spin", 3, r" \(read as 2S\+1: multiplicity 3\)"),  # fairchem's convention
    ("spin", 2, r" \(read as 2S: multiplicity 3\)"),  # PySCF's and mfcalc label's: a triplet too
    ("spin", 5, r" \(read as 2S\+1: multiplicity 5\)"),
])
def test_c02_an_open_shell_spin_in_info_is_refused(calc, ethanol, key, value, reading):
    """'spin' is 2S to PySCF (and mfcalc label) and 2S+1 to fairchem; ethanol's 26 electrons
    fit only one reading of each value, and the message says which was taken."""
    ethanol.info[key] = value
    with pytest.raises(ValueError, match=rf"atoms.info\['{key}'\] = {value}{reading}, but this model was trained on "
                                         r"neutral singlet structures only and it has no spin input"):
        energy(calc, ethanol)


def test_c02b_a_labelled_doublet_is_refused_as_a_doublet(calc):
    radical = water_radical()
    radical.info.update(charge=0, spin=1)  # as mfcalc label / PySCF write a doublet: 2S = 1
    with pytest.raises(ValueError, match=r"atoms.info\['spin'\] = 1 \(read as 2S: multiplicity 2\)"):
        energy(calc, radical)


def test_c02c_a_spin_that_is_no_spin_state(calc, ethanol):
    ethanol.info["multiplicity"] = 0
    with pytest.raises(ValueError, match=r"atoms.info\['multiplicity'\] = 0 is not a spin state"):
        energy(calc, ethanol)


def test_c03_a_multiplicity_impossible_for_the_electron_count(calc, ethanol):
    ethanol.info["multiplicity"] = 2  # 26 electrons cannot be a doublet
    with pytest.raises(ValueError, match=r"atoms.info\['multiplicity'\] = 2 is impossible for C2H6O \(charge \+0, 26 electrons\): "
                                         r"an even number of electrons needs an odd multiplicity"):
        energy(calc, ethanol)


@pytest.mark.parametrize("info", [{"charge": 0}, {"spin": 1}, {"spin": 0}, {"multiplicity": 1},
                                  {"charge": 0, "multiplicity": 1, "spin": 1}])
def test_c04_the_neutral_singlet_said_explicitly_is_accepted(calc, ethanol, info):
    plain = energy(calc, ethanol.copy())
    ethanol.info.update(info)
    assert energy(calc, ethanol) == pytest.approx(plain, abs=1e-12)


def test_c05_non_zero_initial_charges_are_refused_zero_ones_accepted(calc, ethanol):
    plain = energy(calc, ethanol.copy())
    ethanol.set_initial_charges(np.zeros(len(ethanol)))
    assert energy(calc, ethanol) == pytest.approx(plain, abs=1e-12)
    charges = np.zeros(len(ethanol))
    charges[[2, 8]] = [-0.5, 0.5]  # partial charges summing to zero are ignored just the same
    ethanol.set_initial_charges(charges)
    with pytest.raises(ValueError, match=r"non-zero initial_charges \(atom\(s\) \[2, 8\], sum \+0\).*"
                                         r"atoms.set_initial_charges\(None\)"):
        energy(calc, ethanol)


def test_c06_non_zero_initial_magnetic_moments_are_refused(calc, ethanol):
    moments = np.zeros(len(ethanol))
    moments[0] = 2.0
    ethanol.set_initial_magnetic_moments(moments)
    with pytest.raises(ValueError, match=r"non-zero initial_magmoms \(atom\(s\) \[0\].*"
                                         r"set_initial_magnetic_moments\(None\)"):
        energy(calc, ethanol)


@pytest.mark.parametrize("make, formula, electrons", [
    (water_radical, "HO", 9), (lambda: Atoms("H", positions=[[0, 0, 0]]), "H", 1),
    (lambda: Atoms("CH3", positions=[[0, 0, 0], [1.09, 0, 0], [-0.55, 0.94, 0], [-0.55, -0.94, 0]]), "CH3", 9),
])
def test_c07_an_odd_electron_molecule_is_a_radical_and_refused(calc, make, formula, electrons):
    with pytest.raises(ValueError, match=rf"{formula} \(charge \+0, {electrons} electrons\) has an odd number of "
                                         r"electrons: it is a radical.*add or remove a hydrogen"):
        energy(calc, make())


def test_c08_radical_check_is_for_molecules_only(calc):
    """One H in a periodic box is an H crystal, not a radical: the electron parity of one cell
    says nothing (a doubled cell is even)."""
    atoms = Atoms("H", positions=[[0, 0, 0]], cell=[3.0, 3.0, 3.0], pbc=True)
    assert np.isfinite(energy(calc, atoms))


def test_c09_allow_unsupported_state_warns_once_and_predicts_without_charge(tiny_model, ethanol):
    strict = MFCalculator(tiny_model, fidelity="high", dtype="float64", device="cpu")
    plain = energy(strict, ethanol.copy())
    lenient = MFCalculator(tiny_model, fidelity="high", dtype="float64", device="cpu", allow_unsupported_state=True)
    charged = ethanol.copy()
    charged.info["charge"] = 1
    with pytest.warns(RuntimeWarning, match=r"charge'\] = \+1.*allow_unsupported_state=True: predicted without"):
        assert energy(lenient, charged) == pytest.approx(plain, abs=1e-12)
    radical = water_radical()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per calculator: no second warning
        assert np.isfinite(energy(lenient, radical))


@pytest.fixture(scope="module")
def doublet_model(tmp_path_factory):
    """The tiny model's weights with metadata that declares neutral singlets and doublets."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import ALIASES, make_forcefield

    from mfcalc.modelfile import export_model

    path = tmp_path_factory.mktemp("doublet") / "doublet.pt"
    export_model(make_forcefield(), path, metadata={"aliases": ALIASES, "default_fidelity": "high",
                                                    "charge_states": [[0, 1], [0, 2]]})
    return path


def test_c10_metadata_charge_states_decide_what_is_accepted(doublet_model, ethanol):
    calc = MFCalculator(doublet_model, device="cpu")
    assert np.isfinite(energy(calc, water_radical()))  # a doublet: declared, accepted
    ethanol.info["multiplicity"] = 3
    with pytest.raises(ValueError, match=r"trained on neutral singlet, neutral doublet structures only"):
        energy(calc, ethanol)
    charged = molecule("H2O")
    charged.info["charge"] = 1
    with pytest.raises(ValueError, match=r"charge'\] = \+1"):
        energy(calc, charged)


@pytest.mark.parametrize("z", [-1, 119, 200, 1000])
def test_c11_atomic_numbers_outside_1_to_118_are_named(calc, z):
    atoms = molecule("H2O")
    atoms.numbers[1] = z
    with pytest.raises(ValueError, match=rf"atomic number\(s\) \[{z}\] \(atom\(s\) \[1\]\) are not elements: "
                                         r"atomic numbers run from 1 \(H\) to 118 \(Og\)"):
        energy(calc, atoms)


def test_c12_atomic_number_0_is_named_as_ase_ghost_atom(calc):
    atoms = molecule("H2O")
    atoms.numbers[0] = 0
    with pytest.raises(ValueError, match=r"\['X'\] are not in this model.*Atomic number 0 \('X'\) is ASE's "
                                         r"ghost/dummy atom"):
        energy(calc, atoms)


def test_c13_element_118_is_an_element_the_model_does_not_know(calc):
    atoms = molecule("H2O")
    atoms.numbers[0] = 118
    with pytest.raises(ValueError, match=r"element\(s\) \['Og'\] are not in this model; it knows \['H', 'C', 'O', 'Si'\]"):
        energy(calc, atoms)


# ===================================================================== 2. every entry point checks alike
def _bad_structures():
    """name -> (structure maker, expected message): each one what calculate() refuses."""
    def nan_position():
        atoms = molecule("CH3CH2OH")
        atoms.positions[3, 0] = np.nan
        return atoms

    def inf_position():
        atoms = molecule("CH3CH2OH")
        atoms.positions[5, 2] = np.inf
        return atoms

    def unknown_element():
        atoms = molecule("CH3CH2OH")
        atoms.numbers[0] = 17
        return atoms

    def charged():
        atoms = molecule("CH3CH2OH")
        atoms.info["charge"] = -1
        return atoms

    def radical():
        atoms = molecule("CH3CH2OH")[:-1]  # an H removed
        return atoms

    def bad_z():
        atoms = molecule("CH3CH2OH")
        atoms.numbers[2] = 150
        return atoms

    return {
        "NaN position": (nan_position, r"positions of atom\(s\) \[3\] are NaN or infinite"),
        "inf position": (inf_position, r"positions of atom\(s\) \[5\] are NaN or infinite"),
        "unknown element": (unknown_element, r"element\(s\) \['Cl'\] are not in this model"),
        "charge": (charged, r"atoms.info\['charge'\] = -1"),
        "radical": (radical, r"C2H5O \(charge \+0, 25 electrons\) has an odd number of electrons"),
        "atomic number 150": (bad_z, r"atomic number\(s\) \[150\]"),
    }


def _call(entry, calc, atoms):
    if entry == "calculate":
        atoms.calc = calc
        return atoms.get_forces()
    if entry == "predict_all_fidelities":
        return calc.predict_all_fidelities(atoms)
    if entry == "batch":
        return calc.batch([molecule("H2O"), atoms])
    if entry == "replicas.predict":
        return predict(calc, [molecule("H2O"), atoms])
    if entry == "ReplicaMD":  # replicas of one size: a good one first, the bad one second
        good = {9: molecule("CH3CH2OH"), 8: molecule("C2H6")}[len(atoms)]
        return ReplicaMD(calc, [good, atoms], timestep=0.5, friction=0.0)
    raise AssertionError(entry)


ENTRIES = ["calculate", "predict_all_fidelities", "batch", "replicas.predict", "ReplicaMD"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("bad", list(_bad_structures()))
def test_c14_every_entry_point_refuses_what_calculate_refuses(calc, entry, bad):
    make, message = _bad_structures()[bad]
    where = {"batch": r"structure 1: ", "replicas.predict": r"structure 1: ", "ReplicaMD": r"replica 1: "}.get(entry, "")
    with pytest.raises(ValueError, match=where + message):
        _call(entry, calc, make())


@pytest.mark.parametrize("entry", ["calculate", "predict_all_fidelities", "batch"])
def test_c15_bad_periodic_cells_are_refused_by_every_entry_point(calc, entry):
    flat = molecule("H2O")
    flat.cell = [[3, 0, 0], [6, 0, 0], [0, 0, 3]]  # two parallel vectors
    flat.pbc = True
    tiny = Atoms("H2", positions=[[0, 0, 0], [0.05, 0.05, 0.05]], cell=[0.11] * 3, pbc=True)
    for atoms, message in ((flat, "zero or linearly dependent"), (tiny, "periodic images")):
        with pytest.raises(ValueError, match=message):
            _call(entry, calc, atoms)


@pytest.mark.parametrize("entry", ["predict_all_fidelities", "batch", "replicas.predict"])
def test_c16_overlapping_atoms_raise_instead_of_an_all_nan_result(calc, entry):
    atoms = molecule("CH3CH2OH")
    atoms.positions[4] = atoms.positions[3]
    where = r" for structure 1" if entry in ("batch", "replicas.predict") else ""
    with pytest.raises(FloatingPointError, match=rf"non-finite (forces|energy){where}: atoms 3 and 4 are on top of "
                                                 r"each other \(smallest distance 0 Å\); move them apart"):
        with pytest.warns(RuntimeWarning, match="are 0 Å apart"):
            _call(entry, calc, atoms)


def test_c17_calculate_names_the_overlapping_pair(calc, ethanol):
    ethanol.positions[7] = ethanol.positions[2]
    with pytest.raises(FloatingPointError, match=r"non-finite forces: atoms 2 and 7 are on top of each other"):
        with pytest.warns(RuntimeWarning):
            energy(calc, ethanol)


def test_c18_batch_keeps_good_results_exact_and_warns_per_structure(calc):
    close = molecule("H2O")
    close.positions[1] = close.positions[0] + [0.05, 0, 0]
    structures = [molecule("CH4"), close]
    with pytest.warns(RuntimeWarning, match=r"two atoms in structure 1 are 0.05 Å apart"):
        results = calc.batch(structures)
    single = energy(MFCalculator(calc.metadata["path"], fidelity="high", dtype="float64", device="cpu"),
                    molecule("CH4"))
    assert results[0]["energy"] == pytest.approx(single, abs=1e-9)
    assert np.isfinite(results[1]["forces"]).all()


def test_c19_replica_md_stops_at_the_step_a_replica_goes_non_finite_and_keeps_the_trajectory(calc, tmp_path):
    replicas = []
    for seed in range(2):
        atoms = molecule("CH3CH2OH")
        thermalize(atoms, 300, np.random.default_rng(seed))
        replicas.append(atoms)
    md = ReplicaMD(calc, replicas, timestep=0.5, friction=0.0)
    pattern = str(tmp_path / "rep{k}.traj")
    md.run(6, trajectory=pattern, interval=2)
    for state in (md.positions, md.velocities, md.forces):  # two H of replica 1 moving as one
        state[1, 5] = state[1, 4]
    with pytest.raises(FloatingPointError, match=r"replica\(s\) \[1\] got non-finite energy or forces in step 7 "
                                                 r".*smaller timestep"):
        md.run(10, trajectory=pattern, interval=2)
    for k in range(2):
        frames = read(pattern.format(k=k), index=":")
        assert len(frames) == 3 and all(np.isfinite(f.positions).all() for f in frames)


# ===================================================================== 3. threads and processes
def _configurations(name, n, seed):
    out = []
    for k in range(n):
        atoms = molecule(name)
        atoms.rattle(0.05, seed=seed + k)
        out.append(atoms)
    return out


def test_c20_two_threads_sharing_one_calculator_get_their_own_results(calc):
    """2 threads x 150 calls, two different molecules: without the lock about 1 call in 300
    returned the other thread's energy or forces (or crashed on mismatched shapes)."""
    sets = [_configurations("CH3CH2OH", 150, 0), _configurations("H2O", 150, 1000)]
    serial = [[(energy(calc, a), a.get_forces()) for a in configs] for configs in sets]
    wrong, errors = [0, 0], []

    def work(t):
        try:
            for k, atoms in enumerate(sets[t]):
                atoms.calc = calc
                e, f = atoms.get_potential_energy(), atoms.get_forces()
                if e != serial[t][k][0] or not np.array_equal(f, serial[t][k][1]):
                    wrong[t] += 1
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == [0, 0]


def test_c21_threads_mixing_entry_points_do_not_see_each_others_structures(calc):
    ethanols = _configurations("CH3CH2OH", 40, 0)
    waters = _configurations("H2O", 3, 500)
    serial_e = [energy(calc, a) for a in ethanols]
    serial_batch = [r["energy"] for r in calc.batch(waters)]
    serial_all = calc.predict_all_fidelities(waters[0])["energy"]
    problems = []

    def forces_thread():
        for k, atoms in enumerate(ethanols):
            atoms.calc = calc
            if atoms.get_potential_energy() != serial_e[k]:
                problems.append(("calculate", k))

    def batch_thread():
        for k in range(40):
            if [r["energy"] for r in calc.batch(waters)] != serial_batch:
                problems.append(("batch", k))
            if not np.array_equal(calc.predict_all_fidelities(waters[0])["energy"], serial_all):
                problems.append(("predict_all_fidelities", k))

    threads = [threading.Thread(target=forces_thread), threading.Thread(target=batch_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []


def test_c22_pickle_round_trip_gives_identical_results(tiny_model, ethanol):
    calc = MFCalculator(tiny_model, fidelity="LO", dtype="float32", device="cpu", neighbor_list="vesin")
    e = energy(calc, ethanol)
    copy = pickle.loads(pickle.dumps(calc))
    assert copy.fidelity == "low" and copy.dtype == torch.float32 and copy.neighbor_backend == "vesin"
    assert copy.results["energy"] == e  # the results travel with it
    fresh = ethanol.copy()
    fresh.rattle(0.01, seed=3)
    assert energy(copy, fresh.copy()) == energy(calc, fresh.copy())


def test_c23_unpickling_refuses_a_model_file_that_changed(tmp_path, forcefield_factory):
    from mfcalc.modelfile import export_model

    path = tmp_path / "model.pt"
    export_model(forcefield_factory(seed=0), path)
    data = pickle.dumps(MFCalculator(path, device="cpu"))
    export_model(forcefield_factory(seed=1), path)  # other weights under the same name
    with pytest.raises(ModelFileError, match=r"changed since this calculator was pickled.*make the calculator again"):
        pickle.loads(data)


def test_c24_a_multiprocessing_pool_computes_the_same_energies(calc):
    structures = _configurations("CH3CH2OH", 4, 7)
    serial = [energy(calc, a.copy()) for a in structures]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        parallel = pool.map(calc.get_potential_energy, structures)
    np.testing.assert_allclose(parallel, serial, rtol=0, atol=1e-10)


# ===================================================================== 4. tiny periodic cells
BACKENDS = ["auto", "dense", "vesin"] + (["torch-cluster"] if importlib.util.find_spec("torch_cluster") else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_c25_one_atom_in_a_tiny_cube_is_refused_before_anything_is_allocated(tiny_model, backend):
    calc = MFCalculator(tiny_model, device="cpu", neighbor_list=backend)
    atoms = Atoms("H", positions=[[0, 0, 0]], cell=[0.11] * 3, pbc=True)
    with pytest.raises(ValueError, match=r"heights are 0.11, 0.11, 0.11 Å, so every atom would need 421875 periodic "
                                         rf"images \(75 x 75 x 75\), more than the limit of {MAX_PERIODIC_IMAGES}"):
        energy(calc, atoms)


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_c26_the_neighbor_search_itself_refuses_too(backend):
    """The same limit inside the search (also the copy scripted into newly exported model files)."""
    pos, cell, pbc = torch.zeros((1, 3), dtype=torch.float64), torch.eye(3, dtype=torch.float64) * 0.11, torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"421875 periodic images"):
        neighbor_list(pos, cell, pbc, 4.0, backend)


def test_c27_the_model_files_own_search_refuses(tiny_model):
    module, _ = load_model(tiny_model)
    pos, cell, pbc = torch.zeros((1, 3), dtype=torch.float64), torch.eye(3, dtype=torch.float64) * 0.11, torch.ones(3, dtype=torch.bool)
    for backend in ("dense", "vesin"):
        with pytest.raises(Exception, match=r"421875 periodic images"):
            module.neighbor_list(pos, cell, pbc, backend)


def test_c28_just_under_the_limit_works_just_over_is_refused(calc):
    ok = Atoms("H", positions=[[0, 0, 0]], cell=[0.41] * 3, pbc=True)  # ceil(4 / 0.41) = 10: 21^3 = 9261 images
    assert np.isfinite(energy(calc, ok)) and np.isfinite(ok.get_stress()).all()
    over = Atoms("H", positions=[[0, 0, 0]], cell=[0.38] * 3, pbc=True)  # 11 -> 23^3 = 12167
    with pytest.raises(ValueError, match=r"12167 periodic images \(23 x 23 x 23\)"):
        energy(calc, over)


def test_c29_a_skewed_cell_of_a_sensible_lattice_follows_the_hint(calc):
    """A cubic 3.2 Å lattice written with long skewed vectors (heights down to 0.008 Å, 265 795
    images): refused, and niggli_reduce (the hint) gives the same crystal and its energy."""
    from ase.build import niggli_reduce

    cubic = Atoms("Si", positions=[[0.1, 0.2, 0.3]], cell=[3.2] * 3, pbc=True)
    skewed = cubic.copy()
    skewed.cell = [[3.2, 0, 0], [64.0, 3.2, 0], [0, 64.0, 3.2]]
    with pytest.raises(ValueError, match=r"periodic images.*ase.build.niggli_reduce\(atoms\)"):
        energy(calc, skewed)
    niggli_reduce(skewed)
    assert energy(calc, skewed) == pytest.approx(energy(calc, cubic.copy()), abs=1e-9)


def test_c30_a_wire_with_a_short_period_still_works(calc):
    wire = Atoms("C4", positions=[[0.0, 0, 0], [1.3, 0, 0], [2.6, 0, 0], [3.9, 0, 0]],
                 cell=[[5.2, 0, 0], [0, 0, 0], [0, 0, 0]], pbc=[True, False, False])
    one = Atoms("C", positions=[[0, 0, 0]], cell=[[1.3, 0, 0], [0, 0, 0], [0, 0, 0]], pbc=[True, False, False])
    assert energy(calc, wire) == pytest.approx(4 * energy(calc, one), rel=1e-10)


# ===================================================================== 5. mixed PBC with a zero cell row
def _slab(vacuum_row):
    slab = bulk("Si", "diamond", a=5.43, cubic=True)
    slab.rattle(0.05, seed=4)
    slab.pbc = [True, True, False]
    slab.cell[2] = vacuum_row
    return slab


def test_c31_slab_with_a_zero_row_gives_energy_and_forces_and_refuses_stress(calc):
    zero, vacuum = _slab([0, 0, 0]), _slab([0, 0, 20.0])
    e = energy(calc, zero)
    assert e == pytest.approx(energy(calc, vacuum), abs=1e-10)
    np.testing.assert_allclose(zero.get_forces(), vacuum.get_forces(), atol=1e-10)
    with pytest.raises(PropertyNotImplementedError, match=r"stress is not defined for this structure: pbc=\[True, "
                                                          r"True, False\] and the cell row\(s\) \[2\].*zero.*"
                                                          r"atoms.cell\[2\] = \[0, 0, 20\]; energy and forces"):
        zero.get_stress()


def test_c32_slab_stress_with_a_vacuum_row_is_defined_and_scales_with_it(calc):
    """Stress = (1/V) dE/d(strain) with V the cell as given: doubling the vacuum row halves it
    (dE/d(strain) of the in-plane components does not depend on the row)."""
    s20 = calc.get_stress(_slab([0, 0, 20.0]))
    s40 = calc.get_stress(_slab([0, 0, 40.0]))
    assert np.isfinite(s20).all() and np.abs(s20).max() > 0
    np.testing.assert_allclose(s40 * 2, s20, rtol=1e-9, atol=1e-14)


def test_c33_wire_with_zero_rows_and_batches_never_return_infinite_stress(calc):
    wire = molecule("CH3CH2OH")
    wire.cell = [[6.0, 0, 0], [0, 0, 0], [0, 0, 0]]
    wire.pbc = [True, False, False]
    assert np.isfinite(energy(calc, wire))
    with pytest.raises(PropertyNotImplementedError, match=r"cell row\(s\) \[1, 2\].*atoms.cell\[1\] = \[0, 20, 0\]"):
        wire.get_stress()
    results = calc.batch([wire, _slab([0, 0, 0]), _slab([0, 0, 20.0])])
    assert "stress" not in results[0] and "stress" not in results[1]
    np.testing.assert_allclose(results[2]["stress"], calc.get_stress(_slab([0, 0, 20.0])), atol=1e-10)


# ===================================================================== 6. out-of-domain signal
def _training_frames(tiny_model, n=6):
    """Rattled ethanols labelled by the tiny model itself: a stand-in training set."""
    from ase.calculators.singlepoint import SinglePointCalculator

    calc = MFCalculator(tiny_model, fidelity="high", dtype="float64", device="cpu")
    frames = []
    for k in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=100 + k)
        atoms.calc = calc
        e, f = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
        frames.append(atoms)
    return frames


def test_c34_domain_statistics_are_the_brute_force_minima_and_maxima(tiny_model):
    frames = _training_frames(tiny_model)
    stats = domain_statistics(frames, cutoff=4.0)
    for key, value in stats["pair_min_distance"].items():
        a, b = map(int, key.split("-"))
        expected = min(f.get_distance(i, j) for f in frames for i in range(9) for j in range(9)
                       if i != j and {f.numbers[i], f.numbers[j]} == {a, b} and f.get_distance(i, j) < 4.0)
        assert value == pytest.approx(expected, abs=1e-12)
    assert set(stats["pair_min_distance"]) == {"1-1", "1-6", "1-8", "6-6", "6-8"}  # no O-O in ethanol
    for z, value in stats["max_force"].items():
        assert value == pytest.approx(max(np.linalg.norm(f.get_forces()[f.numbers == int(z)], axis=1).max()
                                          for f in frames), abs=1e-12)
    assert "6:1,1,1,6" in stats["environments"] and "8:1,6" in stats["environments"]
    assert stats["n_structures"] == 6 == stats["n_with_forces"]


def test_c35_domain_check_names_each_kind_of_departure(tiny_model):
    frames = _training_frames(tiny_model)
    check = DomainCheck(domain_statistics(frames, cutoff=4.0))
    for f in frames:
        assert check.reasons(f.numbers, f.positions, forces=f.get_forces()) == []
    peroxide = molecule("H2O2")
    assert any(re.match(r"element pair O-O is within the 4 Å cutoff \(1.47 Å, atoms 0 and 1\): no training "
                        r"structure had this pair", r) for r in check.reasons(peroxide.numbers, peroxide.positions))
    water = molecule("H2O")
    assert ("atom 0 (O bonded to H, H, within 1.3 x covalent radii): a bonding environment no training structure had"
            in check.reasons(water.numbers, water.positions))
    squeezed = frames[0].copy()  # atom 6 is an H of the methyl carbon 0
    squeezed.positions[6] = squeezed.positions[0] + 0.6 * (squeezed.positions[6] - squeezed.positions[0])
    assert any(re.match(r"H-C distance 0.6\d\d Å \(atoms 0 and 6\) is below 0.9 x the shortest in training", r)
               for r in check.reasons(squeezed.numbers, squeezed.positions))
    strong = frames[0].get_forces().copy()
    strong[2] *= 10  # the O
    reasons = check.reasons(frames[0].numbers, frames[0].positions, forces=strong)
    assert len(reasons) == 1 and re.match(r"force \d+\.\d\d eV/Å on atom 2 \(O\) is above 1.5 x the largest O force", reasons[0])


def _load_script():
    spec = importlib.util.spec_from_file_location("add_domain_stats", ROOT / "models" / "tools" / "add_domain_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def domain_model(tiny_model, tmp_path_factory):
    """The tiny model with domain statistics of a small ethanol training set, added by the script."""
    folder = tmp_path_factory.mktemp("domain")
    write(folder / "train.xyz", _training_frames(tiny_model), format="extxyz")
    (folder / "recipe.yaml").write_text(
        "datasets:\n  - {path: train.xyz, format: extxyz, fidelity: high, train: rest}\n")
    before = Path(tiny_model).read_bytes()
    out = folder / "with_domain.pt"
    assert _load_script().main([str(tiny_model), "--recipe", str(folder / "recipe.yaml"), "-o", str(out), "--write"]) == 0
    assert Path(tiny_model).read_bytes() == before  # -o: the source file untouched
    return out


def test_c36_the_script_adds_statistics_and_leaves_the_weights_and_the_file_verifiable(tiny_model, domain_model):
    module, meta = load_model(domain_model)  # verifies weights, entries and metadata fields
    _, original = load_model(tiny_model)
    assert meta["checksum"] == original["checksum"]
    assert meta["domain"]["n_structures"] == 6 and meta["domain"]["cutoff"] == 4.0
    atoms = molecule("CH3CH2OH")
    assert energy(MFCalculator(domain_model, device="cpu"), atoms.copy()) == energy(MFCalculator(tiny_model, device="cpu"), atoms.copy())


def test_c37_the_script_without_write_changes_nothing(tiny_model, domain_model, tmp_path, capsys):
    folder = Path(domain_model).parent
    target = tmp_path / "copy.pt"
    shutil.copy(tiny_model, target)
    before = target.read_bytes()
    assert _load_script().main([str(target), "--recipe", str(folder / "recipe.yaml")]) == 0
    assert target.read_bytes() == before and "not written: add --write" in capsys.readouterr().out


def test_c38_calculator_warns_once_and_keeps_the_reasons(domain_model):
    calc = MFCalculator(domain_model, fidelity="high", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a structure like the training data: no warning
        energy(calc, molecule("CH3CH2OH"))
    assert calc.domain_warnings == []
    with pytest.warns(OutOfDomainWarning, match=r"H2O2 is unlike the training data of with_domain.pt: element pair O-O"):
        energy(calc, molecule("H2O2"))
    assert len(calc.domain_warnings) == 2 and "O bonded to H, O" in calc.domain_warnings[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per calculator
        energy(calc, molecule("H2O"))
    assert ("atom 0 (O bonded to H, H, within 1.3 x covalent radii): a bonding environment no training "
            "structure had") in calc.domain_warnings
    assert issubclass(OutOfDomainWarning, RuntimeWarning)


def test_c39_out_of_domain_asks_explicitly_and_says_when_a_model_cannot_tell(domain_model, tiny_model):
    quiet = MFCalculator(domain_model, device="cpu", check_domain=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        energy(quiet, molecule("H2O2"))
    assert quiet.out_of_domain(molecule("CH3CH2OH")) == []
    assert len(quiet.out_of_domain(molecule("H2O2"))) == 2
    with pytest.raises(ModelFileError, match=r"has no training-domain statistics.*models/tools/add_domain_stats.py"):
        MFCalculator(tiny_model, device="cpu").out_of_domain(molecule("H2O"))


def test_c40_ethanol_mf_flags_benzene_and_water_but_not_its_held_out_ethanol():
    """The shipped ethanol-mf with statistics of its own recipe's training split (computed here,
    the shipped file is not changed): none of 60 held-out test frames flagged; benzene (aromatic
    C) and water (O bonded to two H) are."""
    from mfcalc.recipe import load_datasets, read_recipe

    recipe = ROOT / "recipes" / "ethanol-mf.yaml"
    splits = load_datasets(read_recipe(recipe), recipe.parent)
    check = DomainCheck(domain_statistics(splits["train"], cutoff=5.0))
    calc = MFCalculator("ethanol-mf", fidelity="PBE/def2-SVP", device="cpu")
    for s in splits["test"][::5]:
        atoms = Atoms(numbers=s.numbers, positions=s.positions)
        assert check.reasons(atoms.numbers, atoms.positions, forces=calc.get_forces(atoms)) == [], s
    benzene, water = molecule("C6H6"), molecule("H2O")
    assert check.reasons(benzene.numbers, benzene.positions, forces=calc.get_forces(benzene)) == [
        "atom 0 (C bonded to H, C, C, within 1.3 x covalent radii): a bonding environment no training structure had"]
    assert "O bonded to H, H" in " ".join(check.reasons(water.numbers, water.positions))


# ===================================================================== 7. fidelity names in the wrong case
@pytest.mark.parametrize("name, hint", [("hi", "'HI'"), ("HIGH", "'high'"), ("Low", "'low'"), ("lo", "'LO'")])
def test_c41_a_wrong_case_fidelity_is_refused_with_the_right_spelling(tiny_model, name, hint):
    with pytest.raises(ValueError, match=rf"unknown fidelity '{name}'.*Did you mean {hint}\? \(fidelity names and "
                                         r"aliases are case-sensitive\)"):
        MFCalculator(tiny_model, fidelity=name, device="cpu")


def test_c42_ccsd_t_in_lower_case_on_the_default_model():
    with pytest.raises(ValueError, match=r"unknown fidelity 'ccsd\(t\)'.*Did you mean 'CCSD\(T\)'\? \(fidelity names "
                                         r"and aliases are case-sensitive\)"):
        MFCalculator(fidelity="ccsd(t)", device="cpu")
