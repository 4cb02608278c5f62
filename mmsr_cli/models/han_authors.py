"""HAN-GNN as the authors' public code runs it (HoldenHu/MMSR, ``HeteAttenLayer`` with
``fusion_type: asy_mask``), for ``mmsr train --model mmsr --variant authors``.

The paper's layer (Eq. 12-17) is :class:`~mmsr_cli.models.layers.HANLayer`, the default. This
layer follows the published implementation where it departs from the paper; docs/benchmarks.md
measures what each departure costs or gains. Written from a reading of their code, on our sparse
per-edge kernels; every departure is listed here:

1. one projection per node type, q = W_Q,t h, serves as query, key *and* value (their
   ``get_qkv_hidden`` reshapes the query into the key and the value): no W_K, no W_V;
2. heterogeneous scores q_i . q_j without the 1/sqrt(d) of Eq. 13;
3. LeakyReLU slope 0.1 on both score kinds (Eq. 11 as written has 0.2 here);
4. dropout on the attention weights after each softmax (``dropout_atten``, 0.2 in their config);
5. the ho->he order never reaches its second phase: its output re-runs the heterogeneous
   attention of h^(l) (their second call scores with the layer-input queries and discards the
   homogeneous result), so it equals the phase-1 he aggregation up to the dropout mask; the
   he->ho order is as in the paper, non-invasive (scores from h^he, values q);
6. the update gate scores each order's output on its own with one shared MLP d -> d -> 1 (ReLU)
   and takes the softmax over the two scores, where Eq. 16 reads the concatenation of both.

Dropout on the layer output and the shared weights across layers are the model's part
(:class:`~mmsr_cli.models.mmsr.MMSR`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import CsrGraph, HomogeneousAttention, LayerPlan, RelationEdges, TypedLinear, TypeIndex, EdgeDot, aggregate, rows_of, scatter_softmax, take_rows

AUTHORS_SLOPE = 0.1  # their ``alpha`` for the LeakyReLU of the scores


def _softmax(scores: Tensor, graph: CsrGraph) -> Tensor:
    return scatter_softmax(F.leaky_relu(scores, AUTHORS_SLOPE), graph.row, graph.n_rows)


class PathGate(nn.Module):
    """Their gate: s_p = w2 relu(W1 h_p + b1) + b2 per path p, beta = softmax(s_hohe, s_heho)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def forward(self, h_hohe: Tensor, h_heho: Tensor) -> tuple[Tensor, Tensor]:
        beta = torch.softmax(torch.cat([self.mlp(h_hohe), self.mlp(h_heho)], dim=-1), dim=-1)
        return beta[:, :1] * h_hohe + beta[:, 1:] * h_heho, beta


class AuthorsHANLayer(nn.Module):
    """One layer of the authors' HAN-GNN: h^(l) -> h^(l+1) (see the module docstring)."""

    def __init__(self, dim: int, n_types: int, attention_dropout: float = 0.0):
        super().__init__()
        self.dim, self.n_types = dim, n_types
        self.query = TypedLinear(n_types, dim, dim)  # W_Q,t; also the keys and the values
        self.homogeneous = HomogeneousAttention(dim)  # a_r, one per homogeneous relation
        self.gate = PathGate(dim)
        self.attention_dropout = nn.Dropout(attention_dropout)
        #: beta [N, 2] (hohe, heho) of the last forward, detached, in input node order
        self.last_gate: Tensor | None = None

    def reset_parameters_uniform(self) -> None:
        """Every weight and bias U(-1/sqrt(d), 1/sqrt(d)), as their model's ``reset_parameters``."""
        bound = 1.0 / math.sqrt(self.dim)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, h: Tensor, edges: RelationEdges, types: TypeIndex, plan: LayerPlan | None = None) -> Tensor:
        """h^(l+1) [N, d]; with ``plan`` (``LayerPlan.build(..., AUTHORS_PLAN, out)``) its rows
        ``plan.out`` only, from the work those rows need."""
        if plan is not None:
            return self._forward_rows(h, plan)
        q = self.query(h, types)  # q = k = v
        he_alpha = _softmax(EdgeDot.apply(q, q, edges.he), edges.he)  # q_i . q_j, unscaled
        h_he = aggregate(self.attention_dropout(he_alpha), q, edges.he)  # phase 1 of he->ho
        ho_alpha = _softmax(self.homogeneous(h_he, edges), edges.ho)  # a_r . (h^he_i (.) h^he_j)
        out_heho = aggregate(self.attention_dropout(ho_alpha), q, edges.ho)  # non-invasive phase 2
        out_hohe = aggregate(self.attention_dropout(he_alpha), q, edges.he)  # item 5: no phase 2
        out, beta = self.gate(out_hohe, out_heho)
        self.last_gate = beta.detach()
        return out

    def _forward_rows(self, h: Tensor, plan: LayerPlan) -> Tensor:
        n, rows = h.shape[0], plan.inputs
        q = rows_of(self.query(take_rows(h, rows), plan.types_of(rows)), rows, n)
        he = plan.he_edges.he  # phase 1 of he->ho at the out rows and their sequence neighbours
        h_he = aggregate(self.attention_dropout(_softmax(EdgeDot.apply(q.index_select(0, plan.he_rows), q, he), he)), q, he)
        h_he_all = rows_of(h_he, plan.he_rows, n)
        ho, he_out = plan.out_edges.ho, plan.out_edges.he
        ho_alpha = _softmax(self.homogeneous(h_he.index_select(0, plan.out_in_he), plan.out_edges, h_he_all), ho)
        out_heho = aggregate(self.attention_dropout(ho_alpha), q, ho)
        he_alpha = _softmax(EdgeDot.apply(q.index_select(0, plan.out), q, he_out), he_out)
        out_hohe = aggregate(self.attention_dropout(he_alpha), q, he_out)  # item 5
        out, beta = self.gate(out_hohe, out_heho)
        self.last_gate = beta.detach()
        return out

