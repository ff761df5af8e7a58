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


def test_edge_scalars_are_the_neighbours_vectors_and_tensors_along_the_bond():
    """edge_scalars adds v_j·r̂ and r̂ᵀ t_j r̂ (each with its own filter channel) to the scalar
    message; every other output is that of the block without them, given the same weights."""
    torch.manual_seed(5)
    block = Interaction(F, 4, filter_envelope=True, radial_mlp=6, max_l=2, edge_scalars=True).double()
    positions, i, j, s, v, t = _inputs(seed=6)
    s_out, v_out, t_out = _run(block, positions, i, j, s, v, t)

    vectors = positions[j] - positions[i]
    r = vectors.norm(dim=-1)
    unit = vectors / r.unsqueeze(-1)
    basis, envelope = RadialBasis(4, 5.0)(r)
    x = block.phi(s)[j] * block.filter(basis) * envelope
    parts = torch.split(x, F, dim=-1)
    ds = (parts[0] + parts[7] * torch.einsum("eaf,ea->ef", v[j], unit)
          + parts[8] * torch.einsum("ea,eabf,eb->ef", unit, t[j], unit))
    torch.testing.assert_close(s_out, s.index_add(0, i, ds), atol=1e-12, rtol=0)

    plain = Interaction(F, 4, filter_envelope=True, radial_mlp=6, max_l=2).double()
    with torch.no_grad():  # the same weights, less the two extra channels
        plain.phi[0].load_state_dict(block.phi[0].state_dict())
        plain.phi[2].weight.copy_(block.phi[2].weight[:7 * F])
        plain.phi[2].bias.copy_(block.phi[2].bias[:7 * F])
        plain.filter[0].load_state_dict(block.filter[0].state_dict())
        plain.filter[2].weight.copy_(block.filter[2].weight[:7 * F])
        plain.filter[2].bias.copy_(block.filter[2].bias[:7 * F])
    _, v_plain, t_plain = _run(plain, positions, i, j, s, v, t)
    torch.testing.assert_close(v_out, v_plain, atol=1e-12, rtol=0)
    torch.testing.assert_close(t_out, t_plain, atol=1e-12, rtol=0)
    assert (s_out - _run(plain, positions, i, j, s, v, t)[0]).abs().max() > 1e-3


def test_update_products_follow_their_formulas_and_rotate():
    """Update(products=True): the invariant w·W·w joins the gate inputs, U·w is added to the
    vectors and sym0(u ⊗ w) to the tensors; scalars stay invariant, v and t rotate."""
    from mfcalc.model import Update, symmetric_traceless

    torch.manual_seed(7)
    block = Update(F, max_l=2, products=True).double()
    _, _, _, s, v, t = _inputs(seed=8)
    s_out, v_out, t_out = block(s, v, t)

    u, w = torch.split(block.uv(v), F, dim=-1)
    ut, wt = torch.split(block.ut(t), F, dim=-1)
    w_norm = torch.sqrt((w * w).sum(1) + 1e-8)
    wt_norm = torch.sqrt((wt * wt).sum((1, 2)) + 1e-8)
    triple = torch.einsum("naf,nabf,nbf->nf", w, wt, w)
    a_vv, a_sv, a_ss, a_tt, a_st, a_tv, a_vvt = torch.split(
        block.mlp(torch.cat([s, w_norm, wt_norm, triple], dim=-1)), F, dim=-1)
    v_ref = v + a_vv[:, None] * u + a_tv[:, None] * torch.einsum("nabf,nbf->naf", ut, w)
    t_ref = (t + a_tt[:, None, None] * ut
             + a_vvt[:, None, None] * symmetric_traceless(torch.einsum("naf,nbf->nabf", u, w)))
    s_ref = s + a_sv * (u * w).sum(1) + a_ss + a_st * (ut * wt).sum((1, 2))
    torch.testing.assert_close(s_out, s_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(v_out, v_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(t_out, t_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.einsum("naaf->nf", t_out), torch.zeros(N, F, dtype=torch.float64),
                               atol=1e-12, rtol=0)

    rot = torch.tensor(Rotation.from_euler("xyz", [-1.1, 0.3, 0.8]).as_matrix())
    s2, v2, t2 = block(s, torch.einsum("ab,nbf->naf", rot, v), torch.einsum("ac,ncdf,bd->nabf", rot, t, rot))
    torch.testing.assert_close(s2, s_out, atol=1e-10, rtol=0)
    torch.testing.assert_close(v2, torch.einsum("ab,nbf->naf", rot, v_out), atol=1e-10, rtol=0)
    torch.testing.assert_close(t2, torch.einsum("ac,ncdf,bd->nabf", rot, t_out, rot), atol=1e-10, rtol=0)


def test_node_products_need_rank2_tensors():
    from mfcalc.model import default_config

    with pytest.raises(ValueError, match="node_products needs the rank-2 tensors"):
        default_config([1, 6], ["x"], node_products=True)


def test_named_sizes_set_their_options_and_overrides_win():
    from mfcalc.model import SIZES, default_config

    small = default_config([1, 6], ["x"])
    assert small == default_config([1, 6], ["x"], size="small")
    accurate = default_config([1, 6], ["x"], size="accurate")
    assert (accurate["max_l"], accurate["radial_mlp"], accurate["radial_basis"]) == (2, 64, 8)
    # everything a size does not name stays at the default
    assert {k: v for k, v in accurate.items() if k not in SIZES["accurate"]} == \
        {k: v for k, v in small.items() if k not in SIZES["accurate"]}
    assert default_config([1, 6], ["x"], size="accurate", radial_basis=12)["radial_basis"] == 12
    manybody = default_config([1, 6], ["x"], size="manybody")
    assert {k: manybody[k] for k in SIZES["accurate"]} == SIZES["accurate"]
    assert (manybody["features"], manybody["edge_scalars"], manybody["node_products"]) == (32, True, True)
    with pytest.raises(ValueError, match="unknown network size 'huge'; known: \\['accurate', 'manybody', 'small'\\]"):
        default_config([1, 6], ["x"], size="huge")


def test_layer_readouts_add_a_linear_map_of_each_earlier_layers_scalars():
    """E_i = MLP(s_i^L) + sum_t w_t · s_i^t (t < L): with the option, the energy is the plain
    network's plus one linear readout per earlier layer, computed here from hooks on the updates."""
    from mfcalc.model import default_config
    from mfcalc.modelfile import build_forcefield

    options = dict(features=8, layers=3, radial_basis=6, fidelity_dim=4, cutoff=4.0, max_l=2, radial_mlp=8)
    torch.manual_seed(0)
    plain = build_forcefield(default_config([1, 6, 8], ["a", "b"], **options)).double().model
    with_readouts = build_forcefield(default_config([1, 6, 8], ["a", "b"], layer_readouts=True, **options)).double().model
    missing, unexpected = with_readouts.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["layer_readout.weight"] and unexpected == []
    assert with_readouts.layer_readout.weight.shape == (1, 2 * 8)
    with torch.no_grad():
        plain.film.weight.normal_(0, 0.3)
        with_readouts.film.weight.copy_(plain.film.weight)
        with_readouts.layer_readout.weight.normal_()

    g = torch.Generator().manual_seed(3)
    positions = 1.3 * torch.randn(7, 3, generator=g, dtype=torch.float64)
    species = torch.tensor([0, 1, 1, 2, 0, 0, 1])
    fidelity = torch.tensor([1] * 7)
    i, j = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    keep = (i != j) & ((positions[j] - positions[i]).norm(dim=-1) < 4.0)
    edges = torch.stack([i[keep], j[keep]])
    vectors = positions[edges[1]] - positions[edges[0]]

    scalars = []  # s after each layer's update, before FiLM: FiLM is applied here as the model does
    hooks = [u.register_forward_hook(lambda m, a, out: scalars.append(out[0])) for u in plain.updates]
    e_plain = plain(species, edges, vectors, fidelity)
    for h in hooks:
        h.remove()
    film = torch.chunk(plain.film(plain.fidelity_embedding(fidelity)), 6, dim=-1)
    filmed = [s * (1 + film[2 * k]) + film[2 * k + 1] for k, s in enumerate(scalars[:2])]
    linear = torch.cat(filmed, dim=-1) @ with_readouts.layer_readout.weight.t()
    expected = e_plain + linear.squeeze(-1) * plain.scale
    torch.testing.assert_close(with_readouts(species, edges, vectors, fidelity), expected, atol=1e-10, rtol=0)
    # the dense layout runs the same network
    dense, _ = with_readouts.dense_energies(species.unsqueeze(0), positions.unsqueeze(0), fidelity[:1])
    torch.testing.assert_close(dense[0], expected, atol=1e-10, rtol=0)
