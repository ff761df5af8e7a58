"""Dense evaluation of the network for batches of same-size molecules: (R, N, N) pair tensors
instead of a pair list.

The flat path (``MultiFidelityPaiNN.forward``) gathers neighbor features with ``index_select``
and sums messages with ``index_add``; their gradients are scatters, which on a CPU run as serial
or atomic loops. For R replicas of a molecule of N atoms (N up to a few dozen) every atom pair
fits in an (R, N, N) tensor: the gather becomes a broadcast, the message sum a reduction over
the neighbor axis, and the backward pass has no scatter at all. Pairs beyond the cutoff and the
self pairs are masked to zero, so the result is the flat path's, exactly (to rounding); the
neighbor search disappears too (the mask is part of the graph).

Same weights, same module: ``dense_energies(model, species, positions, fidelity)``. Used, compiled
together with its gradient, by ``CompiledForceField`` for non-periodic molecules (replica MD and
``MFCalculator(compile=True)``).
"""

from typing import List

import torch
from torch import Tensor

from .model import MultiFidelityPaiNN


def dense_energies(model: MultiFidelityPaiNN, species: Tensor, positions: Tensor, fidelity: Tensor) -> List[Tensor]:
    """Per-atom energies (R, N) and the shortest pair distance of R molecules.

    species (R, N) model species indices, positions (R, N, 3) in Å, fidelity (R,) indices.
    Every pair within the cutoff interacts, as in the flat path with a full pair list.
    """
    n_rep, n_atoms = species.shape[0], species.shape[1]
    features = model.features
    vectors = positions.unsqueeze(1) - positions.unsqueeze(2)  # [r, i, j] = x_j - x_i
    eye = torch.eye(n_atoms, dtype=positions.dtype, device=positions.device)
    # the diagonal gets distance 1 instead of 0: finite everywhere (also in the gradient), masked below
    dist = torch.sqrt((vectors * vectors).sum(-1) + eye)
    pair = (dist < model.cutoff) & (eye == 0)
    mask = pair.to(positions.dtype).unsqueeze(-1)  # (R, N, N, 1)
    unit = vectors / dist.unsqueeze(-1)
    basis, envelope = model.radial(dist)
    fid = model.fidelity_embedding(fidelity)  # (R, d)
    film = torch.chunk(model.film(fid), 2 * model.n_layers, dim=-1)

    s = model.species_embedding(species)  # (R, N, F)
    v = torch.zeros((n_rep, n_atoms, 3, features), dtype=s.dtype, device=s.device)
    layer = 0
    for interaction, update in zip(model.interactions, model.updates):
        w = interaction.filter(basis) * mask
        if interaction.filter_envelope:
            w = w * envelope
        x = interaction.phi(s).unsqueeze(1) * w  # (R, i, j, 3F): neighbor j's features, pair ij's filter
        ds, dv_v, dv_r = torch.split(x, features, dim=-1)
        s = s + ds.sum(2)
        dv = (dv_r.unsqueeze(3) * unit.unsqueeze(-1)).sum(2)  # (R, N, 3, F)
        if layer > 0:
            dv = dv + (v.unsqueeze(1) * dv_v.unsqueeze(3)).sum(2)
        s, v = update(s, v + dv)
        if model.use_film:
            s = s * (1.0 + film[2 * layer].unsqueeze(1)) + film[2 * layer + 1].unsqueeze(1)
        layer += 1
    fid_atoms = fid.unsqueeze(1).expand(n_rep, n_atoms, fid.shape[-1])
    out = model.readout(torch.cat([s, fid_atoms], dim=-1)).squeeze(-1)
    energies = out * model.scale + model.e0[fidelity.unsqueeze(1), species]
    shortest = torch.where(pair, dist, torch.full_like(dist, float("inf"))).min()
    return [energies, shortest]
