"""MSGraph construction and batching (mmsr_cli/graphs.py, `mmsr build-graphs`).

Graphs are compared in a canonical form keyed by (node type, ref) so expectations read like the
paper's figure: ``I(a)`` is item a, ``M(1, c)`` code c of the first modality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmsr_cli import contracts as C
from mmsr_cli import graphs as G
from mmsr_cli.errors import MmsrError
from mmsr_cli.graphs import REL_BI, REL_HETERO, REL_IN, REL_OUT, REL_SELF, GraphSplit, build_msgraphs
from mmsr_cli.models.base import ModalityInfo
from mmsr_cli.workdir import DatasetDir, write_parquet_atomic


def I(item):  # noqa: E743 - item node key
    return (0, item)


def M(modality, code):  # code node key of modality number ``modality`` (1-based)
    return (modality, code)


# ----------------------------------------------------------------------------------------------
# Canonical forms


def canon_stored(arrays: G.GraphArrays, s: int) -> dict:
    g = arrays.graph(s)
    keys = [(int(t), int(r)) for t, r in zip(g["node_type"], g["node_ref"])]
    src, dst = g["edge_index"]
    edges = [(keys[j], keys[i], int(r)) for j, i, r in zip(src, dst, g["edge_rel"])]
    return {
        "nodes": keys,
        "positions": {k: tuple(int(p) for p in ps) for k, ps in zip(keys, g["positions"])},
        "edges": sorted(edges),
        "n_edges": len(edges),
        "last": keys[int(g["last_node"])],
    }


def canon_batch(batch: dict, g: int) -> dict:
    ids = (batch["node_graph"] == g).nonzero().view(-1).tolist()
    key = {n: (int(batch["node_type"][n]), int(batch["node_ref"][n])) for n in ids}
    src, dst = batch["edge_index"].tolist()
    edges = [(key[j], key[i], int(r)) for j, i, r in zip(src, dst, batch["edge_rel"].tolist()) if i in key]
    assert all(j in key for j, i in zip(src, dst) if i in key), "edge crosses graphs"
    positions = {key[n]: [] for n in ids}
    for p, n in zip(batch["pos_index"].tolist(), batch["pos_node"].tolist()):
        if n in key:
            positions[key[n]].append(p)
    return {
        "nodes": [key[n] for n in ids],
        "positions": {k: tuple(v) for k, v in positions.items()},
        "edges": sorted(edges),
        "n_edges": len(edges),
        "last": key[int(batch["last_node"][g])],
    }


def reference_graph(history: list[int], item_codes: list[np.ndarray]) -> dict:
    """Straightforward per-sample construction, written from the rules in the module docstring."""

    def codes_of(m, item):
        return [int(c) for c in item_codes[m][item] if c >= 0]

    nodes = sorted({I(v) for v in history})
    for m in range(len(item_codes)):
        nodes += sorted({M(m + 1, c) for v in set(history) for c in codes_of(m, v)})
    n = len(history)
    positions: dict = {k: set() for k in nodes}
    for t, v in enumerate(history):
        positions[I(v)].add(n - 1 - t)
        for m in range(len(item_codes)):
            for c in codes_of(m, v):
                positions[M(m + 1, c)].add(n - 1 - t)
    forward = set()
    for a, b in zip(history, history[1:]):
        if a != b:
            forward.add((I(a), I(b)))
        for m in range(len(item_codes)):
            for ca in codes_of(m, a):
                for cb in codes_of(m, b):
                    if ca != cb:
                        forward.add((M(m + 1, ca), M(m + 1, cb)))
    edges = {}
    for a, b in forward:
        if (b, a) in forward:
            edges[(a, b)] = REL_BI
        else:
            edges[(a, b)] = REL_IN  # b aggregates from its predecessor a
            edges[(b, a)] = REL_OUT  # a aggregates from its successor b
    for v in set(history):
        for m in range(len(item_codes)):
            for c in codes_of(m, v):
                edges[(I(v), M(m + 1, c))] = edges[(M(m + 1, c), I(v))] = REL_HETERO
                for m2 in range(len(item_codes)):
                    if m2 != m:
                        for c2 in codes_of(m2, v):
                            edges[(M(m + 1, c), M(m2 + 1, c2))] = REL_HETERO
    for k in nodes:
        edges[(k, k)] = REL_SELF
    return {
        "nodes": nodes,
        "positions": {k: tuple(sorted(v)) for k, v in positions.items()},
        "edges": sorted((s, d, r) for (s, d), r in edges.items()),
        "n_edges": len(edges),
        "last": I(history[-1]),
    }


def build(histories: list[list[int]], item_codes: list[np.ndarray], n_items: int, **kw) -> G.GraphArrays:
    flat = np.array([v for h in histories for v in h], dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    return build_msgraphs(flat, ptr, item_codes, n_items, **kw)


A, B, Cc, D = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------
# Hand-computed graphs


def test_repeat_a_b_a_is_back_and_forth_with_positions_from_the_end():
    g = canon_stored(build([[A, B, A]], [], 4), 0)
    assert g["nodes"] == [I(A), I(B)]  # a repeated item is one node
    assert g["positions"] == {I(A): (0, 2), I(B): (1,)}
    assert g["edges"] == sorted(
        [(I(A), I(A), REL_SELF), (I(B), I(B), REL_SELF), (I(A), I(B), REL_BI), (I(B), I(A), REL_BI)]
    )
    assert g["last"] == I(A)


def test_one_way_transitions_are_in_and_out_and_a_repeat_is_no_self_transition():
    # A B B C: B -> B is a repeat, not a transition; A -> B and B -> C are one-way.
    g = canon_stored(build([[A, B, B, Cc]], [], 4), 0)
    assert g["nodes"] == [I(A), I(B), I(Cc)]
    assert g["positions"] == {I(A): (3,), I(B): (1, 2), I(Cc): (0,)}
    homo = [e for e in g["edges"] if e[2] != REL_SELF]
    assert homo == sorted(
        [
            (I(A), I(B), REL_IN),  # B aggregates from A, which precedes it
            (I(B), I(A), REL_OUT),  # A aggregates from B, which follows it
            (I(B), I(Cc), REL_IN),
            (I(Cc), I(B), REL_OUT),
        ]
    )
    assert g["last"] == I(Cc)


def test_bi_only_for_the_pair_that_goes_both_ways():
    # A B A C: A-B back and forth, A -> C one way.
    g = canon_stored(build([[A, B, A, Cc]], [], 4), 0)
    homo = {(e[0], e[1]): e[2] for e in g["edges"] if e[2] != REL_SELF}
    assert homo == {
        (I(A), I(B)): REL_BI,
        (I(B), I(A)): REL_BI,
        (I(A), I(Cc)): REL_IN,
        (I(Cc), I(A)): REL_OUT,
    }


def test_shared_codes_missing_modality_and_k_2():
    # modality 1 (k=2): A -> {0, 1}, B -> {1, 2}, C missing; history C A B
    codes = np.array([[0, 1], [1, 2], [-1, -1], [-1, -1]])
    g = canon_stored(build([[Cc, A, B]], [codes], 4), 0)
    assert g["nodes"] == [I(A), I(B), I(Cc), M(1, 0), M(1, 1), M(1, 2)]  # code 1 shared by A and B
    assert g["positions"] == {
        I(Cc): (2,), I(A): (1,), I(B): (0,),
        M(1, 0): (1,), M(1, 1): (0, 1), M(1, 2): (0,),  # a code takes every position of its items
    }
    edges = {(e[0], e[1]): e[2] for e in g["edges"]}
    # codes: only A -> B contributes (C has none); 1 -> 1 is a shared code, not a transition
    code_homo = {k: r for k, r in edges.items() if k[0][0] == 1 and k[1][0] == 1 and r != REL_SELF}
    assert code_homo == {
        (M(1, 0), M(1, 1)): REL_IN, (M(1, 1), M(1, 0)): REL_OUT,
        (M(1, 0), M(1, 2)): REL_IN, (M(1, 2), M(1, 0)): REL_OUT,
        (M(1, 1), M(1, 2)): REL_IN, (M(1, 2), M(1, 1)): REL_OUT,
    }
    hetero = {k for k, r in edges.items() if r == REL_HETERO}
    assert hetero == {
        (I(A), M(1, 0)), (M(1, 0), I(A)), (I(A), M(1, 1)), (M(1, 1), I(A)),
        (I(B), M(1, 1)), (M(1, 1), I(B)), (I(B), M(1, 2)), (M(1, 2), I(B)),
    }
    # the item without the modality keeps its item edges only
    assert {k for k in edges if I(Cc) in k} == {(I(Cc), I(Cc)), (I(Cc), I(A)), (I(A), I(Cc))}
    assert g["n_edges"] == 6 + 6 + 4 + 8  # self loops, code transitions, item transitions, hetero


def test_two_modalities_link_codes_of_the_same_item():
    text = np.array([[0], [0], [-1], [-1]])  # A and B share text code 0
    image = np.array([[5], [6], [-1], [-1]])
    g = canon_stored(build([[A, B]], [text, image], 4), 0)
    assert g["nodes"] == [I(A), I(B), M(1, 0), M(2, 5), M(2, 6)]
    hetero = {(e[0], e[1]) for e in g["edges"] if e[2] == REL_HETERO}
    assert hetero == {
        (I(A), M(1, 0)), (M(1, 0), I(A)), (I(B), M(1, 0)), (M(1, 0), I(B)),
        (I(A), M(2, 5)), (M(2, 5), I(A)), (I(B), M(2, 6)), (M(2, 6), I(B)),
        (M(1, 0), M(2, 5)), (M(2, 5), M(1, 0)), (M(1, 0), M(2, 6)), (M(2, 6), M(1, 0)),
    }
    homo = {(e[0], e[1]): e[2] for e in g["edges"] if e[2] in (REL_IN, REL_OUT, REL_BI)}
    assert homo == {
        (I(A), I(B)): REL_IN, (I(B), I(A)): REL_OUT,
        (M(2, 5), M(2, 6)): REL_IN, (M(2, 6), M(2, 5)): REL_OUT,
    }  # text 0 -> 0 is shared, no transition


def test_single_item_history_and_zero_modalities():
    arrays = build([[D], [A, B]], [], 4)
    g0 = canon_stored(arrays, 0)
    assert g0 == {"nodes": [I(D)], "positions": {I(D): (0,)}, "edges": [(I(D), I(D), REL_SELF)], "n_edges": 1, "last": I(D)}
    assert canon_stored(arrays, 1)["last"] == I(B)
    assert arrays.node_type.dtype == np.int8 and arrays.pos.dtype == np.int16


def test_local_ids_are_sorted_by_type_then_ref_and_edges_by_target():
    codes = np.array([[2], [1], [0], [-1]])
    arrays = build([[Cc, A, B, Cc]], [codes], 4)
    g = arrays.graph(0)
    assert g["node_type"].tolist() == [0, 0, 0, 1, 1, 1] and g["node_ref"].tolist() == [0, 1, 2, 0, 1, 2]
    dst, src = g["edge_index"][1], g["edge_index"][0]
    assert np.all(np.diff(dst.astype(np.int64) * 100 + src) > 0)


# ----------------------------------------------------------------------------------------------
# Property test against the reference construction

@st.composite
def graph_inputs(draw):
    n_items = draw(st.integers(1, 7))
    n_mod = draw(st.integers(0, 3))
    item_codes = []
    for _ in range(n_mod):
        k = draw(st.integers(1, 3))
        n_codes = draw(st.integers(1, 6))
        distinct = draw(st.booleans())  # build-codes' top-k are distinct; repeats must not matter
        rows = [
            draw(st.lists(st.integers(0, n_codes - 1), max_size=min(k, n_codes) if distinct else k, unique=distinct))
            for _ in range(n_items)
        ]
        item_codes.append(np.array([r + [-1] * (k - len(r)) for r in rows], dtype=np.int64).reshape(n_items, k))
    histories = draw(st.lists(st.lists(st.integers(0, n_items - 1), min_size=1, max_size=9), min_size=1, max_size=5))
    chunk = draw(st.integers(1, 30))
    return n_items, item_codes, histories, chunk


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph_inputs())
def test_vectorised_construction_matches_reference_and_invariants(inputs):
    n_items, item_codes, histories, chunk = inputs
    arrays = build(histories, item_codes, n_items, chunk_entries=chunk)
    assert arrays.n_samples == len(histories)
    for s, h in enumerate(histories):
        got = canon_stored(arrays, s)
        assert got == reference_graph(h, item_codes)
        # invariants, stated directly
        g = arrays.graph(s)
        n = len(g["node_type"])
        ei = g["edge_index"]
        assert ei.min() >= 0 and ei.max() < n  # every endpoint inside its own graph
        self_loops = ei[0] == ei[1]
        assert sorted(ei[0][self_loops].tolist()) == list(range(n))  # exactly one self loop each
        assert np.all(g["edge_rel"][self_loops] == REL_SELF) and not np.any(g["edge_rel"][~self_loops] == REL_SELF)
        pairs = ei[0].astype(np.int64) * n + ei[1]
        assert len(np.unique(pairs)) == len(pairs)  # deduplicated
        assert int((g["node_type"] == 0).sum()) == len(set(h))
        homo = np.isin(g["edge_rel"], [REL_IN, REL_OUT, REL_BI])
        assert np.all(g["node_type"][ei[0][homo]] == g["node_type"][ei[1][homo]])
        het = g["edge_rel"] == REL_HETERO
        assert np.all(g["node_type"][ei[0][het]] != g["node_type"][ei[1][het]])


# ----------------------------------------------------------------------------------------------
# Batching


HISTORIES = [[A, B, A], [Cc, A, B], [D], [B, Cc, D, Cc, A], [A, A]]
TEXT = np.array([[0, 1], [1, 2], [-1, -1], [3, -1]])
IMAGE = np.array([[4], [4], [5], [-1]])
INFOS = {
    "text": ModalityInfo("text", n_codes=4, code_dim=2, item_codes=TEXT),
    "image": ModalityInfo("image", n_codes=6, code_dim=2, item_codes=IMAGE),
}


def _split(names: list[str], histories=HISTORIES, infos=INFOS, n_items: int = 4) -> GraphSplit:
    """A split of ``histories`` (targets 100.., users 7..) with the modalities ``names``."""
    flat = np.concatenate([np.asarray(h, np.int32) for h in histories])
    ptr = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    S = len(histories)
    return GraphSplit(flat, ptr, np.arange(S) + 100, np.arange(S) + 7, [infos[n] for n in names], n_items)


def test_collate_is_the_per_sample_graphs_offset():
    arrays = build(HISTORIES, [TEXT, IMAGE], 4)
    split = _split(["text", "image"])
    assert len(split) == len(HISTORIES) and split.modality_names == ["text", "image"]
    idx = np.array([3, 0, 4, 0, 2])  # any order, repeats allowed
    batch = split.collate(idx)
    assert all(v.dtype == torch.long for v in batch.values())
    N = len(batch["node_type"])
    assert batch["edge_index"].shape[0] == 2 and int(batch["edge_index"].max()) < N
    assert batch["target"].tolist() == (idx + 100).tolist() and batch["user_idx"].tolist() == (idx + 7).tolist()
    assert batch["node_graph"].tolist() == sorted(batch["node_graph"].tolist())
    for g, s in enumerate(idx):
        assert canon_batch(batch, g) == canon_stored(arrays, int(s))
        # nodes of graph g are one contiguous block, starting where the previous ones end
        start = int((batch["node_graph"] < g).sum())
        n_nodes = int(arrays.node_ptr[s + 1] - arrays.node_ptr[s])
        assert int(batch["last_node"][g]) == start + int(arrays.last_node[s])
        assert batch["node_graph"][start : start + n_nodes].eq(g).all()
    assert split.collate(np.array([], dtype=np.int64))["edge_index"].shape == (2, 0)
    assert torch.equal(split.collate(np.array([-1]))["target"], torch.tensor([104]))
    with pytest.raises(IndexError, match="out of range 0..4"):
        split.collate(np.array([5]))


@given(
    histories=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=9), min_size=1, max_size=12),
    picks=st.lists(st.integers(0, 11), max_size=16),
    chunk=st.integers(1, 40),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_batches_equal_the_formerly_stored_graphs_exactly(histories, picks, chunk):
    """What build-graphs stored before graphs were built per batch (all samples at once, in
    chunks) and collated by index is, tensor for tensor, what a batch builds now."""
    codes = [np.array([[0, 1], [1, -1], [2, 2], [-1, -1], [0, 3], [3, 1]]), np.array([[7], [7], [-1], [1], [0], [2]])]
    infos = {"a": ModalityInfo("a", 4, 2, item_codes=codes[0]), "b": ModalityInfo("b", 8, 2, item_codes=codes[1])}
    idx = np.array([p % len(histories) for p in picks], dtype=np.int64)
    flat = np.concatenate([np.asarray(h) for h in histories])
    ptr = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    stored = build_msgraphs(flat, ptr, codes, 6, chunk_entries=chunk)
    stored.target = np.arange(len(histories)) + 100
    stored.user_idx = np.arange(len(histories)) + 7
    expected = G._collate_arrays(vars(stored), idx)
    batch = _split(["a", "b"], histories, infos, 6).collate(idx)
    assert batch.keys() == expected.keys()
    for key in expected:
        assert batch[key].dtype == expected[key].dtype and torch.equal(batch[key], expected[key]), key


def test_same_graphs_give_the_same_training_losses():
    """MMSR trained on per-batch graphs follows, loss for loss and weight for weight, the run on
    the graphs as build-graphs stored them (built for the whole split, collated by index)."""
    from mmsr_cli.models.base import DatasetInfo, ModelConfig
    from mmsr_cli.models.mmsr import MMSR
    from mmsr_cli.training import TrainStep

    rng = np.random.default_rng(0)
    n_items = 30
    histories = [list(rng.integers(0, n_items, rng.integers(1, 12))) for _ in range(64)]
    codes = [rng.integers(-1, 6, (n_items, 2)), rng.integers(0, 4, (n_items, 1))]
    infos = {f"m{i}": ModalityInfo(f"m{i}", int(c.max()) + 1, 4, torch.randn(int(c.max()) + 1, 4), c)
             for i, c in enumerate(codes)}
    info = DatasetInfo(n_items=n_items, n_users=64, max_len=12, modalities=list(infos.values()))
    flat = np.concatenate(histories)
    ptr = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    stored = build_msgraphs(flat, ptr, codes, n_items, chunk_entries=50)
    stored.target = rng.integers(0, n_items, len(histories))
    stored.user_idx = np.arange(len(histories))
    split = GraphSplit(flat.astype(np.int32), ptr, stored.target, stored.user_idx, list(infos.values()), n_items)

    def run(collate) -> tuple[list[float], dict]:
        torch.manual_seed(0)
        model = MMSR(ModelConfig(dim=8, layers=2, dropout=0.2), info)
        step = TrainStep(model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        order = np.random.default_rng(1).permutation(len(histories))
        for b in range(0, len(order), 16):
            loss = step(collate(order[b : b + 16]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model.state_dict()

    per_batch, weights = run(split.collate)
    from_stored, stored_weights = run(lambda idx: G._collate_arrays(vars(stored), idx))
    assert per_batch == from_stored and len(per_batch) == 4
    assert all(torch.equal(weights[k], stored_weights[k]) for k in weights)


def test_modalities_choose_and_order_the_node_types():
    idx = np.arange(len(HISTORIES))
    for names, codes in ((["image"], [IMAGE]), ([], []), (["image", "text"], [IMAGE, TEXT])):
        split = _split(names)
        assert split.modality_names == names
        batch = split.collate(idx)
        expected = build(HISTORIES, codes, 4)  # node type i + 1 = names[i]
        for g in idx:
            assert canon_batch(batch, int(g)) == canon_stored(expected, int(g))


def test_collate_histories_in_memory_equals_a_split_batch():
    idx = np.array([3, 0, 4, 0, 2])
    # All modalities, a reordered pair, one, none: node types follow the given order either way.
    for names in (["text", "image"], ["image", "text"], ["image"], []):
        expected = _split(names).collate(idx)
        built = G.collate_histories(
            [HISTORIES[i] for i in idx], [INFOS[n] for n in names], 4, target=idx + 100, user_idx=idx + 7
        )
        assert built.keys() == expected.keys()
        for key in expected:
            assert built[key].dtype == expected[key].dtype and torch.equal(built[key], expected[key]), (names, key)
    # max_len keeps the most recent items; defaults: target 0, user_idx 0..B-1.
    long = [[D, A, B, Cc, D, Cc, A], [A, B]]
    cut = G.collate_histories(long, [INFOS["text"]], 4, max_len=5)
    short = G.collate_histories([h[-5:] for h in long], [INFOS["text"]], 4)
    assert all(torch.equal(cut[k], short[k]) for k in short)
    assert cut["target"].tolist() == [0, 0] and cut["user_idx"].tolist() == [0, 1]
    assert int(cut["pos_index"].max()) == 4 and int(G.collate_histories(long, [], 4)["pos_index"].max()) == 6
    with pytest.raises(MmsrError, match="history 1 of the batch is empty"):
        G.collate_histories([[A], []], [], 4)
    with pytest.raises(MmsrError, match=r"item ids must be in 0\.\.3"):
        G.collate_histories([[A, 4]], [], 4)


def test_to_hetero_data_splits_types_and_relations():
    batch = _split(["text", "image"]).collate(np.array([0, 3]))
    data = G.to_hetero_data(batch, ["text", "image"])
    assert set(data.node_types) == {"item", "text", "image"}
    assert ("item", "bi", "item") in data.edge_types and ("text", "hetero", "image") in data.edge_types
    assert data.num_nodes == len(batch["node_type"])
    assert sum(data[et].edge_index.shape[1] for et in data.edge_types) == batch["edge_index"].shape[1]
    # sample 0 is A B A: the only item transitions of the batch's first graph are bi
    item_bi = data["item", "bi", "item"].edge_index
    gid = data["item"].global_id
    assert {(int(gid[s]), int(gid[d])) for s, d in item_bi.T} >= {(0, 1), (1, 0)}
    # typed ids map back to the batch ids with the right refs and graphs
    for t, name in enumerate(["item", "text", "image"]):
        store = data[name]
        assert torch.equal(batch["node_type"][store.global_id], torch.full_like(store.global_id, t))
        assert torch.equal(store.node_ref, batch["node_ref"][store.global_id])
    hetero = data["text", "hetero", "item"].edge_index
    assert torch.equal(
        data["text"].batch[hetero[0]], data["item"].batch[hetero[1]]
    )  # hetero edges stay inside a sample
    assert torch.equal(data["item"].global_id[data["item"].last], batch["last_node"])
    # PyG layers accept it
    from torch_geometric.nn import HeteroConv, SAGEConv

    conv = HeteroConv({et: SAGEConv((-1, -1), 4) for et in data.edge_types}, aggr="sum")
    x = {nt: torch.randn(data[nt].num_nodes, 3) for nt in data.node_types}
    out = conv(x, data.edge_index_dict)
    assert out["item"].shape == (data["item"].num_nodes, 4)


# ----------------------------------------------------------------------------------------------
# The stage: manifests, staleness, atomic writes, one-line errors

N_ITEMS = 4


def _items_table(n: int) -> pa.Table:
    return pa.table(
        {
            "item_idx": pa.array(range(n), pa.int32()),
            "item_id": [f"i{i}" for i in range(n)],
            "title": [None] * n,
            "categories": pa.array([[]] * n, pa.list_(pa.string())),
            "brand": [None] * n,
            "description": [None] * n,
            "features": pa.array([None] * n, pa.list_(pa.string())),
            "image_path": [None] * n,
            "n_interactions": pa.array([1] * n, pa.int32()),
        }
    )


def _samples_table(histories: list[list[int]], targets: list[int]) -> pa.Table:
    return pa.table(
        {
            "sample_idx": pa.array(range(len(histories)), pa.int64()),
            "user_idx": pa.array(range(len(histories)), pa.int32()),
            "history": pa.array(histories, pa.list_(pa.int32())),
            "target": pa.array(targets, pa.int32()),
            "target_position": pa.array([len(h) for h in histories], pa.int32()),
        }
    )


def _preprocess(ds: DatasetDir, histories=None) -> dict:
    histories = histories or HISTORIES
    write_parquet_atomic(ds.path(C.ITEMS), _items_table(N_ITEMS), C.ITEMS_SCHEMA)
    for i, split in enumerate(C.SPLITS):
        hs = histories[i:] if split != "train" else histories
        write_parquet_atomic(ds.path(C.samples_file(split)), _samples_table(hs, [h[0] for h in hs]), C.SAMPLES_SCHEMA)
    return ds.write_manifest(
        C.STAGE_PREPROCESS,
        outputs=[C.ITEMS] + [C.samples_file(s) for s in C.SPLITS],
        options={},
    )


FAKE_CODES = {"text": TEXT, "image": IMAGE}


def _codes(ds: DatasetDir, name: str, version: int = 1) -> dict:
    ds.path(C.codes_file(name)).parent.mkdir(parents=True, exist_ok=True)
    ds.path(C.codes_file(name)).write_text(f"{name} v{version}")
    return ds.write_manifest(C.modality_stage(C.STAGE_CODES, name), outputs=[C.codes_file(name)], options={})


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A dataset folder with preprocess and text/image codes stages done (codes read via a fake)."""
    ds = DatasetDir.open(tmp_path, "toy")
    ds.root.mkdir(parents=True)
    _preprocess(ds)
    for name in FAKE_CODES:
        _codes(ds, name)

    def load(ds_, name, variant):
        codes = FAKE_CODES[name]
        if variant == "items":  # one code per item that has the modality
            has = (codes >= 0).any(axis=1)
            codes = np.where(has, np.arange(N_ITEMS), -1)[:, None]
            return ModalityInfo(name, N_ITEMS, 8, None, codes)
        return ModalityInfo(name, int(codes.max()) + 1, 8, None, codes)

    monkeypatch.setattr(G, "_load_modality_info", load)
    monkeypatch.setattr(G, "_available_modalities", lambda ds_: [n for n in FAKE_CODES if ds_.read_manifest(f"codes:{n}")])
    return ds


def _args(ds: DatasetDir, *extra) -> list[str]:
    return ["build-graphs", "--workdir", ds.workdir, "--dataset", ds.name, *extra]


def _one_error_line(res) -> str:
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsr: error:"), res.stderr
    return lines[0]


def test_build_graphs_command_writes_graphs_that_collate(toy, cli):
    res = cli(_args(toy))
    assert res.exit_code == 0, res.stderr
    assert "build-graphs [codes; text, image]" in res.stderr and "train 5 graphs" in res.stderr
    m = toy.read_manifest("graphs:codes")
    assert set(m["inputs"]) == {"preprocess", "codes:text", "codes:image"}
    assert m["counts"]["train"]["samples"] == 5 and m["options"]["modalities"] == ["text", "image"]
    meta = json.loads(toy.path("graphs/codes/meta.json").read_text())
    assert meta["modalities"] == ["text", "image"] and meta["n_codes"] == {"text": 4, "image": 6}
    split = GraphSplit.open(toy, "train")
    expected = build(HISTORIES, [TEXT, IMAGE], N_ITEMS)
    batch = split.collate(np.arange(5))
    for g in range(5):
        assert canon_batch(batch, g) == canon_stored(expected, g)
    assert batch["target"].tolist() == [h[0] for h in HISTORIES]
    assert len(GraphSplit.open(toy, "test")) == len(HISTORIES) - 2
    # no temporary folders left behind
    assert sorted(p.name for p in toy.path("graphs").iterdir()) == ["codes"]


def test_items_variant_and_modality_choice(toy, cli):
    res = cli(_args(toy, "--no-codes", "--modalities", "image", "--splits", "train"))
    assert res.exit_code == 0, res.stderr
    split = GraphSplit.open(toy, "train", variant="items")
    assert split.modality_names == ["image"]
    batch = split.collate(np.array([0]))  # A B A: A and B share image code 4, but not per-item nodes
    assert canon_batch(batch, 0)["nodes"] == [I(A), I(B), M(1, A), M(1, B)]
    with pytest.raises(MmsrError, match="split 'valid' was not built.*--no-codes"):
        GraphSplit.open(toy, "valid", variant="items")
    with pytest.raises(MmsrError, match="has not been run"):
        GraphSplit.open(toy, "train", variant="codes")


def test_zero_modalities_builds_item_only_graphs(toy, cli):
    for name in FAKE_CODES:
        toy.manifest_path(f"codes:{name}").unlink()
    res = cli(_args(toy))
    assert res.exit_code == 0, res.stderr
    assert "no modalities" in res.stderr
    batch = GraphSplit.open(toy, "train").collate(np.arange(5))
    assert batch["node_type"].eq(0).all()


@pytest.mark.parametrize("upstream_stage", ["preprocess", "codes"])
def test_rerun_upstream_makes_graphs_stale(toy, cli, upstream_stage):
    assert cli(_args(toy)).exit_code == 0
    GraphSplit.open(toy, "valid")
    if upstream_stage == "preprocess":
        _preprocess(toy, [[A, B], [B, A], [Cc]])
    else:
        _codes(toy, "image", version=2)
    with pytest.raises(MmsrError, match="stale"):
        GraphSplit.open(toy, "train")
    assert cli(_args(toy)).exit_code == 0  # re-running refreshes them
    GraphSplit.open(toy, "train")


def test_modified_graph_meta_is_refused(toy, cli):
    assert cli(_args(toy)).exit_code == 0
    path = toy.path("graphs/codes/meta.json")
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "modalities": ["image"]}))
    with pytest.raises(MmsrError, match="changed since stage 'graphs:codes'"):
        GraphSplit.open(toy, "train")


def test_no_per_sample_files_are_written(toy, cli):
    assert cli(_args(toy)).exit_code == 0
    files = sorted(str(p.relative_to(toy.path("graphs"))) for p in toy.path("graphs").rglob("*"))
    assert files == ["codes", "codes/meta.json"]
    assert list(toy.read_manifest("graphs:codes")["outputs"]) == ["graphs/codes/meta.json"]


def test_out_of_order_is_one_line_error(tmp_path, cli):
    ds = DatasetDir.open(tmp_path, "toy")
    ds.root.mkdir(parents=True)
    line = _one_error_line(cli(_args(ds)))
    assert "mmsr preprocess --dataset toy" in line


def test_bad_options_are_one_line_errors_and_keep_previous_graphs(toy, cli):
    assert cli(_args(toy)).exit_code == 0
    before = G.GraphSplit.open(toy, "train").collate(np.arange(5))
    for extra, needle in (
        (["--splits", "train,holdout"], "--splits: unknown split 'holdout'"),
        (["--splits", "train,,test"], "--splits: empty entry"),
        (["--modalities", "audio"], "--modalities: no codes for audio"),
        (["--modalities", "Bad Name"], "modality name 'Bad Name' is invalid"),
    ):
        assert needle in _one_error_line(cli(_args(toy, *extra)))
    # a bad samples file fails the whole build; the previous graphs stay intact and valid
    write_parquet_atomic(
        toy.path(C.samples_file("test")), _samples_table([[A, 9]], [A]), C.SAMPLES_SCHEMA
    )
    toy.write_manifest(
        C.STAGE_PREPROCESS, outputs=[C.ITEMS] + [C.samples_file(s) for s in C.SPLITS], options={}
    )
    line = _one_error_line(cli(_args(toy)))
    assert "samples_test.parquet: sample_idx 0: field 'history' holds item 9" in line
    assert sorted(p.name for p in toy.path("graphs").iterdir()) == ["codes"]
    assert json.loads(toy.path("graphs/codes/meta.json").read_text())["counts"]["train"]["edges"] == before["edge_index"].shape[1]


def test_codes_of_the_wrong_shape_are_refused(toy, cli, monkeypatch):
    monkeypatch.setattr(G, "_load_modality_info", lambda ds, n, v: ModalityInfo(n, 3, 8, None, np.zeros((2, 1), np.int64)))
    line = _one_error_line(cli(_args(toy)))
    assert "codes of modality 'text' have shape (2, 1), expected [4, k]" in line


def test_rebuilding_gives_byte_identical_graphs(toy, cli):
    assert cli(_args(toy)).exit_code == 0
    first = toy.read_manifest("graphs:codes")["outputs"]
    assert cli(_args(toy)).exit_code == 0
    assert toy.read_manifest("graphs:codes")["outputs"] == first


def test_reads_codes_through_the_build_codes_loader(tmp_path, cli):
    """No fakes: codes files in build-codes' format, read by mmsr_cli.codes.load_modality_info."""
    from mmsr_cli import codes as codes_mod
    ds = DatasetDir.open(tmp_path, "toy")
    ds.root.mkdir(parents=True)
    _preprocess(ds)
    for name, codes in FAKE_CODES.items():
        lists = [[int(c) for c in row if c >= 0] for row in codes]
        table = pa.table(
            {
                "item_idx": pa.array(range(N_ITEMS), pa.int32()),
                "codes": pa.array(lists, pa.list_(pa.int32())),
                "similarities": pa.array([[1.0] * len(r) for r in lists], pa.list_(pa.float32())),
            }
        )
        write_parquet_atomic(ds.path(C.codes_file(name)), table, C.CODES_SCHEMA)
        n_codes = int(codes.max()) + 1
        torch.save({"centres": torch.randn(n_codes, 3), "reduced": torch.randn(N_ITEMS, 3)}, ds.path(C.centres_file(name)))
        ds.write_manifest(
            C.modality_stage(C.STAGE_CODES, name),
            outputs=[C.codes_file(name), C.centres_file(name)],
            options={"codes_mode": "clusters", "top_k": codes.shape[1]},
        )
    assert codes_mod.available_modalities(ds) == ["image", "text"]  # the dataset's modality order
    res = cli(_args(ds))
    assert res.exit_code == 0, res.stderr
    split = GraphSplit.open(ds, "train")
    assert split.modality_names == ["image", "text"]
    expected = build(HISTORIES, [IMAGE, TEXT], N_ITEMS)
    batch = split.collate(np.arange(len(HISTORIES)))
    for g in range(len(HISTORIES)):
        assert canon_batch(batch, g) == canon_stored(expected, g)
    assert cli(_args(ds, "--no-codes", "--modalities", "image")).exit_code == 0
    items = GraphSplit.open(ds, "train", variant="items").collate(np.array([0]))
    assert canon_batch(items, 0)["nodes"] == [I(A), I(B), M(1, A), M(1, B)]
