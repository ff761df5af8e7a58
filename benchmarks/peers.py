"""Peers for the speed benchmark, built at their published sizes with random weights (speed does
not depend on weight values). Benchmark-only: neither is an mfcalc dependency.

Install beside torch 2.13 without letting pip replace torch (mace-torch 0.3 otherwise pulls
torch 2.4 with CUDA, 5 GB), e.g. in a venv made with --system-site-packages:

    pip install --no-deps mace-torch e3nn==0.4.4 opt-einsum-fx opt-einsum torch-ema matscipy \
        prettytable configargparse torchmetrics lightning-utilities pandas lmdb dirsync fasteners \
        schnetpack tqdm pytorch-lightning omegaconf orjson

schnetpack 2.1.1 imports `T_co` from torch.utils.data.dataloader, which torch 2.13 no longer has;
``make_schnetpack`` puts the name back before importing it.
"""

import tempfile
import typing
from pathlib import Path

import numpy as np
import torch

ELEMENTS = [1, 6, 7, 8]
_TMP = Path(tempfile.mkdtemp(prefix="mfcalc-peers-"))


def make_mace(dtype: str = "float32", device: str = "cpu"):
    """MACE-OFF 'small' hyper-parameters: 96x0e, L=0, r=4.5 Å, 2 interactions, correlation 3."""
    # e3nn 0.4.4 torch.loads its own constants file, which holds `slice` objects
    torch.serialization.add_safe_globals([slice])
    from e3nn import o3
    from mace import modules
    from mace.calculators import MACECalculator

    torch.set_default_dtype(getattr(torch, dtype))
    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=4.5, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=len(ELEMENTS), hidden_irreps=o3.Irreps("96x0e"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(ELEMENTS)), avg_num_neighbors=12.0,
        atomic_numbers=ELEMENTS, correlation=3, gate=torch.nn.functional.silu,
        atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    )
    torch.set_default_dtype(torch.float32)
    return MACECalculator(models=model, device=device, default_dtype=dtype)


def make_schnetpack(dtype: str = "float32", device: str = "cpu"):
    """SchNetPack PaiNN: 128 features, 3 interactions, 5 Å, matscipy neighbor list."""
    import torch.utils.data.dataloader as loader

    if not hasattr(loader, "T_co"):
        loader.T_co = typing.TypeVar("T_co", covariant=True)
    import schnetpack as spk
    import schnetpack.transform as trn

    torch.manual_seed(0)
    cutoff = 5.0
    painn = spk.representation.PaiNN(
        n_atom_basis=128, n_interactions=3, radial_basis=spk.nn.GaussianRBF(n_rbf=20, cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff),
    )
    model = spk.model.NeuralNetworkPotential(
        representation=painn, input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=128, output_key="energy"),
                        spk.atomistic.Forces(energy_key="energy", force_key="forces")],
    )
    path = _TMP / f"schnetpack-painn-{dtype}.pt"
    torch.save(model, path)
    original_load = torch.load
    # schnetpack loads the whole pickled module; torch >= 2.6 defaults to weights_only=True
    torch.load = lambda *a, **k: original_load(*a, **{**k, "weights_only": False})
    try:
        return _schnetpack_calculator(spk, trn, path, cutoff, dtype, device)
    finally:
        torch.load = original_load


def _schnetpack_calculator(spk, trn, path, cutoff, dtype, device):
    return spk.interfaces.SpkCalculator(
        model_file=str(path), neighbor_list=trn.MatScipyNeighborList(cutoff=cutoff), energy_key="energy",
        force_key="forces", energy_unit="eV", position_unit="Ang", device=device, dtype=getattr(torch, dtype),
    )


PEERS = {"MACE-OFF small": make_mace, "SchNetPack PaiNN": make_schnetpack}
