"""Shared fixtures: a small random-weight model exported to a temporary file.

Physics tests (forces = -grad E, stress, invariances, TorchScript == eager) hold for any weights,
so they use this small model and run in seconds; tests of the shipped model load models/.
"""

import os

import numpy as np
import pytest
import torch

# compile="auto" (the default) would start background compilations during long tests and slow
# the suite; tests/test_autocompile.py asks for it explicitly
os.environ.setdefault("MFCALC_COMPILE", "0")

from mfcalc.model import default_config
from mfcalc.modelfile import build_forcefield, export_model

FIDELITIES = ["low", "mid", "high"]
ALIASES = {"HI": "high", "LO": "low"}


# the networks the physics tests run on: PaiNN (l = 1, linear filters), the shipped models'
# network (l = 2 tensors, radial MLP filters) and that network with the many-body options (scalar
# messages from the neighbours' vectors and tensors, per-atom products) and a linear energy readout
# of every layer, all small
NETWORKS = {"l1": {}, "l2": {"max_l": 2, "radial_mlp": 8},
            "l2-products": {"max_l": 2, "radial_mlp": 8, "edge_scalars": True, "node_products": True,
                            "layer_readouts": True}}


def make_forcefield(seed: int = 0, mode: str = "film", dtype=torch.float64, network: str = "l1"):
    torch.manual_seed(seed)
    config = default_config(
        [1, 6, 8, 14], FIDELITIES, features=16, layers=2, radial_basis=8, fidelity_dim=4,
        cutoff=4.0, fidelity_mode=mode, **NETWORKS[network],
    )
    forcefield = build_forcefield(config)
    with torch.no_grad():
        # FiLM starts at zero; give it weights so that fidelities really differ in the tests
        forcefield.model.film.weight.normal_(0, 0.3)
        forcefield.model.e0.copy_(torch.tensor([[-13.6, -1030.0, -2040.0, -7900.0]]) + torch.arange(3.0).view(3, 1))
        forcefield.model.scale.fill_(0.7)
    return forcefield.to(dtype)


@pytest.fixture(scope="session")
def forcefield_factory():
    """make_forcefield(seed, mode, dtype, network): an eager random-weight ForceField."""
    return make_forcefield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of an exported random-weight model (float64) with fidelities low/mid/high."""
    return _export_tiny(tmp_path_factory, "l1")


@pytest.fixture(scope="session", params=sorted(NETWORKS))
def network_model(request, tmp_path_factory):
    """tiny_model's file for each network of NETWORKS (physics tests run on both)."""
    return _export_tiny(tmp_path_factory, request.param)


def _export_tiny(tmp_path_factory, network: str):
    path = tmp_path_factory.mktemp("models") / f"tiny-{network}.pt"
    export_model(
        make_forcefield(network=network), path,
        metadata={"aliases": ALIASES, "default_fidelity": "high",
                  "training_data": [{"fidelity": "x", "source": "random weights"}]},
        dtype=torch.float64,
    )
    return path


@pytest.fixture
def ethanol():
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    return atoms


@pytest.fixture
def silicon_small_cell():
    """A triclinic periodic cell much smaller than twice the cutoff, atoms outside the cell."""
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43)
    atoms.cell = atoms.cell.array + np.array([[0.0, 0.1, 0.2], [0.3, 0.0, -0.1], [0.1, 0.2, 0.0]])
    atoms.rattle(0.1, seed=2)
    atoms.positions += [4.0, -7.0, 11.0]
    return atoms


@pytest.fixture
def calc(tiny_model):
    """An MFCalculator on ``tiny_model`` at fidelity "high", float64, on the CPU."""
    from mfcalc import MFCalculator

    return MFCalculator(tiny_model, fidelity="high", dtype="float64", device="cpu")
