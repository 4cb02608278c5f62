"""Coverage, recommended popularity and popularity buckets (mmsr_cli/popularity.py), by hand and
through `mmsr evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmsr_cli.popularity import BUCKETS, BeyondAccuracy, flat_metrics, item_popularity, popularity_buckets

from test_training import FAST, evaluate, make_toy, run_folder, train


def test_buckets_split_the_frequent_items_into_thirds_of_their_interactions():
    pop = np.array([30, 20, 10, 5, 5, 4, 3, 2, 1, 0])
    # 77 interactions of the frequent items; shares before each: 0, .39, .65, .78, ...
    assert [BUCKETS[b] for b in popularity_buckets(pop, rare_max=2)] == [
        "head", "torso", "torso", "tail", "tail", "tail", "tail", "rare", "rare", "rare"]
    assert set(popularity_buckets(np.zeros(4, dtype=np.int64))) == {BUCKETS.index("rare")}


def test_coverage_popularity_and_bucket_metrics_by_hand():
    pop = np.array([9, 6, 3, 0])  # head: item 0; torso: item 1; tail: item 2 (rare_max 2); rare: item 3
    acc = BeyondAccuracy(pop, rare_max=2, ks=(1, 2))
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0],   # target 0 at rank 1
                           [4.0, 3.0, 2.0, 1.0],   # target 3 at rank 4
                           [1.0, 2.0, 4.0, 3.0]])  # target 2 at rank 1
    acc(scores[:2], torch.tensor([0, 3]))
    acc(scores[2:], torch.tensor([2]))
    r = acc.result()
    assert r["coverage@1"] == pytest.approx(2 / 4)  # items 0 and 2 top the lists
    assert r["coverage@2"] == pytest.approx(4 / 4)
    assert r["avg_pop@1"] == pytest.approx((9 + 9 + 3) / 3)
    assert r["avg_pop@2"] == pytest.approx((9 + 6 + 9 + 6 + 3 + 0) / 6)
    b = r["buckets"]
    assert [b[n]["n"] for n in BUCKETS] == [1, 0, 1, 1] and [b[n]["items"] for n in BUCKETS] == [1, 1, 1, 1]
    assert b["head"]["metrics"]["hr@1"] == 1.0 and b["rare"]["metrics"]["hr@2"] == 0.0
    assert b["tail"]["metrics"]["ndcg@2"] == 1.0 and b["torso"]["metrics"]["hr@1"] is None
    flat = flat_metrics(r)
    assert "hr@1/head" in flat and "hr@1/torso" not in flat


def test_evaluate_records_buckets_that_add_up_and_pop_covers_ten_items(cli, tmp_path):
    ds = make_toy(tmp_path)
    assert train(cli, ds, "--model", "sasrec", "--epochs", "2", *FAST).exit_code == 0
    assert train(cli, ds, "--model", "pop").exit_code == 0
    r = evaluate(cli, ds, "--run", "sasrec-loo-s0")
    assert r.exit_code == 0, r.stderr
    assert "coverage@10" in r.stdout and "by the target's training popularity" in r.stdout
    rec = json.loads((run_folder(ds, "sasrec-loo-s0") / "metrics_test.json").read_text())
    beyond = rec["beyond"]
    assert sum(b["n"] for b in beyond["buckets"].values()) == rec["n"]
    for m in ("hr@10", "ndcg@20", "mrr@5"):  # the sample-weighted bucket means give the overall mean
        total = sum(b["n"] * b["metrics"][m] for b in beyond["buckets"].values() if b["n"])
        assert total / rec["n"] == pytest.approx(rec["metrics"][m])
    pop = item_popularity(ds, 60, 20)
    assert sum(b["items"] for b in beyond["buckets"].values()) == 20 and pop.sum() > 0
    assert evaluate(cli, ds, "--run", "pop-loo-s0").exit_code == 0
    pop_rec = json.loads((run_folder(ds, "pop-loo-s0") / "metrics_test.json").read_text())["beyond"]
    assert pop_rec["coverage@10"] == pytest.approx(10 / 20)  # one list for every user
    r = evaluate(cli, ds, "--compare", "sasrec-loo-s0,pop-loo-s0")
    assert r.exit_code == 0, r.stderr
    assert "ndcg@10/head" in r.stdout and "avg_pop@10" in r.stdout
    # report: the section's table comes from the metrics files, with its bar chart
    out = tmp_path / "docs" / "report.md"
    r = cli(["report", "--workdir", tmp_path, "--output", out])
    assert r.exit_code == 0, r.stderr
    text = out.read_text()
    section = text.split("### Beyond accuracy: coverage, popularity and long tail")[1].split("###")[0]
    pop_row = next(line for line in section.splitlines() if line.startswith("| pop | 1 |"))
    cells = [c.strip() for c in pop_row.strip("|").split("|")]
    assert cells[2] == "50.00" and cells[3] == f"{pop_rec['avg_pop@10']:.1f}"
    head = beyond["buckets"]["head"]["metrics"]["ndcg@10"]
    sasrec_row = next(line for line in section.splitlines() if line.startswith("| sasrec"))
    assert f"| {100 * head:.2f} |" in sasrec_row and "±" not in section  # one seed: no spread to show
    assert (out.parent / "report_figures" / "toy_popularity.png").read_bytes()[:4] == b"\x89PNG"
