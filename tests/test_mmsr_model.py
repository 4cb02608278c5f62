"""MMSR recommender (paper sections 4.2 and 4.4) on tiny hand-built graph batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmsr_cli import graphs
from mmsr_cli.errors import MmsrError
from mmsr_cli.models.base import DatasetInfo, ModalityInfo, ModelConfig
from mmsr_cli.models.layers import REL_BI, REL_HETERO, REL_IN, REL_OUT, REL_SELF
from mmsr_cli.models.mmsr import MMSR

D = 8
N_ITEMS = 10


def graph(node_type, node_ref, positions, edges, last_node):
    """One sample's graph with local ids; edges (source j, target i, rel), self loops added."""
    edges = list(edges) + [(v, v, REL_SELF) for v in range(len(node_type))]
    return dict(node_type=node_type, node_ref=node_ref, positions=positions, edges=edges, last_node=last_node)


def collate(samples, targets=None):
    """Disjoint batch in the format of graphs.GraphSplit.collate."""
    out = {k: [] for k in ("node_type", "node_ref", "pos_index", "pos_node", "src", "dst", "edge_rel", "node_graph", "last_node")}
    base = 0
    for g, s in enumerate(samples):
        n = len(s["node_type"])
        out["node_type"] += s["node_type"]
        out["node_ref"] += s["node_ref"]
        for v, ps in enumerate(s["positions"]):
            out["pos_index"] += ps
            out["pos_node"] += [base + v] * len(ps)
        for j, i, r in s["edges"]:
            out["src"].append(base + j)
            out["dst"].append(base + i)
            out["edge_rel"].append(r)
        out["node_graph"] += [g] * n
        out["last_node"].append(base + s["last_node"])
        base += n
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    B = len(samples)
    return {
        "node_type": t(out["node_type"]),
        "node_ref": t(out["node_ref"]),
        "pos_index": t(out["pos_index"]),
        "pos_node": t(out["pos_node"]),
        "edge_index": torch.stack([t(out["src"]), t(out["dst"])]),
        "edge_rel": t(out["edge_rel"]),
        "node_graph": t(out["node_graph"]),
        "last_node": t(out["last_node"]),
        "target": t(targets if targets is not None else [0] * B),
        "user_idx": t(list(range(B))),
    }


def tr(a, b):
    """a transitions to b."""
    return [(a, b, REL_IN), (b, a, REL_OUT)]


def het(a, b):
    return [(a, b, REL_HETERO), (b, a, REL_HETERO)]


# history 3 -> 5 -> 3 -> 7 with one modality "text" (codes: 3 -> {0}, 5 -> {1}, 7 -> {0, 2});
# item nodes 0: item 3 (positions 1, 3), 1: item 5 (2), 2: item 7 (0); code nodes 3: c0, 4: c1, 5: c2
SAMPLE_A = graph(
    [0, 0, 0, 1, 1, 1],
    [3, 5, 7, 0, 1, 2],
    [[1, 3], [2], [0], [0, 1, 3], [2], [0]],
    [(0, 1, REL_BI), (1, 0, REL_BI)] + tr(0, 2) + [(3, 4, REL_BI), (4, 3, REL_BI)] + tr(3, 5)
    + het(0, 3) + het(1, 4) + het(2, 3) + het(2, 5),
    last_node=2,
)
# history 1 -> 2, item 2 has no text code
SAMPLE_B = graph([0, 0, 1], [1, 2, 1], [[1], [0], [1]], tr(0, 1) + het(0, 2), last_node=1)


def info(n_modalities=1, code_dim=D, n_codes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = [
        ModalityInfo(f"m{m}", n_codes, code_dim, torch.randn(n_codes, code_dim, generator=g)) for m in range(n_modalities)
    ]
    return DatasetInfo(n_items=N_ITEMS, n_users=5, max_len=6, modalities=mods)


def model(config=None, data=None, seed=0):
    torch.manual_seed(seed)
    m = MMSR(config or ModelConfig(dim=D, layers=2, dropout=0.0), data or info())
    return m.eval()


def test_shapes_scores_and_shared_item_table():
    m = model()
    batch = collate([SAMPLE_A, SAMPLE_B])
    user = m(batch)
    assert user.shape == (2, D)
    assert m.score(batch).shape == (2, N_ITEMS)
    assert m.item_embeddings() is m.encoder.item_embedding.weight  # output table = input table
    torch.testing.assert_close(m.score(batch), user @ m.encoder.item_embedding.weight.T)  # Eq. 7


def test_last_pooling_picks_the_last_item_node():
    m = model()
    batch = collate([SAMPLE_A, SAMPLE_B])
    states = m.node_states(batch)
    torch.testing.assert_close(m(batch), states[batch["last_node"]])
    assert batch["last_node"].tolist() == [2, 7]


@pytest.mark.parametrize("variant,readout", [("paper", "attention"), ("authors", "attention"),
                                             ("paper", "residual"), ("authors", "residual")])
def test_attention_readout_by_hand(variant, readout):
    """--readout attention (not in the paper; SR-GNN's Eq. 6-7): per sample, alpha_i = q .
    sigmoid(W1 h_last + W2 h_i) over its item nodes, s = sum alpha_i h_i, user = W3 [h_last; s],
    from the same final node states as last pooling; code nodes are not read. --readout residual:
    user = h_last + W3 [h_last; s], which is last pooling at initialisation (W3 = 0)."""
    m = model(ModelConfig(dim=D, layers=1 if variant == "authors" else 2, dropout=0.0, variant=variant,
                          readout=readout))
    batch = collate([SAMPLE_A, SAMPLE_B])
    states = m.node_states(batch)
    r = m.readout
    if readout == "residual":
        torch.testing.assert_close(m(batch), states[batch["last_node"]], rtol=0, atol=0)
        with torch.no_grad():
            r.merge.weight.normal_()
    expected = []
    for g, last in enumerate(batch["last_node"].tolist()):
        h_last = states[last]
        items = [v for v in range(len(states)) if batch["node_graph"][v] == g and batch["node_type"][v] == 0]
        pooled = torch.zeros(D)
        for v in items:
            alpha = r.query.weight[0] @ torch.sigmoid(r.last.weight @ h_last + r.node.weight @ states[v] + r.node.bias)
            pooled = pooled + alpha * states[v]
        expected.append(r.merge.weight @ torch.cat([h_last, pooled]) + (h_last if readout == "residual" else 0))
    torch.testing.assert_close(m(batch), torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert [len([v for v in range(9) if batch["node_graph"][v] == g and batch["node_type"][v] == 0]) for g in (0, 1)] == [3, 2]
    from mmsr_cli.models import check_model_config
    from mmsr_cli.runs import train_configs

    with pytest.raises(MmsrError, match="--readout: expected one of last, attention, residual, got 'mean'"):
        check_model_config(train_configs("mmsr", readout="mean")[1])
    with pytest.raises(MmsrError, match="--readout: not used by model sasrec"):
        train_configs("sasrec", readout="attention")


def test_node_order_in_the_batch_does_not_matter():
    """Nodes are sorted by type inside the model; any input order gives the same result."""
    m = model()
    batch = collate([SAMPLE_A, SAMPLE_B])
    perm = torch.tensor([8, 3, 0, 6, 1, 4, 7, 2, 5])
    inverse = torch.argsort(perm)  # new id of old node v
    shuffled = dict(batch)
    for key in ("node_type", "node_ref", "node_graph"):
        shuffled[key] = batch[key][perm]
    shuffled["pos_node"] = inverse[batch["pos_node"]]
    shuffled["edge_index"] = inverse[batch["edge_index"]]
    shuffled["last_node"] = inverse[batch["last_node"]]
    torch.testing.assert_close(m(shuffled), m(batch))
    torch.testing.assert_close(m.node_states(shuffled), m.node_states(batch)[perm])


def test_position_embedding_is_the_mean_over_the_nodes_positions():
    m = model(ModelConfig(dim=D, layers=1, dropout=0.0, type_emb=False))
    enc = m.encoder
    assert enc.merge.in_features == 2 * D
    with torch.no_grad():  # W selects the position part
        enc.merge.weight.copy_(torch.cat([torch.zeros(D, D), torch.eye(D)], 1))
        enc.merge.bias.zero_()
    batch = collate([SAMPLE_A])
    from mmsr_cli.models.layers import TypeIndex

    types = TypeIndex.build(batch["node_type"], enc.n_types)
    h0 = enc(batch["node_type"], batch["node_ref"], batch["pos_index"], batch["pos_node"], types)
    pos = enc.position_embedding.weight
    torch.testing.assert_close(h0[0], (pos[1] + pos[3]) / 2)  # item 3 at positions 1 and 3
    torch.testing.assert_close(h0[3], (pos[0] + pos[1] + pos[3]) / 3)  # code 0 at 0, 1, 3
    torch.testing.assert_close(h0[2], pos[0])


def test_node_content_item_table_and_projected_code_tables():
    data = info(code_dim=5)
    m = model(ModelConfig(dim=D, layers=1, dropout=0.0, type_emb=False, pos_emb=False), data)
    enc = m.encoder
    assert enc.code_embeddings[0].weight.shape == (3, 5)  # kept at code_dim, projected to d
    centres = data.modalities[0].centres
    torch.testing.assert_close(
        F.cosine_similarity(enc.code_embeddings[0].weight, centres), torch.ones(3)
    )  # initialised from the centres (rescaled)
    with torch.no_grad():
        enc.merge.weight.copy_(torch.eye(D))
        enc.merge.bias.zero_()
    batch = collate([SAMPLE_A])
    from mmsr_cli.models.layers import TypeIndex

    h0 = enc(batch["node_type"], batch["node_ref"], batch["pos_index"], batch["pos_node"], TypeIndex.build(batch["node_type"], 2))
    torch.testing.assert_close(h0[1], enc.item_embedding.weight[5])
    torch.testing.assert_close(h0[5], enc.code_projections[0](enc.code_embeddings[0].weight[2]))


@pytest.mark.parametrize("pos_emb, type_emb, parts", [(True, True, 3), (False, True, 2), (True, False, 2), (False, False, 1)])
def test_position_and_type_ablations_change_the_merge_input(pos_emb, type_emb, parts):
    m = model(ModelConfig(dim=D, layers=1, dropout=0.0, pos_emb=pos_emb, type_emb=type_emb))
    assert m.encoder.merge.in_features == parts * D
    assert (m.encoder.position_embedding is not None) == pos_emb
    assert (m.encoder.type_embedding is not None) == type_emb
    assert m(collate([SAMPLE_A, SAMPLE_B])).shape == (2, D)


def test_gradients_reach_code_embeddings_and_projections():
    m = model(data=info(code_dim=5))
    m.train()
    batch = collate([SAMPLE_A, SAMPLE_B], targets=[4, 6])
    F.cross_entropy(m.score(batch), batch["target"]).backward()
    grad = m.encoder.code_embeddings[0].weight.grad
    assert grad is not None and bool((grad.abs().sum(1) > 0).all())  # all three codes are used
    assert m.encoder.code_projections[0].weight.grad.abs().sum() > 0
    assert m.encoder.type_embedding.weight.grad.abs().sum() > 0


def test_zero_modality_item_only_graphs():
    item_only = graph([0, 0, 0], [3, 5, 7], [[2], [1], [0]], tr(0, 1) + tr(1, 2), last_node=2)
    single = graph([0], [4], [[0]], [], last_node=0)  # a history of one item: only a self loop
    for fusion in ("adaptive", "synchronous", "he"):
        m = model(ModelConfig(dim=D, layers=2, dropout=0.0, fusion=fusion), info(n_modalities=0))
        out = m(collate([item_only, single]))
        assert out.shape == (2, D) and bool(torch.isfinite(out).all())


def test_gate_values_in_batch_node_order():
    m = model()
    batch = collate([SAMPLE_B, SAMPLE_A])  # types unsorted across graphs: sorted inside
    m(batch)  # scores need the pooled nodes only: the last layer computes their gates alone
    pooled = m.gate_values()
    assert pooled[0].shape[0] <= 9 and pooled[1].shape == (2, 2) and m.gate_node_type is None
    m.every_node = True  # evaluation's gate statistics ask for every node
    m(batch)
    gates = m.gate_values()
    assert len(gates) == 2 and all(g.shape == (9, 2) for g in gates)
    torch.testing.assert_close(gates[0].sum(1), torch.ones(9))
    assert torch.equal(m.gate_node_type, batch["node_type"])
    # row v is node v's gate: a batch holding only SAMPLE_A's graph gives the same rows for it
    m(collate([SAMPLE_A]))
    torch.testing.assert_close(m.gate_values()[0], gates[0][3:])
    torch.testing.assert_close(pooled[1], gates[1][batch["last_node"]])  # the pooled rows' gates
    assert model(ModelConfig(dim=D, layers=1, dropout=0.0, fusion="hohe")).gate_values() == []


def test_config_modalities_pick_node_types_by_name():
    data = info(n_modalities=2, n_codes=3)
    m = model(ModelConfig(dim=D, layers=1, dropout=0.0, modalities=("m1",)), data)
    assert [x.name for x in m.modalities] == ["m1"] and m.n_types == 2
    torch.testing.assert_close(
        F.cosine_similarity(m.encoder.code_embeddings[0].weight, data.modalities[1].centres), torch.ones(3)
    )
    with pytest.raises(MmsrError, match="--modalities: m7"):
        MMSR(ModelConfig(dim=D, modalities=("m7",)), data)


def _graph_batch(histories, item_codes, targets):
    """Batch all samples of graphs.build_msgraphs output (what GraphSplit.collate does)."""
    flat = np.concatenate(histories)
    ptr = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    a = graphs.build_msgraphs(flat, ptr, item_codes, N_ITEMS)
    n_count = np.diff(a.node_ptr)
    e_count = np.diff(a.edge_ptr)
    node_base = a.node_ptr[:-1]
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x).astype(np.int64))  # noqa: E731
    return {
        "node_type": t(a.node_type),
        "node_ref": t(a.node_ref),
        "pos_index": t(a.pos),
        "pos_node": t(np.repeat(np.arange(len(a.node_type)), np.diff(a.pos_ptr))),
        "edge_index": t(a.edge_index.astype(np.int64) + np.repeat(node_base, e_count)[None]),
        "edge_rel": t(a.edge_rel),
        "node_graph": t(np.repeat(np.arange(len(histories)), n_count)),
        "last_node": t(a.last_node.astype(np.int64) + node_base),
        "target": t(np.asarray(targets)),
        "user_idx": t(np.arange(len(histories))),
    }


def test_overfits_a_tiny_set_to_hit_rate_at_1(one_thread):
    rng = np.random.default_rng(0)
    histories = [rng.choice(N_ITEMS, size=n, replace=False) for n in (2, 3, 4, 5, 3, 4)]
    # the same history prefix with different targets can't be memorised; these differ
    targets = [1, 8, 3, 0, 9, 6]
    item_codes = [rng.integers(0, 4, size=(N_ITEMS, 2)), rng.integers(0, 3, size=(N_ITEMS, 1))]
    batch = _graph_batch(histories, item_codes, targets)
    mods = [ModalityInfo("text", 4, 6, torch.randn(4, 6)), ModalityInfo("image", 3, D, torch.randn(3, D))]
    data = DatasetInfo(n_items=N_ITEMS, n_users=6, max_len=6, modalities=mods)
    torch.manual_seed(0)
    m = MMSR(ModelConfig(dim=16, layers=2, dropout=0.0), data)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(m.score(batch), batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        top1 = m.score(batch).argmax(1)
    assert top1.tolist() == targets, float(loss)


def test_feed_forward_block_is_a_residual_relu_after_each_layer():
    """--feed-forward: h^(l+1) = g(h) + W2 relu(W1 g(h)) with g the HAN layer; off by default."""
    assert model().feed_forward is None
    m = model(ModelConfig(dim=D, layers=2, dropout=0.0, feed_forward=True))
    batch = collate([SAMPLE_A, SAMPLE_B])
    # the same propagation with the blocks' second linear zeroed is the paper's model with m's weights
    with torch.no_grad():
        plain = MMSR(ModelConfig(dim=D, layers=2, dropout=0.0), info()).eval()
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("feed_forward.")})
        for block in m.feed_forward:
            block.net[2].weight.zero_()
            block.net[2].bias.zero_()
        torch.testing.assert_close(m(batch), plain(batch))
        # a block with a negative-only hidden pre-activation adds nothing (relu), a positive one adds W2 W1 h
        block = m.feed_forward[0]
        h = torch.randn(5, D)
        block.net[0].weight.copy_(torch.eye(D))
        block.net[0].bias.fill_(-1e3)
        block.net[2].weight.copy_(torch.eye(D))
        torch.testing.assert_close(block(h), h)
        block.net[0].bias.fill_(1e3)
        torch.testing.assert_close(block(h), 2 * h + 1e3)


def test_node_input_parts_start_at_comparable_scale():
    """Content, type and position enter the merge W of section 4.2 at the same scale at init.

    With nn.Embedding's N(0, 1) type and position rows (norm ~sqrt(d)) the merged input of an item
    node was >90 % constant type/position signal; each part must now contribute alike."""
    d = 128
    data = DatasetInfo(n_items=500, n_users=5, max_len=50, modalities=[
        ModalityInfo("m0", 30, 384, torch.randn(30, 384, generator=torch.Generator().manual_seed(0)) * 3.0)
    ])
    torch.manual_seed(0)
    enc = MMSR(ModelConfig(dim=d), data).encoder
    row_norm = lambda t: t.detach().norm(dim=1).mean().item()  # noqa: E731
    norms = {
        "item": row_norm(enc.item_embedding.weight),
        "code": row_norm(enc.code_embeddings[0].weight),
        "type": row_norm(enc.type_embedding.weight),
        "position": row_norm(enc.position_embedding.weight),
    }
    for name, value in norms.items():
        assert 0.8 < value < 1.2, (name, value)
    # what each part adds to h^(0) = W [e; e_ty; e_po] (+ b), for item nodes at one position each
    W = enc.merge.weight.detach()
    items, positions = torch.arange(500), torch.arange(500) % 50
    parts = {
        "content": enc.item_embedding.weight[items] @ W[:, :d].T,
        "type": enc.type_embedding.weight[torch.zeros(500, dtype=torch.long)] @ W[:, d : 2 * d].T,
        "position": enc.position_embedding.weight[positions] @ W[:, 2 * d :].T,
    }
    sizes = {name: part.detach().norm(dim=1).mean().item() for name, part in parts.items()}
    assert max(sizes.values()) / min(sizes.values()) < 1.3, sizes


# ---- the optimised forward and backward against a plain one ------------------------------------


def plain_forward(m: MMSR, batch) -> torch.Tensor:
    """MMSR (paper variant, HAN-GNN) written plainly from sections 4.2-4.4: per-node concatenation
    and merge, one score per edge from explicit edge lists, index_add aggregation, every node in
    every layer. No type sorting, CSR kernels, table algebra or pruning to the pooled nodes."""
    from torch_geometric.utils import scatter, softmax

    enc, nt, ref = m.encoder, batch["node_type"], batch["node_ref"]
    n = len(nt)
    content = torch.stack([
        enc.item_embedding.weight[ref[v]] if nt[v] == 0
        else enc.code_projections[nt[v] - 1](enc.code_embeddings[nt[v] - 1].weight[ref[v]])
        for v in range(n)
    ])
    pos = scatter(enc.position_embedding.weight[batch["pos_index"]], batch["pos_node"], 0, n, "mean")
    h = enc.merge(torch.cat([content, enc.type_embedding.weight[nt], pos], 1))
    src, dst = batch["edge_index"]
    rel = batch["edge_rel"]
    ho = rel <= REL_BI
    he = (rel == REL_SELF) | (rel == REL_HETERO)

    def proj(lin, x):
        return torch.stack([x[v] @ lin.weight[nt[v]] for v in range(n)])

    def attend(scores, mask, values):
        alpha = softmax(F.leaky_relu(scores, 0.2), dst[mask], num_nodes=n)
        return torch.zeros_like(values).index_add(0, dst[mask], alpha[:, None] * values[src[mask]])

    for i, layer in enumerate(m.layers):
        a = layer.homogeneous.relation_vectors

        def ho_attend(state_v, values):  # Eq. 12 + 14
            return attend((a[rel[ho]] * state_v[dst[ho]] * state_v[src[ho]]).sum(1), ho, values)

        def he_attend(state, values):  # Eq. 13 + 14
            q, k = proj(layer.query, state), proj(layer.key, state)
            return attend((q[src[he]] * k[dst[he]]).sum(1) / D**0.5, he, values)

        v = proj(layer.value, h)
        h_ho, h_he = ho_attend(v, v), he_attend(h, v)
        hohe = he_attend(h_ho, proj(layer.value, h_ho) if layer.invasive else v)
        v_he = proj(layer.value, h_he)
        heho = ho_attend(v_he, v_he if layer.invasive else v)
        if layer.fusion == "hohe":
            h = hohe
        elif layer.fusion == "heho":
            h = heho
        else:  # Eq. 16-17
            beta = torch.softmax(layer.gate.mlp(torch.cat([hohe, heho], 1)), 1)
            h = beta[:, :1] * hohe + beta[:, 1:] * heho
        if m.feed_forward is not None:
            h = m.feed_forward[i](h)
    return h[batch["last_node"]]


@pytest.mark.parametrize("fusion, invasive, layers, feed_forward", [
    ("adaptive", False, 2, False), ("adaptive", True, 1, False), ("hohe", False, 2, True), ("heho", True, 2, False),
])
def test_forward_and_gradients_equal_the_plain_computation(fusion, invasive, layers, feed_forward):
    """The speed-ups (table algebra in the encoder, Eq. 12 over the stacked relation graph, typed
    products, the last layer computed for the pooled nodes only) change nothing beyond float
    rounding: the user vectors, the loss and the gradient of every parameter equal the plain
    computation's."""
    m = model(ModelConfig(dim=D, layers=layers, dropout=0.0, fusion=fusion, invasive=invasive,
                          feed_forward=feed_forward)).double()
    shifted = graph([0, 0, 1, 0, 1], [4, 9, 2, 4, 0], [[0, 2], [1], [0, 2], [], [1]],
                    tr(0, 1) + tr(1, 0) + het(0, 2) + het(1, 4), last_node=1)
    batch = collate([SAMPLE_B, SAMPLE_A, shifted, SAMPLE_A], targets=[4, 6, 1, 3])
    got, expected = m(batch), plain_forward(m, batch)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    items = m.item_embeddings()
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(got @ items.T, batch["target"]), params, allow_unused=True)
    plain = torch.autograd.grad(F.cross_entropy(expected @ items.T, batch["target"]), params, allow_unused=True)
    for (name, _), g, e in zip(m.named_parameters(), grads, plain):
        if e is None:  # e.g. W_Q/W_K of a fusion without phase-1 heterogeneous scores
            assert g is None or float(g.abs().max()) == 0.0, name
        else:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("config", [dict(layers=2), dict(layers=2, variant="authors"), dict(layers=3, fusion="heho")],
                         ids=["paper", "authors", "heho-3"])
def test_rows_a_plan_leaves_unset_are_never_read(config, monkeypatch):
    """The rows a layer plan does not compute (zeros from layers.rows_of) are never read: with NaN
    written there instead, the pooled user vectors and every gradient are those of computing every
    node."""
    from mmsr_cli.models import han_authors, layers, mmsr

    def rows_of_nan(x, rows, n):
        return x.new_full((n, x.shape[1]), float("nan")).index_copy_(0, rows, x)

    for module in (layers, mmsr, han_authors):
        monkeypatch.setattr(module, "rows_of", rows_of_nan)
    m = model(ModelConfig(dim=D, dropout=0.0, **config)).double()
    batch = collate([SAMPLE_B, SAMPLE_A, SAMPLE_A], targets=[4, 6, 1])
    params = [p for p in m.parameters() if p.requires_grad]
    pooled = m(batch)
    m.every_node = True
    every = m(batch)
    torch.testing.assert_close(pooled, every, rtol=1e-10, atol=1e-12)
    items = m.item_embeddings()
    got = torch.autograd.grad(F.cross_entropy(pooled @ items.T, batch["target"]), params, allow_unused=True)
    expected = torch.autograd.grad(F.cross_entropy(every @ items.T, batch["target"]), params, allow_unused=True)
    for g, e in zip(got, expected):
        if e is None or g is None:
            assert (g is None or not bool(g.abs().sum())) and (e is None or not bool(e.abs().sum()))
        else:
            assert not bool(torch.isnan(g).any())
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
