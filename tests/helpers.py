"""Small helpers shared by test modules (fixtures live in conftest.py)."""


def energy(calc, atoms):
    """``atoms``'s potential energy with ``calc`` attached."""
    atoms.calc = calc
    return atoms.get_potential_energy()
