"""Baselines: shapes, padding invariance, memorisation, Pop's ranking, SASRecF's modality masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmsr_cli.errors import MmsrError
from mmsr_cli.metrics import pessimistic_ranks
from mmsr_cli.models import REGISTRY, build_model, check_model_name, model_class
from mmsr_cli.models.base import DatasetInfo, ModalityInfo, ModelConfig, Recommender
from mmsr_cli.models.sasrecf import SASRecF

N_ITEMS, MAX_LEN = 12, 5
PAD = N_ITEMS


def info(modalities=()) -> DatasetInfo:
    return DatasetInfo(
        n_items=N_ITEMS,
        n_users=4,
        max_len=MAX_LEN,
        modalities=list(modalities),
        item_popularity=np.array([5, 0, 2, 9, 2, 0, 0, 1, 0, 0, 0, 3]),
    )


def image_modality() -> ModalityInfo:
    codes = np.full((N_ITEMS, 2), -1, dtype=np.int64)
    codes[:, 0] = np.arange(N_ITEMS) % 4
    codes[::2, 1] = (np.arange(0, N_ITEMS, 2) + 1) % 4
    codes[3] = -1  # item 3 has no image
    codes[5] = [2, -1]  # item 5: one code only
    torch.manual_seed(1)
    return ModalityInfo("image", n_codes=4, code_dim=6, centres=torch.randn(4, 6), item_codes=codes)


def batch(rows: list[list[int]], length: int = MAX_LEN) -> dict[str, torch.Tensor]:
    history = torch.full((len(rows), length), PAD)
    for b, items in enumerate(rows):
        history[b, length - len(items) :] = torch.tensor(items)
    return {
        "history": history,
        "lengths": torch.tensor([len(r) for r in rows]),
        "target": torch.zeros(len(rows), dtype=torch.long),
        "user_idx": torch.arange(len(rows)),
    }


def make(name: str, modalities=(), **kw) -> Recommender:
    torch.manual_seed(0)
    cfg = ModelConfig(model=name, dim=16, layers=2, heads=2, dropout=kw.pop("dropout", 0.2), max_len=MAX_LEN, **kw)
    return build_model(cfg, info(modalities))


SEQUENCE_MODELS = ["pop", "gru4rec", "sasrec", "sasrecf"]


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_shapes_and_dot_product_scoring(name):
    model = make(name, [image_modality()] if name == "sasrecf" else ()).eval()
    b = batch([[1, 2, 3], [4], [5, 6, 7, 8, 9]])
    users, items = model(b), model.item_embeddings()
    assert users.shape[0] == 3 and items.shape == (N_ITEMS, users.shape[1])
    assert torch.allclose(model.score(b), users @ items.T)
    assert torch.isfinite(model.score(b)).all()


@pytest.mark.parametrize("name", ["gru4rec", "sasrec", "sasrecf"])
def test_padding_does_not_change_the_user_vector(name):
    model = make(name, [image_modality()] if name == "sasrecf" else ()).eval()
    short = model(batch([[7, 2]], length=2))
    padded = model(batch([[7, 2]], length=MAX_LEN))
    assert torch.allclose(short, padded, atol=1e-5)
    # ... but the history's content and order do.
    assert not torch.allclose(padded, model(batch([[2, 7]])), atol=1e-4)


@pytest.mark.parametrize("name", ["gru4rec", "sasrec", "sasrecf"])
def test_other_rows_of_the_batch_do_not_change_the_user_vector(name):
    """A row's vector is the same alone and next to longer or shorter histories (GRU4Rec runs
    rows of similar length together, over the longest of them: 3 and 4 items share a group)."""
    model = make(name, [image_modality()] if name == "sasrecf" else ()).eval()
    rows = [[7, 2, 5], [1, 2, 3, 4], [9], [8, 6, 4, 2, 0]]
    together = model(batch(rows))
    for b, row in enumerate(rows):
        assert torch.allclose(model(batch([row]))[0], together[b], atol=1e-5), row


def test_gru4rec_user_vector_is_the_final_hidden_state_of_the_history_alone():
    model = make("gru4rec").eval()
    rows = [[7, 2, 5], [1, 2, 3, 4], [9], [8, 6, 4, 2, 0]]
    users = model(batch(rows))
    with torch.no_grad():
        for b, row in enumerate(rows):
            _, h_n = model.gru(model.item_emb(torch.tensor([row])))
            assert torch.allclose(users[b], h_n[-1, 0], atol=1e-5), row


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_memorises_a_few_sequences_to_hr_at_1(name):
    model = make(name, dropout=0.0)
    b = batch([[0, 1, 2], [3, 4], [5, 6, 7, 8], [9], [2, 1]])
    b["target"] = torch.tensor([3, 5, 9, 11, 0])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        loss = F.cross_entropy(model.score(b), b["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert pessimistic_ranks(model.score(b), b["target"]).tolist() == [1, 1, 1, 1, 1]


def test_pop_ranks_by_training_counts_and_has_no_parameters():
    model = make("pop")
    assert not any(True for _ in model.parameters())
    scores = model.score(batch([[1], [2, 3]]))
    assert torch.equal(scores[0], scores[1])  # same list for everyone
    order = torch.argsort(scores[0], descending=True, stable=True).tolist()
    assert order[:4] == [3, 0, 11, 2]
    # Items with equal counts tie, so the pessimistic rank of an unseen item is the last one.
    assert pessimistic_ranks(scores[:1], torch.tensor([1])).item() == N_ITEMS


def test_sasrecf_masks_missing_modalities():
    mod = image_modality()
    model = make("sasrecf", [mod]).eval()
    # Code tables start from the centres.
    # (directions kept, rescaled to unit mean norm so large feature spaces cannot swamp Eq. 3).
    centres = torch.as_tensor(mod.centres)
    assert torch.allclose(model.code_tables[0].weight.detach(), centres / centres.norm(dim=1).mean())
    with torch.no_grad():
        channel, available = model.modality_channel(0, torch.arange(N_ITEMS + 1))
        assert available.tolist() == [i not in (3, N_ITEMS) for i in range(N_ITEMS + 1)]
        # missing -> zero channel; partial codes -> mean of the valid ones only
        assert torch.count_nonzero(channel[3]) == 0
        assert torch.allclose(channel[5], model.code_tables[0].weight[2])
        assert torch.allclose(channel[0], model.code_tables[0].weight[[0, 1]].mean(0))
        before = model.fused_item_table().clone()
        model.code_tables[0].weight.add_(torch.randn_like(model.code_tables[0].weight))
        after = model.fused_item_table()
    # The item without an image is unaffected by the image codes; the others change.
    assert torch.allclose(before[3], after[3])
    assert not torch.allclose(before[4], after[4])
    assert torch.count_nonzero(after[PAD]) == 0  # padding row stays zero


def test_sasrecf_fuses_each_distinct_history_item_as_the_whole_table_does():
    """input_embeddings fuses the batch's distinct items only: the same rows, padding included,
    and the same gradients as looking the history up in the fused table of every item."""
    model = make("sasrecf", [image_modality()]).train()
    history = torch.tensor([[PAD, PAD, 3, 5, 5], [1, 4, 0, 3, 2], [PAD, PAD, PAD, PAD, 6]])
    weights = torch.randn(*history.shape, model.dim)
    grads = []
    for embed in (model.input_embeddings, lambda h: torch.nn.functional.embedding(h, model.fused_item_table())):
        model.zero_grad()
        out = embed(history)
        (out * weights).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (rows, grad), (table_rows, table_grad) = grads
    assert torch.allclose(rows, table_rows, atol=1e-6) and torch.count_nonzero(rows[history == PAD]) == 0
    assert grad.keys() == table_grad.keys() and "fuse.weight" in grad
    for name in grad:
        assert torch.allclose(grad[name], table_grad[name], atol=1e-5), name


def test_sasrecf_without_modalities_is_an_error():
    with pytest.raises(MmsrError, match="sasrecf needs at least one modality"):
        make("sasrecf")


def test_registry_names_and_unknown_model():
    assert {"mmsr", "pop", "gru4rec", "sasrec", "sasrecf"} <= set(REGISTRY)  # and the other baselines
    for name in ("pop", "gru4rec", "sasrec", "sasrecf"):
        assert issubclass(model_class(name), Recommender)
    assert model_class("sasrecf") is SASRecF
    with pytest.raises(MmsrError) as e:
        check_model_name("bert4rec")
    assert str(e.value) == f"--model: unknown model 'bert4rec' (expected one of {', '.join(REGISTRY)})"
    assert str(e.value).startswith("--model: unknown model 'bert4rec' (expected one of mmsr, pop, gru4rec, sasrec, sasrecf, ")


@pytest.mark.parametrize("name", ["sasrec", "sasrecf"])
def test_scoring_computes_the_last_block_at_the_last_position_only_with_the_same_vectors(name):
    """In eval mode the last transformer block runs for the last position alone (the only one the
    user vector reads): the vectors equal those of the full blocks."""
    modalities = (image_modality(),) if name == "sasrecf" else ()
    m = make(name, modalities, dropout=0.0)
    m.eval()
    rows = batch([[1, 2, 3], [4], [5, 6, 7, 8, 9]])
    with torch.no_grad():
        fast = m(rows)
        m.train()  # training mode computes every position of every block; dropout 0 here
        full = m(rows)
    assert m.blocks[0].dropout.p == 0.0
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6)


def test_side_channels_start_at_the_scale_of_items_and_positions():
    """SASRec^F's fused rows, NOVA's side channels and DIF-SR's attention maps per source start
    at comparable scale (issue 16's check of the node encoder, applied to the baselines).

    Before the fix SASRec^F's fused rows started at 3.4 beside positions of 11.3, NOVA's code
    channels at ~0.75 beside 11.3, and DIF-SR's code maps ~200x smaller than its item map."""
    d, n = 128, 400
    centres = torch.randn(30, 384, generator=torch.Generator().manual_seed(0)) * 3.0
    codes = np.random.default_rng(0).integers(0, 30, size=(n, 3))
    data = DatasetInfo(n_items=n, n_users=5, max_len=50, modalities=[ModalityInfo("m0", 30, 384, centres, codes)])
    norm = lambda t: t.detach().norm(dim=-1).mean().item()  # noqa: E731
    history = torch.arange(n).view(8, 50)

    torch.manual_seed(0)
    sasrecf = build_model(ModelConfig(model="sasrecf", dim=d, heads=2), data)
    fused = norm(sasrecf.fused_item_table()[:n] * d**0.5)
    assert 0.7 < fused / norm(sasrecf.pos_emb.weight) < 1.4, fused

    torch.manual_seed(0)
    nova = build_model(ModelConfig(model="nova", dim=d, heads=2), data)
    side, _ = nova.side_information(history)
    position, code = norm(side[:, :, 0]), norm(side[:, :, 1])
    assert 0.7 < code / position < 1.4, (code, position)

    torch.manual_seed(0)
    difsr = build_model(ModelConfig(model="difsr", dim=d, heads=2), data)
    sides, masks = difsr.side_sources(history)
    r = difsr.input_norm(difsr.item_emb(history))
    maps = difsr.layers[0].attn.attention_maps(r, sides, masks).detach()  # item, position, code
    spread = maps.flatten(0, -2).std(dim=0)
    assert spread.max() / spread.min() < 3.0, spread


@pytest.mark.parametrize("name", ["sasrec", "sasrecf"])
def test_scoring_computes_the_last_blocks_last_position_alone_with_the_same_result(name):
    """When scoring, the last transformer block computes the last position's query alone (keys
    and values of every position): the same user vectors as every position through every block
    (train mode without dropout), and the full path really is a different computation."""
    model = make(name, [image_modality()] if name == "sasrecf" else (), dropout=0.0)
    assert len(model.blocks) == 2
    b = batch([[1, 2, 3], [4], [5, 6, 7, 8, 9], [3, 3]])
    with torch.no_grad():
        full = model.train()(b)
        calls = []
        block = model.blocks[-1].attn
        hook = block.register_forward_hook(lambda module, args, out: calls.append(out.shape[1]))
        scored = model.eval()(b)
        hook.remove()
    torch.testing.assert_close(scored, full, rtol=1e-5, atol=1e-6)
    assert calls and set(calls) == {1}  # the last block's attention returned one position per row
