"""HAN-GNN: the Heterogeneity-aware, Asynchronous and Non-invasive graph layer (paper section 4.3.2).

A batch is one disjoint graph of MSGraphs (see ``graphs.py``): nodes carry a type (0 = item,
m + 1 = modality m), edges ``j -> i`` (row 0 = source j, row 1 = target i, "i aggregates from j")
carry a relation. The homogeneous neighbourhood of i holds its SELF/IN/OUT/BI edges, the
heterogeneous one its SELF/HETERO edges (the self loop belongs to both).

Building blocks, one per concept:

* :class:`TypedLinear` - the type-specific projections W_{Q,t}, W_{K,t}, W_{V,t};
* :class:`HomogeneousAttention` - content-based scores with one vector a_r per relation (Eq. 12);
* :class:`HeterogeneousAttention` - key-value scores between node types (Eq. 13);
* :func:`neighbourhood_softmax` and :func:`aggregate` - sft(e | N_i) and the value sum (Eq. 14);
* :class:`UpdateGate` - the adaptive choice between the two update orders (Eq. 16-17);
* :class:`HANLayer` - one propagation layer: both phases of both orders, then fusion.

Choices the paper leaves open (documented here, tested in tests/test_layers.py):

* sft is the softmax of Eq. 11, LeakyReLU(0.2) included, for both attention kinds;
* heterogeneous scores are scaled by 1/sqrt(d), as in Transformer key-value attention;
* single head; no residual connection and no LayerNorm (the paper has none; tiny sets train
  stably without them, full-dataset training has not been checked yet);
* the gate MLP is Linear(2d, d) -> tanh -> Linear(d, 2), and beta is the softmax of its two
  scores so that Eq. 17 is a convex combination of the two paths.

Rows are gathered with ``index_select`` here and in the MMSR model, never ``x[idx]``: the latter's
backward is an accumulating ``index_put_`` that sorts its indices on CPU, 2.5x the time of
``index_select``'s ``index_add_`` (docs/benchmarks.md, "Gathers by index_select").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contracts import REL_BI, REL_HETERO, REL_IN, REL_OUT, REL_SELF  # noqa: F401  (edge_rel ids)

N_HOMOGENEOUS_RELATIONS = 4  # SELF, IN, OUT, BI: one a_r each (Eq. 12)

# The CSR kernels used here (sparse @ dense, sampled_addmm) are stable on CPU; silence the
# once-per-process "beta" notice torch prints when a CSR tensor is built.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

FUSION_MODES = ("adaptive", "hohe", "heho", "synchronous", "ho", "he")
AUTHORS_PLAN = "authors"  # LayerPlan.build's name for the rows the authors' layer reads
ATTENTION_SLOPE = 0.2  # LeakyReLU slope inside sft (Eq. 11)


@dataclass
class TypeIndex:
    """Nodes grouped by type, so type-specific weights run as one matmul per type.

    ``order`` sorts the nodes by type (None when they already are); ``counts[t]`` is the number
    of nodes of type t.
    """

    order: Tensor | None
    inverse: Tensor | None
    counts: list[int]

    @classmethod
    def build(cls, node_type: Tensor, n_types: int) -> "TypeIndex":
        if node_type.numel() and int(node_type.max()) >= n_types:
            raise ValueError(f"node type {int(node_type.max())} but the layer knows {n_types} types")
        counts = torch.bincount(node_type, minlength=n_types).tolist()
        if node_type.numel() < 2 or bool((node_type[1:] >= node_type[:-1]).all()):
            return cls(None, None, counts)
        order = torch.argsort(node_type, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return cls(order, inverse, counts)


class CsrGraph:
    """Edges ``col -> row`` sorted by row, as CSR index arrays for the sparse kernels, both ways.

    ``row`` must be sorted; within a row the columns need not be (the homogeneous graph keeps a
    target's edges by relation, then source: cuSPARSE documents sorted columns as its assumption,
    and tests/test_cuda.py compares every HAN piece on a device with the CPU, which does not care).
    The transposed structure (``crow_t``, ``col_t``, ``order_t``: edge order sorted by ``col``,
    stable, so each transposed row's columns are sorted) serves the backward passes.
    """

    def __init__(self, row: Tensor, col: Tensor, n_rows: int, n_cols: int):
        self.row, self.col, self.n_rows, self.n_cols = row, col, n_rows, n_cols
        self.crow = _offsets(row, n_rows)
        self._pattern: Tensor | None = None

    # the transposed structure, built when a backward pass first needs it
    @cached_property
    def order_t(self) -> Tensor:
        return torch.argsort(self.col, stable=True)

    @cached_property
    def crow_t(self) -> Tensor:
        return _offsets(self.col, self.n_cols)

    @cached_property
    def col_t(self) -> Tensor:
        return self.row[self.order_t]

    def pattern(self, like: Tensor) -> Tensor:
        """The sparsity pattern (ones at the edges), built once per batch."""
        if self._pattern is None or self._pattern.dtype != like.dtype:
            self._pattern = self.matrix(like.new_ones(self.row.shape[0]))
        return self._pattern

    def matrix(self, values: Tensor) -> Tensor:
        """Sparse [n_rows, n_cols] matrix with ``values`` (in edge order) at the edges.

        The CSR invariants (offsets from sorted rows, in-range columns) hold by construction, so
        torch's per-tensor checks are skipped.
        """
        return torch.sparse_csr_tensor(self.crow, self.col, values, (self.n_rows, self.n_cols), check_invariants=False)

    def matrix_t(self, values: Tensor) -> Tensor:
        """The transpose [n_cols, n_rows] of :meth:`matrix`."""
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.order_t], (self.n_cols, self.n_rows), check_invariants=False)

    def restrict(self, rows: Tensor) -> tuple["CsrGraph", Tensor]:
        """The edges into ``rows`` (distinct targets, any order) as a graph whose row r is
        ``rows[r]``, columns unchanged; and their positions in this graph's edge order."""
        starts = self.crow[rows]
        counts = self.crow[rows + 1] - starts
        new_row = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), counts)
        first = torch.cumsum(counts, 0) - counts  # where each row's edges start in the new order
        ids = starts[new_row] + torch.arange(new_row.shape[0], device=rows.device) - first[new_row]
        return CsrGraph(new_row, self.col[ids], rows.shape[0], self.n_cols), ids


def _offsets(sorted_ids: Tensor, n: int) -> Tensor:
    crow = torch.zeros(n + 1, dtype=torch.long, device=sorted_ids.device)
    crow[1:] = torch.cumsum(torch.bincount(sorted_ids, minlength=n), 0)
    return crow


def sparse_mm(matrix: Tensor, dense: Tensor) -> Tensor:
    """``matrix @ dense`` for a sparse CSR ``matrix``. On CPU the product is written straight into
    one fresh output: there ``@`` zero-fills an output, multiplies into a second one and copies
    it over, twice the time of the product alone (docs/benchmarks.md, "Sparse products")."""
    if matrix.device.type != "cpu":
        return matrix @ dense
    out = dense.new_empty(matrix.shape[0], dense.shape[1])
    return torch.addmm(out, matrix, dense, beta=0.0, out=out)  # beta 0: out's contents are not read


def _sampled_dot(x_row: Tensor, x_col: Tensor, graph: CsrGraph) -> Tensor:
    """[E]: x_row[row_k] . x_col[col_k], computed only at the edges (no [E, d] intermediate)."""
    return torch.sparse.sampled_addmm(graph.pattern(x_row), x_row, x_col.T, beta=0.0).values()


class EdgeDot(torch.autograd.Function):
    """e_k = x_row[row_k] . x_col[col_k] for every edge k (a sampled dense-dense product)."""

    @staticmethod
    def forward(ctx, x_row: Tensor, x_col: Tensor, graph: CsrGraph) -> Tensor:
        ctx.save_for_backward(x_row, x_col)
        ctx.graph = graph
        return _sampled_dot(x_row, x_col, graph)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_row, x_col = ctx.saved_tensors
        g = ctx.graph
        grad_row = sparse_mm(g.matrix(grad), x_col) if ctx.needs_input_grad[0] else None
        grad_col = sparse_mm(g.matrix_t(grad), x_row) if ctx.needs_input_grad[1] else None
        return grad_row, grad_col, None


class Aggregate(torch.autograd.Function):
    """out_i = sum_k alpha_k values[col_k] over the edges k with row_k = i (a sparse matmul)."""

    @staticmethod
    def forward(ctx, alpha: Tensor, values: Tensor, graph: CsrGraph) -> Tensor:
        ctx.save_for_backward(alpha, values)
        ctx.graph = graph
        return sparse_mm(graph.matrix(alpha), values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        alpha, values = ctx.saved_tensors
        g = ctx.graph
        grad_alpha = _sampled_dot(grad, values, g) if ctx.needs_input_grad[0] else None
        grad_values = sparse_mm(g.matrix_t(alpha), grad) if ctx.needs_input_grad[1] else None
        return grad_alpha, grad_values, None


class _HomogeneousScores(torch.autograd.Function):
    """Eq. 12 at the edges: e_k = a_r . (x_i (.) y_j) for edge k = (j -> i) of relation r, with x
    the targets' rows and y the sources' (both W_V h; separate tensors when a layer computes some
    targets only, the same one otherwise, autograd then adding the two gradients).

    All relations in one sampled product over the stacked graph (``RelationEdges.ho_stacked``,
    row 4i + r holds target i's edges of relation r) with x_r = a_r (.) x stacked the same way:
    no [E, d] tensor of edge vectors, and one sparse kernel per pass instead of one per relation.
    The backward uses that a_r scales columns: with t[i, r] = sum_j g_ij y_j over relation r,
    dx_i = sum_r a_r (.) t[i, r] and da_r = sum_i x_i (.) t[i, r].
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, relation_vectors: Tensor, edges: "RelationEdges") -> Tensor:
        ctx.save_for_backward(x, y, relation_vectors)
        ctx.edges = edges
        return _sampled_dot(_relation_scaled(x, relation_vectors), y, edges.ho_stacked)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, relation_vectors = ctx.saved_tensors
        stacked = ctx.edges.ho_stacked
        grad_x = grad_y = grad_a = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            t = sparse_mm(stacked.matrix(grad), y).view(x.shape[0], N_HOMOGENEOUS_RELATIONS, x.shape[1])
            if ctx.needs_input_grad[0]:
                grad_x = t[:, 0] * relation_vectors[0]
                for r in range(1, N_HOMOGENEOUS_RELATIONS):
                    grad_x.addcmul_(t[:, r], relation_vectors[r])
            if ctx.needs_input_grad[2]:
                grad_a = (t * x.unsqueeze(1)).sum(0)
        if ctx.needs_input_grad[1]:  # row j: sum over edges (j -> i) of g_ij a_r (.) x_i
            grad_y = sparse_mm(stacked.matrix_t(grad), _relation_scaled(x, relation_vectors))
        return grad_x, grad_y, grad_a, None


def _relation_scaled(x: Tensor, relation_vectors: Tensor) -> Tensor:
    """[n * R, d]: row R i + r is a_r (.) x_i, the rows of the stacked graph's targets."""
    return (x.unsqueeze(1) * relation_vectors).view(-1, x.shape[1])


class RelationEdges:
    """The two neighbourhoods of a batch: homogeneous (SELF/IN/OUT/BI) and heterogeneous (SELF/HETERO).

    Edges are sorted by target, so that the attention runs as sparse CSR kernels (sampled
    dense-dense products for the scores, sparse matmuls for Eq. 14) that never materialise one
    d-vector per edge. :meth:`rows` keeps the edges into some targets only (a layer that computes
    a subset of its output, :class:`LayerPlan`).
    """

    def __init__(self, edge_index: Tensor, edge_rel: Tensor, n_nodes: int):
        ho = edge_rel <= REL_BI
        he = (edge_rel == REL_SELF) | (edge_rel == REL_HETERO)
        src, dst, rel = edge_index[0, ho], edge_index[1, ho], edge_rel[ho]
        # sorted by (target, relation, source): by target for Eq. 14, by (target, relation) for Eq. 12
        order = torch.argsort((dst * N_HOMOGENEOUS_RELATIONS + rel) * n_nodes + src)
        src, dst, rel = src[order], dst[order], rel[order]
        self._set_homogeneous(CsrGraph(dst, src, n_nodes, n_nodes), rel)
        src, dst = edge_index[0, he], edge_index[1, he]
        order = torch.argsort(dst * n_nodes + src)
        self._set_heterogeneous(CsrGraph(dst[order], src[order], n_nodes, n_nodes))
        self.n_nodes = n_nodes

    def _set_homogeneous(self, graph: CsrGraph, rel: Tensor) -> None:
        self.ho = graph
        self.ho_rel = rel  # [E_ho] in 0..3

    def _set_heterogeneous(self, graph: CsrGraph) -> None:
        self.he = graph

    @cached_property
    def ho_stacked(self) -> CsrGraph:
        """The homogeneous edges with target i of relation r at row R i + r (R relations): a valid
        CSR graph in the same edge order, since edges are sorted by (target, relation, source)."""
        ho = self.ho
        return CsrGraph(ho.row * N_HOMOGENEOUS_RELATIONS + self.ho_rel, ho.col, ho.n_rows * N_HOMOGENEOUS_RELATIONS, ho.n_cols)

    @property
    def ho_index(self) -> Tensor:
        """[2, E_ho] (source j, target i) in ho edge order."""
        return torch.stack([self.ho.col, self.ho.row])

    @property
    def he_index(self) -> Tensor:
        """[2, E_he] (source j, target i) in he edge order."""
        return torch.stack([self.he.col, self.he.row])

    def rows(self, rows: Tensor, ho: bool = True, he: bool = True) -> "RelationEdges":
        """The homogeneous and/or heterogeneous edges into ``rows`` only: target r is node
        ``rows[r]``, sources keep their node ids."""
        sub = RelationEdges.__new__(RelationEdges)
        sub.n_nodes = self.n_nodes
        if ho:
            graph, ids = self.ho.restrict(rows)
            sub._set_homogeneous(graph, self.ho_rel[ids])
        if he:
            sub._set_heterogeneous(self.he.restrict(rows)[0])
        return sub


def _union(n: int, *parts: Tensor) -> Tensor:
    """The distinct node ids (< n) of ``parts``, sorted: one mark per node and the marked ones,
    linear in n and the parts, where ``torch.unique`` of their concatenation sorts it (a third of
    the time at a Beauty batch's sizes; docs/benchmarks.md)."""
    marked = torch.zeros(n, dtype=torch.bool, device=parts[0].device)
    for part in parts:
        marked[part] = True
    return marked.nonzero().squeeze(1)


@dataclass
class LayerPlan:
    """What one HAN-GNN layer must compute so that rows ``out`` of its output are exact.

    Last pooling reads one node per graph, and each layer reads a node's neighbours twice (two
    phases), so most of the last layer's work (phase 2 and the gate at every node, phase 1 beyond
    the pooled nodes' neighbours) feeds nothing. A plan names, for nodes sorted by type: the rows
    of phase 1 of each order (``ho_rows``: h^ho, ``he_rows``: h^he; each with the edges into them),
    the edges into ``out`` for phase 2, the rows of the input projections (``v_rows``: W_V h,
    ``q_rows``: W_Q h; W_K h at ``he_rows``), and ``inputs``, the rows of h the layer reads: the
    ``out`` of the plan of the layer before. Built from the graph alone, once per batch.
    """

    out: Tensor
    node_type: Tensor
    n_types: int
    ho_rows: Tensor | None
    ho_edges: RelationEdges | None
    he_rows: Tensor | None
    he_edges: RelationEdges | None
    out_edges: RelationEdges
    out_in_ho: Tensor | None  # position of each out row in ho_rows
    out_in_he: Tensor | None
    v_rows: Tensor
    q_rows: Tensor | None
    inputs: Tensor
    _types: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, edges: RelationEdges, types: "TypeIndex", fusion: str, out: Tensor) -> "LayerPlan":
        node_type = torch.repeat_interleave(torch.arange(len(types.counts), device=out.device),
                                            torch.tensor(types.counts, device=out.device))
        n = node_type.shape[0]
        # AUTHORS_PLAN: han_authors.AuthorsHANLayer (h^he at out and its sequence neighbours, then
        # both aggregations into out, all from one projection q; no h^ho)
        two_phase = fusion in ("adaptive", "hohe", "heho", AUTHORS_PLAN)
        uses_ho = fusion in ("adaptive", "hohe", "synchronous", "ho")
        uses_he = fusion in ("adaptive", "heho", "synchronous", "he", AUTHORS_PLAN)
        out_edges = edges.rows(out, ho=fusion in ("adaptive", "heho", AUTHORS_PLAN), he=fusion in ("adaptive", "hohe", AUTHORS_PLAN))
        ho_rows = ho_edges = he_rows = he_edges = out_in_ho = out_in_he = q_rows = None
        v_parts = [out]
        if uses_ho:  # h^ho where phase 2 (hohe) or the output reads it
            ho_rows = _union(n, out, out_edges.he.col) if two_phase else out
            ho_edges = edges.rows(ho_rows, he=False)
            v_parts += [ho_rows, ho_edges.ho.col]
            out_in_ho = torch.searchsorted(ho_rows, out) if two_phase else None
        if uses_he:  # h^he where phase 2 (heho) or the output reads it
            he_rows = _union(n, out, out_edges.ho.col) if two_phase else out
            he_edges = edges.rows(he_rows, ho=False)
            q_rows = _union(n, he_edges.he.col)
            v_parts += [he_rows, q_rows]
            out_in_he = torch.searchsorted(he_rows, out) if two_phase else None
        v_rows = _union(n, *v_parts)
        inputs = v_rows if he_rows is None else _union(n, v_rows, q_rows, he_rows)
        if fusion == AUTHORS_PLAN:  # q at he_rows and their heterogeneous sources (out is in he_rows)
            inputs = _union(n, he_rows, q_rows)
        return cls(out, node_type, len(types.counts), ho_rows, ho_edges, he_rows, he_edges, out_edges,
                   out_in_ho, out_in_he, v_rows, q_rows, inputs)

    def types_of(self, rows: Tensor) -> "TypeIndex":
        """TypeIndex of the nodes ``rows`` (sorted rows are grouped by type already); built once
        per row set of the plan (the forward asks for each several times, every step)."""
        key = id(rows)  # the row sets are the plan's own tensors, alive as long as the plan
        if key not in self._types:
            self._types[key] = TypeIndex.build(self.node_type[rows], self.n_types)
        return self._types[key]


def every_row(rows: Tensor, n: int) -> bool:
    """Whether ``rows`` is 0, 1, ..., n - 1: a plan's row set that covers every node in order (the
    first layers of a deep plan), where gathering or placing rows is the identity."""
    return rows.shape[0] == n and torch.equal(rows, torch.arange(n, device=rows.device))


def take_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x.index_select(0, rows)``, or ``x`` itself where ``rows`` are all its rows in order (no
    copy forward, no scatter into zeros backward)."""
    return x if every_row(rows, x.shape[0]) else x.index_select(0, rows)


def rows_of(x: Tensor, rows: Tensor, n: int) -> Tensor:
    """An [n, d] tensor holding ``x`` at ``rows``, zeros elsewhere: a plan's partial result in node
    order, so that edges keep node ids (the zero rows are never read); ``x`` itself where
    ``rows`` are all n rows in order. In place into the fresh zeros: the out-of-place
    ``index_copy`` first cloned the [n, d] zeros, a full copy per call."""
    if every_row(rows, n):
        return x
    return x.new_zeros(n, x.shape[1]).index_copy_(0, rows, x)


class TypedLinear(nn.Module):
    """x_i -> W_{t_i} x_i with one [d_in, d_out] matrix per node type (stacked as [T, d_in, d_out])."""

    def __init__(self, n_types: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_types, d_in, d_out))
        bound = math.sqrt(6.0 / (d_in + d_out))  # Xavier per type: keeps the scale of h through the layers
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor, types: TypeIndex) -> Tensor:
        xs = x if types.order is None else x.index_select(0, types.order)
        out = _TypedMatmul.apply(xs, self.weight, types.counts)
        return out if types.inverse is None else out.index_select(0, types.inverse)


class _TypedMatmul(torch.autograd.Function):
    """Rows grouped by type (``counts[t]`` rows of type t, in type order) times their type's
    matrix, each product written into its block of one output, and the backward likewise: the
    same products as splitting, multiplying and concatenating, without the concatenation's copy
    of every row in the forward pass and again in the backward one."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, counts: list[int]) -> Tensor:
        if sum(counts) != x.shape[0]:  # rows left out would stay uninitialised in ``out``
            raise ValueError(f"type counts {counts} cover {sum(counts)} rows, the input has {x.shape[0]}")
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        out = x.new_empty(x.shape[0], weight.shape[2])
        for t, rows in _type_blocks(counts):
            torch.mm(x[rows], weight[t], out=out[rows])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for t, rows in _type_blocks(ctx.counts):
            if grad_x is not None:
                torch.mm(grad[rows], weight[t].T, out=grad_x[rows])
            if grad_weight is not None:
                torch.mm(x[rows].T, grad[rows], out=grad_weight[t])
        return grad_x, grad_weight, None


def _type_blocks(counts: list[int]):
    """(type, slice of its rows) for each type with rows."""
    start = 0
    for t, n in enumerate(counts):
        if n:
            yield t, slice(start, start + n)
        start += n


class HomogeneousAttention(nn.Module):
    """Eq. 12: e_ij = a_r . (W_V h_i  (.)  W_V h_j), one vector a_r per homogeneous relation r."""

    def __init__(self, dim: int):
        super().__init__()
        self.relation_vectors = nn.Parameter(torch.empty(N_HOMOGENEOUS_RELATIONS, dim))
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.relation_vectors, -bound, bound)

    def forward(self, v: Tensor, edges: RelationEdges, v_source: Tensor | None = None) -> Tensor:
        """Scores [E_ho] (edge order of ``edges.ho_index``) from the value projections ``v`` [N, d]
        (targets' rows of ``edges``; ``v_source``, the sources', when it differs)."""
        return _HomogeneousScores.apply(v, v if v_source is None else v_source, self.relation_vectors, edges)


class HeterogeneousAttention(nn.Module):
    """Eq. 13: e_ij = (W_Q,tj h_j) . (W_K,ti h_i) / sqrt(d): query from the neighbour, key from the target."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, q: Tensor, k: Tensor, edges: RelationEdges) -> Tensor:
        """Scores [E_he] (edge order of ``edges.he_index``)."""
        return EdgeDot.apply(k, q, edges.he) * self.scale


def _along_rows(index: Tensor, like: Tensor) -> Tensor:
    """``index`` [E] broadcast to ``like``'s shape [E, ...] (one row per entry)."""
    return index.view(-1, *([1] * (like.dim() - 1))).expand_as(like)


def scatter_softmax(src: Tensor, index: Tensor, n: int) -> Tensor:
    """softmax of ``src`` [E, ...] within each group of equal ``index`` [E] (n groups): PyG's
    ``utils.softmax`` for an index, the same operations in the same order, in torch alone.
    Importing torch_geometric costs about 2 s of CPU per process (it imports torch._dynamo), which
    every `mmsr` command paid for this one function; PyG stays for the aggregators that use it."""
    size = (n, *src.shape[1:])
    peak = src.new_zeros(size).scatter_reduce_(0, _along_rows(index, src), src.detach(), "amax", include_self=False)
    out = (src - peak.index_select(0, index)).exp()
    total = src.new_zeros(size).scatter_add_(0, _along_rows(index, out), out) + 1e-16
    return out / total.index_select(0, index)


def scatter_mean(src: Tensor, index: Tensor, n: int) -> Tensor:
    """The mean of the rows of ``src`` [E, d] per ``index`` [E] into n rows (0 where none), as
    PyG's ``scatter(..., reduce="mean")`` computes it."""
    count = src.new_zeros(n).scatter_add_(0, index, src.new_ones(index.shape[0])).clamp(min=1)
    total = src.new_zeros((n, *src.shape[1:])).scatter_add_(0, _along_rows(index, src), src)
    return total / count.view(-1, *([1] * (src.dim() - 1)))


def neighbourhood_softmax(scores: Tensor, graph: CsrGraph) -> Tensor:
    """sft(e_ij | N_i) of Eq. 11: softmax of LeakyReLU(e_ij) over the edges into each target i."""
    return scatter_softmax(F.leaky_relu(scores, ATTENTION_SLOPE), graph.row, graph.n_rows)


def aggregate(alpha: Tensor, values: Tensor, graph: CsrGraph) -> Tensor:
    """Eq. 14: h_i = sum_j alpha_ij v_j over the edges j -> i."""
    return Aggregate.apply(alpha, values, graph)


class Dropout(nn.Dropout):
    """Inverted dropout whose CPU mask comes from ``uniform_`` rather than ``bernoulli_``: the same
    distribution (each entry kept with probability 1 - p, scaled by 1 / (1 - p)) at half the cost
    on CPU, where ``bernoulli_`` took ~7 ms per [11k, 64] tensor. Other devices use ``nn.Dropout``."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        if self.p == 1.0:
            return x * 0.0
        return x * torch.empty_like(x).uniform_().ge_(self.p).mul_(1.0 / (1.0 - self.p))


class UpdateGate(nn.Module):
    """Eq. 16-17: beta = softmax(MLP([h^hohe; h^heho])), h = beta_0 h^hohe + beta_1 h^heho."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.Tanh(), nn.Linear(dim, 2))

    def forward(self, h_hohe: Tensor, h_heho: Tensor) -> tuple[Tensor, Tensor]:
        beta = torch.softmax(self.mlp(torch.cat([h_hohe, h_heho], dim=-1)), dim=-1)  # Eq. 16
        return beta[:, :1] * h_hohe + beta[:, 1:] * h_heho, beta  # Eq. 17


class HANLayer(nn.Module):
    """One HAN-GNN propagation layer h^(l) -> h^(l+1).

    Both update orders run in two phases:

    * hohe: h -> h^ho (homogeneous attention, Eq. 12 + 14) -> h^hohe (heterogeneous attention
      whose scores come from h^ho, Eq. 13 + 14);
    * heho: h -> h^he -> h^heho symmetrically.

    Non-invasive (default): phase 2 takes its attention scores from the intermediate state but
    aggregates the values W_V h^(l) of the layer input; invasive: the values W_V of the
    intermediate state. ``fusion`` picks what h^(l+1) is: ``adaptive`` (update gate over both
    orders, Eq. 16-17), ``hohe`` / ``heho`` (one order), ``synchronous`` (Linear([h^ho; h^he]),
    both from h^(l), Eq. 15), ``ho`` / ``he`` (one neighbourhood only, one phase).
    """

    def __init__(self, dim: int, n_types: int, fusion: str = "adaptive", invasive: bool = False, attention_dropout: float = 0.0):
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion '{fusion}' is not one of {', '.join(FUSION_MODES)}")
        self.dim, self.n_types, self.fusion, self.invasive = dim, n_types, fusion, invasive
        self.query = TypedLinear(n_types, dim, dim)  # W_Q,t
        self.key = TypedLinear(n_types, dim, dim)  # W_K,t
        self.value = TypedLinear(n_types, dim, dim)  # W_V,t
        self.homogeneous = HomogeneousAttention(dim)
        self.heterogeneous = HeterogeneousAttention(dim)
        self.gate = UpdateGate(dim) if fusion == "adaptive" else None
        self.synchronous = nn.Linear(2 * dim, dim) if fusion == "synchronous" else None  # Eq. 15
        # not in the paper (0 = off): dropout on the weights alpha of every aggregation
        self.attention_dropout = nn.Dropout(attention_dropout) if attention_dropout > 0 else nn.Identity()
        #: beta [N, 2] of the last forward (adaptive fusion only), detached, in input node order
        self.last_gate: Tensor | None = None

    # -- the two aggregations (Eq. 14): scores from the targets' and sources' states, values given --
    def _homogeneous(self, v_target: Tensor, values: Tensor, edges: RelationEdges, v_source: Tensor | None = None) -> Tensor:
        alpha = neighbourhood_softmax(self.homogeneous(v_target, edges, v_source), edges.ho)  # Eq. 12
        return aggregate(self.attention_dropout(alpha), values, edges.ho)  # Eq. 14, * = ho

    def _heterogeneous(self, k_target: Tensor, q_source: Tensor, values: Tensor, edges: RelationEdges) -> Tensor:
        alpha = neighbourhood_softmax(self.heterogeneous(q_source, k_target, edges), edges.he)  # Eq. 13
        return aggregate(self.attention_dropout(alpha), values, edges.he)  # Eq. 14, * = he

    def attention(self, h: Tensor, edges: RelationEdges, types: TypeIndex, kind: str) -> Tensor:
        """alpha [E_kind] of one aggregation from state h (kind: "ho" or "he"), for inspection and tests."""
        if kind == "ho":
            return neighbourhood_softmax(self.homogeneous(self.value(h, types), edges), edges.ho)
        return neighbourhood_softmax(self.heterogeneous(self.query(h, types), self.key(h, types), edges), edges.he)

    def forward(self, h: Tensor, edges: RelationEdges, types: TypeIndex, plan: LayerPlan | None = None) -> Tensor:
        """h^(l+1) [N, d]; with ``plan`` (built from ``edges`` and ``types``), its rows ``plan.out``
        only [len(out), d]: the same values, from the work those rows need."""
        if plan is not None:
            return self._forward_rows(h, plan)
        v = self.value(h, types)  # W_V h^(l): phase-1 values, and phase-2 values when non-invasive
        fusion = self.fusion
        out_hohe = out_heho = h_ho = h_he = None
        if fusion in ("adaptive", "hohe", "synchronous", "ho"):
            h_ho = self._homogeneous(v, v, edges)  # phase 1 of hohe: h -> h^ho
        if fusion in ("adaptive", "heho", "synchronous", "he"):
            h_he = self._heterogeneous(self.key(h, types), self.query(h, types), v, edges)  # phase 1 of heho
        if fusion in ("adaptive", "hohe"):  # phase 2: h^ho -> h^hohe
            values = self.value(h_ho, types) if self.invasive else v
            out_hohe = self._heterogeneous(self.key(h_ho, types), self.query(h_ho, types), values, edges)
        if fusion in ("adaptive", "heho"):  # phase 2: h^he -> h^heho
            v_he = self.value(h_he, types)
            out_heho = self._homogeneous(v_he, v_he if self.invasive else v, edges)
        return self._fuse(out_hohe, out_heho, h_ho, h_he)

    def _forward_rows(self, h: Tensor, plan: LayerPlan) -> Tensor:
        """:meth:`forward` for the rows ``plan.out``: each projection and aggregation at the rows
        the plan names; projections are placed into [N, d] (zeros elsewhere, never read) so that
        the edges keep their node ids as sources."""
        n = h.shape[0]

        def place(x: Tensor, rows: Tensor) -> Tensor:
            return rows_of(x, rows, n)

        def project(linear: TypedLinear, x: Tensor, rows: Tensor) -> Tensor:
            return linear(x, plan.types_of(rows))

        fusion = self.fusion
        v = place(project(self.value, take_rows(h, plan.v_rows), plan.v_rows), plan.v_rows)
        out_hohe = out_heho = h_ho = h_he = None
        if plan.ho_rows is not None:  # phase 1 of hohe at ho_rows: [len(ho_rows), d]
            h_ho = self._homogeneous(take_rows(v, plan.ho_rows), v, plan.ho_edges, v_source=v)
        if plan.he_rows is not None:  # phase 1 of heho at he_rows
            q = place(project(self.query, take_rows(h, plan.q_rows), plan.q_rows), plan.q_rows)
            h_he = self._heterogeneous(project(self.key, take_rows(h, plan.he_rows), plan.he_rows), q, v, plan.he_edges)
        if fusion in ("adaptive", "hohe"):  # phase 2 at the out rows, from h^ho at ho_rows
            q_ho = place(project(self.query, h_ho, plan.ho_rows), plan.ho_rows)
            k_ho = project(self.key, h_ho.index_select(0, plan.out_in_ho), plan.out)
            values = place(project(self.value, h_ho, plan.ho_rows), plan.ho_rows) if self.invasive else v
            out_hohe = self._heterogeneous(k_ho, q_ho, values, plan.out_edges)
        if fusion in ("adaptive", "heho"):  # phase 2 at the out rows, from h^he at he_rows
            v_he = place(project(self.value, h_he, plan.he_rows), plan.he_rows)
            values = v_he if self.invasive else v
            out_heho = self._homogeneous(v_he.index_select(0, plan.out), values, plan.out_edges, v_source=v_he)
        return self._fuse(out_hohe, out_heho, h_ho, h_he)

    def _fuse(self, out_hohe: Tensor | None, out_heho: Tensor | None, h_ho: Tensor | None, h_he: Tensor | None) -> Tensor:
        fusion = self.fusion
        if fusion == "adaptive":
            out, beta = self.gate(out_hohe, out_heho)
            self.last_gate = beta.detach()
            return out
        if fusion == "hohe":
            return out_hohe
        if fusion == "heho":
            return out_heho
        if fusion == "synchronous":
            return self.synchronous(torch.cat([h_ho, h_he], dim=-1))  # Eq. 15
        return h_ho if fusion == "ho" else h_he
