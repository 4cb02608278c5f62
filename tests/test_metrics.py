"""Full-ranking metrics: hand-computed ranks, pessimistic ties, the NDCG formula, batching."""

from __future__ import annotations

import math

import pytest
import torch

from mmsr_cli.errors import MmsrError
from mmsr_cli.evaluation import (
    METRIC_NAMES,
    MetricAccumulator,
    check_metric,
    pessimistic_ranks,
    ranking_metrics,
)


def test_ranks_by_hand():
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.9],  # target 2: 0.5 and 0.9 are higher -> rank 3
            [0.1, 0.5, 0.3, 0.9],  # target 3: best -> rank 1
            [0.1, 0.5, 0.3, 0.9],  # target 0: worst -> rank 4
        ]
    )
    assert pessimistic_ranks(scores, torch.tensor([2, 3, 0])).tolist() == [3, 1, 4]


def test_ties_count_against_the_target():
    # Target 1 ties with items 0 and 3, item 2 is higher: 1 + 1 higher + 2 ties = 4.
    scores = torch.tensor([[0.5, 0.5, 0.7, 0.5, 0.1]])
    assert pessimistic_ranks(scores, torch.tensor([1])).tolist() == [4]
    # All equal scores: every target gets the worst rank, whichever it is.
    flat = torch.zeros(3, 30)
    assert pessimistic_ranks(flat, torch.tensor([0, 7, 29])).tolist() == [30, 30, 30]
    m = ranking_metrics(flat, torch.tensor([0, 7, 29]))
    assert all(v == 0.0 for v in m.values())  # rank 30 > 20


def test_nan_scores_rank_last():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[nan, 0.2, 0.1]])
    assert pessimistic_ranks(scores, torch.tensor([0])).tolist() == [3]
    # a NaN elsewhere counts as the lowest score: below a finite target, tied with a -inf one
    scores = torch.tensor([[0.3, nan, 0.1, -inf, 0.5]] * 4)
    assert pessimistic_ranks(scores, torch.tensor([0, 2, 3, 1])).tolist() == [2, 3, 5, 5]
    # +inf targets tie with every +inf score; half-precision scores rank as float32
    scores = torch.tensor([[inf, 0.0, inf, 1.0]])
    assert pessimistic_ranks(scores, torch.tensor([0])).tolist() == [2]
    assert pessimistic_ranks(scores.half(), torch.tensor([3])).tolist() == [3]


def test_metric_values_single_target_ndcg():
    # One sample per rank 1, 2, 3, 10, 11, 21 in a 30-item catalogue.
    ranks = [1, 2, 3, 10, 11, 21]
    n = 30
    scores = torch.zeros(len(ranks), n)
    targets = torch.zeros(len(ranks), dtype=torch.long)
    for row, r in enumerate(ranks):
        # items 1..r-1 score higher than the target (item 0); the rest lower
        scores[row, 0] = 0.0
        scores[row, 1:r] = 1.0
        scores[row, r:] = -1.0
    assert pessimistic_ranks(scores, targets).tolist() == ranks
    m = ranking_metrics(scores, targets)
    for k in (5, 10, 20):
        hits = [r for r in ranks if r <= k]
        assert m[f"hr@{k}"] == pytest.approx(len(hits) / len(ranks))
        assert m[f"mrr@{k}"] == pytest.approx(sum(1 / r for r in hits) / len(ranks))
        # single relevant item: DCG = 1/log2(rank+1), ideal DCG = 1, no other normalisation
        assert m[f"ndcg@{k}"] == pytest.approx(sum(1 / math.log2(r + 1) for r in hits) / len(ranks))
    one = ranking_metrics(scores[1:2], targets[1:2])  # rank 2
    assert one["ndcg@5"] == pytest.approx(1 / math.log2(3)) == pytest.approx(0.6309297535714575)
    assert one["mrr@5"] == 0.5 and one["hr@5"] == 1.0


def test_batchwise_accumulation_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (97, 40), generator=g).float()  # many ties on purpose
    targets = torch.randint(0, 40, (97,), generator=g)
    acc = MetricAccumulator()
    for start in range(0, 97, 10):
        acc.add(scores[start : start + 10], targets[start : start + 10])
    whole = ranking_metrics(scores, targets)
    assert acc.n == 97
    assert acc.result() == pytest.approx(whole)
    assert set(whole) == set(METRIC_NAMES)


def test_unknown_metric_is_an_error():
    assert check_metric("ndcg@10") == "ndcg@10"
    with pytest.raises(MmsrError, match="--metric: unknown metric 'ndcg@7'"):
        check_metric("ndcg@7")


def test_evaluation_scores_a_few_rows_at_a_time_with_the_same_metrics(monkeypatch):
    """Full-ranking evaluation multiplies user and item vectors in row chunks that bound the score
    matrix; the metrics and per-sample ranks are those of one [B, n_items] product."""
    from mmsr_cli import evaluation

    g = torch.Generator().manual_seed(0)
    users = torch.randint(-2, 3, (23, 4), generator=g).float()  # integer scores: many ties
    items = torch.randint(-2, 3, (11, 4), generator=g).float()
    targets = torch.randint(0, 11, (23,), generator=g)

    class Split:
        def __len__(self):
            return 23

        def collate(self, idx):
            return {"target": targets[idx], "user_idx": torch.as_tensor(idx)}

    class Model(torch.nn.Module):
        def user_and_item_vectors(self, batch):
            return users[batch["user_idx"]], items

    expected_ranks = pessimistic_ranks(users @ items.T, targets)
    seen_rows = []
    monkeypatch.setattr(evaluation, "SCORE_CHUNK_ELEMENTS", 3 * 11)  # three users' scores at a time
    ranks: list = []
    got = evaluation.evaluate_split(Model(), Split(), 10, torch.device("cpu"), ranks=ranks,
                                    on_scores=lambda s, t: seen_rows.append(s.shape[0]))
    assert torch.equal(torch.cat(ranks), expected_ranks)
    assert seen_rows == [3, 3, 3, 1] * 2 + [3]  # batches of 10, 10, 3 users
    assert got.pop("n") == 23
    assert got == pytest.approx(ranking_metrics(users @ items.T, targets))
