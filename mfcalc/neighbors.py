"""Neighbor lists: which atom pairs lie within the cutoff, and through which periodic image.

Every backend returns the same thing for one structure:

    edge_index  (2, E) long   -- pair (i, j), i receives the message from j
    shifts      (E, 3) float  -- integer cell shifts S, so that the pair vector is
                                 r_ij = positions[j] - positions[i] + S @ cell

Both directions of a pair are listed (a "full" list). Shifts are integers stored in the dtype of
the positions, so that the model can form S @ cell with a cell that carries a strain gradient.

Backends: ``dense`` (all pairs in torch; cheapest for small molecules), ``vesin`` (cell lists,
compiled, CPU and CUDA), ``torch-cluster`` (optional extra) and ``auto`` (picks by size and device).
The ``dense`` and ``vesin`` backends are TorchScript-compatible and live inside exported models.
"""

from typing import List, Tuple

import torch
import vesin_torch
from torch import Tensor

BACKENDS = ("auto", "dense", "vesin", "torch-cluster")

# Above this many atoms `auto` leaves the dense all-pairs search for a cell list. Measured on a
# 2-core CPU (benchmarks/results/neighbor_lists.md, µs per search, dense / vesin): molecules
# 9 atoms 54 / 149, 24 atoms 126 / 101, 48 atoms 141 / 120; periodic cells 9 atoms 846 / 290
# (the dense search loops over periodic images), so on a CPU periodic cells always use vesin.
# On CUDA the dense search stays cheaper longer (not re-measured; kept from mfcalc 0.3).
DENSE_MAX_ATOMS_CPU = 24
DENSE_MAX_ATOMS_CUDA = 1024
# Periodic images of the cell one search may need (check_periodic_images). A cell of height h
# needs 2 * ceil(cutoff / h) + 1 images per periodic direction: real cells (heights >= ~1 Å) stay
# below 11^3 = 1331 at a 5 Å cutoff; 10 000 allows heights down to a tenth of the cutoff.
MAX_PERIODIC_IMAGES = 10000


def complete_cell(cell: Tensor, pbc: Tensor) -> Tensor:
    """Return ``cell`` with the rows of non-periodic directions replaced by unit vectors
    orthogonal to the periodic rows.

    Shifts along non-periodic directions are always zero, so those rows never change a pair
    vector; replacing them makes the matrix invertible whatever the user put there (ASE gives
    molecules a zero cell).
    """
    out = cell.clone()
    basis: List[Tensor] = []
    for d in range(3):
        if bool(pbc[d]):
            v = cell[d]
            for b in basis:
                v = v - (v * b).sum() * b
            basis.append(v / v.norm())
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    for d in range(3):
        if not bool(pbc[d]):
            best = eye[0]
            best_norm = -1.0
            for k in range(3):
                v = eye[k]
                for b in basis:
                    v = v - (v * b).sum() * b
                n = float(v.norm())
                if n > best_norm:
                    best = v / n
                    best_norm = n
            basis.append(best)
            out[d] = best
    return out


def image_reach(cell: Tensor, pbc: Tensor, cutoff: float) -> List[int]:
    """How many cell lengths the cutoff reaches along each direction (0 where not periodic).

    ``cell`` must be complete (invertible; see ``complete_cell``). The height of the cell along
    direction d is 1 / |column d of inv(cell)|; the search needs ``ceil(cutoff / height)``
    images on each side.
    """
    inv = torch.linalg.inv(cell.detach())
    reach = torch.ceil(cutoff * torch.linalg.vector_norm(inv, dim=0)) * pbc.to(cell.dtype)
    reach_list: List[float] = reach.tolist()
    return [int(x) for x in reach_list]


def _short(x: float) -> str:
    """``x`` rounded to 3 decimals, as text (the same in Python and TorchScript)."""
    text = str(int(x * 1000.0 + 0.5) / 1000.0)
    return text + "0" if text.endswith(".") else text


def check_periodic_images(
    cell: Tensor, pbc: Tensor, cutoff: float, limit: int = MAX_PERIODIC_IMAGES
) -> int:
    """The number of periodic images of the cell a neighbor search within ``cutoff`` needs;
    ValueError (with that number and the limit) above ``limit``, before anything is allocated.

    A cell far smaller than the cutoff needs (2k+1)^3 images and a pair list, and the model
    messages over it, that grow as fast: 1 H in a 0.11 Å cube with a 4 Å cutoff needs 421 875
    images and never finishes. ``cell`` must be complete (see ``complete_cell``).
    """
    reach = image_reach(cell, pbc, cutoff)
    n_images = 1
    for k in reach:
        n_images *= 2 * k + 1
    if n_images > limit:
        inv = torch.linalg.inv(cell.detach())
        heights: List[float] = (1.0 / torch.linalg.vector_norm(inv, dim=0)).tolist()
        shown: List[str] = []
        per_direction: List[str] = []
        for d in range(3):
            if bool(pbc[d]):
                shown.append(_short(heights[d]))
                per_direction.append(str(2 * reach[d] + 1))
        raise ValueError(
            "the periodic cell is too small for the " + _short(cutoff) + " Å cutoff: its heights are "
            + ", ".join(shown) + " Å, so every atom would need " + str(n_images)
            + " periodic images (" + " x ".join(per_direction)
            + "), more than the limit of " + str(limit) + "; check the cell's units (Å, not nm or"
            " Bohr) and size; a skewed cell of a sensible lattice can be reduced first"
            " (ase.build.niggli_reduce(atoms))"
        )
    return n_images


def _shift_range(cell: Tensor, pbc: Tensor, cutoff: float) -> Tensor:
    """All integer shifts that can bring an image within ``cutoff`` of an atom in the cell."""
    check_periodic_images(cell, pbc, cutoff)
    n = image_reach(cell, pbc, cutoff)
    ranges = [torch.arange(-k, k + 1, dtype=cell.dtype, device=cell.device) for k in n]
    grid = torch.meshgrid(ranges[0], ranges[1], ranges[2], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], dim=1)


def _check_dense_size(n_atoms: int, n_images: int, limit_gb: float = 4.0) -> None:
    """The dense search holds N x N x images pair vectors at once: refuse sizes that would
    take more than ``limit_gb`` instead of running the machine out of memory."""
    need_gb = float(n_atoms) * float(n_atoms) * float(n_images) * 3.0 * 8.0 / 1e9
    if need_gb > limit_gb:
        raise ValueError(
            "the dense all-pairs neighbor search of " + str(n_atoms) + " atoms x "
            + str(n_images) + " periodic images would hold about " + str(int(need_gb))
            + " GB at once; use neighbor_list='vesin' (or 'auto', which switches by size)"
        )


def dense_neighbor_list(
    positions: Tensor, cell: Tensor, pbc: Tensor, cutoff: float
) -> Tuple[Tensor, Tensor]:
    """All-pairs search in torch, with as many periodic images as the cutoff needs."""
    n_atoms = positions.shape[0]
    positions = positions.detach()
    if not bool(pbc.any()):
        _check_dense_size(n_atoms, 1)
        diff = positions.unsqueeze(0) - positions.unsqueeze(1)
        mask = (diff * diff).sum(-1) < cutoff * cutoff
        mask.fill_diagonal_(False)
        edge_index = mask.nonzero().t()
        shifts = torch.zeros(
            (edge_index.shape[1], 3), dtype=positions.dtype, device=positions.device
        )
        return edge_index, shifts

    cell = complete_cell(cell.detach(), pbc)
    periodic = pbc.to(positions.dtype)
    offset = torch.floor(positions @ torch.linalg.inv(cell)) * periodic
    wrapped = positions - offset @ cell
    images = _shift_range(cell, pbc, cutoff)  # (M, 3)
    _check_dense_size(n_atoms, images.shape[0])
    diff = (
        wrapped.unsqueeze(0).unsqueeze(2)
        - wrapped.unsqueeze(1).unsqueeze(2)
        + (images @ cell).unsqueeze(0).unsqueeze(0)
    )  # (N_i, N_j, M, 3)
    mask = (diff * diff).sum(-1) < cutoff * cutoff
    zero_shift = (images == 0).all(dim=1)
    self_pair = torch.eye(n_atoms, dtype=torch.bool, device=positions.device)
    mask = mask & ~(self_pair.unsqueeze(2) & zero_shift.view(1, 1, -1))
    idx = mask.nonzero()
    i, j, m = idx[:, 0], idx[:, 1], idx[:, 2]
    shifts = images[m] - offset[j] + offset[i]
    return torch.stack([i, j]), shifts


def vesin_neighbor_list(
    positions: Tensor, cell: Tensor, pbc: Tensor, cutoff: float
) -> Tuple[Tensor, Tensor]:
    """Cell-list search with vesin (compiled; CPU and CUDA)."""
    box = cell.detach()
    if bool(pbc.any()):
        box = complete_cell(box, pbc)
        check_periodic_images(box, pbc, cutoff)
    nl = vesin_torch.NeighborList(cutoff=cutoff, full_list=True)  # public API, TorchScript-ready
    results = nl.compute(
        # contiguous copies: vesin reads the raw buffers, and an expanded (stride-0) pbc tensor
        # was read wrongly (4 of 16 pairs found for a small periodic cell)
        points=positions.detach().to(torch.float64).contiguous(), box=box.to(torch.float64).contiguous(),
        periodic=pbc.contiguous(),
        quantities="ijS", copy=True,
    )
    edge_index = torch.stack([results[0], results[1]]).to(torch.long)
    return edge_index, results[2].to(positions.dtype)


def pick_backend(
    n_atoms: int,
    device: torch.device,
    periodic: bool = False,
    dense_max_cpu: int = DENSE_MAX_ATOMS_CPU,
    dense_max_cuda: int = DENSE_MAX_ATOMS_CUDA,
) -> str:
    """The backend ``auto`` uses for a structure of ``n_atoms`` on ``device``."""
    if device.type == "cuda":
        return "dense" if n_atoms <= dense_max_cuda else "vesin"
    return "dense" if n_atoms <= dense_max_cpu and not periodic else "vesin"


def torch_cluster_neighbor_list(
    positions: Tensor, cell: Tensor, pbc: Tensor, cutoff: float
) -> Tuple[Tensor, Tensor]:
    """radius search with torch-cluster (optional extra ``mfcalc[cluster]``).

    Periodic systems are handled by searching the images of the wrapped cell.
    """
    try:
        import torch_cluster
    except ImportError:
        raise ImportError(
            "neighbor_list='torch-cluster' needs the optional torch-cluster package "
            "(pip install 'mfcalc[cluster]'; it builds from source); "
            "'vesin' and 'dense' need nothing extra"
        ) from None
    positions = positions.detach()
    n_atoms = positions.shape[0]
    if not bool(pbc.any()):
        edge_index = torch_cluster.radius_graph(
            positions, r=cutoff, loop=False, max_num_neighbors=max(n_atoms, 1)
        )
        # radius_graph gives (source j, target i); keep pairs strictly inside the cutoff as the
        # other backends do
        j, i = edge_index[0], edge_index[1]
        keep = (positions[j] - positions[i]).norm(dim=1) < cutoff
        edge_index = torch.stack([i[keep], j[keep]])
        return edge_index, torch.zeros(
            (edge_index.shape[1], 3), dtype=positions.dtype, device=positions.device
        )
    cell = complete_cell(cell.detach(), pbc)
    offset = torch.floor(positions @ torch.linalg.inv(cell)) * pbc.to(positions.dtype)
    wrapped = positions - offset @ cell
    images = _shift_range(cell, pbc, cutoff)
    image_pos = (wrapped.unsqueeze(0) + (images @ cell).unsqueeze(1)).reshape(-1, 3)
    pairs = torch_cluster.radius(
        image_pos, wrapped, r=cutoff, max_num_neighbors=image_pos.shape[0]
    )
    i, col = pairs[0], pairs[1]
    j, m = col % n_atoms, torch.div(col, n_atoms, rounding_mode="floor")
    d = (image_pos[col] - wrapped[i]).norm(dim=1)
    keep = (d < cutoff) & ~((i == j) & (images[m] == 0).all(dim=1))
    i, j, m = i[keep], j[keep], m[keep]
    shifts = images[m] - offset[j] + offset[i]
    return torch.stack([i, j]), shifts


def neighbor_list(
    positions: Tensor, cell: Tensor, pbc: Tensor, cutoff: float, backend: str = "auto"
) -> Tuple[Tensor, Tensor]:
    """Full neighbor list of one structure with the chosen backend (see module docstring)."""
    if backend == "auto":
        backend = pick_backend(positions.shape[0], positions.device, bool(pbc.any()))
    if backend == "dense":
        return dense_neighbor_list(positions, cell, pbc, cutoff)
    if backend == "vesin":
        return vesin_neighbor_list(positions, cell, pbc, cutoff)
    if backend == "torch-cluster":
        return torch_cluster_neighbor_list(positions, cell, pbc, cutoff)
    raise ValueError(f"unknown neighbor-list backend {backend!r}; choose one of {BACKENDS}")
