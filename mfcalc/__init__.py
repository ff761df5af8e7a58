"""mfcalc: multi-fidelity machine-learned interatomic potentials for molecular dynamics.

    from mfcalc import MFCalculator
    atoms.calc = MFCalculator("ethanol-mf", fidelity="CCSD(T)")
"""

from .version import __version__  # noqa: E402
from .calculator import MFCalculator  # noqa: E402
from .committee import MFCommittee  # noqa: E402
from .mdguard import MDGuard, MDInstabilityError  # noqa: E402
from .modelfile import ModelFileError, export_model, load_model, read_metadata  # noqa: E402
from .neighbors import neighbor_list  # noqa: E402
from .potential import Potential  # noqa: E402
from .replicas import ReplicaMD, predict  # noqa: E402

__all__ = [
    "MDGuard",
    "MDInstabilityError",
    "MFCalculator",
    "MFCommittee",
    "ModelFileError",
    "Potential",
    "ReplicaMD",
    "export_model",
    "load_model",
    "neighbor_list",
    "predict",
    "read_metadata",
    "__version__",
]
