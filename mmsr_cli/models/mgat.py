"""MGAT, a multi-modal collaborative baseline of the paper's Table 2 (user-item graphs: common.py)."""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.utils import degree, softmax

from .common import ModalityGraphs, WidthDepth, WithModalities
from .layers import Aggregate, CsrGraph, EdgeDot


class GatedGraphAttention(nn.Module):
    """MGAT's gated attention aggregation over one modality graph (its embedding propagation layer).

    With z = W x and the score s(v, j) = z_v . LeakyReLU(z_j) between a node v and a neighbour
    j, the gate g = sigmoid(s / sqrt(|N(j)|)) decides how much j may pass on (a neighbour with
    many interactions says less about v), and the attention weights a(v, j) = softmax over j in
    N(v) of g * s sum to one per neighbourhood. The output is the L2-normalised
    sum_j a(v, j) z_j + b. All as in the authors' code (GraphGAT.message), the degree being the
    neighbour's own.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.xavier_normal_(self.lin.weight)

    def attention(self, z: torch.Tensor, graph: CsrGraph) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention [E], gate [E]) of every edge, in the graph's (target-sorted) edge order."""
        s = EdgeDot.apply(z, F.leaky_relu(z), graph)  # z_target . LeakyReLU(z_source), at the edges
        source_degree = degree(graph.col, num_nodes=graph.n_cols, dtype=z.dtype)
        gate = torch.sigmoid(s / source_degree[graph.col].sqrt())
        return softmax(gate * s, graph.row, num_nodes=graph.n_rows), gate

    def forward(self, x: torch.Tensor, graph: CsrGraph) -> torch.Tensor:
        z = self.lin(x)
        alpha, _ = self.attention(z, graph)
        return F.normalize(Aggregate.apply(alpha, z, graph) + self.bias, dim=-1)


class MGATLayer(nn.Module):
    """One MGAT layer: gated attention aggregation, then fusion with the node and its ID embedding:
    x' = LeakyReLU(W3 LeakyReLU(h) + LeakyReLU(W2 x) + e_id) (MGAT's information fusion of
    one layer, as in the authors' code)."""

    def __init__(self, dim: int):
        super().__init__()
        self.attend = GatedGraphAttention(dim)
        self.own = nn.Linear(dim, dim)  # W2
        self.fuse = nn.Linear(dim, dim)  # W3
        nn.init.xavier_normal_(self.own.weight)
        nn.init.xavier_normal_(self.fuse.weight)

    def forward(self, x: torch.Tensor, id_emb: torch.Tensor, graph: CsrGraph) -> torch.Tensor:
        h = F.leaky_relu(self.attend(x, graph))
        return F.leaky_relu(self.fuse(h) + F.leaky_relu(self.own(x)) + id_emb)


@dataclass
class MGATConfig(WidthDepth, WithModalities):
    """MGAT's options: width, layers per modality graph, the feature modalities (no dropout)."""


class MGAT(ModalityGraphs):
    """MGAT (Tao et al., IP&M 2020): MMGCN's per-modality graphs with gated attention.

    Per modality (embedding layer): users start from a learned preference vector, items from
    their features (linear map + tanh, ModalityInput); ``layers`` MGATLayers let each neighbour
    pass on information through a gate and weigh neighbours by attention (embedding propagation
    layer), so that noisy neighbours in a modality are down-weighted instead of averaged in as in
    MMGCN. Prediction layer: a node's layer outputs are concatenated, averaged over modalities,
    and scored by inner product (vectors of ``layers * dim``). The authors' code holds the
    same concatenation of two layers but returns after the first one, so their runs used one
    layer (``--layers 1`` here). One width ``dim`` throughout (theirs: 256/128/100 per modality
    inside, 64 out). Dense inputs: the raw extract-features vectors. ``dropout`` is not used
    (the authors' dropout is commented out).
    """

    config_class = MGATConfig

    layer = MGATLayer
    squash = True

    def modality_representations(self) -> list[torch.Tensor]:
        """Each modality graph's node vectors [U + I, layers * d] (layer outputs concatenated)."""
        out = []
        for i, (inp, layers) in enumerate(zip(self.inputs, self.layers)):
            x, outputs = inp(self.features(i)), []
            for layer in layers:
                x = layer(x, self.id_emb.weight, self.csr())
                outputs.append(x)
            out.append(torch.cat(outputs, dim=-1))
        return out

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_nodes(torch.stack(self.modality_representations()).mean(0))
