"""One flat batch of structures for the force path, built in one place.

Training (``training.collate``, which adds the labels), prediction and every-fidelity prediction
(``Potential.evaluate_batch``) all hand the module the same layout: atoms of every structure
concatenated, pair indices offset by the atoms before them, one cell and one fidelity per
structure, and ``batch`` mapping each atom to its structure.
"""

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor


def flat_batch(
    positions: Sequence[Tensor],
    numbers: Sequence[Tensor],
    cells: Sequence[Tensor],
    edge_indices: Sequence[Tensor],
    shifts: Sequence[Tensor],
    fidelities: Sequence[int],
    device: Optional[torch.device] = None,
) -> Dict[str, Tensor]:
    """``positions`` (N_k, 3), ``numbers`` (N_k,), ``cells`` (3, 3), ``edge_indices`` (2, P_k) and
    ``shifts`` (P_k, 3) of each structure k -> the module's flat-batch inputs: positions, numbers,
    cell (B, 3, 3), edge_index, shifts, fidelity (B,), batch (sum N_k,), n_atoms (B,)."""
    if not (len(positions) == len(numbers) == len(cells) == len(edge_indices) == len(shifts) == len(fidelities)):
        raise ValueError("flat_batch needs one of each input per structure")
    if len(positions) == 0:
        raise ValueError("flat_batch needs at least one structure")
    device = positions[0].device if device is None else device
    counts = torch.tensor([len(z) for z in numbers], dtype=torch.long)
    offsets = torch.cumsum(counts, 0) - counts
    return {
        "positions": torch.cat(list(positions)),
        "numbers": torch.cat(list(numbers)),
        "cell": torch.stack(list(cells)),
        "edge_index": torch.cat([e + int(o) for e, o in zip(edge_indices, offsets)], dim=1),
        "shifts": torch.cat(list(shifts)),
        "fidelity": torch.tensor([int(f) for f in fidelities], dtype=torch.long, device=device),
        "batch": torch.repeat_interleave(torch.arange(len(counts), device=device), counts.to(device)),
        "n_atoms": counts.to(device),
    }
