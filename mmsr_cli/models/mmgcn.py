"""MMGCN, a multi-modal collaborative baseline of the paper's Table 2 (user-item graphs: common.py)."""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import SimpleConv

from .common import ModalityGraphs, WidthDepth, WithModalities


class MMGCNLayer(nn.Module):
    """One MMGCN layer on one modality graph: its aggregation layer, then its combination layer.

    Aggregation: h = LeakyReLU(mean_{j in N(v)} W1 x_j) (Eq. 1 with the mean aggregator).
    Combination: x_hat = LeakyReLU(W2 x_v) + e_id(v), the node itself in the ID space (Eq. 5),
    then x' = LeakyReLU(W3 [h; x_hat]) (the concatenation combiner). Equation numbers as the
    authors' code comments them.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.neighbour = nn.Linear(dim, dim, bias=False)  # W1
        self.aggregate = SimpleConv(aggr="mean")  # mean over the neighbourhood, no self loop
        self.own = nn.Linear(dim, dim)  # W2
        self.combine = nn.Linear(2 * dim, dim)  # W3
        for lin in (self.neighbour, self.own, self.combine):
            nn.init.xavier_normal_(lin.weight)

    def forward(self, x: torch.Tensor, id_emb: torch.Tensor, adj_t: torch.Tensor) -> torch.Tensor:
        """``adj_t``: sparse [N, N] adjacency, row = target (PyG's ``adj_t``)."""
        h = F.leaky_relu(self.aggregate(self.neighbour(x), adj_t))
        x_hat = F.leaky_relu(self.own(x)) + id_emb
        return F.leaky_relu(self.combine(torch.cat([h, x_hat], dim=-1)))


@dataclass
class MMGCNConfig(WidthDepth, WithModalities):
    """MMGCN's options: width, layers per modality graph, the feature modalities (no dropout)."""


class MMGCN(ModalityGraphs):
    """MMGCN (Wei et al., ACM MM 2019): one GCN per modality over the same user-item graph.

    Each modality m has its own graph (modal-specific user-item graphs): item nodes start from
    the item's features of m, user nodes from a learned preference vector (ModalityInput);
    ``layers`` MMGCNLayers propagate on it, each combining the node with its neighbourhood and the
    ID embedding shared by all modalities. Model prediction: a node's representation is the sum
    over modalities of its last layer's output, and scores are inner products. Dense inputs: the
    raw extract-features vectors. ``dropout`` is not used (MMGCN has none).
    """

    config_class = MMGCNConfig

    layer = MMGCNLayer

    def modality_representations(self) -> list[torch.Tensor]:
        """Each modality graph's last-layer node vectors [U + I, d], before they are summed."""
        out = []
        for i, (inp, layers) in enumerate(zip(self.inputs, self.layers)):
            x = inp(self.features(i))
            adj_t = self.csr().pattern(x)
            for layer in layers:
                x = layer(x, self.id_emb.weight, adj_t)
            out.append(x)
        return out

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_nodes(torch.stack(self.modality_representations()).sum(0))
