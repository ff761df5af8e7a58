"""Small helpers shared by test modules (fixtures live in conftest.py)."""


def energy(calc, atoms):
    """``atoms``'s potential energy with ``calc`` attached."""
    atoms.calc = calc
    return atoms.get_potential_energy()


def numeric_forces(atoms, calc, h=1e-4):
    """-dE/dR by central differences of ``atoms``'s energy with ``calc`` (float64 numpy).

    h = 1e-4 Å: the total energies carry E0 terms of thousands of eV, so the rounding error of a
    difference is ~1e-16 x |E| / h (5e-8 eV/Å at h = 1e-5, near the tests' 1e-7 tolerance), while
    the truncation error h^2 |d3E/dR3| / 6 stays ~1e-10 (measured on the test networks: 7e-9 eV/Å
    at h = 1e-4)."""
    import numpy as np

    numeric = np.zeros((len(atoms), 3))
    for a in range(len(atoms)):
        for k in range(3):
            energies = []
            for sign in (1, -1):
                displaced = atoms.copy()
                displaced.positions[a, k] += sign * h
                energies.append(energy(calc, displaced))
            numeric[a, k] = -(energies[0] - energies[1]) / (2 * h)
    return numeric


def numeric_stress(atoms, calc, h=1e-5):
    """(1/V) dE/d(strain) by central differences of homogeneous strains, 3x3 and symmetrised."""
    import numpy as np

    numeric = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[a, b] += sign * h
                strained = atoms.copy()
                strained.set_cell(atoms.cell.array @ strain, scale_atoms=False)
                strained.positions = atoms.positions @ strain
                energies.append(energy(calc, strained))
            numeric[a, b] = (energies[0] - energies[1]) / (2 * h) / atoms.get_volume()
    return (numeric + numeric.T) / 2
