"""Unit conversions. Inside mfcalc everything is eV and Å; loaders convert with these, by name."""

# CODATA 2018: 1 kcal/mol = 4184 J/mol / (N_A * e) = 0.0433641043 eV
KCAL_PER_MOL_TO_EV = 0.0433641043
HARTREE_TO_EV = 27.211386245988
BOHR_TO_ANGSTROM = 0.529177210903
KJ_PER_MOL_TO_EV = 0.0103642688

ENERGY_UNITS_TO_EV = {
    "eV": 1.0,
    "kcal/mol": KCAL_PER_MOL_TO_EV,
    "kJ/mol": KJ_PER_MOL_TO_EV,
    "Hartree": HARTREE_TO_EV,
    "meV": 1e-3,
}


def energy_to_ev(unit: str) -> float:
    """Factor that turns an energy in `unit` into eV (raises on an unknown unit)."""
    try:
        return ENERGY_UNITS_TO_EV[unit]
    except KeyError:
        raise ValueError(
            f"unknown energy unit {unit!r}; known units: {sorted(ENERGY_UNITS_TO_EV)}"
        ) from None
