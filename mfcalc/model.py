"""The network: a PaiNN-style equivariant message-passing potential conditioned on a trainable
fidelity embedding.

Input: element indices, the pair list and pair vectors, and each atom's fidelity index.
Output: one energy per atom, in eV, at that atom's fidelity.

    E_i = scale * MLP([s_i, f]) + E0[fidelity, element_i]

where s_i are the final invariant features, f = embedding[fidelity] is the learned vector of the
level of theory, and E0 the per-fidelity, per-element reference energies that carry the large
absolute offsets between methods. With ``fidelity_mode="film"`` the embedding also scales and
shifts the scalar features after every interaction block (FiLM), so the whole network, not only
the readout, can depend on the level of theory. The code avoids data-dependent Python control flow
so that it scripts (TorchScript) and exports (torch.export).
"""

import math
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

FIDELITY_MODES = ("readout", "film")


def default_config(elements: List[int], fidelities: List[str], **overrides: Any) -> Dict[str, Any]:
    """A complete model configuration; ``overrides`` replace any default."""
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
    }
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(config)}")
    config.update(overrides)
    if config["fidelity_mode"] not in FIDELITY_MODES:
        raise ValueError(
            f"fidelity_mode must be one of {FIDELITY_MODES}, got {config['fidelity_mode']!r}"
        )
    if len(set(config["fidelities"])) != len(config["fidelities"]) or not config["fidelities"]:
        raise ValueError(f"fidelity names must be unique and non-empty: {config['fidelities']}")
    return config


class RadialBasis(nn.Module):
    """sin(n pi r / rc) / r for n = 1..K, times a cosine cutoff that is 0 (with zero slope) at rc.
    Returns [basis (E, K), envelope (E, 1)]."""

    def __init__(self, n_basis: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("freq", torch.arange(1, n_basis + 1) * math.pi / cutoff)

    def forward(self, r: Tensor) -> List[Tensor]:
        r = r.unsqueeze(-1)
        envelope = 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0) * (r < self.cutoff)
        return [torch.sin(r * self.freq) / r * envelope, envelope]


class Interaction(nn.Module):
    """Equivariant message from neighbors j to atom i (PaiNN eq. 7-8)."""

    def __init__(self, features: int, n_basis: int, filter_envelope: bool = True):
        super().__init__()
        self.features = features
        self.filter_envelope = filter_envelope
        self.phi = nn.Sequential(
            nn.Linear(features, features), nn.SiLU(), nn.Linear(features, 3 * features)
        )
        self.filter = nn.Linear(n_basis, 3 * features)

    def forward(
        self, s: Tensor, v: Tensor, edge_index: Tensor, basis: Tensor, unit: Tensor,
        envelope: Tensor, first: bool = False,
    ) -> List[Tensor]:
        i, j = edge_index[0], edge_index[1]
        w = self.filter(basis)
        if self.filter_envelope:  # the bias too must vanish at the cutoff (PaiNN: W(r) fcut(r))
            w = w * envelope
        x = self.phi(s).index_select(0, j) * w
        ds, dv_v, dv_r = torch.split(x, self.features, dim=-1)
        dv = dv_r.unsqueeze(1) * unit.unsqueeze(2)
        if not first:  # in the first block v is still zero: skip the (E, 3, F) gather and product
            dv = dv + v.index_select(0, j) * dv_v.unsqueeze(1)
        s = s.index_add(0, i, ds)
        v = v.index_add(0, i, dv)
        return [s, v]


class Update(nn.Module):
    """Per-atom mixing of scalar and vector channels (PaiNN eq. 9-11)."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.uv = nn.Linear(features, 2 * features, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * features, features), nn.SiLU(), nn.Linear(features, 3 * features)
        )

    def forward(self, s: Tensor, v: Tensor) -> List[Tensor]:
        """s (..., F), v (..., 3, F): any leading axes (atoms, or replicas x atoms in mfcalc.dense)."""
        u, w = torch.split(self.uv(v), self.features, dim=-1)
        w_norm = torch.sqrt((w * w).sum(dim=-2) + 1e-8)
        a = self.mlp(torch.cat([s, w_norm], dim=-1))
        a_vv, a_sv, a_ss = torch.split(a, self.features, dim=-1)
        v = v + a_vv.unsqueeze(-2) * u
        s = s + a_sv * (u * w).sum(dim=-2) + a_ss
        return [s, v]


class MultiFidelityPaiNN(nn.Module):
    """Atomic energies from species, pairs and pair vectors, at each atom's fidelity."""

    def __init__(self, config: Dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        f = int(config["features"])
        n_layers = int(config["layers"])
        d = int(config["fidelity_dim"])
        n_elements = len(config["elements"])
        n_fidelities = len(config["fidelities"])
        self.features = f
        self.n_layers = n_layers
        self.use_film = config["fidelity_mode"] == "film"
        self.cutoff = float(config["cutoff"])

        self.species_embedding = nn.Embedding(n_elements, f)
        self.fidelity_embedding = nn.Embedding(n_fidelities, d)
        nn.init.normal_(self.fidelity_embedding.weight, std=1.0)
        self.radial = RadialBasis(int(config["radial_basis"]), self.cutoff)
        self.interactions = nn.ModuleList(
            [Interaction(f, int(config["radial_basis"]), bool(config.get("filter_envelope", False)))
             for _ in range(n_layers)]
        )
        self.updates = nn.ModuleList([Update(f) for _ in range(n_layers)])
        # FiLM starts as the identity: every fidelity begins from the same network
        self.film = nn.Linear(d, 2 * f * n_layers)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.readout = nn.Sequential(nn.Linear(f + d, f // 2), nn.SiLU(), nn.Linear(f // 2, 1))
        # energy normalisation, set from data before training (mfcalc.training.fit_reference)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("e0", torch.zeros(n_fidelities, n_elements))

    def forward(
        self, species: Tensor, edge_index: Tensor, vectors: Tensor, fidelity: Tensor
    ) -> Tensor:
        r = torch.sqrt((vectors * vectors).sum(dim=1))
        unit = vectors / r.unsqueeze(1)
        basis, envelope = self.radial(r)
        f = self.fidelity_embedding(fidelity)

        s = self.species_embedding(species)
        v = torch.zeros((s.shape[0], 3, self.features), dtype=s.dtype, device=s.device)
        film = torch.chunk(self.film(f), 2 * self.n_layers, dim=-1)
        layer = 0
        for interaction, update in zip(self.interactions, self.updates):
            s, v = interaction(s, v, edge_index, basis, unit, envelope, layer == 0)
            s, v = update(s, v)
            if self.use_film:
                s = s * (1.0 + film[2 * layer]) + film[2 * layer + 1]
            layer += 1
        out = self.readout(torch.cat([s, f], dim=-1)).squeeze(-1)
        return out * self.scale + self.e0[fidelity, species]
