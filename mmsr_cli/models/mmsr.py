"""MMSR: node representations (section 4.2), L HAN-GNN layers (4.3.2), last pooling (4.4).

The model reads a graph batch (``graphs.GraphSplit.collate``) and returns one user vector per
sample; scores against all items are dot products with the item-ID table (Eq. 7, in
:meth:`Recommender.score`), which is shared with the input so that ``item_embeddings()`` is the
same table the item nodes start from.

Node types: 0 = item, m + 1 = modality m, in the order of ``config.modalities`` when given (the
order ``GraphSplit`` gives the batch types when opened with those modalities), else the order of
``info.modalities``. Zero modalities (item-only graphs) is fine.

``config.feed_forward`` (off by default) adds a residual ReLU block after each layer, an extension
tested against SASRec on Amazon Beauty (docs/benchmarks.md).

``config.aggregator`` picks the propagation layers: ``han`` (HAN-GNN, the default) or a standard
aggregator of aggregators.py (section 5.2, Table 3); the encoder, pooling and scores stay the same.

Deviations and choices (the paper leaves them open):

* code tables keep the dimension of the cluster centres; a per-modality Linear(code_dim, d) maps
  them to d when the two differ;
* every part of the node input starts at unit expected row norm: item, type and position tables
  N(0, 1/d) entries, code tables the centres rescaled to unit mean row norm (directions kept), so
  that the merge W of section 4.2 sees content, type and position at comparable scale (with
  ``nn.Embedding``'s N(0, 1) type and position rows, 11x the content's norm at d = 128, h^(0)
  was almost all constant type/position signal; docs/benchmarks.md measures the change);
* dropout on h^(0) and between layers, not on h^(L): the last layer's output is the user
  vector scored against every item, and dropping its entries slowed training on Amazon Beauty
  (validation NDCG@10 after 80 batches 0.70 % with, 0.46 % without this change; docs/benchmarks.md).

``config.variant = "authors"`` runs the HAN-GNN as the authors' public code does
(han_authors.py lists the layer's departures). The model's part of it: every table and weight
starts U(-1/sqrt(d), 1/sqrt(d)) and the code tables are the centres min-max scaled into that range
(their ``reset_parameters`` and ``normalize_array``); the merge W has no bias; no dropout on
h^(0) but dropout after every layer, the last included; one layer's weights serve all ``layers``
applications (their loop reuses one aggregator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import contracts as C
from ..errors import MmsrError
from .aggregators import BatchGraph, build_layers, check_aggregator
from .base import DatasetInfo, ModalityInfo, Recommender, code_embedding_table
from .common import Regularised, WithModalities
from .han_authors import AuthorsHANLayer
from .layers import AUTHORS_PLAN, FUSION_MODES, Dropout, HANLayer, LayerPlan, RelationEdges, TypeIndex, rows_of, scatter_mean

VARIANTS = ("paper", "authors")
# --readout: last pooling (section 4.4), or AttentionReadout (not in the paper) replacing it
# ("attention") or added to it ("residual")
READOUTS = ("last", "attention", "residual")


@dataclass
class MMSRConfig(Regularised, WithModalities):
    """MMSR's options: the shared width, layers and dropout, its modalities, and the ablations and
    extensions of sections 5.2-5.3 (checked together by :meth:`validate`)."""

    fusion: str = "adaptive"  # adaptive | hohe | heho | synchronous | ho | he (layers.FUSION_MODES)
    invasive: bool = False  # phase 2 values from the intermediate state instead of h^(l)
    pos_emb: bool = True  # position embeddings of the nodes
    type_emb: bool = True  # node-type embeddings
    graph_variant: str = "codes"  # codes | items (--no-codes: one modality node per item)
    # propagation layers (paper section 5.2, Table 3): "han" = HAN-GNN (layers.py; fusion and
    # invasive apply to it only), or a standard PyG aggregator (aggregators.AGGREGATOR_NAMES)
    aggregator: str = "han"
    # not in the paper (docs/benchmarks.md, "Does MMSR beat SASRec?"): a residual ReLU
    # feed-forward block h + W2 relu(W1 h) after each propagation layer
    feed_forward: bool = False
    # the HAN-GNN as the paper writes it ("paper", layers.HANLayer) or as the authors' public
    # code runs it ("authors", han_authors.AuthorsHANLayer; their init, dropouts and shared layer)
    variant: str = "paper"
    attention_dropout: float = 0.0  # on the attention weights after each softmax (0 = off)
    # the user vector: "last" = last pooling (section 4.4); "attention" and "residual" (not in the
    # paper; see AttentionReadout) read every item node of the graph, not only the last
    readout: str = "last"

    def validate(self) -> "MMSRConfig":
        super().validate()
        check_variant(self)
        if self.readout not in READOUTS:
            raise MmsrError(f"--readout: expected one of {', '.join(READOUTS)}, got {self.readout!r}")
        check_aggregator(self.aggregator)
        if self.fusion not in FUSION_MODES:
            raise MmsrError(f"--fusion: expected one of {', '.join(FUSION_MODES)}, got {self.fusion!r}")
        if self.graph_variant not in C.GRAPH_VARIANTS:
            raise MmsrError(f"graph variant {self.graph_variant!r} is unknown (expected {', '.join(C.GRAPH_VARIANTS)})")
        return self


def select_modalities(config: MMSRConfig, info: DatasetInfo) -> list[ModalityInfo]:
    """The modalities the model has node types for, in batch node-type order."""
    if not config.modalities:
        return list(info.modalities)
    by_name = {m.name: m for m in info.modalities}
    missing = [name for name in config.modalities if name not in by_name]
    if missing:
        known = ", ".join(by_name) or "none"
        raise MmsrError(f"--modalities: {', '.join(missing)} not in the dataset's modalities ({known})")
    return [by_name[name] for name in config.modalities]


def check_variant(config: MMSRConfig) -> None:
    """The authors' variant is their one layer kind: no ablation or extension of the paper's."""
    if config.variant not in VARIANTS:
        raise MmsrError(f"--variant: expected one of {', '.join(VARIANTS)}, got {config.variant!r}")
    if not 0.0 <= config.attention_dropout < 1.0:
        raise MmsrError(f"--attention-dropout: must be in [0, 1), got {config.attention_dropout}")
    if config.variant == "authors":
        used = [
            option for option, changed in (
                ("--aggregator", config.aggregator != MMSRConfig.aggregator),
                ("--fusion", config.fusion != MMSRConfig.fusion),
                ("--invasive", config.invasive),
                ("--feed-forward", config.feed_forward),
            ) if changed
        ]
        if used:
            raise MmsrError(f"{', '.join(used)}: not available with --variant authors (their layer has one fusion)")


class NodeEncoder(nn.Module):
    """Section 4.2: e~_n = W [e_n; e_n^ty; e_n^po], e^po the mean over the node's positions."""

    def __init__(self, config: MMSRConfig, info: DatasetInfo, modalities: list[ModalityInfo]):
        super().__init__()
        d = config.dim
        self.item_embedding = nn.Embedding(info.n_items, d)
        self.code_embeddings = nn.ModuleList()
        self.code_projections = nn.ModuleList()
        for m in modalities:
            self.code_embeddings.append(code_embedding_table(m))
            self.code_projections.append(nn.Linear(m.code_dim, d) if m.code_dim != d else nn.Identity())
        self.n_types = 1 + len(modalities)
        self.type_embedding = nn.Embedding(self.n_types, d) if config.type_emb else None
        self.position_embedding = nn.Embedding(info.max_len, d) if config.pos_emb else None
        n_parts = 1 + int(config.type_emb) + int(config.pos_emb)
        self.merge = nn.Linear(n_parts * d, d, bias=config.variant != "authors")  # W of section 4.2
        for table in (self.item_embedding, self.type_embedding, self.position_embedding):
            if table is not None:  # unit expected row norm, like the code tables
                nn.init.normal_(table.weight, std=1.0 / math.sqrt(d))

    def reset_parameters_uniform(self, modalities: list[ModalityInfo]) -> None:
        """The authors' init: every weight U(-1/sqrt(d), 1/sqrt(d)), code tables the centres
        min-max scaled into that range (one min and max over the whole centre matrix)."""
        bound = 1.0 / math.sqrt(self.item_embedding.embedding_dim)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():
            for table, m in zip(self.code_embeddings, modalities):
                if m.centres is not None:
                    c = torch.as_tensor(m.centres, dtype=torch.float32)
                    span = (c.max() - c.min()).clamp_min(1e-12)
                    table.weight.copy_((c - c.min()) / span * 2 * bound - bound)

    def content(self, node_ref: Tensor, types: TypeIndex) -> Tensor:
        """e_n: item-ID embedding for items, (projected) code embedding for modality nodes.

        Expects nodes sorted by type (``types.order is None``).
        """
        tables = [self.item_embedding] + [
            lambda ref, emb=emb, proj=proj: proj(emb(ref))
            for emb, proj in zip(self.code_embeddings, self.code_projections)
        ]
        parts = [tables[t](ref) for t, ref in enumerate(torch.split(node_ref, types.counts)) if ref.numel()]
        if not parts:
            return self.item_embedding.weight.new_zeros(0, self.item_embedding.embedding_dim)
        return torch.cat(parts)

    def forward(self, node_type: Tensor, node_ref: Tensor, pos_index: Tensor, pos_node: Tensor, types: TypeIndex) -> Tensor:
        """h^(0) [N, d] of nodes sorted by type.

        W is linear, so it is applied to table rows rather than to every node's concatenated input:
        W [e; e^ty; e^po] = W_e e + W_ty e^ty + mean_p(W_po e^po_p) with W = [W_e | W_ty | W_po],
        each product over the distinct rows a batch uses (its items and codes, the types, the
        positions) and then gathered, instead of one [N, 3d] x [3d, d] product over all nodes.
        """
        d = self.item_embedding.embedding_dim
        blocks = iter(self.merge.weight.split(d, dim=1))
        h = self.projected_content(node_ref, types, next(blocks))
        if self.type_embedding is not None:
            h = h + F.linear(self.type_embedding.weight, next(blocks)).index_select(0, node_type)
        if self.position_embedding is not None:  # mean of the (projected) position embeddings of each node
            positions = F.linear(self.position_embedding.weight, next(blocks)).index_select(0, pos_index)
            h = h + scatter_mean(positions, pos_node, node_type.shape[0])
        return h if self.merge.bias is None else h + self.merge.bias

    def projected_content(self, node_ref: Tensor, types: TypeIndex, weight: Tensor) -> Tensor:
        """W_e e_n for nodes sorted by type, computed once per distinct item or code of the batch."""
        parts = []
        for t, ref in enumerate(torch.split(node_ref, types.counts)):
            if not ref.numel():
                continue
            rows, where = torch.unique(ref, return_inverse=True)
            if t == 0:
                content = self.item_embedding(rows)
            else:
                content = self.code_projections[t - 1](self.code_embeddings[t - 1](rows))
            parts.append(F.linear(content, weight).index_select(0, where))
        if not parts:
            return weight.new_zeros(0, weight.shape[0])
        return torch.cat(parts)


class FeedForward(nn.Module):
    """h + W2 relu(W1 h) per node (``--feed-forward``; not in the paper).

    The paper's layer (Eq. 12-17) is softmax- and gate-weighted sums of linear projections, so the
    user vector is linear in the embeddings it attends to; this block adds the position-wise
    nonlinearity SASRec's encoder has (without its LayerNorm, which slowed MMSR's training).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.net(h)


class AttentionReadout(nn.Module):
    """``--readout attention`` (not in the paper): SR-GNN's session readout over the item nodes.

    alpha_i = q . sigmoid(W1 h_last + W2 h_i), s = sum_i alpha_i h_i over the graph's item nodes,
    user = W3 [h_last; s] (Wu et al., AAAI 2019, Eq. 6-7). Last pooling scores from the last item's
    node alone, which on Amazon Beauty learns that item's successors and generalises less than
    SASRec to steps unseen in training (docs/benchmarks.md); this readout lets every item of the
    history reach the user vector directly.

    With ``residual`` (``--readout residual``) the user vector is h_last + W3 [h_last; s] with W3
    zero at initialisation: training starts from last pooling, whose successor memory the plain
    readout loses on steps seen in training, and adds the history only as far as it helps.
    """

    def __init__(self, dim: int, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.last = nn.Linear(dim, dim, bias=False)  # W1
        self.node = nn.Linear(dim, dim)  # W2 (its bias is SR-GNN's c)
        self.query = nn.Linear(dim, 1, bias=False)  # q
        self.merge = nn.Linear(2 * dim, dim, bias=False)  # W3
        if residual:
            nn.init.zeros_(self.merge.weight)

    def forward(self, h_items: Tensor, graph: Tensor, h_last: Tensor) -> Tensor:
        """``h_items`` [M, d] item nodes of ``graph`` [M] (sample index), ``h_last`` [B, d] -> [B, d]."""
        alpha = self.query(torch.sigmoid(self.last(h_last).index_select(0, graph) + self.node(h_items)))  # [M, 1]
        pooled = h_last.new_zeros(h_last.shape).index_add_(0, graph, alpha * h_items)
        merged = self.merge(torch.cat([h_last, pooled], dim=1))
        return h_last + merged if self.residual else merged


class MMSR(Recommender):
    """Multi-modality enriched sequential recommender over MSGraphs (HAN-GNN + last pooling)."""

    input_kind = "graph"
    search_space = {"fusion": ("adaptive", "hohe", "heho", "synchronous")}  # `mmsr tune`, besides space.PAPER_SPACE
    config_class = MMSRConfig

    def __init__(self, config: MMSRConfig, info: DatasetInfo):
        super().__init__()
        self.config = config
        self.modalities = select_modalities(config, info)
        self.encoder = NodeEncoder(config, info, self.modalities)
        self.n_types = self.encoder.n_types
        check_variant(config)
        if config.variant == "authors":  # one layer applied `layers` times (their loop)
            layer = AuthorsHANLayer(config.dim, self.n_types, config.attention_dropout)
            self.layers = nn.ModuleList([layer] * config.layers)
        elif check_aggregator(config.aggregator) == "han":
            self.layers = nn.ModuleList(
                HANLayer(config.dim, self.n_types, config.fusion, config.invasive, config.attention_dropout)
                for _ in range(config.layers)
            )
        else:  # section 5.2: a standard aggregator in place of HAN-GNN
            used = [option for option, changed in (
                ("--fusion", config.fusion != MMSRConfig.fusion), ("--invasive", config.invasive),
                ("--attention-dropout", config.attention_dropout != MMSRConfig.attention_dropout),
            ) if changed]
            if used:
                raise MmsrError(f"{', '.join(used)}: only used by --aggregator han, not {config.aggregator}")
            self.layers = build_layers(config.aggregator, config.dim, self.n_types, config.layers)
        self.feed_forward = (
            nn.ModuleList(FeedForward(config.dim) for _ in range(config.layers)) if config.feed_forward else None
        )
        self.readout = (
            AttentionReadout(config.dim, residual=config.readout == "residual") if config.readout != "last" else None
        )
        if config.variant == "authors":
            self.encoder.reset_parameters_uniform(self.modalities)
            self.layers[0].reset_parameters_uniform()
        self.dropout = Dropout(config.dropout)  # layers.Dropout: nn.Dropout's distribution, cheaper on CPU
        #: compute every node in every layer, also when only the pooled nodes are scored: for
        #: statistics over all nodes' update gates (evaluation.GateStatistics)
        self.every_node = False
        self._last_inverse: Tensor | None = None
        self._last_node_type: Tensor | None = None
        self._last_gates: list[Tensor] = []

    def item_embeddings(self) -> Tensor:
        return self.encoder.item_embedding.weight

    def node_states(self, batch: dict[str, Tensor]) -> Tensor:
        """h^(L) [N, d] of every node, in the batch's node order."""
        h, inverse = self._propagate(batch)
        return h if inverse is None else h.index_select(0, inverse)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        if self.readout is not None:  # every item node is read: no restricted layer plans
            h = self.node_states(batch)
            items = torch.nonzero(batch["node_type"] == 0).squeeze(1)
            return self.readout(h.index_select(0, items), batch["node_graph"][items], h.index_select(0, batch["last_node"]))
        if not self.every_node and self.config.aggregator == "han":
            h, _ = self._propagate(batch, pooled=True)
            return h  # the pooled rows, in sample order
        h, inverse = self._propagate(batch)
        last = batch["last_node"]
        if inverse is not None:  # position of each batch node in the type-sorted order
            last = inverse[last]
        return h.index_select(0, last)  # last pooling (section 4.4): P = h^(L) of the last history item

    def _propagate(self, batch: dict[str, Tensor], pooled: bool = False) -> tuple[Tensor, Tensor | None]:
        """h^(L) of every node (type-sorted order, with the inverse permutation), or with
        ``pooled`` h^(L) of the last item nodes only (sample order): each layer then computes the
        rows the layers after it read (layers.LayerPlan), the same values for less work."""
        node_type, node_ref = batch["node_type"], batch["node_ref"]
        pos_index, pos_node = batch["pos_index"], batch["pos_node"]
        edge_index, edge_rel = batch["edge_index"], batch["edge_rel"]
        # Sort nodes by type once, so every type-specific projection is a contiguous slice.
        sorting = TypeIndex.build(node_type, self.n_types)
        inverse = sorting.inverse
        if sorting.order is not None:
            node_type, node_ref = node_type[sorting.order], node_ref[sorting.order]
            pos_node = inverse[pos_node]
            edge_index = inverse[edge_index]
        types = TypeIndex(None, None, sorting.counts)
        if self.config.aggregator == "han":
            edges = RelationEdges(edge_index, edge_rel, node_type.shape[0])
        else:
            edges = BatchGraph(edge_index, edge_rel, types.counts)

        plans: list[LayerPlan | None] = [None] * len(self.layers)
        if pooled:  # from the pooled rows back to the rows each earlier layer must compute
            rows = batch["last_node"] if inverse is None else inverse[batch["last_node"]]
            for i in reversed(range(len(self.layers))):
                kind = AUTHORS_PLAN if self.config.variant == "authors" else self.config.fusion
                plans[i] = LayerPlan.build(edges, types, kind, rows)
                rows = plans[i].inputs

        h = self.encoder(node_type, node_ref, pos_index, pos_node, types)  # h^(0)
        authors = self.config.variant == "authors"
        if not authors:
            h = self.dropout(h)
        gates = []
        for i, (layer, plan) in enumerate(zip(self.layers, plans)):
            h = layer(h, edges, types) if plan is None else layer(h, edges, types, plan)
            gates.append(getattr(layer, "last_gate", None))
            if self.feed_forward is not None:
                h = self.feed_forward[i](h)
            if plan is not None and i + 1 < len(self.layers):  # rows plan.out of [N, d]; others unread
                h = rows_of(h, plan.out, node_type.shape[0])
            if authors or i + 1 < len(self.layers):  # the authors drop after the last layer too
                h = self.dropout(h)
        if pooled:  # gates of the rows each layer computed (gate_values)
            self._last_inverse, self._last_node_type = None, None
            self._last_gates = [g for g in gates if g is not None]
            return h, None
        self._last_inverse, self._last_node_type = inverse, batch["node_type"]
        self._last_gates = [g for g in gates if g is not None]
        return h, inverse

    def gate_values(self) -> list[Tensor]:
        """beta [N, 2] (hohe, heho) of each layer in the last forward, in the batch's node order.

        Empty unless HAN-GNN with adaptive fusion. Pair with :attr:`gate_node_type` for per-type
        statistics. After a forward that computed the pooled nodes only (``every_node`` False),
        each layer's beta of the rows it computed, and no ``gate_node_type``.
        """
        if self.config.aggregator != "han" or self.config.fusion != "adaptive":
            return []
        if self._last_node_type is None:
            return list(self._last_gates)
        inv = self._last_inverse
        return [gate if inv is None else gate[inv] for gate in self._last_gates]

    @property
    def gate_node_type(self) -> Tensor | None:
        """node_type [N] of the last forward's batch (the rows of :meth:`gate_values`)."""
        return self._last_node_type
