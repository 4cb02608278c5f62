"""Standard graph aggregators in place of HAN-GNN (paper section 5.2, Table 3; models/aggregators.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from mmsr_cli import contracts as C
from mmsr_cli import graphs
from mmsr_cli.errors import MmsrError
from mmsr_cli.runs import describe_experiment
from mmsr_cli.models.aggregators import (
    AGGREGATOR_NAMES,
    AGGREGATORS,
    RELATION_NAMES,
    BatchGraph,
    build_layers,
    edge_types,
    gat,
    gcn,
)
from mmsr_cli.models.base import ModalityInfo, ModelConfig
from mmsr_cli.models.layers import REL_IN, REL_OUT, HANLayer, RelationEdges, TypeIndex
from mmsr_cli.models.mmsr import MMSR
from mmsr_cli.workdir import DatasetDir

from conftest import assert_metrics_match_ranks, run_cli
from test_codes import blobs, write_features
from test_mmsr_model import D, N_ITEMS, SAMPLE_A, SAMPLE_B, collate, info

CONV_CLASS = {
    "gcn": "GCNConv", "sage": "SAGEConv", "gat": "GATConv", "transformer": "TransformerConv", "rgcn": "RGCNConv",
    "rgat": "RGATConv", "hgnn": "HeteroConv", "hgt": "HGTConv", "hgat": "HANConv",
}
RELATION_AWARE = {"rgcn", "rgat", "hgnn", "hgt", "hgat"}


def sorted_batch_graph(batch, n_types):
    """(edge_index, edge_rel, counts) with nodes sorted by type, as MMSR feeds its layers."""
    sorting = TypeIndex.build(batch["node_type"], n_types)
    edge_index = batch["edge_index"] if sorting.inverse is None else sorting.inverse[batch["edge_index"]]
    return edge_index, batch["edge_rel"], sorting.counts


def test_every_aggregator_is_listed_and_documented_in_the_cli_help(cli):
    assert set(CONV_CLASS) == set(AGGREGATORS) and AGGREGATOR_NAMES[0] == "han"
    assert RELATION_NAMES == graphs.RELATION_NAMES
    help_text = " ".join(cli(["train", "--help"]).stdout.split())
    for name in AGGREGATOR_NAMES:
        assert f" {name}" in help_text


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_each_aggregator_trains_behind_the_mmsr_interface(name):
    """Same encoder, last pooling and scores; L layers of the aggregator, each with its own weights;
    the loss reaches the code embeddings only through propagation (code nodes are never pooled).
    dim 32: at dim 8 ReLU between GCN layers can zero a node's whole state (dim > code_dim: the
    code projection of section 4.2 is used too)."""
    torch.manual_seed(0)
    m = MMSR(ModelConfig(dim=32, layers=2, dropout=0.0, aggregator=name), info())
    import torch_geometric.nn as pyg_nn

    assert len(m.layers) == 2 and all(isinstance(layer.conv, getattr(pyg_nn, CONV_CLASS[name])) for layer in m.layers)
    first, second = ({id(p) for p in layer.parameters()} for layer in m.layers)
    assert first and not first & second
    batch = collate([SAMPLE_A, SAMPLE_B], targets=[4, 6])
    user = m(batch)
    assert user.shape == (2, 32) and torch.isfinite(user).all()
    torch.testing.assert_close(m.score(batch), user @ m.item_embeddings().T)  # Eq. 7
    F.cross_entropy(m.score(batch), batch["target"]).backward()
    code_grad = m.encoder.code_embeddings[0].weight.grad
    assert code_grad is not None and code_grad.abs().sum(1).gt(0).all()  # codes 0, 1, 2 all in the batch
    for layer in m.layers:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    assert m.gate_values() == []  # the update gate is HAN-GNN's


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_relation_aware_aggregators_read_the_edge_relations(name):
    """Swapping IN and OUT labels changes rgcn/rgat/hgnn/hgt/hgat outputs, not the others'.

    Item 3 has two IN neighbours (1 and 2): hgat's relation types act only through its attention
    within an edge type (its semantic attention is shared by all edge types), which a single
    neighbour would not show."""
    torch.manual_seed(0)
    layer = build_layers(name, D, 2, 1)[0]
    codes = np.arange(N_ITEMS)[:, None] % 3
    batch = graphs.collate_histories([[1, 3, 4, 2, 3], [5, 6, 5, 7]], [ModalityInfo("a", 3, D, item_codes=codes)], N_ITEMS)
    edge_index, edge_rel, counts = sorted_batch_graph(batch, 2)
    h = torch.randn(sum(counts), D)
    swapped = edge_rel.clone()
    swapped[edge_rel == REL_IN], swapped[edge_rel == REL_OUT] = REL_OUT, REL_IN
    out = layer(h, BatchGraph(edge_index, edge_rel, counts))
    out_swapped = layer(h, BatchGraph(edge_index, swapped, counts))
    assert torch.allclose(out, out_swapped, atol=1e-6) == (name not in RELATION_AWARE)


def test_gcn_is_eq_8():
    """h_i = sigma(sum_{j in N_i} W h_j / sqrt(|N_i| |N_j|)) (+ bias), N_i with its self loop."""
    torch.manual_seed(0)
    layer = gcn(D, 2, activation=True)
    edge_index, edge_rel, counts = sorted_batch_graph(collate([SAMPLE_A]), 2)
    n = sum(counts)
    h = torch.randn(n, D)
    adjacency = torch.zeros(n, n)
    adjacency[edge_index[1], edge_index[0]] = 1.0  # row i: the j that i aggregates from
    deg = adjacency.sum(1)
    norm = adjacency / torch.sqrt(deg[:, None] * deg[None, :])
    expected = torch.relu(norm @ (h @ layer.conv.lin.weight.T) + layer.conv.bias)
    torch.testing.assert_close(layer(h, BatchGraph(edge_index, edge_rel, counts)), expected)


def test_gat_is_eq_9_to_11():
    """alpha_ij = sft(a^T [W h_i; W h_j] | N_i) with LeakyReLU(0.2); h_i = sum_j alpha_ij W h_j (+ bias)."""
    torch.manual_seed(0)
    layer = gat(D, 2, activation=False)
    edge_index, edge_rel, counts = sorted_batch_graph(collate([SAMPLE_A]), 2)
    n = sum(counts)
    h = torch.randn(n, D)
    wh = h @ layer.conv.lin.weight.T
    a_dst, a_src = layer.conv.att_dst.view(-1), layer.conv.att_src.view(-1)
    expected = torch.zeros(n, D)
    for i in range(n):
        js = edge_index[0, edge_index[1] == i]
        alpha = torch.softmax(F.leaky_relu(wh[i] @ a_dst + wh[js] @ a_src, 0.2), 0)  # Eq. 10-11
        expected[i] = alpha @ wh[js]  # Eq. 9
    expected += layer.conv.bias
    torch.testing.assert_close(layer(h, BatchGraph(edge_index, edge_rel, counts)), expected)


def test_typed_edges_equal_to_hetero_data():
    """BatchGraph's per-edge-type edge_index (built by one sort) equals graphs.to_hetero_data's."""
    rng = np.random.default_rng(0)
    codes_a = rng.integers(0, 4, (N_ITEMS, 2))
    codes_a[3] = -1  # item 3 lacks modality a
    mods = [ModalityInfo("a", 4, D, item_codes=codes_a), ModalityInfo("b", 3, D, item_codes=rng.integers(0, 3, (N_ITEMS, 1)))]
    batch = graphs.collate_histories([[1, 2, 3, 2], [4, 5], [6, 7, 8, 9, 1, 3]], mods, N_ITEMS)
    edge_index, edge_rel, counts = sorted_batch_graph(batch, 3)
    graph = BatchGraph(edge_index, edge_rel, counts)
    typed = graph.typed()
    data = graphs.to_hetero_data(batch, ["a", "b"])
    names = {"t0": "item", "t1": "a", "t2": "b"}
    assert set(typed) == set(edge_types(3)) and len(typed) == 4 * 3 + 3 * 2
    for (s, r, d), index in typed.items():
        torch.testing.assert_close(index, data[names[s], r, names[d]].edge_index)
    assert sum(v.shape[1] for v in typed.values()) == edge_index.shape[1] > 0
    assert set(graph.typed(self_loops=False)) == set(edge_types(3, self_loops=False))
    assert all(r != "self" for _, r, _ in graph.typed(self_loops=False))
    assert int((graph.without_self_loops()[1] == 0).sum()) == 0
    # every layer maps the type-sorted nodes to outputs in the same order and shape
    h = torch.randn(sum(counts), D)
    for name in AGGREGATORS:
        assert build_layers(name, D, 3, 1)[0](h, graph).shape == h.shape


def test_default_aggregator_is_han_gnn_unchanged():
    """The default builds HANLayers (fusion and invasive passed on) and composes them as before:
    encoder -> HAN-GNN layers over RelationEdges -> last pooling."""
    torch.manual_seed(0)
    config = ModelConfig(dim=D, layers=2, dropout=0.0, fusion="hohe", invasive=True)
    assert config.aggregator == "han"
    m = MMSR(config, info()).eval()
    assert all(isinstance(layer, HANLayer) for layer in m.layers) and len(m.layers) == 2
    assert all(layer.fusion == "hohe" and layer.invasive for layer in m.layers)
    batch = collate([SAMPLE_A])  # nodes already sorted by type
    counts = torch.bincount(batch["node_type"]).tolist()
    types = TypeIndex(None, None, counts)
    h = m.encoder(batch["node_type"], batch["node_ref"], batch["pos_index"], batch["pos_node"], types)
    edges = RelationEdges(batch["edge_index"], batch["edge_rel"], sum(counts))
    for layer in m.layers:
        h = layer(h, edges, types)
    torch.testing.assert_close(m(batch), h[batch["last_node"]])
    adaptive = MMSR(ModelConfig(dim=D, layers=2, dropout=0.0), info()).eval()
    adaptive(batch)
    assert len(adaptive.gate_values()) == 2


def test_model_refuses_unknown_aggregators_and_han_options_elsewhere():
    with pytest.raises(MmsrError, match="--aggregator: expected one of han, gcn"):
        MMSR(ModelConfig(dim=D, aggregator="graphormer"), info())
    with pytest.raises(MmsrError, match="^--fusion: only used by --aggregator han, not gat"):
        MMSR(ModelConfig(dim=D, aggregator="gat", fusion="hohe"), info())
    with pytest.raises(MmsrError, match="^--invasive, --attention-dropout: only used by --aggregator han, not gcn"):
        MMSR(ModelConfig(dim=D, aggregator="gcn", invasive=True, attention_dropout=0.2), info())
    with pytest.raises(MmsrError, match="not rgat"):
        MMSR(ModelConfig(dim=D, aggregator="rgat", invasive=True), info())
    with pytest.raises(ValueError):
        build_layers("han", D, 2, 2)


# ----------------------------------------------------------------------------------------------
# CLI, on the synthetic dataset (hand-made image features stand in for extract-features' CNN)


def synthetic_with_graphs(cli, workdir) -> DatasetDir:
    """The synthetic dataset preprocessed, with codes (c 4, k 2) of hand-made features and graphs."""
    ds = DatasetDir.open(workdir, "synthetic")
    for args in (["download", "--no-images"], ["preprocess"]):
        r = cli([args[0], "--workdir", workdir, "--dataset", "synthetic", *args[1:]])
        assert r.exit_code == 0, r.stderr
    n_items = pq.read_metadata(ds.path(C.ITEMS)).num_rows
    write_features(ds, "image", blobs(n_items, 16, 4, seed=0), missing={0, 1})
    for args in (["build-codes", "-c", "4", "-k", "2", "--epochs", "2", "--ae-dim", "8"], ["build-graphs"]):
        r = cli([args[0], "--workdir", workdir, "--dataset", "synthetic", *args[1:]])
        assert r.exit_code == 0, r.stderr
    return ds


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> DatasetDir:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return synthetic_with_graphs(run_cli, tmp_path_factory.mktemp("work"))
    finally:
        torch.set_num_threads(threads)


TINY = ["--epochs", "1", "--dim", "8", "--batch-size", "256", "--max-steps", "2", "--device", "cpu"]


def test_cli_trains_and_evaluates_mmsr_with_gcn(cli, synthetic):
    from mmsr_cli.runs import load_run

    base = ["--workdir", synthetic.workdir, "--dataset", "synthetic"]
    r = cli(["train", *base, "--model", "mmsr", "--aggregator", "gcn", *TINY])
    assert r.exit_code == 0, r.stderr
    folder = synthetic.path(f"{C.RUNS_DIR}/mmsr-gcn-loo-s0")  # the default name tells aggregators apart
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["aggregator"] == "gcn" and config["codes"]["image"]["clusters"] == 4
    assert describe_experiment(config).startswith("mmsr aggregator=gcn")
    r = cli(["evaluate", *base, "--run", "mmsr-gcn-loo-s0"])
    assert r.exit_code == 0, r.stderr
    assert_metrics_match_ranks(folder)
    loaded = load_run(synthetic, "mmsr-gcn-loo-s0")
    assert [type(layer.conv).__name__ for layer in loaded.model.layers] == ["GCNConv", "GCNConv"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--aggregator", "graphormer"], "--aggregator: expected one of han, gcn, sage"),
        (["--aggregator", "gcn", "--fusion", "hohe"], "--fusion: only used by --aggregator han, not gcn"),
        (["--aggregator", "hgt", "--invasive"], "--invasive: only used by --aggregator han, not hgt"),
        (["--model", "sasrec", "--aggregator", "gcn"], "--aggregator: not used by model sasrec"),
    ],
)
def test_bad_aggregator_options_are_one_line_errors(cli, tmp_path, args, needle):
    r = cli(["train", "--workdir", tmp_path, "--dataset", "toy", *args])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "toy").exists()


def test_rgat_node_table_equals_pygs_rgatconv():
    """The memory-safe RGAT (a table of x W_r per node and relation) is PyG's RGATConv: same weights,
    outputs and gradients; the parent gathers a d x d matrix per edge."""
    from torch_geometric.nn import RGATConv

    from mmsr_cli.models.aggregators import _node_table_rgat_class

    torch.manual_seed(0)
    n, e, dim, rels = 30, 200, 8, 7
    x = torch.randn(n, dim)
    edge_index = torch.randint(0, n, (2, e))
    edge_type = torch.randint(0, rels, (e,))
    ours = _node_table_rgat_class()(dim, dim, num_relations=rels, heads=1)
    pyg = RGATConv(dim, dim, num_relations=rels, heads=1)
    pyg.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ours.bias.normal_()
        pyg.bias.copy_(ours.bias)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = ours(xa, edge_index, edge_type), pyg(xb, edge_index, edge_type)
    torch.testing.assert_close(out_a, out_b)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, pyg.weight.grad)
    torch.testing.assert_close(ours.q.grad, pyg.q.grad)
