"""MMGCN, MGAT and BM3 (mmsr_cli/models/collaborative.py): the training user-item graph, shapes,
each model's defining property, and `mmsr train` / `mmsr evaluate` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from mmsr_cli import contracts as C
from mmsr_cli import memory
from mmsr_cli import inputs
from mmsr_cli import training
from mmsr_cli.metrics import pessimistic_ranks
from mmsr_cli.models import build_model
from mmsr_cli.models.base import DatasetInfo, ModelConfig
from mmsr_cli.models.bm3 import BM3
from mmsr_cli.models.mgat import MGAT
from mmsr_cli.models.mmgcn import MMGCN
from mmsr_cli.workdir import DatasetDir

from conftest import run_cli
from test_codes import write_features
from test_training import N_TOY_ITEMS, evaluate, make_toy, one_error_line, run_folder, train

MODELS = ["mmgcn", "mgat", "bm3"]
FAST = ["--dim", "16", "--batch-size", "64"]  # no --heads: these models refuse it
N_USERS, N_ITEMS = 4, 12
# user -> items; item 11 is in no training interaction (an isolated node)
INTERACTIONS = {0: [0, 1, 2], 1: [2, 3], 2: [4, 5, 0], 3: [6, 7, 1, 9]}


def info() -> DatasetInfo:
    g = torch.Generator().manual_seed(3)
    image = torch.randn(N_ITEMS, 10, generator=g)
    image[8] = 0  # item 8 has no image
    pairs = np.array([(u, i) for u, items in INTERACTIONS.items() for i in items])
    return DatasetInfo(
        n_items=N_ITEMS, n_users=N_USERS, max_len=5, train_interactions=pairs,
        item_features={"image": image, "text": torch.randn(N_ITEMS, 7, generator=g)},
    )


def make(name: str, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(model=name, dim=16, **{"layers": 2, "dropout": 0.2, **kw}), info())


def batch(users: list[int], targets: list[int] | None = None, history_seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(history_seed)
    return {
        "history": torch.randint(0, N_ITEMS + 1, (len(users), 5), generator=g),
        "lengths": torch.full((len(users),), 5),
        "target": torch.tensor(targets if targets is not None else [0] * len(users)),
        "user_idx": torch.tensor(users),
    }


# ----------------------------------------------------------------------------------------------
# The training graph: what each user met before their validation target, nothing after


SEQUENCES = {
    "a": ["i0", "i1", "i2", "i3", "i4"],
    "b": ["i5", "i6", "i7"],  # loo: one item before the validation target, no training sample
    "c": ["i0", "i8", "i9", "i8", "i2", "i1"],
    "d": ["i3", "i4", "i6", "i3", "i5"],  # loo: the validation target i3 was met before
}


def make_sequences(workdir: Path, *split_args: str) -> DatasetDir:
    ds = DatasetDir.open(workdir, "hand")
    ds.path(C.RAW_DIR).mkdir(parents=True)
    lines = ["user_id\titem_ids"] + [f"{u}\t{' '.join(items)}" for u, items in SEQUENCES.items()]
    ds.path(C.RAW_SEQUENCES).write_text("\n".join(lines) + "\n")
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=[C.RAW_DIR], options={})
    # --max-len 2: histories are cut, the graph must still hold every earlier item
    r = run_cli(["preprocess", "--workdir", workdir, "--dataset", "hand", "--core", "0", "--max-len", "2", *split_args])
    assert r.exit_code == 0, r.stderr
    return ds


@pytest.mark.parametrize(
    "split_args,n_test",
    [((), lambda n: 1), (("--split", "ratio", "--test-ratio", "0.4"), lambda n: max(1, math.floor(0.4 * n)))],
    ids=["loo", "ratio"],
)
def test_training_graph_holds_what_users_met_before_their_validation_target(tmp_path, split_args, n_test):
    ds = make_sequences(tmp_path, *split_args)
    users = pq.read_table(ds.path(C.USERS)).to_pydict()
    items = pq.read_table(ds.path(C.ITEMS)).to_pydict()
    user_id = dict(zip(users["user_idx"], users["user_id"]))
    item_id = dict(zip(items["item_idx"], items["item_id"]))
    pairs = inputs.train_interactions(ds, len(user_id), len(item_id))
    got = {(user_id[u], item_id[i]) for u, i in pairs.tolist()}
    assert len(got) == len(pairs)  # unique pairs
    # Everything before the validation target (position n - t - 1), nothing from it on.
    expected = {(u, i) for u, seq in SEQUENCES.items() for i in seq[: len(seq) - n_test(len(seq)) - 1]}
    assert got == expected
    valid = pq.read_table(ds.path(C.samples_file("valid"))).to_pydict()
    test = pq.read_table(ds.path(C.samples_file("test"))).to_pydict()
    for u, t in zip(valid["user_idx"] + test["user_idx"], valid["target"] + test["target"]):
        seq = SEQUENCES[user_id[u]]
        met_before = item_id[t] in seq[: len(seq) - n_test(len(seq)) - 1]
        assert ((user_id[u], item_id[t]) in got) == met_before
    assert ("b", "i5") in got  # read from b's validation history: b has no training sample under loo


def test_only_models_that_ask_get_interactions_and_features(tmp_path):
    ds = make_toy(tmp_path)
    write_features(ds, "image", np.random.default_rng(0).normal(size=(N_TOY_ITEMS, 6)), {2})
    sasrec = inputs.load_dataset(ds, ModelConfig(model="sasrec"))
    assert sasrec.info.train_interactions is None and sasrec.info.item_features == {}
    assert set(sasrec.fingerprints) == {"preprocess"}
    mmgcn = inputs.load_dataset(ds, ModelConfig(model="mmgcn"))
    pairs = mmgcn.info.train_interactions
    assert pairs.shape[1] == 2 and np.array_equal(pairs, inputs.train_interactions(ds, mmgcn.info.n_users, N_TOY_ITEMS))
    assert list(mmgcn.info.item_features) == ["image"] and mmgcn.info.item_features["image"].shape == (N_TOY_ITEMS, 6)
    assert torch.all(mmgcn.info.item_features["image"][2] == 0)  # the missing item
    assert set(mmgcn.fingerprints) == {"preprocess", "features:image"}
    assert mmgcn.model_config.modalities == ("image",)


# ----------------------------------------------------------------------------------------------
# Shared behaviour


@pytest.mark.parametrize("name", MODELS)
def test_shapes_scoring_and_the_history_is_ignored(name):
    model = make(name).eval()
    b = batch([0, 1, 2, 3, 0])
    users, items = model(b), model.item_embeddings()
    width = 2 * 16 if name == "mgat" else 16  # MGAT concatenates its two layers
    assert users.shape == (5, width) and items.shape == (N_ITEMS, width)
    assert torch.allclose(model.score(b), users @ items.T) and torch.isfinite(model.score(b)).all()
    # A user's vector is its graph node's: other histories or other rows change nothing.
    assert torch.equal(model(batch([0, 1, 2, 3, 0], history_seed=7)), users)
    assert torch.equal(users[0], users[4]) and torch.equal(model(batch([2]))[0], users[2])


@pytest.mark.parametrize("name", MODELS)
def test_eval_representations_are_reused_until_a_parameter_changes(name):
    model = make(name).eval()
    b = batch([0, 1, 2, 3])
    with torch.no_grad():
        first = model.score(b)
        assert torch.equal(model.score(b), first)
        next(model.parameters()).add_(0.5)  # in place, as an optimizer step does
        changed = model.score(b)
    assert not torch.allclose(changed, first)
    assert torch.allclose(changed, model.score(b), atol=1e-6)  # with grad: recomputed, same values


@pytest.mark.parametrize("name", MODELS)
def test_overfits_a_few_users(name):
    model = make(name)
    b = batch([0, 1, 2, 3], targets=[2, 3, 5, 9])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(80):
        loss = F.cross_entropy(model.score(b), b["target"])
        aux = model.auxiliary_loss(b)
        opt.zero_grad()
        (loss if aux is None else loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    with torch.no_grad():
        assert pessimistic_ranks(model.score(b), b["target"]).tolist() == [1, 1, 1, 1]


# ----------------------------------------------------------------------------------------------
# What makes each model itself


def reference_layer_output(model, layer, x: torch.Tensor) -> torch.Tensor:
    """The layer computed edge by edge (gather one vector per edge, scatter back): what the CSR
    kernels must reproduce."""
    from torch_geometric.utils import scatter, softmax

    src, dst = model.edge_index
    n = model.n_nodes
    id_emb = model.id_emb.weight
    if isinstance(model, MMGCN):
        h = F.leaky_relu(scatter(layer.neighbour(x)[src], dst, dim=0, dim_size=n, reduce="mean"))
        return F.leaky_relu(layer.combine(torch.cat([h, F.leaky_relu(layer.own(x)) + id_emb], dim=-1)))
    att = layer.attend
    z = att.lin(x)
    s = (z[dst] * F.leaky_relu(z[src])).sum(-1)
    gate = torch.sigmoid(s / torch.bincount(src, minlength=n)[src].float().sqrt())
    alpha = softmax(gate * s, dst, num_nodes=n)
    h = F.leaky_relu(F.normalize(scatter(alpha[:, None] * z[src], dst, dim=0, dim_size=n) + att.bias, dim=-1))
    return F.leaky_relu(layer.fuse(h) + F.leaky_relu(layer.own(x)) + id_emb)


@pytest.mark.parametrize("name", ["mmgcn", "mgat"])
def test_sparse_propagation_equals_the_edge_by_edge_computation(name):
    model = make(name)
    layer = model.layers[0][0]
    x = model.inputs[0](model.features(0))
    weights = torch.randn(model.n_nodes, 16, generator=torch.Generator().manual_seed(1))
    graph = model.csr().pattern(x) if name == "mmgcn" else model.csr()
    fast = layer(x, model.id_emb.weight, graph)
    grads_fast = torch.autograd.grad((fast * weights).sum(), list(layer.parameters()))
    slow = reference_layer_output(model, layer, x)
    grads_slow = torch.autograd.grad((slow * weights).sum(), list(layer.parameters()))
    assert torch.allclose(fast, slow, atol=1e-5)
    for a, b in zip(grads_fast, grads_slow):
        assert torch.allclose(a, b, atol=1e-4)


def test_bm3_lightgcn_readout_equals_dense_propagation():
    model = make("bm3")
    adjacency = torch.zeros(model.n_nodes, model.n_nodes)
    for u, items in INTERACTIONS.items():
        for i in items:
            adjacency[u, N_USERS + i] = adjacency[N_USERS + i, u] = 1.0
    inv_sqrt = adjacency.sum(1).clamp(min=1).pow(-0.5)
    norm = inv_sqrt[:, None] * adjacency * inv_sqrt[None, :]  # D^-1/2 A D^-1/2 (Eq. 2)
    x = torch.cat([model.user_emb.weight, model.item_emb.weight])
    layers = [x, norm @ x, norm @ norm @ x]
    mean = torch.stack(layers).mean(0)  # readout over layers 0..2, items add their own (Eq. 3)
    users, items = model.encode()
    assert torch.allclose(users, mean[:N_USERS], atol=1e-6)
    assert torch.allclose(items, mean[N_USERS:] + model.item_emb.weight, atol=1e-6)
    grad_fast = torch.autograd.grad(items.sum() + users.square().sum(), model.user_emb.weight)[0]
    users, items = mean[:N_USERS], mean[N_USERS:] + model.item_emb.weight
    grad_slow = torch.autograd.grad(items.sum() + users.square().sum(), model.user_emb.weight)[0]
    assert torch.allclose(grad_fast, grad_slow, atol=1e-5)


def test_mmgcn_propagates_each_modality_on_its_own_graph_then_sums():
    model = make("mmgcn", layers=1).eval()
    with torch.no_grad():
        per_modality = model.modality_representations()
        users, items = model.propagate()
        assert len(per_modality) == 2
        assert torch.allclose(torch.cat([users, items]), per_modality[0] + per_modality[1], atol=1e-6)
        # Other text features change the text graph only.
        model.features_1.add_(torch.randn_like(model.features_1))
        image_again, text_again = model.modality_representations()
        assert torch.equal(image_again, per_modality[0]) and not torch.allclose(text_again, per_modality[1])
        # One layer: user 0 (items 0, 1, 2) hears from its training items, not from item 7 (user 3's).
        model.features_0[7] += 5.0
        assert torch.allclose(model.modality_representations()[0][0], per_modality[0][0], atol=1e-6)
        model.features_0[1] += 5.0
        assert not torch.allclose(model.modality_representations()[0][0], per_modality[0][0], atol=1e-4)


def test_mgat_gated_attention_sums_to_one_over_each_neighbourhood():
    model = make("mgat")
    layer = model.layers[0][0].attend
    with torch.no_grad():
        x = model.inputs[0](model.features(0))
        z = layer.lin(x)
        alpha, gate = layer.attention(z, model.csr())
    dst = model.edge_index[1]
    totals = torch.zeros(model.n_nodes).index_add_(0, dst, alpha)
    has_neighbours = torch.bincount(dst, minlength=model.n_nodes) > 0
    assert torch.allclose(totals[has_neighbours], torch.ones(int(has_neighbours.sum())), atol=1e-5)
    assert not has_neighbours[model.n_users + 11]  # item 11: in no training interaction, no weight
    assert ((alpha > 0) & (alpha <= 1)).all() and ((gate > 0) & (gate < 1)).all()
    # Not a plain mean: the weights depend on the neighbours.
    uniform = 1.0 / torch.bincount(dst, minlength=model.n_nodes)[dst]
    assert not torch.allclose(alpha, uniform, atol=1e-3)
    # Prediction: the modalities' concatenated layer outputs, averaged.
    with torch.no_grad():
        image, text = model.modality_representations()
        users, items = model.propagate()
    assert image.shape == (model.n_nodes, 2 * 16)
    assert torch.allclose(torch.cat([users, items]), (image + text) / 2, atol=1e-6)


def test_bm3_target_views_are_dropped_out_stop_gradient_copies():
    model = make("bm3", dropout=0.5).train()
    h = torch.randn(200, 16, requires_grad=True)
    view = model.target_view(h)
    assert not view.requires_grad
    kept = view != 0
    assert 0.3 < kept.float().mean() < 0.7
    assert torch.allclose(view[kept], (h.detach() * 2)[kept])  # inverted dropout scaling 1 / (1 - p)
    b = batch([0, 1, 2, 3], targets=[2, 3, 5, 9])
    assert model.auxiliary_loss(b) != model.auxiliary_loss(b)  # a fresh augmentation each call
    still = make("bm3", dropout=0.0).train()
    assert torch.equal(still.auxiliary_loss(b), still.auxiliary_loss(b))


def test_bm3_needs_no_negative_items():
    """Its self-supervised loss only reads the batch's (user, item) pairs and their graph
    neighbourhoods: an item outside both gets no gradient (CE over all items does push it)."""
    model = make("bm3", dropout=0.3).train()
    b = batch([0, 1], targets=[2, 3])
    model.auxiliary_loss(b).backward()
    grad = model.item_emb.weight.grad
    assert grad[11].abs().max() == 0 and grad[2].abs().max() > 0
    for projection in model.projections:  # the modality alignment terms are part of it
        assert projection.weight.grad.abs().max() > 0
    model.zero_grad()
    F.cross_entropy(model.score(b), b["target"]).backward()
    assert model.item_emb.weight.grad[11].abs().max() > 0


def test_bm3_auxiliary_loss_reuses_the_step_propagation():
    model = make("bm3", dropout=0.0).train()
    b = batch([0, 1, 2, 3], targets=[2, 3, 5, 9])
    calls = []
    encode = model.encode
    model.encode = lambda: calls.append(1) or encode()
    model.score(b)
    model.auxiliary_loss(b)
    assert len(calls) == 1
    model.auxiliary_loss(b)  # no score before it: encodes itself
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------------
# End to end through the CLI


@pytest.fixture(scope="module")
def featured(tmp_path_factory) -> DatasetDir:
    ds = make_toy(tmp_path_factory.mktemp("collab"), "feat")
    rng = np.random.default_rng(0)
    write_features(ds, "image", rng.normal(size=(N_TOY_ITEMS, 12)), {0, 5})
    write_features(ds, "text", rng.normal(size=(N_TOY_ITEMS, 8)), set())
    return ds


@pytest.mark.parametrize("name", MODELS)
def test_trains_and_evaluates_end_to_end(cli, featured, name):
    r = train(cli, featured, "--model", name, "--epochs", "4", "--patience", "0", "--lr", "0.01", *FAST)
    assert r.exit_code == 0, r.stderr
    folder = run_folder(featured, f"{name}-loo-s0")
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["modalities"] == ["image", "text"]
    assert set(config["fingerprints"]) == {"preprocess", "features:image", "features:text"}
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == 4 and history[-1]["loss"] < history[0]["loss"]
    # Nothing the dataset can rebuild (graph, features) is stored in the checkpoint.
    best = torch.load(folder / "best.pt", weights_only=True)
    assert not any(k.startswith(("edge_", "features_")) for k in best)
    r = evaluate(cli, featured, "--run", f"{name}-loo-s0")
    assert r.exit_code == 0, r.stderr
    assert (folder / "metrics_test.json").exists()


def test_the_training_loop_adds_the_auxiliary_loss(cli, featured, monkeypatch):
    calls = []

    def constant(self, batch):
        calls.append(len(batch["target"]))
        return torch.tensor(100.0)

    monkeypatch.setattr(BM3, "auxiliary_loss", constant)
    monkeypatch.setattr(memory, "measure", lambda *a, **k: None)  # no memory probe: only the steps call it
    r = train(cli, featured, "--model", "bm3", "--run-name", "aux", "--epochs", "1", *FAST)
    assert r.exit_code == 0, r.stderr
    history = json.loads((run_folder(featured, "aux") / "history.json").read_text())
    assert len(calls) == history[0]["steps"] > 0 and history[0]["loss"] > 100


def test_modalities_option_and_errors(cli, featured, tmp_path):
    r = train(cli, featured, "--model", "mgat", "--modalities", "text", "--run-name", "t", "--epochs", "1", *FAST)
    assert r.exit_code == 0, r.stderr
    config = json.loads((run_folder(featured, "t") / "config.json").read_text())
    assert config["model"]["modalities"] == ["text"] and "features:image" not in config["fingerprints"]
    r = train(cli, featured, "--model", "mmgcn", "--modalities", "audio", "--run-name", "x", *FAST)
    assert "stage 'features:audio' has not been run" in one_error_line(r)
    r = train(cli, featured, "--model", "mmgcn", "--heads", "2", *FAST)
    assert "--heads: not used by model mmgcn" in one_error_line(r)
    bare = make_toy(tmp_path, "bare")
    r = train(cli, bare, "--model", "bm3", *FAST)
    assert "has no item features; run `mmsr extract-features" in one_error_line(r)
