"""HAN-GNN layer (paper section 4.3.2) against hand computations on tiny hand-built graphs.

The manual references below loop over edges in plain Python, following Eq. 11-17 directly, so
they share no code with the vectorised layer.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmsr_cli.models import layers
from mmsr_cli.models.layers import (
    LayerPlan,
    FUSION_MODES,
    REL_BI,
    REL_HETERO,
    REL_IN,
    REL_OUT,
    REL_SELF,
    HANLayer,
    RelationEdges,
    TypedLinear,
    TypeIndex,
)

D = 4


def make_graph(edges: list[tuple[int, int, int]], node_type: list[int]):
    """edges as (source j, target i, relation); a self loop is added for every node."""
    n = len(node_type)
    edges = edges + [(v, v, REL_SELF) for v in range(n)]
    edge_index = torch.tensor([[j for j, _, _ in edges], [i for _, i, _ in edges]])
    edge_rel = torch.tensor([r for _, _, r in edges])
    return edge_index, edge_rel, torch.tensor(node_type)


def path_edges(a: int, b: int) -> list[tuple[int, int, int]]:
    """a transitions to b: b aggregates a (IN, a precedes b), a aggregates b (OUT)."""
    return [(a, b, REL_IN), (b, a, REL_OUT)]


# A history of three items 0 -> 1 -> 2, item 0 and 2 share the text code 3, item 1 has code 4,
# node 5 is a modality-2 code of item 2 only. Types: items 0, modality-1 codes 1, modality-2 code 2.
RICH_NODE_TYPE = [0, 0, 0, 1, 1, 2]
RICH_EDGES = (
    path_edges(0, 1)
    + path_edges(1, 2)
    + [(3, 4, REL_BI), (4, 3, REL_BI)]  # code 3 -> 4 -> 3: back and forth
    + [(0, 3, REL_HETERO), (3, 0, REL_HETERO), (2, 3, REL_HETERO), (3, 2, REL_HETERO)]
    + [(1, 4, REL_HETERO), (4, 1, REL_HETERO), (2, 5, REL_HETERO), (5, 2, REL_HETERO)]
    + [(3, 5, REL_HETERO), (5, 3, REL_HETERO)]
)


def setup_layer(fusion="adaptive", invasive=False, n_types=3, seed=0):
    torch.manual_seed(seed)
    layer = HANLayer(D, n_types, fusion=fusion, invasive=invasive)
    layer.eval()
    return layer


def graph_inputs(edges, node_type, n_types, seed=1):
    edge_index, edge_rel, types = make_graph(edges, node_type)
    torch.manual_seed(seed)
    h = torch.randn(len(node_type), D)
    return h, RelationEdges(edge_index, edge_rel, len(node_type)), TypeIndex.build(types, n_types), edge_index, edge_rel, types


# ---- manual references --------------------------------------------------------------------------


def proj(weight: torch.Tensor, h: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    return torch.stack([h[v] @ weight[int(types[v])] for v in range(len(h))])


def manual_scores(layer, state, edge_index, edge_rel, types, kind):
    """(i, j, e_ij) for every edge of the ``kind`` neighbourhood, Eq. 12 or Eq. 13."""
    out = []
    v = proj(layer.value.weight, state, types)
    q = proj(layer.query.weight, state, types)
    k = proj(layer.key.weight, state, types)
    for e in range(edge_index.shape[1]):
        j, i, r = int(edge_index[0, e]), int(edge_index[1, e]), int(edge_rel[e])
        if kind == "ho" and r in (REL_SELF, REL_IN, REL_OUT, REL_BI):
            out.append((i, j, float(layer.homogeneous.relation_vectors[r] @ (v[i] * v[j]))))  # Eq. 12
        if kind == "he" and r in (REL_SELF, REL_HETERO):
            out.append((i, j, float(q[j] @ k[i]) / math.sqrt(D)))  # Eq. 13
    return out


def manual_aggregate(layer, score_state, value_state, edge_index, edge_rel, types, kind):
    """Eq. 14 with sft of Eq. 11 (LeakyReLU 0.2, softmax over the neighbourhood N_i)."""
    scores = manual_scores(layer, score_state, edge_index, edge_rel, types, kind)
    values = proj(layer.value.weight, value_state, types)
    out = torch.zeros_like(value_state)
    for i in range(len(value_state)):
        mine = [(j, F.leaky_relu(torch.tensor(e), 0.2)) for t, j, e in scores if t == i]
        z = sum(torch.exp(e) for _, e in mine)
        for j, e in mine:
            out[i] += torch.exp(e) / z * values[j]
    return out


# ---- tests --------------------------------------------------------------------------------------


def test_typed_linear_uses_each_nodes_type_weight_in_any_node_order():
    """Forward and gradients (its own backward: products written into blocks) equal a per-node
    loop, nodes sorted by type or not, with a type that has no node (its matrix: zero gradient)."""
    torch.manual_seed(0)
    lin = TypedLinear(4, D, 5)
    types = torch.tensor([2, 0, 1, 0, 2, 1])  # no node of type 3
    x = torch.randn(6, D, requires_grad=True)
    upstream = torch.randn(6, 5)
    expected = torch.stack([x[v] @ lin.weight[int(types[v])] for v in range(6)])
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [x, lin.weight])
    got = lin(x, TypeIndex.build(types, 4))
    torch.testing.assert_close(got, expected)
    for g, e in zip(torch.autograd.grad((got * upstream).sum(), [x, lin.weight]), expected_grads):
        torch.testing.assert_close(g, e)
    assert float(expected_grads[1][3].abs().max()) == 0.0
    with pytest.raises(ValueError, match="cover 5 rows, the input has 6"):  # never uninitialised rows
        lin(x, TypeIndex(None, None, [2, 2, 1, 0]))
    order = torch.argsort(types, stable=True)
    got = lin(x[order], TypeIndex.build(types[order], 4))
    torch.testing.assert_close(got, expected[order])
    for g, e in zip(torch.autograd.grad((got * upstream[order]).sum(), [x, lin.weight]), expected_grads):
        torch.testing.assert_close(g, e)


def test_homogeneous_scores_eq12_on_a_three_node_path():
    layer = setup_layer(n_types=1)
    h, edges, types, edge_index, edge_rel, node_type = graph_inputs(path_edges(0, 1) + path_edges(1, 2), [0, 0, 0], 1)
    v = layer.value(h, types)
    got = layer.homogeneous(v, edges).detach()
    a = layer.homogeneous.relation_vectors.detach()
    vm = (h @ layer.value.weight[0]).detach()
    for e in range(edges.ho_index.shape[1]):
        j, i, r = (int(x) for x in (edges.ho_index[0, e], edges.ho_index[1, e], edges.ho_rel[e]))
        expected = sum(float(a[r, c] * vm[i, c] * vm[j, c]) for c in range(D))
        assert float(got[e]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # each relation uses its own vector: IN and OUT scores of the symmetric pair (0, 1) differ
    e_in = [e for e in range(edges.ho_index.shape[1]) if int(edges.ho_rel[e]) == REL_IN][0]
    i, j = int(edges.ho_index[1, e_in]), int(edges.ho_index[0, e_in])
    e_out = [e for e in range(edges.ho_index.shape[1]) if (int(edges.ho_index[1, e]), int(edges.ho_index[0, e])) == (j, i)][0]
    assert int(edges.ho_rel[e_out]) == REL_OUT and float(got[e_in]) != pytest.approx(float(got[e_out]))


def test_heterogeneous_scores_eq13_query_from_neighbour_key_from_target():
    layer = setup_layer()
    h, edges, types, edge_index, edge_rel, node_type = graph_inputs(RICH_EDGES, RICH_NODE_TYPE, 3)
    got = layer.heterogeneous(layer.query(h, types), layer.key(h, types), edges).detach()
    expected = {(i, j): score for i, j, score in manual_scores(layer, h, edge_index, edge_rel, node_type, "he")}
    assert len(expected) == edges.he_index.shape[1]
    for e in range(edges.he_index.shape[1]):
        i, j = int(edges.he_index[1, e]), int(edges.he_index[0, e])
        assert float(got[e]) == pytest.approx(expected[(i, j)], rel=1e-5, abs=1e-6)
    # queries, keys and values are different projections (not Q = K = V)
    assert not torch.allclose(layer.query.weight, layer.key.weight)
    assert not torch.allclose(layer.key.weight, layer.value.weight)


def test_softmax_sums_to_one_over_exactly_each_neighbourhood():
    layer = setup_layer()
    # node 6: an item with no transition and no modality node: only its self loop
    h, edges, types, edge_index, edge_rel, node_type = graph_inputs(RICH_EDGES, RICH_NODE_TYPE + [0], 3)
    for kind, index in (("ho", edges.ho_index), ("he", edges.he_index)):
        alpha = layer.attention(h, edges, types, kind)
        assert alpha.shape == (index.shape[1],) and bool((alpha > 0).all())
        sums = torch.zeros(len(h)).index_add_(0, index[1], alpha)
        torch.testing.assert_close(sums, torch.ones(len(h)))
        lone = (index[1] == 6).nonzero().flatten()
        assert len(lone) == 1 and int(index[0, lone[0]]) == 6 and float(alpha[lone[0]]) == pytest.approx(1.0)
    # the neighbourhoods respect node types: homogeneous edges join equal types, heterogeneous
    # ones different types (or the self loop)
    same = node_type[edges.ho_index[0]] == node_type[edges.ho_index[1]]
    assert bool(same.all())
    he_src, he_dst = edges.he_index
    assert bool(((node_type[he_src] != node_type[he_dst]) | (he_src == he_dst)).all())
    # node 1's homogeneous set is {0, 1, 2}, its heterogeneous set {1, 4}
    assert sorted(edges.ho_index[0, edges.ho_index[1] == 1].tolist()) == [0, 1, 2]
    assert sorted(edges.he_index[0, edges.he_index[1] == 1].tolist()) == [1, 4]


@pytest.mark.parametrize("kind", ["ho", "he"])
def test_single_phase_aggregation_eq14_equals_manual(kind):
    layer = setup_layer(fusion=kind)
    h, edges, types, edge_index, edge_rel, node_type = graph_inputs(RICH_EDGES, RICH_NODE_TYPE, 3)
    expected = manual_aggregate(layer, h, h, edge_index, edge_rel, node_type, kind)
    torch.testing.assert_close(layer(h, edges, types), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ["hohe", "heho"])
def test_phase_two_values_non_invasive_vs_invasive(order):
    first, second = ("ho", "he") if order == "hohe" else ("he", "ho")
    outputs = {}
    for invasive in (False, True):
        layer = setup_layer(fusion=order, invasive=invasive)
        h, edges, types, edge_index, edge_rel, node_type = graph_inputs(RICH_EDGES, RICH_NODE_TYPE, 3)
        mid = manual_aggregate(layer, h, h, edge_index, edge_rel, node_type, first)  # phase 1
        # phase 2: scores from the intermediate state; values from h^(l) unless invasive
        expected = manual_aggregate(layer, mid, mid if invasive else h, edge_index, edge_rel, node_type, second)
        outputs[invasive] = layer(h, edges, types)
        torch.testing.assert_close(outputs[invasive], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[False], outputs[True])


@pytest.mark.parametrize("favoured, bias", [("hohe", (50.0, -50.0)), ("heho", (-50.0, 50.0))])
def test_gate_forced_to_one_path_gives_that_path(favoured, bias):
    layer = setup_layer("adaptive")
    with torch.no_grad():
        layer.gate.mlp[-1].weight.zero_()
        layer.gate.mlp[-1].bias.copy_(torch.tensor(bias))
    single = setup_layer(favoured, seed=99)
    missing, unexpected = single.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and all(k.startswith("gate.") for k in unexpected)
    h, edges, types, *_ = graph_inputs(RICH_EDGES, RICH_NODE_TYPE, 3)
    torch.testing.assert_close(layer(h, edges, types), single(h, edges, types))
    beta = layer.last_gate
    assert beta.shape == (len(h), 2)
    torch.testing.assert_close(beta.sum(1), torch.ones(len(h)))
    assert bool((beta[:, 0 if favoured == "hohe" else 1] > 0.999).all())


def test_adaptive_gate_mixes_both_orders():
    layer = setup_layer("adaptive")
    h, edges, types, *_ = graph_inputs(RICH_EDGES, RICH_NODE_TYPE, 3)
    out = layer(h, edges, types)
    paths = {}
    for order in ("hohe", "heho"):
        single = setup_layer(order)
        single.load_state_dict(layer.state_dict(), strict=False)
        paths[order] = single(h, edges, types)
    beta = layer.last_gate
    torch.testing.assert_close(out, beta[:, :1] * paths["hohe"] + beta[:, 1:] * paths["heho"])  # Eq. 17
    expected_beta = torch.softmax(layer.gate.mlp(torch.cat([paths["hohe"], paths["heho"]], 1)), 1)  # Eq. 16
    torch.testing.assert_close(beta, expected_beta)


def test_synchronous_fusion_eq15():
    layer = setup_layer("synchronous")
    h, edges, types, edge_index, edge_rel, node_type = graph_inputs(RICH_EDGES, RICH_NODE_TYPE, 3)
    h_ho = manual_aggregate(layer, h, h, edge_index, edge_rel, node_type, "ho")
    h_he = manual_aggregate(layer, h, h, edge_index, edge_rel, node_type, "he")
    expected = layer.synchronous(torch.cat([h_ho, h_he], 1))
    torch.testing.assert_close(layer(h, edges, types), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_every_fusion_mode_runs_and_backpropagates(fusion):
    layer = setup_layer(fusion)
    layer.train()
    h, edges, types, *_ = graph_inputs(RICH_EDGES, RICH_NODE_TYPE, 3)
    h.requires_grad_(True)
    out = layer(h, edges, types)
    assert out.shape == h.shape and bool(torch.isfinite(out).all())
    out.square().sum().backward()
    assert h.grad is not None and float(h.grad.abs().sum()) > 0


def test_ho_ignores_heterogeneous_edges_and_he_ignores_homogeneous_ones():
    h, edges, types, edge_index, edge_rel, node_type = graph_inputs(RICH_EDGES, RICH_NODE_TYPE, 3)
    no_hetero = [e for e in RICH_EDGES if e[2] != REL_HETERO]
    no_homo = [e for e in RICH_EDGES if e[2] == REL_HETERO]
    _, edges_no_hetero, *_ = graph_inputs(no_hetero, RICH_NODE_TYPE, 3)
    _, edges_no_homo, *_ = graph_inputs(no_homo, RICH_NODE_TYPE, 3)
    ho, he = setup_layer("ho"), setup_layer("he")
    torch.testing.assert_close(ho(h, edges, types), ho(h, edges_no_hetero, types))
    torch.testing.assert_close(he(h, edges, types), he(h, edges_no_homo, types))
    # ... while each does see its own relation set
    assert not torch.allclose(ho(h, edges, types), ho(h, edges_no_homo, types))
    assert not torch.allclose(he(h, edges, types), he(h, edges_no_hetero, types))


def test_item_only_graph_without_heterogeneous_neighbours():
    layer = setup_layer("adaptive", n_types=1)
    h, edges, types, *_ = graph_inputs(path_edges(0, 1) + path_edges(1, 2), [0, 0, 0], 1)
    alpha = layer.attention(h, edges, types, "he")
    torch.testing.assert_close(alpha, torch.ones(3))  # each node attends only to itself
    out = layer(h, edges, types)
    assert out.shape == (3, D) and bool(torch.isfinite(out).all())


def test_unknown_fusion_and_out_of_range_type_are_refused():
    with pytest.raises(ValueError, match="fusion"):
        HANLayer(D, 2, fusion="late")
    with pytest.raises(ValueError, match="node type 3"):
        TypeIndex.build(torch.tensor([0, 3]), 3)


def test_sparse_attention_kernels_have_exact_gradients():
    """The CSR kernels (sampled products for scores, sparse matmul for Eq. 14) pass gradcheck."""
    torch.manual_seed(0)
    layer = HANLayer(3, 3, fusion="adaptive").double()
    edge_index, edge_rel, node_type = make_graph(RICH_EDGES, RICH_NODE_TYPE)
    edges = RelationEdges(edge_index, edge_rel, len(RICH_NODE_TYPE))
    types = TypeIndex.build(node_type, 3)
    h = torch.randn(len(RICH_NODE_TYPE), 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x, edges, types), (h,))
    # Eq. 12's scores over the stacked relation graph, also in the relation vectors a_r
    a = layer.homogeneous.relation_vectors.detach().clone().requires_grad_(True)
    x, y = torch.randn_like(h, requires_grad=True), torch.randn_like(h, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, r: layers._HomogeneousScores.apply(x, y, r, edges), (x, y, a))
    params = [layer.homogeneous.relation_vectors, layer.query.weight]
    grads = torch.autograd.grad(layer(h, edges, types).square().sum(), params)
    assert all(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("fusion", FUSION_MODES)
@pytest.mark.parametrize("invasive", [False, True])
def test_layer_plan_computes_some_rows_exactly(fusion, invasive):
    """A layer asked for some rows only (LayerPlan: last pooling reads one node per graph) gives
    those rows of the full output, with the same gradients, and reads only ``plan.inputs``."""
    torch.manual_seed(0)
    layer = HANLayer(D, 3, fusion=fusion, invasive=invasive).double()
    node_type = RICH_NODE_TYPE + [0]  # node 6: an item with only its self loop
    edge_index, edge_rel, nt = make_graph(RICH_EDGES, node_type)
    order = torch.argsort(nt, stable=True)  # the model sorts nodes by type first
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    edges = RelationEdges(inverse[edge_index], edge_rel, len(node_type))
    types = TypeIndex.build(nt[order], 3)
    h = torch.randn(len(node_type), D, dtype=torch.double, requires_grad=True)
    full = layer(h, edges, types)
    for out in (torch.tensor([2, 0]), torch.tensor([6]), torch.arange(len(node_type))):
        plan = LayerPlan.build(edges, types, fusion, out)
        got = layer(h, edges, types, plan)
        torch.testing.assert_close(got, full[out], rtol=1e-12, atol=1e-12)
        weights = torch.randn_like(got)
        grads = torch.autograd.grad((got * weights).sum(), [h, *layer.parameters()], allow_unused=True)
        expected = torch.autograd.grad((full[out] * weights).sum(), [h, *layer.parameters()], retain_graph=True, allow_unused=True)
        for g, e in zip(grads, expected):
            if e is None or g is None:
                assert (g is None or float(g.abs().max()) == 0) and (e is None or float(e.abs().max()) == 0)
            else:
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
        # rows of h outside plan.inputs are never read: NaN there
        # changes nothing, in the output or in the gradients of the rows that are read
        unread = torch.ones(len(node_type), dtype=torch.bool)
        unread[plan.inputs] = False
        changed = h.detach().clone()
        changed[unread] = float("nan")
        changed.requires_grad_(True)
        again = layer(changed, edges, types, plan)
        torch.testing.assert_close(again, got.detach(), rtol=1e-12, atol=1e-12)
        grad_h = torch.autograd.grad((again * weights).sum(), changed)[0]
        torch.testing.assert_close(grad_h[~unread], grads[0][~unread], rtol=1e-12, atol=1e-12)
        assert not bool(torch.isnan(grad_h).any())
    single = LayerPlan.build(edges, types, fusion, torch.tensor([6]))
    assert len(single.inputs) < len(node_type)  # a lone node reads less than the whole graph


def test_dropout_keeps_each_entry_with_probability_1_minus_p_scaled():
    from mmsr_cli.models.layers import Dropout

    torch.manual_seed(0)
    drop = Dropout(0.3)
    x = torch.ones(200, 500, requires_grad=True)
    out = drop(x)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.7) < 0.005  # 100k draws: the binomial sd is 0.0015
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.7))
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)  # the gradient goes through the kept entries only
    torch.manual_seed(0)
    assert torch.equal(Dropout(0.3)(torch.ones(200, 500)), out.detach())  # seeded: the same mask
    drop.eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(40,), (40, 3)])
def test_scatter_softmax_and_mean_equal_pyg_bit_for_bit(shape):
    """layers.scatter_softmax / scatter_mean replace torch_geometric.utils.softmax / scatter(mean)
    (PyG's import costs every command ~2 s): the same values and gradients, bit for bit, with
    empty groups (mean 0) and groups of one."""
    from torch_geometric.utils import scatter, softmax

    from mmsr_cli.models.layers import scatter_mean, scatter_softmax

    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 12, (shape[0],), generator=g)
    index[index == 5] = 6  # group 5 empty
    x = (torch.randn(shape, generator=g) * 10).requires_grad_()
    ours, theirs = scatter_softmax(x, index, 14), softmax(x, index, num_nodes=14)
    assert torch.equal(ours, theirs)
    w = torch.randn(shape, generator=g)
    (ga,) = torch.autograd.grad((ours * w).sum(), x)
    (gb,) = torch.autograd.grad((theirs * w).sum(), x)
    assert torch.equal(ga, gb)
    sums = torch.zeros(14, *shape[1:]).index_add_(0, index, ours.detach())
    filled = sums[torch.bincount(index, minlength=14) > 0]
    assert filled.shape[0] == 11 and torch.allclose(filled, torch.ones_like(filled))
    mean = scatter_mean(x.detach(), index, 14)
    assert torch.equal(mean, scatter(x.detach(), index, 0, 14, "mean"))
    assert torch.equal(mean[5], torch.zeros(shape[1:])) and torch.equal(mean[13], torch.zeros(shape[1:]))


def test_sparse_mm_equals_the_product_with_empty_rows_and_strided_operands():
    """layers.sparse_mm (the CSR product written into a fresh, unfilled output) gives ``@``'s
    result exactly: rows without edges are zeros, not the new buffer's contents, and a strided
    dense operand (a column slice, as the stacked relations' backward passes) is read right."""
    torch.manual_seed(0)
    row, col = torch.tensor([0, 0, 2, 2, 2, 4]), torch.tensor([1, 3, 0, 2, 3, 4])
    graph = layers.CsrGraph(row, col, 6, 5)  # rows 1, 3 and 5 have no edges
    values = torch.randn(len(row))
    wide = torch.randn(5, 14)
    for dense in (wide[:, :7], wide[:, ::2], wide[:, :7].contiguous()):
        matrix = graph.matrix(values)
        out = layers.sparse_mm(matrix, dense)
        assert out.is_contiguous() and torch.equal(out, matrix @ dense)
        assert torch.equal(out[[1, 3, 5]], torch.zeros(3, 7))


def test_union_is_the_sorted_distinct_ids_of_its_parts():
    """layers._union (the rows of a layer plan) gives torch.unique's answer: sorted, no repeats,
    nothing outside the parts, with repeated and empty parts."""
    generator = torch.Generator().manual_seed(0)
    n = 50
    parts = [torch.randint(0, n, (k,), generator=generator) for k in (30, 0, 7, 30)]
    parts.append(parts[0][:5])
    got = layers._union(n, *parts)
    assert got.dtype == torch.long and torch.equal(got, torch.unique(torch.cat(parts)))
    assert layers._union(n, torch.empty(0, dtype=torch.long)).numel() == 0


def test_rows_of_and_take_rows_skip_copies_only_for_every_row_in_order():
    """A plan's row set covering every node in order is the identity (no copy, x itself); every
    row in another order (a batch of one-node graphs, whose pooled rows are in sample order) is
    still a permutation."""
    x = torch.arange(12.0).view(4, 3)
    in_order, permuted = torch.arange(4), torch.tensor([2, 0, 3, 1])
    assert layers.rows_of(x, in_order, 4) is x and layers.take_rows(x, in_order) is x
    placed = layers.rows_of(x, permuted, 4)
    assert torch.equal(placed[permuted], x)
    assert torch.equal(layers.take_rows(x, permuted), x[permuted])
    assert torch.equal(layers.rows_of(x[:2], torch.tensor([1, 3]), 4)[[0, 2]], torch.zeros(2, 3))
