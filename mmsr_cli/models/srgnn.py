"""SR-GNN (Wu et al., AAAI 2019: "Session-based Recommendation with Graph Neural Networks"; paper
ref. [48]) in the shared harness (base.Recommender).

Each history becomes a session graph at batch time (``session_graphs``, vectorised over the batch),
a gated graph neural network updates the node (distinct item) vectors, and a soft-attention
readout over the history combined with the last item gives the user vector, scored against the
item-ID table (SR-GNN Eq. 8, the harness's dot product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import DatasetInfo
from .common import ItemTable, WidthDepth, by_length_groups, trimmed_history


@dataclass
class SessionGraphs:
    """A batch of session graphs, N = L node slots per row (a row has at most L distinct items)."""

    node_items: torch.Tensor  # [B, N] item of each node (distinct items ascending), pad after them
    node_mask: torch.Tensor  # [B, N] slot holds a node
    alias: torch.Tensor  # [B, L] node of each history position (meaningful where the position is real)
    a_in: torch.Tensor  # [B, N, N] normalised incoming adjacency A^(in)
    a_out: torch.Tensor  # [B, N, N] normalised outgoing adjacency A^(out)


def session_graphs(history: torch.Tensor, is_item: torch.Tensor, pad: int) -> SessionGraphs:
    """SR-GNN section "Constructing Session Graphs", for every row at once.

    Nodes are the row's distinct items; each transition ``v_{s,i-1} -> v_{s,i}`` of consecutive
    history items is an edge, weighted by how often it occurs. As in the paper's Figure 1 example,
    ``A^(out)[u, v]`` is the u->v count over u's out-degree and ``A^(in)[v, u]`` the same count over
    v's in-degree (a repeated transition weighs more; the authors' code counts it once).
    ``history`` holds ``pad`` outside ``is_item``; rows are left-padded, so real items are contiguous.
    """
    B, L = history.shape
    ordered, _ = history.sort(dim=1)  # pad (= n_items, the largest id) sorts last
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    # Distinct items ascending, then pad: searchsorted finds each position's node.
    node_items, _ = torch.where(first, ordered, torch.full_like(ordered, pad)).sort(dim=1)
    node_mask = node_items != pad
    alias = torch.searchsorted(node_items, history).clamp(max=L - 1)
    edge = is_item[:, :-1] & is_item[:, 1:]
    flat = (alias[:, :-1] * L + alias[:, 1:]).masked_fill(~edge, 0)
    counts = torch.zeros(B, L * L, dtype=torch.float32, device=history.device)
    counts.scatter_add_(1, flat, edge.to(torch.float32))
    counts = counts.view(B, L, L)  # counts[b, u, v]: transitions u -> v
    a_out = counts / counts.sum(2, keepdim=True).clamp(min=1)
    a_in = counts.transpose(1, 2) / counts.sum(1).unsqueeze(2).clamp(min=1)
    return SessionGraphs(node_items, node_mask, alias, a_in, a_out)


class GatedGraphLayer(nn.Module):
    """One GGNN propagation step over the session graph (SR-GNN Eq. 1-5)."""

    def __init__(self, dim: int):
        super().__init__()
        self.edge_in = nn.Linear(dim, dim, bias=False)  # H, incoming half (Eq. 1)
        self.edge_out = nn.Linear(dim, dim, bias=False)  # H, outgoing half (Eq. 1)
        self.edge_bias = nn.Parameter(torch.zeros(2 * dim))  # b (Eq. 1)
        self.w_zr = nn.Linear(2 * dim, 2 * dim)  # W_z, W_r (Eq. 2-3)
        self.u_zr = nn.Linear(dim, 2 * dim, bias=False)  # U_z, U_r (Eq. 2-3)
        self.w_o = nn.Linear(2 * dim, dim)  # W_o (Eq. 4)
        self.u_o = nn.Linear(dim, dim, bias=False)  # U_o (Eq. 4)

    def forward(self, v: torch.Tensor, graphs: SessionGraphs) -> torch.Tensor:
        # Eq. 1: a = A_s,i: [v_1..v_n]^T H + b, the in- and out-neighbourhoods side by side.
        a = torch.cat([graphs.a_in @ self.edge_in(v), graphs.a_out @ self.edge_out(v)], dim=-1) + self.edge_bias
        z, r = torch.sigmoid(self.w_zr(a) + self.u_zr(v)).chunk(2, dim=-1)  # Eq. 2-3
        candidate = torch.tanh(self.w_o(a) + self.u_o(r * v))  # Eq. 4
        return (1 - z) * v + z * candidate  # Eq. 5


@dataclass
class SRGNNConfig(WidthDepth):
    """SR-GNN's options: width and gated graph layers (no dropout, no heads)."""


class SRGNN(ItemTable):
    """SR-GNN: session graph -> ``layers`` GGNN steps -> attention readout (SR-GNN's "Learning Item
    Embeddings on Session Graphs" and "Generating Session Embeddings").

    Node vectors start from the item embeddings. After propagation every history position reads
    its node's vector; with ``v_n`` the last item's, the readout is ``alpha_i = q^T sigmoid(W_1 v_n
    + W_2 v_i + c)`` (Eq. 6), ``s_g = sum_i alpha_i v_i`` over the history's positions, ``s_l = v_n``
    and the user vector ``s_h = W_3 [s_l; s_g]`` (Eq. 7). The original has no dropout.
    """

    config_class = SRGNNConfig

    def __init__(self, config: SRGNNConfig, info: DatasetInfo):
        super().__init__(config, info)
        d = config.dim
        self.steps = nn.ModuleList(GatedGraphLayer(d) for _ in range(config.layers))
        self.w_1 = nn.Linear(d, d)  # W_1 and c (Eq. 6)
        self.w_2 = nn.Linear(d, d, bias=False)  # W_2 (Eq. 6)
        self.q = nn.Linear(d, 1, bias=False)  # q (Eq. 6)
        self.w_3 = nn.Linear(2 * d, d)  # W_3 (Eq. 7)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, is_item = trimmed_history(batch, self.n_items)
        L = history.shape[1]
        # Each length group builds its session graphs over its own span (by_length_groups).
        def encode(rows: torch.Tensor, steps: int) -> torch.Tensor:
            return self.session_vector(history[rows, L - steps :], is_item[rows, L - steps :])

        return by_length_groups(is_item.sum(1).clamp(min=1), encode)

    def session_vector(self, history: torch.Tensor, is_item: torch.Tensor) -> torch.Tensor:
        """s_h of Eq. 7 for left-padded histories [B, L] (``is_item`` marks the real slots)."""
        graphs = session_graphs(history, is_item, self.n_items)
        v = self.item_emb(graphs.node_items)  # [B, N, d]; empty slots are the zero padding row
        for step in self.steps:
            v = step(v, graphs)
        seq = v.gather(1, graphs.alias.unsqueeze(-1).expand(-1, -1, self.dim))  # [B, L, d]
        last = seq[:, -1]  # s_l = v_n: the most recent item sits in the last column
        alpha = self.q(torch.sigmoid(self.w_1(last).unsqueeze(1) + self.w_2(seq)))  # Eq. 6, [B, L, 1]
        s_g = (alpha * is_item.unsqueeze(-1)).mul(seq).sum(1)
        return self.w_3(torch.cat([last, s_g], dim=-1))  # Eq. 7
