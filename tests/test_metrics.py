"""Full-ranking metrics: hand-computed ranks, pessimistic ties, the NDCG formula, batching."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_bad_inputs import mmsr, work  # noqa: F401  (work: a copy of the finished toy pipeline)

from mmsr_cli.errors import MmsrError
from mmsr_cli.metrics import METRIC_NAMES, MetricAccumulator, check_metric, pessimistic_ranks, ranking_metrics


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


def test_evaluation_batches_samples_by_history_length_and_keeps_ranks_in_sample_order():
    """Evaluation takes a split's samples shortest history first (the sequence models then pad
    each batch to about one length); the metrics are the same and the stored per-sample ranks
    stay in sample order."""
    from mmsr_cli import evaluation

    g = torch.Generator().manual_seed(1)
    users = torch.randint(-2, 3, (9, 4), generator=g).float()
    items = torch.randint(-2, 3, (7, 4), generator=g).float()
    targets = torch.randint(0, 7, (9,), generator=g)
    lengths = np.array([5, 1, 3, 1, 4, 2, 5, 1, 2])
    batches_seen = []

    class Split:
        ptr = np.concatenate([[0], np.cumsum(lengths)])  # as SequenceSplit: history offsets

        def __len__(self):
            return 9

        def collate(self, idx):
            batches_seen.append(idx.tolist())
            return {"target": targets[idx], "user_idx": torch.as_tensor(idx)}

    class Model(torch.nn.Module):
        def user_and_item_vectors(self, batch):
            return users[batch["user_idx"]], items

    ranks: list = [torch.tensor([99])]  # what the caller held before is left alone
    got = evaluation.evaluate_split(Model(), Split(), 4, torch.device("cpu"), ranks=ranks)
    assert batches_seen == [[1, 3, 7, 5], [8, 2, 4, 0], [6]]  # by length, ties in sample order
    assert torch.equal(torch.cat(ranks), torch.cat([torch.tensor([99]), pessimistic_ranks(users @ items.T, targets)]))
    assert got.pop("n") == 9
    assert got == pytest.approx(ranking_metrics(users @ items.T, targets))


# ----------------------------------------------------------------------------------------------
# The registry and `mmsr evaluate --metrics/--topk`


def test_selection_parses_metrics_and_cutoffs_and_refuses_bad_ones_in_one_line():
    from mmsr_cli.metrics import Selection

    assert Selection.parse(None, None) == Selection() and Selection().names == METRIC_NAMES
    chosen = Selection.parse("ndcg, hr", "10,1")
    assert chosen.names == ("ndcg@10", "ndcg@1", "hr@10", "hr@1")
    for metrics, topk, message in (("ndcg,map", None, "--metrics: unknown metric 'map'"),
                                   ("hr,hr", None, "--metrics: an entry is named twice"),
                                   (None, "10,,20", "--topk: empty entry"), (None, "ten", "--topk: 'ten' is not an integer"),
                                   (None, "0", "--topk")):
        with pytest.raises(MmsrError, match=message):
            Selection.parse(metrics, topk)


def test_a_registered_metric_is_computed_per_cutoff_like_the_built_in_ones(monkeypatch):
    from mmsr_cli import metrics

    monkeypatch.setattr(metrics, "REGISTRY", dict(metrics.REGISTRY))
    metrics.register("precision")(lambda ranks, k: (ranks <= k).double() / k)
    ranks = torch.tensor([1, 3, 8])
    values = metrics.metrics_from_ranks(ranks, (2, 4), ("hr", "precision"))
    assert list(values) == ["hr@2", "precision@2", "hr@4", "precision@4"]
    assert values["precision@4"].tolist() == [0.25, 0.25, 0.0]
    with pytest.raises(ValueError):
        metrics.register("p@5")


def test_evaluate_computes_the_chosen_metrics_at_the_chosen_cutoffs(work):  # noqa: F811

    from mmsr_cli import contracts as C

    r = run_cli(mmsr(work, "evaluate", "--run", "s", "--metrics", "ndcg,mrr", "--topk", "1,50"))
    assert r.exit_code == 0, r.stderr
    record = json.loads(work.path(f"{C.RUNS_DIR}/s/{C.metrics_file('test')}").read_text())
    assert set(record["metrics"]) == {"ndcg@1", "mrr@1", "ndcg@50", "mrr@50"}
    ranks = torch.from_numpy(np.load(work.path(f"{C.RUNS_DIR}/s/{record['ranks']}")).astype(np.int64)).double()
    assert record["metrics"]["mrr@50"] == pytest.approx(float(torch.where(ranks <= 50, 1 / ranks, 0.0).mean()), abs=1e-12)
    assert record["metrics"]["ndcg@1"] == pytest.approx(float((ranks <= 1).double().mean()), abs=1e-12)
    assert "ndcg@1 " in r.stdout and "mrr@50" in r.stdout and "hr@5" not in r.stdout  # the table follows the choice
    line = run_cli(mmsr(work, "evaluate", "--run", "s", "--metrics", "auc"))
    assert line.exit_code == 2 and "--metrics: unknown metric 'auc'" in line.stderr
