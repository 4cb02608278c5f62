"""Standard graph aggregators in place of HAN-GNN (paper section 5.2, Table 3), from PyG layers.

``mmsr train --model mmsr --aggregator NAME`` keeps everything of MMSR but its propagation layers:
the node encoder (section 4.2), the last pooling (section 4.4) and the scores (Eq. 7) are the
same, and each of the L layers (``--layers``, own weights each) is one of these aggregators over
the same MSGraphs (section 4.1). ``han`` (the default) is HAN-GNN itself (layers.py).

Aggregators, by the heterogeneity they see (Table 3 rows in brackets):

* none - every node and edge alike:
  ``gcn`` GCNConv, Kipf & Welling, ICLR 2017 (paper [24], Eq. 8) [GCN];
  ``sage`` SAGEConv, mean aggregator, Hamilton et al., NeurIPS 2017 [GraphSAGE];
  ``gat`` GATConv, one head, Velickovic et al., ICLR 2018 (paper [45], Eq. 9-11) [GAT];
  ``transformer`` TransformerConv, one head, Shi et al., IJCAI 2021: key-value (Transformer)
  attention over the graph's edges. Table 3's Graphormer (paper [50]) attends over all node pairs
  with structural encodings and has no PyG layer; this is the closest message-passing form;
* edge types (the five relations self/in/out/bi/hetero of ``edge_rel``):
  ``rgcn`` RGCNConv, Schlichtkrull et al., ESWC 2018; ``rgat`` RGATConv, across-relation
  attention, Busbridge et al., 2019 [RGAT];
* node and edge types (edge type = (source node type, relation, target node type)):
  ``hgnn`` HeteroConv of one SAGEConv per edge type, summed per target (PyG's heterogeneous GNN
  recipe; our reading of Table 3's HGNN, which the paper does not cite);
  ``hgt`` HGTConv, one head, Hu et al., WWW 2020 (Heterogeneous Graph Transformer);
  ``hgat`` HANConv, one head, Wang et al., WWW 2019 (Heterogeneous Graph Attention Network,
  node-level attention per edge type + semantic attention over edge types) [HGAT].

Choices the paper leaves open:

* the layers whose own root weight is their self term (sage, transformer, rgcn, hgnn) get the
  graph without its SELF loops; the others aggregate over N_i with the self loop, as in Eq. 8-11;
* sigma of Eq. 8 is ReLU, applied between layers but not after the last one (its output is the
  user vector scored by dot product, Eq. 7, so it stays signed); hgt and hgat carry their own
  non-linearities (GELU and ReLU inside the PyG layers) and get none added;
* one attention head everywhere, as in Eq. 9-11 and HAN-GNN (``--heads`` stays SASRec's option).

Cost: PyG's RGATConv gathers one d x d relation matrix per edge, E * d^2 floats per layer (64 KiB
per edge at d = 128, kept for the backward pass): on Amazon Beauty at batch 512 (~174,000 edges)
training passed 21 GiB and was killed. ``rgat`` therefore uses :class:`NodeTableRGATConv`, the
same layer and parameters with x W_r computed once per node and relation (N * R * d floats).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contracts import REL_HETERO, REL_SELF, RELATION_NAMES
from ..errors import MmsrError
from .layers import TypeIndex

N_RELATIONS = len(RELATION_NAMES)


def type_name(t: int) -> str:
    """Node type t as a PyG node-type key: "t0" items, "t<m+1>" modality m."""
    return f"t{t}"


def edge_types(n_types: int, self_loops: bool = True) -> list[tuple[str, str, str]]:
    """Every (source type, relation, target type) an MSGraph can hold: same-type self/in/out/bi,
    cross-type hetero. All are present in every batch (maybe empty), so the weights are fixed."""
    same = RELATION_NAMES[:REL_HETERO] if self_loops else RELATION_NAMES[REL_SELF + 1 : REL_HETERO]
    out = []
    for s in range(n_types):
        for d in range(n_types):
            for r in same if s == d else ("hetero",):
                out.append((type_name(s), r, type_name(d)))
    return out


def metadata(n_types: int, self_loops: bool = True) -> tuple[list[str], list[tuple[str, str, str]]]:
    """PyG's (node types, edge types) of a batch with ``n_types`` node types."""
    return [type_name(t) for t in range(n_types)], edge_types(n_types, self_loops)


class BatchGraph:
    """A batch's edges (source j in row 0, target i in row 1) in the layouts the PyG layers take.

    Nodes must be sorted by type, ``counts[t]`` of type t (as MMSR sorts them). The typed form
    (per-type local ids, one ``edge_index`` per edge type) is built once per batch, vectorised:
    one sort of the edges by (source type, target type, relation).
    """

    def __init__(self, edge_index: Tensor, edge_rel: Tensor, counts: list[int]):
        self.edge_index, self.edge_rel, self.counts = edge_index, edge_rel, list(counts)
        self.n_types = len(self.counts)
        self._no_self: tuple[Tensor, Tensor] | None = None
        self._typed: dict[tuple[str, str, str], Tensor] | None = None

    def without_self_loops(self) -> tuple[Tensor, Tensor]:
        """(edge_index, edge_rel) without the SELF relation."""
        if self._no_self is None:
            keep = self.edge_rel != REL_SELF
            self._no_self = self.edge_index[:, keep], self.edge_rel[keep]
        return self._no_self

    def typed(self, self_loops: bool = True) -> dict[tuple[str, str, str], Tensor]:
        """edge_index per :func:`edge_types` key, with per-type local node ids."""
        if self._typed is None:
            self._typed = self._build_typed()
        if self_loops:
            return self._typed
        return {k: v for k, v in self._typed.items() if k[1] != "self"}

    def _build_typed(self) -> dict[tuple[str, str, str], Tensor]:
        T, device = self.n_types, self.edge_index.device
        counts = torch.tensor(self.counts, dtype=torch.long, device=device)
        node_type = torch.repeat_interleave(torch.arange(T, device=device), counts)
        offsets = torch.cumsum(counts, 0) - counts
        src_t, dst_t = node_type[self.edge_index[0]], node_type[self.edge_index[1]]
        key = (src_t * T + dst_t) * N_RELATIONS + self.edge_rel
        order = torch.argsort(key, stable=True)
        sizes = torch.bincount(key, minlength=T * T * N_RELATIONS).tolist()
        local = (self.edge_index - offsets[node_type[self.edge_index]])[:, order]
        parts = torch.split(local, sizes, dim=1)
        out = {}
        for s, r, d in edge_types(T):
            si, di = int(s[1:]), int(d[1:])
            out[(s, r, d)] = parts[(si * T + di) * N_RELATIONS + RELATION_NAMES.index(r)]
        if sum(p.shape[1] for p in out.values()) != self.edge_index.shape[1]:
            raise ValueError("batch has edges outside the MSGraph edge types (hetero within a type or homogeneous across)")
        return out

    def split_nodes(self, h: Tensor) -> dict[str, Tensor]:
        return {type_name(t): x for t, x in enumerate(torch.split(h, self.counts))}

    def join_nodes(self, out: dict[str, Tensor | None], like: Tensor) -> Tensor:
        parts = []
        for t, n in enumerate(self.counts):
            x = out.get(type_name(t))
            parts.append(x if x is not None else like.new_zeros(n, like.shape[1]))
        return torch.cat(parts)


class AggregatorLayer(nn.Module):
    """One propagation layer h^(l) -> h^(l+1) around a PyG convolution ``conv``.

    ``kind`` says how the conv is called: "plain" conv(h, edge_index), "relational"
    conv(h, edge_index, edge_rel), "hetero" conv(x_dict, edge_index_dict) over node types.
    ``self_loops``: whether the conv sees the SELF edges; ``activation``: ReLU after the conv
    (sigma of Eq. 8; every layer but the last).
    """

    def __init__(self, conv: nn.Module, kind: str, self_loops: bool, activation: bool):
        super().__init__()
        if kind not in ("plain", "relational", "hetero"):
            raise ValueError(f"unknown aggregator kind {kind!r}")
        self.conv, self.kind, self.self_loops, self.activation = conv, kind, self_loops, activation

    def forward(self, h: Tensor, graph: BatchGraph, types: TypeIndex | None = None) -> Tensor:
        if self.kind == "hetero":
            out = self.conv(graph.split_nodes(h), graph.typed(self.self_loops))
            out = graph.join_nodes(out, h)
        else:
            edge_index, edge_rel = (graph.edge_index, graph.edge_rel) if self.self_loops else graph.without_self_loops()
            out = self.conv(h, edge_index) if self.kind == "plain" else self.conv(h, edge_index, edge_rel)
        return F.relu(out) if self.activation else out


# One factory per aggregator: (dim, n_types, activation) -> layer. PyG is imported only here.


def gcn(dim: int, n_types: int, activation: bool) -> AggregatorLayer:
    """Eq. 8: h_i = sigma(sum_{j in N_i} W h_j / sqrt(|N_i| |N_j|)) (Kipf & Welling 2017)."""
    # torch_geometric.nn: loaded only when this aggregator is built
    from torch_geometric.nn import GCNConv

    return AggregatorLayer(GCNConv(dim, dim, add_self_loops=False), "plain", True, activation)


def sage(dim: int, n_types: int, activation: bool) -> AggregatorLayer:
    """GraphSAGE-mean: h_i = W_1 h_i + W_2 mean_{j in N_i} h_j (Hamilton et al. 2017)."""
    # torch_geometric.nn: loaded only when this aggregator is built
    from torch_geometric.nn import SAGEConv

    return AggregatorLayer(SAGEConv(dim, dim, aggr="mean"), "plain", False, activation)


def gat(dim: int, n_types: int, activation: bool) -> AggregatorLayer:
    """Eq. 9-11: alpha_ij = sft(a^T [W h_i; W h_j] | N_i), h_i = sum_j alpha_ij W h_j (Velickovic et al. 2018)."""
    # torch_geometric.nn: loaded only when this aggregator is built
    from torch_geometric.nn import GATConv

    return AggregatorLayer(GATConv(dim, dim, heads=1, add_self_loops=False), "plain", True, activation)


def transformer(dim: int, n_types: int, activation: bool) -> AggregatorLayer:
    """h_i = W_r h_i + sum_j softmax_j((W_q h_i).(W_k h_j)/sqrt(d)) W_v h_j (Shi et al. 2021)."""
    # torch_geometric.nn: loaded only when this aggregator is built
    from torch_geometric.nn import TransformerConv

    return AggregatorLayer(TransformerConv(dim, dim, heads=1), "plain", False, activation)


def rgcn(dim: int, n_types: int, activation: bool) -> AggregatorLayer:
    """h_i = W_0 h_i + sum_r mean_{j in N_i^r} W_r h_j, one W_r per relation (Schlichtkrull et al. 2018)."""
    # torch_geometric.nn: loaded only when this aggregator is built
    from torch_geometric.nn import RGCNConv

    return AggregatorLayer(RGCNConv(dim, dim, num_relations=N_RELATIONS), "relational", False, activation)


def _node_table_rgat_class():
    # torch_geometric.nn: loaded only when this aggregator is built
    from torch_geometric.nn import RGATConv
    from torch_geometric.utils import scatter, softmax

    class NodeTableRGATConv(RGATConv):
        """PyG's RGATConv (across-relation additive self-attention, no bases/blocks, no edge
        features, no cardinality mod) with g = x W_r computed once per node and relation.

        Same parameters and the same function as the parent (Busbridge et al. 2019, RGAT:
        g_i = W_r h_i, q_i = g_i Q, k_j = g_j K, a_ij = softmax_j over every edge into i of
        LeakyReLU(q_i + k_j), h'_i = sum_j a_ij g_j + b). The parent gathers W_r for every edge
        (``index_select`` + ``bmm``: E x d x d floats, E x d^2 multiply-adds per endpoint); this
        takes the table x W_r of every (node, relation), N x R x d, and gathers rows of it.
        """

        def _fast(self, edge_attr) -> bool:
            return (self.num_bases is None and self.num_blocks is None and edge_attr is None and self.mod is None
                    and self.attention_mode == "additive-self-attention" and self.attention_mechanism == "across-relation")

        def forward(self, x, edge_index, edge_type=None, edge_attr=None, size=None, return_attention_weights=None):
            if (not self._fast(edge_attr) or return_attention_weights is not None or not isinstance(edge_index, Tensor)
                    or self.aggr != "add" or not self.concat):
                return super().forward(x, edge_index, edge_type, edge_attr, size, return_attention_weights)
            n_nodes, rels = x.size(0), self.num_relations
            table = torch.einsum("ni,rio->nro", x, self.weight).reshape(n_nodes * rels, -1)  # row n R + r: x_n W_r
            src, dst = edge_index
            g_i, g_j = table[dst * rels + edge_type], table[src * rels + edge_type]
            alpha = softmax(F.leaky_relu(g_i @ self.q + g_j @ self.k, self.negative_slope), dst, num_nodes=n_nodes)
            if self.training and self.dropout > 0:
                alpha = F.dropout(alpha, p=self.dropout, training=True)
            messages = (alpha.view(-1, self.heads, 1) * g_j.view(-1, self.heads, self.out_channels)).flatten(1)
            out = scatter(messages, dst, 0, n_nodes, "sum")
            return out + self.bias if self.bias is not None else out

    return NodeTableRGATConv


def rgat(dim: int, n_types: int, activation: bool) -> AggregatorLayer:
    """Relational GAT: per-relation W_r, attention over all edges into i (Busbridge et al. 2019)."""
    conv = _node_table_rgat_class()(dim, dim, num_relations=N_RELATIONS, heads=1)
    return AggregatorLayer(conv, "relational", True, activation)


def hgnn(dim: int, n_types: int, activation: bool) -> AggregatorLayer:
    """Heterogeneous GNN: h_i = sum over edge types e into t_i of SAGE_e(h)_i (node- and edge-type weights)."""
    # torch_geometric.nn: loaded only when this aggregator is built
    from torch_geometric.nn import HeteroConv, SAGEConv

    convs = {et: SAGEConv((dim, dim), dim, aggr="mean") for et in edge_types(n_types, self_loops=False)}
    return AggregatorLayer(HeteroConv(convs, aggr="sum"), "hetero", False, activation)


def hgt(dim: int, n_types: int, activation: bool) -> AggregatorLayer:
    """Heterogeneous Graph Transformer: type-specific K/Q/V and per-edge-type attention (Hu et al. 2020)."""
    # torch_geometric.nn: loaded only when this aggregator is built
    from torch_geometric.nn import HGTConv

    return AggregatorLayer(HGTConv(dim, dim, metadata(n_types), heads=1), "hetero", True, False)


def hgat(dim: int, n_types: int, activation: bool) -> AggregatorLayer:
    """Heterogeneous graph attention: GAT per edge type, then attention over edge types (Wang et al. 2019)."""
    # torch_geometric.nn: loaded only when this aggregator is built
    from torch_geometric.nn import HANConv

    return AggregatorLayer(HANConv(dim, dim, metadata(n_types), heads=1), "hetero", True, False)


AGGREGATORS: dict[str, Callable[[int, int, bool], AggregatorLayer]] = {
    "gcn": gcn,
    "sage": sage,
    "gat": gat,
    "transformer": transformer,
    "rgcn": rgcn,
    "rgat": rgat,
    "hgnn": hgnn,
    "hgt": hgt,
    "hgat": hgat,
}
#: every ``--aggregator`` value: HAN-GNN (layers.HANLayer) first, then the standard ones
AGGREGATOR_NAMES = ("han", *AGGREGATORS)


def check_aggregator(name: str) -> str:
    if name not in AGGREGATOR_NAMES:
        raise MmsrError(f"--aggregator: expected one of {', '.join(AGGREGATOR_NAMES)}, got {name!r}")
    return name


def build_layers(name: str, dim: int, n_types: int, n_layers: int) -> nn.ModuleList:
    """L layers of aggregator ``name`` (not ``han``), each with its own weights."""
    factory = AGGREGATORS.get(check_aggregator(name))
    if factory is None:
        raise ValueError("HAN-GNN layers are built by MMSR itself (layers.HANLayer)")
    return nn.ModuleList(factory(dim, n_types, i + 1 < n_layers) for i in range(n_layers))
