"""The l = 2 interaction block against its per-pair definition.

The block sums over neighbours before it takes the symmetric traceless part (mfcalc.model,
Interaction): these tests write the message out per pair, as the formula reads, and check that
the block's output is that sum, that its tensors are symmetric and traceless, and that they
rotate as rank-2 tensors."""

import pytest
import torch
from scipy.spatial.transform import Rotation

from mfcalc.model import Interaction, Pairs, RadialBasis

F, N = 5, 6


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = 2.0 * torch.randn(N, 3, generator=g, dtype=torch.float64)
    i, j = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    keep = i != j
    i, j = i[keep], j[keep]
    s = torch.randn(N, F, generator=g, dtype=torch.float64)
    v = torch.randn(N, 3, F, generator=g, dtype=torch.float64)
    a = torch.randn(N, 3, 3, F, generator=g, dtype=torch.float64)
    sym = 0.5 * (a + a.transpose(1, 2))
    t = sym - torch.eye(3, dtype=torch.float64).view(1, 3, 3, 1) * torch.einsum("naaf->nf", sym).view(N, 1, 1, F) / 3
    return positions, i, j, s, v, t


def _block(seed=1):
    torch.manual_seed(seed)
    return Interaction(F, 4, filter_envelope=True, radial_mlp=6, max_l=2).double()


def _run(block, positions, i, j, s, v, t, first=False):
    vectors = positions[j] - positions[i]
    r = vectors.norm(dim=-1)
    basis, envelope = RadialBasis(4, 5.0)(r)
    return block(s, v, t, Pairs(i, j, False, None), basis, vectors / r.unsqueeze(-1), envelope, first)


def _sym0(m):
    """symmetric traceless part of (E, 3, 3, F)"""
    sym = 0.5 * (m + m.transpose(1, 2))
    trace = torch.einsum("eaaf->ef", sym)
    return sym - torch.eye(3, dtype=m.dtype).view(1, 3, 3, 1) * trace.view(-1, 1, 1, m.shape[-1]) / 3


@pytest.mark.parametrize("first", [False, True])
def test_rank2_message_is_the_sum_of_the_per_pair_formula(first):
    block = _block()
    positions, i, j, s, v, t = _inputs()
    if first:  # the first block is only called with zero v and t
        v, t = torch.zeros_like(v), torch.zeros_like(t)
    s_out, v_out, t_out = _run(block, positions, i, j, s, v, t, first)

    vectors = positions[j] - positions[i]
    r = vectors.norm(dim=-1)
    unit = vectors / r.unsqueeze(-1)
    basis, envelope = RadialBasis(4, 5.0)(r)
    x = block.phi(s)[j] * block.filter(basis) * envelope
    ds, dv_v, dv_r, dt_r, dt_t, dt_v, dv_t = torch.split(x, F, dim=-1)
    quadrupole = unit.unsqueeze(-1) * unit.unsqueeze(-2) - torch.eye(3, dtype=torch.float64) / 3
    v_j, t_j = v[j], t[j]
    outer_vr = torch.einsum("eaf,eb->eabf", v_j, unit)
    dt = (torch.einsum("ef,eab->eabf", dt_r, quadrupole) + t_j * dt_t[:, None, None, :]
          + _sym0(outer_vr) * dt_v[:, None, None, :])
    dv = (torch.einsum("ef,ea->eaf", dv_r, unit) + v_j * dv_v[:, None, :]
          + torch.einsum("eabf,eb->eaf", t_j, unit) * dv_t[:, None, :])
    torch.testing.assert_close(s_out, s.index_add(0, i, ds), atol=1e-12, rtol=0)
    torch.testing.assert_close(v_out, v.index_add(0, i, dv), atol=1e-12, rtol=0)
    torch.testing.assert_close(t_out, t.index_add(0, i, dt), atol=1e-12, rtol=0)
    assert (t_out - t).abs().max() > 1e-3  # the message is not zero


def test_rank2_features_stay_symmetric_traceless_and_rotate_as_tensors():
    block = _block(seed=2)
    positions, i, j, s, v, t = _inputs(seed=3)
    _, v_out, t_out = _run(block, positions, i, j, s, v, t)
    torch.testing.assert_close(t_out, t_out.transpose(1, 2), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.einsum("naaf->nf", t_out), torch.zeros(N, F, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    rot = torch.tensor(Rotation.from_euler("xyz", [0.4, -0.9, 2.2]).as_matrix())
    v_rot = torch.einsum("ab,nbf->naf", rot, v)
    t_rot = torch.einsum("ac,ncdf,bd->nabf", rot, t, rot)
    s2, v2, t2 = _run(block, positions @ rot.T, i, j, s, v_rot, t_rot)
    torch.testing.assert_close(v2, torch.einsum("ab,nbf->naf", rot, v_out), atol=1e-10, rtol=0)
    torch.testing.assert_close(t2, torch.einsum("ac,ncdf,bd->nabf", rot, t_out, rot), atol=1e-10, rtol=0)
