"""Paired significance tests (significance.py) and the ranks `mmsr evaluate` stores for them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from mmsr_cli import significance as sig
from mmsr_cli.metrics import METRIC_NAMES, metrics_from_ranks

from conftest import run_cli
from test_training import make_toy, run_folder


def arm(label, model, ranks, seeds=None):
    seeds = seeds if seeds is not None else list(range(len(ranks)))
    mean = {m: float(np.mean([sig.case_values(r, m).mean() for r in ranks])) for m in METRIC_NAMES}
    return sig.Arm(label, model, [f"{label}-s{s}" for s in seeds], seeds, mean, ranks, "same")


def test_identical_experiments_are_not_significant():
    r = np.random.default_rng(0).integers(1, 50, 300)
    t = sig.paired_test(arm("a", "mmsr", [r]), arm("b", "sasrec", [r.copy()]), "ndcg@10")
    assert (t.diff, t.t_p, t.wilcoxon_p, t.significant) == (0.0, 1.0, 1.0, False)


def test_a_consistent_gain_is_significant_with_scipy_p_values_and_seed_tests():
    rng = np.random.default_rng(1)
    base = [rng.integers(1, 40, 400) for _ in range(3)]
    better = [np.maximum(1, b - rng.integers(0, 6, 400)) for b in base]  # never worse, often better
    a, b = arm("mmsr", "mmsr", better), arm("sasrec", "sasrec", base)
    t = sig.paired_test(a, b, "mrr@20")
    x = np.mean([sig.case_values(r, "mrr@20") for r in better], axis=0)
    y = np.mean([sig.case_values(r, "mrr@20") for r in base], axis=0)
    assert t.t_p == pytest.approx(stats.ttest_rel(x, y).pvalue) and t.wilcoxon_p == pytest.approx(stats.wilcoxon(x, y).pvalue)
    assert t.diff > 0 and t.significant and t.n_cases == 400
    sx = [sig.case_values(r, "mrr@20").mean() for r in better]
    sy = [sig.case_values(r, "mrr@20").mean() for r in base]
    assert t.n_seeds == 3 and t.seeds_t_p == pytest.approx(stats.ttest_rel(sx, sy).pvalue)
    # the reverse direction is a loss: never marked, whatever the p-values
    assert not sig.paired_test(b, a, "mrr@20").significant
    # case values are the evaluation's per-sample metrics of the ranks
    import torch

    assert np.allclose(sig.case_values(base[0], "ndcg@5"), metrics_from_ranks(torch.from_numpy(base[0]), (5,))["ndcg@5"].numpy())


@pytest.mark.parametrize("n", [3, 5, 6, 8])
def test_the_wilcoxon_floor_over_seeds_is_scipys_smallest_p_and_the_note_says_when_it_blocks(n):
    """Every seed better is the most extreme case: scipy's exact two-sided p is the floor, and the
    note that the test cannot mark a gain appears exactly while that floor is >= 0.05."""
    gains = np.arange(1, n + 1) / 100
    assert stats.wilcoxon(gains, np.zeros(n)).pvalue == pytest.approx(sig.wilcoxon_floor(n))
    test = sig.PairTest("mmsr", "sasrec", "ndcg@10", 0.01, 100, 0.01, 0.01, n_seeds=n)
    note = sig.seeds_wilcoxon_note([test])
    assert bool(note) == (sig.wilcoxon_floor(n) >= sig.ALPHA) == (n < 6)
    if note:
        assert f"{sig.wilcoxon_floor(n):.3g} with {n} seeds" in note
    assert sig.seeds_wilcoxon_note([sig.PairTest("a", "b", "hr@5", 0.0, 10, 1.0, 1.0)]) == ""  # one seed: no test, no note


def test_default_pairs_take_the_best_baseline_per_metric_and_other_samples_are_refused():
    rng = np.random.default_rng(2)
    good_hr = arm("gru4rec", "gru4rec", [np.where(rng.random(200) < 0.5, 15, 100)])  # many hits at rank 15
    good_mrr = arm("sasrec", "sasrec", [np.where(rng.random(200) < 0.2, 1, 100)])  # few hits, at rank 1
    mmsr = arm("mmsr", "mmsr", [rng.integers(1, 30, 200)])
    pairs = {m: b.label for a, b, m in sig.default_pairs([good_hr, good_mrr, mmsr], METRIC_NAMES) if a is mmsr}
    assert pairs["hr@20"] == "gru4rec" and pairs["mrr@5"] == "sasrec"
    assert sig.default_pairs([good_hr, good_mrr], METRIC_NAMES) == []
    other = arm("other", "sasrec", [rng.integers(1, 30, 200)])
    other.samples = "different"
    with pytest.raises(sig.MmsrError, match="evaluated on other samples"):
        sig.paired_test(mmsr, other, "hr@10")


def test_evaluate_stores_ranks_and_compare_marks_and_tests(tmp_path, one_thread):
    ds = make_toy(tmp_path / "work")
    base = ["--workdir", ds.workdir, "--dataset", ds.name]
    for args in (["--model", "pop"], ["--model", "sasrec", "--epochs", "3", "--dim", "16", "--batch-size", "64"]):
        assert run_cli(["train", *base, *args]).exit_code == 0
    r = run_cli(["evaluate", *base, "--compare", "sasrec-loo-s0,pop-loo-s0", "--pairs", "sasrec-loo-s0:pop-loo-s0"])
    assert r.exit_code == 0, r.stderr
    folder = run_folder(ds, "sasrec-loo-s0")
    record = json.loads((folder / "metrics_test.json").read_text())
    ranks = sig.read_ranks(folder / record["ranks"])
    assert record["ranks"] == "ranks_test.npy" and ranks.dtype == np.int32 and len(ranks) == record["n"]
    for m in METRIC_NAMES:  # the stored ranks give the stored metrics
        assert sig.case_values(ranks, m).mean() == pytest.approx(record["metrics"][m])
    results = r.stdout.split("paired tests")[0]  # the results table, before the p-values
    rows = [line for line in results.splitlines() if line.startswith("│ sasrec") or line.startswith("│ pop")]
    assert {line.split()[1] for line in rows} == {"sasrec", "pop"}  # accuracy and beyond-accuracy rows
    assert not any("±" in line for line in rows)  # one seed each: no "± 0.0000"
    assert "paired tests" in r.stdout and "9 paired test(s)" in r.stderr
    bad = run_cli(["evaluate", *base, "--compare", "sasrec-loo-s0,pop-loo-s0", "--pairs", "sasrec-loo-s0:nope"])
    assert bad.exit_code == 2 and "--pairs: run 'nope' is not among the compared runs" in bad.stderr
