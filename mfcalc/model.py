"""The network: a PaiNN-style equivariant message-passing potential conditioned on a trainable
fidelity embedding.

Input: element indices, the pairs and their vectors, and each atom's fidelity index.
Output: one energy per atom, in eV, at that atom's fidelity.

    E_i = scale * MLP([s_i, f]) + E0[fidelity, element_i] (+ core repulsion)

where s_i are the final invariant features, f = embedding[fidelity] is the learned vector of the
level of theory, and E0 the per-fidelity, per-element reference energies that carry the large
absolute offsets between methods. With ``fidelity_mode="film"`` the embedding also scales and
shifts the scalar features after every interaction block (FiLM), so the whole network, not only
the readout, can depend on the level of theory.

Features per atom: scalars s (F), vectors v (3, F) and, with ``max_l=2``, symmetric traceless
rank-2 tensors t (3, 3, F) (Cartesian l = 2), mixed by messages built from the pair's unit
vector r̂ (r̂, r̂r̂ᵀ - I/3) and the neighbour's features, each scaled by a learned radial filter
(``radial_mlp``: a small MLP of the radial basis instead of one linear map). Two options raise
the body order (issue 15; off in the default config and in every model file written before
them): ``edge_scalars`` lets the neighbour's vectors and tensors reach the scalar message along
the bond (v_j · r̂, r̂ᵀ t_j r̂), and ``node_products`` multiplies an atom's vector and tensor
channels in the update (w·T·w, T·w, sym0(u ⊗ w)). ``layer_readouts`` adds a linear energy
readout of every earlier layer's scalars (MACE's sum of per-layer readouts).

One network, two layouts of the pairs (``Pairs``): a pair list (E pairs, gathered with
``index_select`` and summed with ``index_add``; any structure, periodic or not, and flat
batches) and a dense (R, N, N) block for R same-size molecules (the gather is a broadcast and the
sum a reduction over the neighbour axis: no scatter in the backward pass, used by the compiled
path and replica MD). The layers are written once, against ``gather`` and ``accumulate``, with
trailing-axis arithmetic that is the same in both layouts.

Short range (``core_radius_factor`` > 0): no training set holds atoms much closer than ~0.7 of
the sum of their covalent radii, and an unconstrained network is wild there (chno-mf: H2 at
0.1 Å at -4e12 eV). Below ``core_radius_factor`` (0.6) x (R_i + R_j) the learned part sees the
pair distance smoothly clamped (it saturates instead of extrapolating), and a ZBL
screened-nuclear repulsion is switched in below ``core_switch_factor`` (0.65) x (R_i + R_j), fully
on below ``core_inner_factor`` (0.45) x (R_i + R_j), so the energy rises monotonically as any two
atoms are pushed inside 0.6 x (R_i + R_j) (every real bond is longer). Above 0.65 x (R_i + R_j)
nothing changes.

The code avoids data-dependent Python control flow so that it scripts (TorchScript) and exports
(torch.export).
"""

import math
from typing import Any, Dict, Final, List, NamedTuple, Optional

import torch
from torch import Tensor, nn

FIDELITY_MODES = ("readout", "film")

# Named network sizes: the options each sets on top of the defaults below (benchmarks/pareto.py
# puts them on one accuracy/speed table; rMD17 forces MAE at N = 50 and ethanol ms/MD step there).
#   "small": PaiNN, l <= 1, 20 radial functions, one linear radial filter (158k parameters for
#            CHNO): the fastest; 2-3x MACE's rMD17 error at N = 50.
#   "accurate": rank-2 tensor features, a radial MLP and 8 radial functions (347k parameters): the
#            network of the shipped models since ethanol-mf v6 / chno-mf v5; 1.3-2.0x MACE's error
#            at N = 50, about half the speed of "small" (still > 10x MACE-OFF small on ethanol).
#   "manybody": "accurate" with 32 features and both many-body options (edge_scalars,
#            node_products; 141k parameters): the lowest rMD17 errors per data point measured
#            here (1.22-1.85x MACE at N = 50; 5-13% below "accurate" on ethanol, uracil, toluene,
#            naphthalene and salicylic acid, 11% above on benzene); the network of chno-mf v6.
_ACCURATE = {"max_l": 2, "radial_mlp": 64, "radial_basis": 8}
SIZES: Dict[str, Dict[str, Any]] = {
    "small": {},
    "accurate": _ACCURATE,
    "manybody": {**_ACCURATE, "features": 32, "edge_scalars": True, "node_products": True},
}


def default_config(elements: List[int], fidelities: List[str], size: str = "small",
                   **overrides: Any) -> Dict[str, Any]:
    """A complete model configuration: the options of the named ``size`` (``SIZES``), then
    ``overrides``, which replace any of them."""
    if size not in SIZES:
        raise ValueError(f"unknown network size {size!r}; known: {sorted(SIZES)}")
    config: Dict[str, Any] = {
        "elements": sorted(int(z) for z in elements),
        "fidelities": list(fidelities),
        "cutoff": 5.0,
        "features": 64,
        "layers": 3,
        "radial_basis": 20,
        "fidelity_dim": 16,
        "fidelity_mode": "film",
        # the radial filters are multiplied by the cutoff envelope, so a pair's message (the
        # filter bias included) fades to zero at the cutoff and the energy is continuous there.
        # Model files from before this option (mfcalc <= 0.3) lack it and read as False: their
        # energy jumps by ~0.1-0.6 eV when a pair crosses the cutoff (forces stay continuous).
        "filter_envelope": True,
        # hidden width of the radial filter MLP (0: one linear map of the basis, as before 0.4)
        "radial_mlp": 0,
        # 1: scalars and vectors (PaiNN); 2: also symmetric traceless rank-2 tensors
        "max_l": 1,
        # scalar messages also from the neighbour's vectors and tensors along the bond
        # (v_j · r̂ and r̂ᵀ t_j r̂, the l -> 0 paths of a full tensor product), not only its scalars
        "edge_scalars": False,
        # per-atom products of the vector and tensor channels in every update (max_l = 2): the
        # invariant w·T·w, the vector T·w and the tensor sym0(u ⊗ w) (higher body order per layer)
        "node_products": False,
        # a linear energy readout of every layer's scalars but the last, added to the last
        # layer's MLP readout (MACE's E_i = sum over layers of readout_t(h_i^t)): the low body
        # order features of the first layers reach the energy directly. rMD17 N = 50, accurate
        # network with 32 features: ethanol 40.5 meV/Å (40.8 without), toluene 24.2 (20.6
        # without): no gain, off everywhere
        "layer_readouts": False,
        # learned part's pair distance clamped below this x (sum of covalent radii); 0: no core
        "core_radius_factor": 0.6,
        # ZBL repulsion: zero above core_switch_factor x (sum of covalent radii), full below
        # core_inner_factor x (sum of covalent radii), smooth in between
        "core_switch_factor": 0.65,
        "core_inner_factor": 0.45,
        # width of the clamp, as a fraction of its radius (0.1 until 0.2.0: ethanol-mf v4's PBE
        # fidelity then still dipped 0.26 eV near 0.33 Å in the H-H scan; 0.05 saturates faster)
        "core_clamp_width": 0.05,
        # per element pair "Z1-Z2": the learned part's pair distance clamped below this radius (Å)
        # instead of core_radius_factor x (sum of covalent radii), e.g. just inside the closest
        # pair of that kind in the training data; pairs not listed keep the factor. A recipe may
        # say "auto": mfcalc train sets it from its training data (mfcalc.domain.pair_clamp_from_data)
        "core_pair_radius": {},
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(config)} (and size)")
    config.update(SIZES[size])
    config.update(overrides)
    if config["fidelity_mode"] not in FIDELITY_MODES:
        raise ValueError(
            f"fidelity_mode must be one of {FIDELITY_MODES}, got {config['fidelity_mode']!r}"
        )
    if int(config["max_l"]) not in (1, 2):
        raise ValueError(f"max_l must be 1 or 2, got {config['max_l']!r}")
    if config["node_products"] and int(config["max_l"]) != 2:
        raise ValueError("node_products needs the rank-2 tensors: set max_l to 2 (or node_products to False)")
    if len(set(config["fidelities"])) != len(config["fidelities"]) or not config["fidelities"]:
        raise ValueError(f"fidelity names must be unique and non-empty: {config['fidelities']}")
    return config


# Model files written before an option existed read it with the behaviour they were trained with.
LEGACY_DEFAULTS = {"filter_envelope": False, "radial_mlp": 0, "max_l": 1, "edge_scalars": False,
                   "node_products": False, "layer_readouts": False, "core_radius_factor": 0.0,
                   "core_switch_factor": 0.0, "core_inner_factor": 0.0, "core_clamp_width": 0.1,
                   "core_pair_radius": {}}


class Pairs(NamedTuple):
    """Which atoms interact, in one of two layouts.

    Pair list: ``i``, ``j`` (E,) centre and neighbour of each pair; pair tensors are (E, ...),
    atom tensors (N, ...). Dense: ``dense`` True, ``mask`` (R, N, N) of the pairs that interact
    (within the cutoff, not self); pair tensors are (R, N, N, ...), atom tensors (R, N, ...),
    and ``i``/``j`` are unused."""

    i: Tensor
    j: Tensor
    dense: bool
    mask: Optional[Tensor]
    # dense only: (N*N,) index of each (i, j) into the P = N(N-1)/2 pairs i < j (the diagonal
    # points at P, a row of zeros). The radial filters are functions of the distance alone, the
    # same for (i, j) and (j, i): they are evaluated on the P pairs once and unfolded, which
    # halves the largest matrix products of the network (mirror_index).
    mirror: Optional[Tensor] = None
    # dense only: (2, P) rows and columns of the pairs i < j, in the order ``mirror`` points into
    upper: Optional[Tensor] = None


def gather(x: Tensor, pairs: Pairs) -> Tensor:
    """The neighbour's features for every pair: (E, ...) or (R, 1, N, ...) (broadcasts)."""
    if pairs.dense:
        return x.unsqueeze(1)
    return x.index_select(0, pairs.j)


def mirror_index(n_atoms: int, device: torch.device) -> List[Tensor]:
    """[upper, index]: the (2, P) pairs i < j (``torch.triu_indices`` order, P = N(N-1)/2) and
    the (N*N,) index of every ordered pair (i, j) into them (both orders share one entry; the
    diagonal gets P)."""
    upper = torch.triu_indices(n_atoms, n_atoms, 1, device=device)
    p = upper.shape[1]
    index = torch.full((n_atoms * n_atoms,), p, dtype=torch.long, device=device)
    order = torch.arange(p, device=device)
    index = index.index_put((upper[0] * n_atoms + upper[1],), order)
    return [upper, index.index_put((upper[1] * n_atoms + upper[0],), order)]


def unfold(w: Tensor, pairs: Pairs) -> Tensor:
    """(R, P, C) values of the pairs i < j -> (R, N, N, C) for every ordered pair (zero on the diagonal)."""
    mirror = pairs.mirror
    if mirror is None:
        return w
    r, c = w.shape[0], w.shape[-1]
    n = pairs.i.shape[-1]
    padded = torch.cat([w, torch.zeros((r, 1, c), dtype=w.dtype, device=w.device)], dim=1)
    return padded.index_select(1, mirror).view(r, n, n, c)


def accumulate(x: Tensor, message: Tensor, pairs: Pairs) -> Tensor:
    """x + the sum of each atom's pair messages (the messages are zero on masked pairs)."""
    if pairs.dense:
        return x + message.sum(2)
    return x.index_add(0, pairs.i, message)


class RadialBasis(nn.Module):
    """sin(n pi r / rc) / r for n = 1..K, times a cosine cutoff that is 0 (with zero slope) at rc.
    Returns [basis (..., K), envelope (..., 1)]."""

    def __init__(self, n_basis: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("freq", torch.arange(1, n_basis + 1) * math.pi / cutoff)

    def forward(self, r: Tensor) -> List[Tensor]:
        r = r.unsqueeze(-1)
        envelope = 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0) * (r < self.cutoff)
        return [torch.sin(r * self.freq) / r * envelope, envelope]


def radial_filter(n_basis: int, out: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(n_basis, out)
    return nn.Sequential(nn.Linear(n_basis, hidden), nn.SiLU(), nn.Linear(hidden, out))


def symmetric_traceless(m: Tensor) -> Tensor:
    """Symmetric traceless part of (..., 3, 3, F) matrices: (m + mᵀ)/2 - I tr(m)/3."""
    trace = m[..., 0, 0, :] + m[..., 1, 1, :] + m[..., 2, 2, :]
    eye = torch.eye(3, dtype=m.dtype, device=m.device).unsqueeze(-1)
    return 0.5 * (m + m.transpose(-3, -2)) - eye * (trace.unsqueeze(-2).unsqueeze(-2) / 3.0)


def contract_unit(t: Tensor, unit: Tensor, pairs: Pairs) -> Tensor:
    """t · r̂ for symmetric t (..., 3, 3, F) and unit vectors (..., 3): (..., 3, F). A pair list
    contracts with one batched (1 x 3) @ (3 x 3F) product per pair (t is symmetric, so its rows
    are its columns), without a (pairs, 3, 3, F) temporary; the dense layout, where t is a
    broadcast of the atoms' tensors, multiplies and sums."""
    if pairs.dense:
        return (t * unit.unsqueeze(-2).unsqueeze(-1)).sum(dim=-2)
    e, f = t.shape[0], t.shape[-1]
    return torch.bmm(unit.unsqueeze(1), t.reshape(e, 3, 3 * f)).view(e, 3, f)


class Interaction(nn.Module):
    """Equivariant message from neighbours j to atom i (PaiNN eq. 7-8; with l = 2 tensors)."""

    hidden_filter: Final[bool]
    edge_scalars: Final[bool]
    edge_channel: Final[int]

    def __init__(self, features: int, n_basis: int, filter_envelope: bool = True, radial_mlp: int = 0,
                 max_l: int = 1, edge_scalars: bool = False):
        super().__init__()
        self.features = features
        self.hidden_filter = radial_mlp > 0
        self.filter_envelope = filter_envelope
        self.max_l = max_l
        self.edge_scalars = edge_scalars
        # message channels per feature: s, v (v, r̂) [, t (r̂r̂, t, v⊗r̂), v (t·r̂)] [, s (v·r̂) [, s (r̂ t r̂)]]
        base = 3 if max_l == 1 else 7
        self.edge_channel = base  # first edge-scalar channel: v·r̂, then (max_l = 2) r̂ t r̂
        width = base + (max_l if edge_scalars else 0)
        self.phi = nn.Sequential(
            nn.Linear(features, features), nn.SiLU(), nn.Linear(features, width * features)
        )
        self.filter = radial_filter(n_basis, width * features, radial_mlp)

    def filters(self, basis: Tensor, envelope: Tensor) -> Tensor:
        """The radial filters of the pairs, times the cutoff envelope: the bias too must vanish at
        the cutoff (PaiNN: W(r) fcut(r)). The envelope goes into the last linear map,
        [h fcut, fcut] @ [Wᵀ; b] = (h Wᵀ + b) fcut, instead of a (pairs x width) product after it."""
        if not self.filter_envelope:  # models from mfcalc <= 0.3
            return self.filter(basis)
        if self.hidden_filter:
            hidden = self.filter[1](self.filter[0](basis))
            last = self.filter[2]
            weight, bias = last.weight, last.bias
        else:
            hidden = basis
            weight, bias = self.filter.weight, self.filter.bias
        return torch.cat([hidden * envelope, envelope], dim=-1) @ torch.cat([weight.t(), bias.unsqueeze(0)], dim=0)

    def forward(
        self, s: Tensor, v: Tensor, t: Tensor, pairs: Pairs, basis: Tensor, unit: Tensor,
        envelope: Tensor, first: bool = False,
    ) -> List[Tensor]:
        w = self.filters(basis, envelope)
        w = unfold(w, pairs)  # dense: the filters of the pairs i < j to every ordered pair
        mask = pairs.mask
        if mask is not None:
            w = w * mask.unsqueeze(-1)
        x = gather(self.phi(s), pairs) * w
        parts = torch.split(x, self.features, dim=-1)
        ds, dv_v, dv_r = parts[0], parts[1], parts[2]
        dv = dv_r.unsqueeze(-2) * unit.unsqueeze(-1)
        v_j = v
        if not first:  # in the first block v (and t) are still zero: skip their products
            v_j = gather(v, pairs)
            dv = dv + v_j * dv_v.unsqueeze(-2)
            if self.edge_scalars:  # the neighbour's vectors along the bond: v_j · r̂
                ds = ds + parts[self.edge_channel] * (v_j * unit.unsqueeze(-1)).sum(dim=-2)
        if self.max_l == 2:
            # The rank-2 message of pair ij, per feature:
            #   dt_r (r̂r̂ᵀ - I/3) + dt_t t_j + dt_v sym0(v_j ⊗ r̂)
            # with sym0 the symmetric traceless part. Since r̂r̂ᵀ - I/3 = sym0(r̂ ⊗ r̂) and sym0 is
            # linear, the first and last terms are sym0(y ⊗ r̂) with y = dt_r r̂ + dt_v v_j, and the
            # sum over neighbours may be taken before sym0: per pair one outer product y ⊗ r̂ (and
            # dt_t t_j), per atom one sym0. The same function as forming each term per pair, with a
            # third of the (pairs x 9 x F) temporaries (the water box spends its time there).
            dt_r, dt_t, dt_v, dv_t = parts[3], parts[4], parts[5], parts[6]
            y = dt_r.unsqueeze(-2) * unit.unsqueeze(-1)
            r_b = unit.unsqueeze(-2).unsqueeze(-1)  # (..., 1, 3, 1): r̂_b
            if first:
                message = y.unsqueeze(-2) * r_b
            else:
                t_j = gather(t, pairs)
                y = y + v_j * dt_v.unsqueeze(-2)
                t_r = contract_unit(t_j, unit, pairs)  # t_j · r̂
                dv = dv + t_r * dv_t.unsqueeze(-2)
                if self.edge_scalars:  # the neighbour's tensors along the bond: r̂ᵀ t_j r̂
                    ds = ds + parts[self.edge_channel + 1] * (t_r * unit.unsqueeze(-1)).sum(dim=-2)
                # dt_t t_j is symmetric traceless already: sym0 leaves its sum as it is
                message = torch.addcmul(t_j * dt_t.unsqueeze(-2).unsqueeze(-2), y.unsqueeze(-2), r_b)
            t = t + symmetric_traceless(accumulate(torch.zeros_like(t), message, pairs))
        s = accumulate(s, ds, pairs)
        v = accumulate(v, dv, pairs)
        return [s, v, t]


class Update(nn.Module):
    """Per-atom mixing of scalar, vector (and tensor) channels (PaiNN eq. 9-11). With
    ``products`` (max_l = 2) the mixed channels u, w (vectors) and U, W (tensors) of an atom also
    multiply: the invariant w·W·w joins the gates' inputs, and U·w (a vector) and sym0(u ⊗ w) (a
    tensor) are added, each with its own gate. These products of the atom's summed messages
    raise the body order of one layer, as the symmetric contraction of ACE/MACE does."""

    products: Final[bool]

    def __init__(self, features: int, max_l: int = 1, products: bool = False):
        super().__init__()
        self.features = features
        self.max_l = max_l
        self.products = products
        self.uv = nn.Linear(features, 2 * features, bias=False)
        self.ut = nn.Linear(features, 2 * features, bias=False) if max_l == 2 else nn.Identity()
        n_in, n_out = (2, 3) if max_l == 1 else (3, 5)
        if products:
            n_in, n_out = n_in + 1, n_out + 2
        self.mlp = nn.Sequential(
            nn.Linear(n_in * features, features), nn.SiLU(), nn.Linear(features, n_out * features)
        )

    def forward(self, s: Tensor, v: Tensor, t: Tensor) -> List[Tensor]:
        """s (..., F), v (..., 3, F), t (..., 3, 3, F): any leading axes."""
        u, w = torch.split(self.uv(v), self.features, dim=-1)
        w_norm = torch.sqrt((w * w).sum(dim=-2) + 1e-8)
        if self.max_l == 2:
            ut, wt = torch.split(self.ut(t), self.features, dim=-1)
            wt_norm = torch.sqrt((wt * wt).sum(dim=-2).sum(dim=-2) + 1e-8)
            if self.products:
                wt_w = (wt * w.unsqueeze(-3)).sum(dim=-2)  # W·w (..., 3, F)
                a = self.mlp(torch.cat([s, w_norm, wt_norm, (w * wt_w).sum(dim=-2)], dim=-1))
            else:
                a = self.mlp(torch.cat([s, w_norm, wt_norm], dim=-1))
            parts = torch.split(a, self.features, dim=-1)
            t_new = parts[3].unsqueeze(-2).unsqueeze(-2) * ut
            if self.products:
                ut_w = (ut * w.unsqueeze(-3)).sum(dim=-2)  # U·w, before v changes
                u_w = symmetric_traceless(u.unsqueeze(-2) * w.unsqueeze(-3))  # sym0(u ⊗ w)
                t_new = t_new + parts[6].unsqueeze(-2).unsqueeze(-2) * u_w
                v = v + parts[5].unsqueeze(-2) * ut_w
            t = t + t_new
            s = s + parts[4] * (ut * wt).sum(dim=-2).sum(dim=-2)
        else:
            a = self.mlp(torch.cat([s, w_norm], dim=-1))
            parts = torch.split(a, self.features, dim=-1)
        a_vv, a_sv, a_ss = parts[0], parts[1], parts[2]
        v = v + a_vv.unsqueeze(-2) * u
        s = s + a_sv * (u * w).sum(dim=-2) + a_ss
        return [s, v, t]


# buffers that are constants of the elements (rebuilt from the config; never trained)
ELEMENT_CONSTANTS = ("atomic_number", "covalent_radius")


def element_constants(elements: List[int]) -> Dict[str, Tensor]:
    """Atomic numbers and covalent radii (Å, Cordero et al. 2008 as in ase.data) of the model's
    elements, in species order."""
    from ase.data import covalent_radii

    zs = [int(z) for z in elements]
    return {"atomic_number": torch.tensor(zs, dtype=torch.float64),
            "covalent_radius": torch.tensor([float(covalent_radii[z]) for z in zs], dtype=torch.float64)}


# buffers derived from the config (not weights: outside the state dict and the checksum)
CONFIG_BUFFERS = ("clamp_radius", "core_reach")


def pair_clamp_radii(config: Dict[str, Any]) -> Tensor:
    """(S, S) radius below which the learned part sees a pair's distance clamped, in species order:
    ``core_radius_factor`` x (sum of covalent radii), or the ``core_pair_radius`` entry of that
    element pair ("Z1-Z2", either order)."""
    zs = [int(z) for z in config["elements"]]
    radius = element_constants(zs)["covalent_radius"]
    table = float(config.get("core_radius_factor", 0.0)) * (radius[:, None] + radius[None, :])
    pairs = config.get("core_pair_radius") or {}
    if not isinstance(pairs, dict):
        raise ValueError(f"core_pair_radius must map element pairs 'Z1-Z2' to radii in Å, got {pairs!r}"
                         + (" ('auto' is for recipes: mfcalc train replaces it with radii from its training "
                            "data)" if pairs == "auto" else ""))
    for key, value in pairs.items():
        try:
            a, b = (int(x) for x in str(key).split("-"))
        except ValueError:
            raise ValueError(f"core_pair_radius keys are element pairs 'Z1-Z2' (atomic numbers), got {key!r}") from None
        if a not in zs or b not in zs:
            raise ValueError(f"core_pair_radius names {key!r}, but the model's elements are {zs}")
        if not float(value) > 0.0:
            raise ValueError(f"core_pair_radius[{key!r}] must be a positive distance in Å, got {value!r}")
        table[zs.index(a), zs.index(b)] = table[zs.index(b), zs.index(a)] = float(value)
    return table


def zbl_energy(r: Tensor, zi: Tensor, zj: Tensor) -> Tensor:
    """Ziegler-Biersack-Littmark screened nuclear repulsion of a pair, eV (r in Å)."""
    a = 0.46850 / (zi.pow(0.23) + zj.pow(0.23))
    x = r / a
    screening = (0.18175 * torch.exp(-3.19980 * x) + 0.50986 * torch.exp(-0.94229 * x)
                 + 0.28022 * torch.exp(-0.40290 * x) + 0.02817 * torch.exp(-0.20162 * x))
    return 14.3996454784 * zi * zj / r * screening  # e^2 / (4 pi eps0) = 14.3996 eV Å


def smooth_step(x: Tensor) -> Tensor:
    """0 for x <= 0, 1 for x >= 1, C2 in between (6x^5 - 15x^4 + 10x^3)."""
    x = x.clamp(0.0, 1.0)
    return x * x * x * (x * (6.0 * x - 15.0) + 10.0)


class MultiFidelityPaiNN(nn.Module):
    """Atomic energies from species, pairs and pair vectors, at each atom's fidelity."""

    # a constant of the scripted graph: without the option its branches are compiled away
    use_layer_readouts: Final[bool]

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        config = {**LEGACY_DEFAULTS, **config}
        self.config = dict(config)
        f = int(config["features"])
        n_layers = int(config["layers"])
        d = int(config["fidelity_dim"])
        n_elements = len(config["elements"])
        n_fidelities = len(config["fidelities"])
        max_l = int(config["max_l"])
        self.features = f
        self.n_layers = n_layers
        self.max_l = max_l
        self.use_film = config["fidelity_mode"] == "film"
        self.cutoff = float(config["cutoff"])
        self.core_radius_factor = float(config["core_radius_factor"])
        self.core_switch_factor = float(config["core_switch_factor"])
        self.core_inner_factor = float(config["core_inner_factor"])
        self.core_clamp_width = float(config["core_clamp_width"])
        self.use_core = self.core_radius_factor > 0.0

        self.species_embedding = nn.Embedding(n_elements, f)
        self.fidelity_embedding = nn.Embedding(n_fidelities, d)
        nn.init.normal_(self.fidelity_embedding.weight, std=1.0)
        self.radial = RadialBasis(int(config["radial_basis"]), self.cutoff)
        self.interactions = nn.ModuleList([
            Interaction(f, int(config["radial_basis"]), bool(config["filter_envelope"]),
                        int(config["radial_mlp"]), max_l, bool(config["edge_scalars"]))
            for _ in range(n_layers)
        ])
        self.updates = nn.ModuleList([Update(f, max_l, bool(config["node_products"])) for _ in range(n_layers)])
        # FiLM starts as the identity: every fidelity begins from the same network
        self.film = nn.Linear(d, 2 * f * n_layers)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.readout = nn.Sequential(nn.Linear(f + d, f // 2), nn.SiLU(), nn.Linear(f // 2, 1))
        # layer_readouts: one linear map of the scalars of layers 1..L-1, concatenated (the sum
        # of one linear readout per layer); no parameters without the option
        self.use_layer_readouts = bool(config["layer_readouts"]) and n_layers > 1
        self.layer_readout = nn.Linear((n_layers - 1) * f, 1, bias=False) if self.use_layer_readouts else nn.Identity()
        # energy normalisation, set from data before training (mfcalc.training.fit_reference)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("e0", torch.zeros(n_fidelities, n_elements))
        # constants of the elements, for the core repulsion (buffers: they follow .to(device))
        for name, values in element_constants(config["elements"]).items():
            self.register_buffer(name, values)
        # CONFIG_BUFFERS: where the learned part's pair distances are clamped, and the distance
        # below which a pair reaches any core term (clamp or ZBL switch); from the config, never
        # trained, not in the state dict (a re-shipped model may set other radii), but inside the
        # TorchScript file
        clamp = pair_clamp_radii(config)
        radius = self.covalent_radius
        reach = torch.maximum(clamp, self.core_switch_factor * (radius[:, None] + radius[None, :]))
        self.register_buffer("clamp_radius", clamp, persistent=False)
        self.register_buffer("core_reach", reach, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Checkpoints written before the element constants existed load as before: the
        constants are filled in from the configuration."""
        for name, values in element_constants(self.config["elements"]).items():
            state_dict.setdefault(prefix + name, values.to(getattr(self, name).dtype))
        # a TorchScript file's state dict lists the config buffers; the eager module takes its config's
        for name in CONFIG_BUFFERS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ---------------------------------------------------------------- the two layouts
    def forward(
        self, species: Tensor, edge_index: Tensor, vectors: Tensor, fidelity: Tensor
    ) -> Tensor:
        """Pair list: species (N,), edge_index (2, E), vectors (E, 3) = x_j - x_i (+ shift),
        fidelity (N,) per atom. Returns energies (N,)."""
        r = torch.sqrt((vectors * vectors).sum(dim=-1))
        pairs = Pairs(edge_index[0], edge_index[1], False, None)
        i, j = edge_index[0], edge_index[1]
        return self.atom_energies(species, fidelity, pairs, vectors, r, species[i], species[j])

    def dense_energies(self, species: Tensor, positions: Tensor, fidelity: Tensor) -> List[Tensor]:
        """Dense: species (R, N), positions (R, N, 3) in Å, fidelity (R,). Every pair within the
        cutoff interacts, as with a full pair list. Returns [energies (R, N), shortest pair
        distance]."""
        n_atoms = species.shape[1]
        vectors = positions.unsqueeze(1) - positions.unsqueeze(2)  # [r, i, j] = x_j - x_i
        eye = torch.eye(n_atoms, dtype=positions.dtype, device=positions.device)
        # the diagonal gets distance 1 instead of 0: finite everywhere (also in the gradient), masked
        r = torch.sqrt((vectors * vectors).sum(-1) + eye)
        interacting = (r < self.cutoff) & (eye == 0)
        upper, mirror = mirror_index(n_atoms, positions.device)
        pairs = Pairs(species, species, True, interacting.to(positions.dtype), mirror, upper)
        fid_atoms = fidelity.unsqueeze(1).expand(species.shape[0], n_atoms)
        energies = self.atom_energies(species, fid_atoms, pairs, vectors, r, species.unsqueeze(2),
                                      species.unsqueeze(1))
        shortest = torch.where(interacting, r, torch.full_like(r, float("inf"))).min()
        return [energies, shortest]

    # ---------------------------------------------------------------- the network, once
    def atom_energies(self, species: Tensor, fidelity: Tensor, pairs: Pairs, vectors: Tensor, r: Tensor,
                      species_i: Tensor, species_j: Tensor) -> Tensor:
        unit = vectors / r.unsqueeze(-1)
        use_core = self.use_core and self._core_reached(r, species_i, species_j)
        r_learned = r
        if use_core:
            r_learned = self._clamped(r, self.clamp_radius[species_i, species_j], self.core_clamp_width)
        basis, envelope = self.radial(self._filter_distances(r_learned, pairs))
        f = self.fidelity_embedding(fidelity)

        s = self.species_embedding(species)
        lead = list(s.shape[:-1])
        v = torch.zeros(lead + [3, self.features], dtype=s.dtype, device=s.device)
        if self.max_l == 2:
            t = torch.zeros(lead + [3, 3, self.features], dtype=s.dtype, device=s.device)
        else:
            t = torch.zeros((0,), dtype=s.dtype, device=s.device)
        film = torch.chunk(self.film(f), 2 * self.n_layers, dim=-1)
        layer = 0
        hidden: List[Tensor] = []
        for interaction, update in zip(self.interactions, self.updates):
            s, v, t = interaction(s, v, t, pairs, basis, unit, envelope, layer == 0)
            s, v, t = update(s, v, t)
            if self.use_film:
                s = s * (1.0 + film[2 * layer]) + film[2 * layer + 1]
            layer += 1
            if self.use_layer_readouts and layer < self.n_layers:
                hidden.append(s)
        out = self.readout(torch.cat([s, f], dim=-1)).squeeze(-1)
        if self.use_layer_readouts:
            out = out + self.layer_readout(torch.cat(hidden, dim=-1)).squeeze(-1)
        energies = out * self.scale + self.e0[fidelity, species]
        if use_core:
            core = self.covalent_radius[species_i] + self.covalent_radius[species_j]
            energies = accumulate(energies, self._core_repulsion(r, core, species_i, species_j, pairs), pairs)
        return energies

    @staticmethod
    def _filter_distances(r: Tensor, pairs: Pairs) -> Tensor:
        """The distances the radial filters see: dense, those of the pairs i < j (R, P)."""
        upper = pairs.upper
        if upper is None:
            return r
        return r[:, upper[0], upper[1]]

    def _core_reached(self, r: Tensor, species_i: Tensor, species_j: Tensor) -> bool:
        """Whether the core terms can differ from zero. Inside a TorchScript file on a CPU they are
        skipped when no pair is within reach of any core (ordinary MD: ~25 ops and their backward
        less per call, exactly the same numbers); elsewhere (training, torch.compile, CUDA, where
        a host sync per step would cost more) they are always computed."""
        if torch.jit.is_scripting() and not r.is_cuda:
            return bool((r < self.core_reach[species_i, species_j]).any())
        return True

    @staticmethod
    def _clamped(r: Tensor, r_core: Tensor, fraction: float) -> Tensor:
        """r above r_core; below it, r_core - w tanh((r_core - r) / w) with w = fraction x r_core:
        equal value, slope and curvature at r_core, and never below (1 - fraction) r_core."""
        width = fraction * r_core
        inner = r_core - width * torch.tanh((r_core - r) / width)
        return torch.where(r < r_core, inner, r)

    def _core_repulsion(self, r: Tensor, core: Tensor, species_i: Tensor, species_j: Tensor,
                        pairs: Pairs) -> Tensor:
        """Half of each pair's switched ZBL energy (each atom of the pair gets half)."""
        inner = self.core_inner_factor * core
        outer = self.core_switch_factor * core
        switch = 1.0 - smooth_step((r - inner) / (outer - inner))
        zi = self.atomic_number[species_i].to(r.dtype)
        zj = self.atomic_number[species_j].to(r.dtype)
        energy = 0.5 * zbl_energy(r, zi, zj) * switch
        mask = pairs.mask
        if mask is not None:
            energy = energy * mask
        return energy
