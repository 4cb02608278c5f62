"""SR-GNN, GRU4Rec^F, NOVA, DIF-SR and Trans2D: shapes, padding, each model's defining property,
masking of missing modalities, memorisation, and training through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmsr_cli.errors import MmsrError
from mmsr_cli.models import REGISTRY, build_model, model_class
from mmsr_cli.models.base import ModelConfig, Recommender
from mmsr_cli.models.common import trimmed_history
from mmsr_cli.models.difsr import DIFSR
from mmsr_cli.models.gru4recf import GRU4RecF
from mmsr_cli.models.nova import NOVA
from mmsr_cli.models.trans2d import Attention2D, Trans2D, attention2d_mask
from mmsr_cli.models.srgnn import SRGNN, session_graphs

from conftest import assert_metrics_match_ranks
from test_baselines import MAX_LEN, N_ITEMS, PAD, batch, image_modality, info, make
from test_training import FAST, add_hand_made_codes, evaluate, make_toy, one_error_line, run_folder, train

FEATURE_MODELS = ["gru4recf", "nova", "difsr", "trans2d"]
MODELS = ["srgnn", *FEATURE_MODELS]


def build(name: str, **kw) -> Recommender:
    return make(name, [image_modality()] if name in FEATURE_MODELS else (), **kw)


def test_registry_holds_the_sequential_baselines():
    classes = {"srgnn": SRGNN, "gru4recf": GRU4RecF, "nova": NOVA, "difsr": DIFSR, "trans2d": Trans2D}
    for name, cls in classes.items():
        assert name in REGISTRY and model_class(name) is cls and cls.input_kind == "sequence"


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_dot_product_scoring(name):
    model = build(name).eval()
    b = batch([[1, 2, 3], [4], [5, 6, 7, 8, 9]])
    users, items = model(b), model.item_embeddings()
    assert users.shape == (3, 16) and items.shape == (N_ITEMS, 16)
    assert torch.allclose(model.score(b), users @ items.T)
    assert torch.isfinite(model.score(b)).all()


@pytest.mark.parametrize("name", MODELS)
def test_padding_and_anything_outside_the_history_do_not_change_the_user_vector(name):
    model = build(name).eval()
    with torch.no_grad():
        short = model(batch([[7, 2, 5]], length=3))
        padded = model(batch([[7, 2, 5]], length=MAX_LEN))
        garbage = batch([[7, 2, 5]], length=MAX_LEN)
        garbage["history"][0, :2] = torch.tensor([9, 1])  # stray ids before the history's start
        assert torch.allclose(short, padded, atol=1e-5)
        assert torch.allclose(padded, model(garbage), atol=1e-5)
        # ... but the history's content and order do matter.
        assert not torch.allclose(padded, model(batch([[5, 2, 7]])), atol=1e-4)
        assert not torch.allclose(padded, model(batch([[7, 2, 6]])), atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_other_rows_of_the_batch_do_not_change_the_user_vector(name):
    model = build(name).eval()
    rows = [[7, 2, 5], [1, 2, 3, 4], [9], [8, 6, 4, 2, 0]]
    with torch.no_grad():
        together = model(batch(rows))
        for b, row in enumerate(rows):
            assert torch.allclose(model(batch([row]))[0], together[b], atol=1e-5), row


def test_trimmed_history_reads_only_the_last_lengths_columns():
    b = batch([[7, 2], [1, 2, 3]])
    b["history"][0, 0] = 4  # garbage before row 0's history
    history, is_item = trimmed_history(b, PAD)
    assert history.tolist() == [[PAD, 7, 2], [1, 2, 3]]
    assert is_item.tolist() == [[False, True, True], [True, True, True]]


# ---------------------------------------------------------------------------------------------
# SR-GNN


def test_srgnn_session_graph_equals_the_hand_computed_normalised_adjacency():
    # Row 0: the paper's Figure 1 session v1 v2 v3 v2 v4 (items 1..4). Row 1: 5 -> 6 twice.
    b = batch([[1, 2, 3, 2, 4], [5, 6, 5, 7, 5, 6]], length=7)
    history, is_item = trimmed_history(b, PAD)
    g = session_graphs(history, is_item, PAD)
    assert g.node_items[0, :4].tolist() == [1, 2, 3, 4] and g.node_items[1, :3].tolist() == [5, 6, 7]
    assert g.node_mask.sum(1).tolist() == [4, 3]
    assert g.alias[0, 1:].tolist() == [0, 1, 2, 1, 3] and g.alias[1].tolist() == [0, 1, 0, 2, 0, 1]
    out0 = torch.zeros(6, 6)
    out0[0, 1] = 1  # v1 -> v2
    out0[1, 2] = out0[1, 3] = 0.5  # v2 -> v3, v2 -> v4: out-degree 2
    out0[2, 1] = 1  # v3 -> v2
    in0 = torch.zeros(6, 6)
    in0[1, 0] = in0[1, 2] = 0.5  # v2 <- v1, v2 <- v3: in-degree 2
    in0[2, 1] = 1  # v3 <- v2
    in0[3, 1] = 1  # v4 <- v2
    assert torch.allclose(g.a_out[0], out0) and torch.allclose(g.a_in[0], in0)
    # A repeated transition counts twice: 5 -> 6 (x2), 5 -> 7, 6 -> 5, 7 -> 5.
    out1 = torch.zeros(6, 6)
    out1[0, 1], out1[0, 2], out1[1, 0], out1[2, 0] = 2 / 3, 1 / 3, 1, 1
    in1 = torch.zeros(6, 6)
    in1[0, 1], in1[0, 2], in1[1, 0], in1[2, 0] = 0.5, 0.5, 1, 1
    assert torch.allclose(g.a_out[1], out1) and torch.allclose(g.a_in[1], in1)


def test_srgnn_user_vector_is_the_attention_readout_of_eq_6_and_7():
    model = build("srgnn").eval()
    b = batch([[3, 5, 3, 8]])
    history, is_item = trimmed_history(b, PAD)
    with torch.no_grad():
        g = session_graphs(history, is_item, PAD)
        v = model.item_emb(g.node_items)
        for step in model.steps:
            v = step(v, g)
        nodes = {int(item): v[0, k] for k, item in enumerate(g.node_items[0]) if item != PAD}
        seq = torch.stack([nodes[i] for i in [3, 5, 3, 8]])  # repeated item 3: one node, read twice
        s_l = seq[-1]
        alpha = torch.stack([model.q(torch.sigmoid(model.w_1(s_l) + model.w_2(x))) for x in seq])
        s_g = (alpha * seq).sum(0)
        expected = model.w_3(torch.cat([s_l, s_g]))
        assert torch.allclose(model(b)[0], expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Modality channels: shared by the feature models


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_missing_modality_channel_is_masked(name):
    """Item 3 has no image codes: a history of it ignores the image code table entirely; a history
    of items with images depends on it."""
    model = build(name, dropout=0.0).eval()
    with torch.no_grad():
        without_images = model(batch([[3, 3], [3]]))
        with_images = model(batch([[4, 6], [1]]))
        model.code_tables[0].weight.add_(torch.randn_like(model.code_tables[0].weight))
        assert torch.allclose(model(batch([[3, 3], [3]])), without_images, atol=1e-6)
        assert not torch.allclose(model(batch([[4, 6], [1]])), with_images, atol=1e-4)


def test_gru4recf_fuses_the_channels_after_their_own_grus():
    """Late fusion (paper Eq. 5-6): P = GELU(W cat[GRU_id(ids); GRU_image(image channel)]) at the
    last item, each GRU run over its channel alone."""
    model = build("gru4recf").eval()
    rows = [[7, 2, 5], [3], [8, 6, 4, 2, 0]]
    with torch.no_grad():
        users = model(batch(rows))
        for b, row in enumerate(rows):
            items = torch.tensor([row])
            h_id = model.channel_grus[0](model.item_emb(items))[0][0, -1]
            h_image = model.channel_grus[1](model.modality_channel(0, items)[0])[0][0, -1]
            assert torch.allclose(users[b], F.gelu(model.fuse(torch.cat([h_id, h_image]))), atol=1e-5), row


@pytest.mark.parametrize("name", FEATURE_MODELS)
def test_feature_models_need_modality_codes(name):
    with pytest.raises(MmsrError, match=f"model {name} needs at least one modality with codes"):
        make(name)


@pytest.mark.parametrize("name", ["nova", "difsr", "trans2d"])
def test_heads_must_divide_dim(name):
    with pytest.raises(MmsrError, match="--heads: 3 does not divide --dim 16"):
        build_model(ModelConfig(model=name, dim=16, heads=3, max_len=MAX_LEN), info([image_modality()]))


def zero_query_key_weights(model: Recommender) -> None:
    """Every query/key projection to zero: every attention map becomes uniform."""
    with torch.no_grad():
        for layer in model.layers:
            attn = layer.attn
            projections = [attn.qk] if isinstance(model, NOVA) else [attn.item_qk, *attn.side_qk]
            for p in projections:
                p.weight.zero_()
                p.bias.zero_()


@pytest.mark.parametrize("name", ["nova", "difsr"])
def test_non_invasive_values_ignore_side_information(name):
    """NOVA / DIF-SR: side information (modality codes, positions) only shapes the attention map;
    the values are pure item IDs. With the attention fixed (uniform), changing every code
    embedding and position embedding leaves the user vector unchanged."""
    model = build(name, dropout=0.0).eval()
    b = batch([[4, 6, 8], [1, 5]])
    with torch.no_grad():
        before = model(b)
        model.code_tables[0].weight.add_(torch.randn_like(model.code_tables[0].weight))
        assert not torch.allclose(model(b), before, atol=1e-4)  # the attention does read them
    zero_query_key_weights(model)
    with torch.no_grad():
        fixed = model(b)
        model.code_tables[0].weight.add_(torch.randn_like(model.code_tables[0].weight))
        model.pos_emb.weight.add_(torch.randn_like(model.pos_emb.weight))
        assert torch.allclose(model(b), fixed, atol=1e-5)


def test_nova_gating_fusion_drops_missing_channels():
    model = build("nova").eval()
    attn = model.layers[0].attn
    r, side = torch.randn(1, 2, 16), torch.randn(1, 2, 2, 16)
    mask = torch.tensor([[[True, True], [True, False]]])
    with torch.no_grad():
        fused = attn.fuse(r, side, mask)
        gate = lambda x: torch.sigmoid(attn.gate(x))  # noqa: E731
        expected_0 = gate(r[0, 0]) * r[0, 0] + gate(side[0, 0, 0]) * side[0, 0, 0] + gate(side[0, 0, 1]) * side[0, 0, 1]
        expected_1 = gate(r[0, 1]) * r[0, 1] + gate(side[0, 1, 0]) * side[0, 1, 0]
    assert torch.allclose(fused[0, 0], expected_0, atol=1e-6) and torch.allclose(fused[0, 1], expected_1, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# DIF-SR


def test_difsr_attention_is_fused_from_separate_id_position_and_modality_maps():
    model = make("difsr", [image_modality()], dropout=0.0).eval()
    history, is_item = trimmed_history(batch([[4, 3, 6], [1, 2]]), PAD)
    attn = model.layers[0].attn
    with torch.no_grad():
        r = model.input_norm(model.item_emb(history)) * is_item.unsqueeze(-1)
        sides, masks = model.side_sources(history)
        masks = [m & is_item for m in masks]
        maps = attn.attention_maps(r, sides, masks)  # [B, H, L, L, 3]: ID, position, image
        assert maps.shape == (2, 2, 3, 3, 3)
        # Each map is computed from its own source alone.
        assert torch.allclose(maps[..., 0], attn._scores(r, attn.item_qk))
        assert torch.allclose(maps[..., 1], attn._scores(sides[0], attn.side_qk[0]) * (masks[0][:, :, None] & masks[0][:, None, :]).unsqueeze(1))
        # Item 3 (row 0, column 1) has no image: its image-map row and column are zero.
        assert torch.count_nonzero(maps[0, :, 1, :, 2]) == 0 and torch.count_nonzero(maps[0, :, :, 1, 2]) == 0
        assert torch.count_nonzero(maps[0, :, 0, 2, 2]) > 0
        # Changing the code embeddings changes the image map only.
        model.code_tables[0].weight.add_(torch.randn(model.code_tables[0].weight.shape, generator=torch.Generator().manual_seed(3)))
        sides2, _ = model.side_sources(history)
        maps2 = attn.attention_maps(r, sides2, masks)
        assert torch.equal(maps2[..., :2], maps[..., :2]) and not torch.allclose(maps2[..., 2], maps[..., 2])
        # Sum fusion is the plain sum of the maps.
        allowed = torch.ones(2, 3, 3, dtype=torch.bool).tril()
        attn.fusion = "sum"
        assert torch.allclose(attn.fuse(maps, allowed), maps.sum(-1))


def test_difsr_auxiliary_attribute_predictors_predict_the_targets_codes():
    model = make("difsr", [image_modality()], dropout=0.0).train()
    b = batch([[4, 6], [1, 2, 5]])
    b["target"] = torch.tensor([0, 3])  # item 0 has image codes 0 and 1; item 3 has none
    labels = model.target_code_labels(0, b["target"])
    assert labels.tolist() == [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    users = model(b)
    aux = model.auxiliary_loss(b)  # reuses the forward pass of the same batch
    expected = model.ATTRIBUTE_LOSS_WEIGHT * F.binary_cross_entropy_with_logits(model.attribute_predictors[0](users), labels)
    assert torch.allclose(aux, expected)
    aux.backward()
    assert model.attribute_predictors[0].weight.grad.abs().sum() > 0
    assert model.item_emb.weight.grad.abs().sum() > 0  # it trains the encoder too
    # Without a preceding forward of that batch it runs its own.
    assert torch.allclose(model.auxiliary_loss(b), expected.detach())
    assert model.eval()(b) is not None and model._training_users is None


@pytest.mark.parametrize("fusion", ["sum", "concat", "gate"])
def test_difsr_fusions_train_and_ignore_padding(fusion):
    torch.manual_seed(0)
    cfg = ModelConfig(model="difsr", dim=16, layers=2, heads=2, dropout=0.0, max_len=MAX_LEN)
    model = DIFSR(cfg, info([image_modality()]), fusion=fusion).eval()
    with torch.no_grad():
        assert torch.allclose(model(batch([[7, 2, 5]], length=3)), model(batch([[7, 2, 5]])), atol=1e-5)
    assert model(batch([[1, 2]])).requires_grad


def test_difsr_unknown_fusion_is_an_error():
    with pytest.raises(MmsrError, match="expected one of sum, concat, gate, got 'max'"):
        DIFSR(ModelConfig(model="difsr", dim=16, heads=2, max_len=MAX_LEN), info([image_modality()]), fusion="max")


# ---------------------------------------------------------------------------------------------
# Trans2D


def test_trans2d_attention_spans_items_and_channels_and_masks_missing_channels():
    # 3 history slots (first one padding), 2 channels; item at slot 1 lacks channel 1.
    is_item = torch.tensor([[False, True, True]])
    available = torch.tensor([[[False, False], [True, False], [True, True]]])
    allowed = attention2d_mask(is_item, available).view(3, 2, 3, 2)
    # The last item's image channel sees both channels of itself and the ID channel of slot 1.
    assert allowed[2, 1].tolist() == [[False, False], [True, False], [True, True]]
    # No query sees the future, padding, or a missing channel (except its own ID channel).
    assert not allowed[1, :, 2].any() and not allowed[1:, :, 0].any() and not allowed[:, :, 1, 1].any()
    assert allowed[0, :, 0, 0].all()  # a padding slot sees its own ID channel: no empty row


def test_attention2d_scores_sum_the_4d_channel_and_item_terms():
    """Each (i, c) -> (j, c') score is a0 q[i,c].k[j,c'] + a1 sum_{t<=i} q[t,c].k[t,c']
    + a2 sum_e q[i,e].k[j,e] over available cells, scaled by 1/sqrt(d_head): checked cell by cell."""
    torch.manual_seed(0)
    L, C, D = 3, 2, 4
    attn = Attention2D(C, D, heads=1, dropout=0.0).eval()
    with torch.no_grad():
        attn.alpha.copy_(torch.tensor([0.7, -1.3, 2.1]))
    x = torch.randn(1, L, C, D)
    is_item = torch.tensor([[False, True, True]])
    available = torch.tensor([[[False, False], [True, False], [True, True]]])
    allowed = attention2d_mask(is_item, available)
    q, k, v = attn.qkv(x).reshape(L, C, 3, D).unbind(2)
    m = available[0]
    a = attn.alpha.detach()
    out = torch.zeros(L, C, D)
    for i in range(L):
        for c in range(C):
            scores = torch.full((L, C), float("-inf"))
            for j in range(L):
                for e in range(C):
                    if not allowed[0, i * C + c, j * C + e]:
                        continue
                    channel = sum(q[t, c] @ k[t, e] for t in range(i + 1) if m[t, c] and m[t, e])
                    item = sum(q[i, f] @ k[j, f] for f in range(C) if m[i, f] and m[j, f])
                    scores[j, e] = (a[0] * (q[i, c] @ k[j, e]) + a[1] * channel + a[2] * item) / D**0.5
            out[i, c] = (scores.flatten().softmax(0)[:, None] * v.reshape(L * C, D)).sum(0)
    expected = attn.out(out[None])
    with torch.no_grad():
        assert torch.allclose(attn(x, allowed, available), expected, atol=1e-5)


def test_attention2d_earlier_items_do_not_read_later_ones():
    torch.manual_seed(0)
    attn = Attention2D(2, 4, heads=2, dropout=0.0).eval()
    x = torch.randn(1, 4, 2, 4)
    is_item = torch.ones(1, 4, dtype=torch.bool)
    available = torch.ones(1, 4, 2, dtype=torch.bool)
    allowed = attention2d_mask(is_item, available)
    changed = x.clone()
    changed[0, 3] += 1.0
    with torch.no_grad():
        before, after = attn(x, allowed, available), attn(changed, allowed, available)
    assert torch.allclose(before[0, :3], after[0, :3], atol=1e-6)
    assert not torch.allclose(before[0, 3], after[0, 3], atol=1e-3)


def test_trans2d_channels_of_earlier_items_reach_the_user_vector():
    """Holistic fusion: the image channel of an earlier item changes the last item's output."""
    model = build("trans2d", dropout=0.0).eval()
    with torch.no_grad():
        before = model(batch([[4, 3]]))  # the last item (3) has no image; item 4 has
        model.code_tables[0].weight[0].add_(1.0)  # item 4's image code is 0
        assert not torch.allclose(model(batch([[4, 3]])), before, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("name", MODELS)
def test_a_few_steps_fit_a_few_sequences(name):
    model = build(name, dropout=0.0)
    b = batch([[0, 1, 2], [3, 4], [5, 6, 7, 8], [9], [2, 1]])
    b["target"] = torch.tensor([3, 5, 9, 11, 0])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model.score(b), b["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    ds = make_toy(tmp_path_factory.mktemp("work"), "coded")
    add_hand_made_codes(ds)
    return ds


@pytest.mark.parametrize("name", MODELS)
def test_trains_and_evaluates_through_the_cli(cli, coded, name):
    fast = list(FAST)
    if name in ("srgnn", "gru4recf"):  # no attention heads
        del fast[fast.index("--heads") : fast.index("--heads") + 2]
    r = train(cli, coded, "--model", name, "--epochs", "3", "--patience", "0", "--lr", "0.005", *fast)
    assert r.exit_code == 0, r.stderr
    folder = run_folder(coded, f"{name}-loo-s0")
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["model"] == name
    expected = {"preprocess", "codes:image"} if name in FEATURE_MODELS else {"preprocess"}
    assert set(config["fingerprints"]) == expected
    assert config["model"]["modalities"] == (["image"] if name in FEATURE_MODELS else [])
    history = json.loads((folder / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"]
    e = evaluate(cli, coded, "--run", f"{name}-loo-s0")
    assert e.exit_code == 0, e.stderr
    assert_metrics_match_ranks(folder)


def test_cli_refuses_options_a_model_does_not_use(cli, coded, tmp_path):
    assert "--modalities: not used by model srgnn" in one_error_line(train(cli, coded, "--model", "srgnn", "--modalities", "image"))
    assert "--heads: not used by model srgnn" in one_error_line(train(cli, coded, "--model", "srgnn", "--heads", "4"))
    assert "--heads: not used by model gru4recf" in one_error_line(train(cli, coded, "--model", "gru4recf", "--heads", "4"))
    r = train(cli, coded, "--model", "nova", "--dim", "15", "--heads", "2", "--run-name", "odd")
    assert "--heads: 2 does not divide --dim 15" in one_error_line(r)
    assert not run_folder(coded, "odd").exists()
    bare = make_toy(tmp_path, "bare")
    assert "--model nova: dataset 'bare' has no modality codes" in one_error_line(train(cli, bare, "--model", "nova"))


def test_train_help_lists_every_registered_model(cli):
    r = cli(["train", "--help"])
    text = " ".join(r.stdout.split())
    for name in MODELS:
        assert name in text
