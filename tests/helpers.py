"""Small helpers shared by test modules (fixtures live in conftest.py)."""


def energy(calc, atoms):
    """``atoms``'s potential energy with ``calc`` attached."""
    atoms.calc = calc
    return atoms.get_potential_energy()


def numeric_forces(atoms, calc, h=1e-5):
    """-dE/dR by central differences of ``atoms``'s energy with ``calc`` (float64 numpy)."""
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
