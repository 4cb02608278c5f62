"""The authors' HAN-GNN (han_authors.py) against a plain-loop reading of their published layer.

The reference follows their ``HeteAttenLayer`` with ``fusion_type: asy_mask`` step by step on a
tiny graph, one node and one neighbour at a time, sharing no code with the vectorised layer.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmsr_cli.errors import MmsrError
from mmsr_cli.models.base import ModelConfig
from mmsr_cli.models.han_authors import AuthorsHANLayer
from mmsr_cli.models.layers import REL_HETERO, REL_SELF, RelationEdges, TypeIndex
from mmsr_cli.models.mmsr import MMSR
from test_layers import RICH_EDGES, RICH_NODE_TYPE, make_graph
from test_mmsr_model import SAMPLE_A, SAMPLE_B, collate, info

D = 4
HETEROGENEOUS = (REL_SELF, REL_HETERO)


def reference(layer: AuthorsHANLayer, h, edge_index, edge_rel, node_type):
    """(output, hohe weights, heho weights, he->ho second-phase weights) by hand, eval mode."""
    W, a = layer.query.weight.detach(), layer.homogeneous.relation_vectors.detach()
    n = h.shape[0]
    q = torch.stack([h[i] @ W[node_type[i]] for i in range(n)])
    edges = [(int(j), int(i), int(r)) for (j, i), r in zip(edge_index.T, edge_rel)]

    def softmax_over(i, kind, score):
        nbrs = [(j, r) for j, t, r in edges if t == i and ((r in HETEROGENEOUS) if kind == "he" else r != REL_HETERO)]
        s = torch.stack([F.leaky_relu(score(j, r), 0.1) for j, r in nbrs])  # their alpha = 0.1
        return [j for j, _ in nbrs], torch.softmax(s, 0)

    he = [softmax_over(i, "he", lambda j, r, i=i: q[i] @ q[j]) for i in range(n)]  # no 1/sqrt(d)
    h_he = torch.stack([sum(w * q[j] for j, w in zip(*he[i])) for i in range(n)])
    ho = [softmax_over(i, "ho", lambda j, r, i=i: a[r] @ (h_he[i] * h_he[j])) for i in range(n)]
    heho = torch.stack([sum(w * q[j] for j, w in zip(*ho[i])) for i in range(n)])  # values q: non-invasive
    hohe = h_he  # their second phase of ho->he re-runs the first he aggregation
    mlp = layer.gate.mlp
    s = torch.stack([mlp(hohe).squeeze(-1), mlp(heho).squeeze(-1)], -1)  # one MLP scores each path
    beta = torch.softmax(s, -1)
    return beta[:, :1] * hohe + beta[:, 1:] * heho, beta


def setup(attention_dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = AuthorsHANLayer(D, 3, attention_dropout)
    layer.reset_parameters_uniform()
    edge_index, edge_rel, types = make_graph(list(RICH_EDGES), RICH_NODE_TYPE)
    torch.manual_seed(seed + 1)
    h = torch.randn(len(RICH_NODE_TYPE), D)
    edges = RelationEdges(edge_index, edge_rel, len(RICH_NODE_TYPE))
    return layer, h, edges, TypeIndex.build(types, 3), (edge_index, edge_rel, types)


def test_layer_equals_their_computation_by_hand():
    layer, h, edges, types, raw = setup()
    out = layer.eval()(h, edges, types)
    want, beta = reference(layer, h, *raw)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.last_gate, beta.detach(), rtol=1e-5, atol=1e-6)


def test_keys_and_values_are_the_query_projection():
    layer, h, edges, types, raw = setup()
    names = {name for name, _ in layer.named_parameters()}
    assert not any(name.startswith(("key", "value")) for name in names)
    # changing W_Q of item nodes changes the output; there is nothing else to project with
    before = layer.eval()(h, edges, types)
    with torch.no_grad():
        layer.query.weight[0] *= 2
    assert not torch.allclose(before, layer(h, edges, types))


def test_attention_dropout_is_off_in_eval_and_on_in_training():
    layer, h, edges, types, _ = setup(attention_dropout=0.5)
    eval_out = layer.eval()(h, edges, types)
    torch.testing.assert_close(eval_out, reference(layer, h, *setup()[4])[0], rtol=1e-5, atol=1e-6)
    torch.manual_seed(3)
    train_out = layer.train()(h, edges, types)
    assert not torch.allclose(train_out, eval_out)
    no_drop, *_ = setup(attention_dropout=0.0)
    torch.testing.assert_close(no_drop.train()(h, edges, types), eval_out, rtol=1e-5, atol=1e-6)


def _authors(dropout=0.0, attention_dropout=0.0, layers=1):
    torch.manual_seed(0)
    config = ModelConfig(dim=8, layers=layers, dropout=dropout, variant="authors", attention_dropout=attention_dropout)
    return MMSR(config, info())


def test_authors_init_every_table_uniform_and_codes_min_max_scaled():
    m = _authors()
    bound = 1 / math.sqrt(8)
    codes = m.encoder.code_embeddings[0].weight
    for name, p in m.named_parameters():
        assert p.abs().max() <= bound + 1e-7, name
    assert m.encoder.merge.bias is None
    torch.testing.assert_close(codes.min(), torch.tensor(-bound))
    torch.testing.assert_close(codes.max(), torch.tensor(bound))
    # directions of the centres within the min-max map: an affine map of the centre matrix
    centres = info().modalities[0].centres
    scaled = (centres - centres.min()) / (centres.max() - centres.min()) * 2 * bound - bound
    torch.testing.assert_close(codes.detach(), scaled)


def test_authors_layers_share_one_set_of_weights():
    m = _authors(layers=3)
    assert m.layers[0] is m.layers[1] is m.layers[2]
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in _authors(layers=1).parameters())
    assert len(m.gate_values() or [None]) >= 1


def test_authors_dropout_after_the_last_layer_and_not_on_the_input():
    """With attention dropout off, a training forward is exactly dropout(eval forward): nothing is
    dropped before the layer, and the user vector itself is dropped."""
    p = 0.5
    m = _authors(dropout=p)
    batch = collate([SAMPLE_A, SAMPLE_B])
    want = m.eval()(batch)
    torch.manual_seed(1)
    got = m.train()(batch)
    dropped = got == 0
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(got[~dropped], want[~dropped] / (1 - p))


def test_paper_variant_drops_the_input_not_the_user_vector():
    torch.manual_seed(0)
    m = MMSR(ModelConfig(dim=8, layers=1, dropout=0.5), info())
    batch = collate([SAMPLE_A, SAMPLE_B])
    torch.manual_seed(1)
    got = m.train()(batch)
    assert not (got == 0).any()
    assert not torch.allclose(got, m.eval()(batch))


@pytest.mark.parametrize("option", [dict(fusion="hohe"), dict(invasive=True), dict(aggregator="gcn"), dict(feed_forward=True)])
def test_authors_variant_refuses_the_paper_ablations(option):
    with pytest.raises(MmsrError, match="--variant authors"):
        MMSR(ModelConfig(dim=8, variant="authors", **option), info())


def test_unknown_variant_is_refused():
    with pytest.raises(MmsrError, match="--variant"):
        MMSR(ModelConfig(dim=8, variant="author"), info())


@pytest.mark.parametrize("layers", [1, 2])
def test_pooled_forward_equals_every_node_and_has_the_same_gradients(layers):
    """Scoring computes the authors' layer for the rows last pooling reads (LayerPlan): the user
    vectors and every gradient equal those of the layer run over every node."""
    torch.manual_seed(0)
    m = MMSR(ModelConfig(dim=D, layers=layers, dropout=0.0, variant="authors", attention_dropout=0.0), info()).double()
    batch = collate([SAMPLE_B, SAMPLE_A, SAMPLE_A], targets=[1, 2, 3])
    params = list(m.parameters())
    pooled = m(batch)
    grads = torch.autograd.grad(F.cross_entropy(pooled @ m.item_embeddings().T, batch["target"]), params, allow_unused=True)
    m.every_node = True
    full = m(batch)
    expected = torch.autograd.grad(F.cross_entropy(full @ m.item_embeddings().T, batch["target"]), params, allow_unused=True)
    torch.testing.assert_close(pooled, full, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected):
        if e is None:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
