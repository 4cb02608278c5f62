"""The recipes of docs/architecture.md touch at most two files each.

A model and a metric are written here, in this test module (the one new file of their recipe),
and registered (the recipe's one registration line); `mmsr train`, `evaluate` and `recommend` then
run them with no other file touched. The data-source and encoder recipes are done the same way
by tests/test_sources.py and tests/test_encoders.py. The last test reads the recipes in the docs
and counts the files each one names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_bad_inputs import mmsr, work  # noqa: F401  (work: a copy of the finished toy pipeline)
from torch import nn

from mmsr_cli import contracts as C
from mmsr_cli import metrics, models
from mmsr_cli.models.base import DatasetInfo, ModelOptions, Recommender

DOCS = Path(__file__).resolve().parents[1] / "docs"


@dataclass
class MeanOfHistoryConfig(ModelOptions):
    """The toy model's one option."""

    dim: int = 32  # embedding size


class MeanOfHistory(Recommender):
    """A toy model: the user vector is the mean embedding of the history's items."""

    config_class = MeanOfHistoryConfig

    def __init__(self, config: MeanOfHistoryConfig, info: DatasetInfo):
        super().__init__()
        self.n_items = info.n_items
        self.item_emb = nn.Embedding(info.n_items + 1, config.dim, padding_idx=info.n_items)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        real = (batch["history"] != self.n_items).unsqueeze(-1)
        return (self.item_emb(batch["history"]) * real).sum(1) / real.sum(1).clamp(min=1)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight[: self.n_items]


@pytest.fixture
def toy_model(monkeypatch):
    """Recipe "add a model", step 2: its registry line (undone after the test)."""
    monkeypatch.setitem(models.REGISTRY, "meanhist", f"{__name__}:MeanOfHistory")


def test_a_model_written_in_one_module_trains_evaluates_and_recommends(work, toy_model):  # noqa: F811
    r = run_cli(mmsr(work, "train", "--model", "meanhist", "--epochs", "2", "--dim", "8"))
    assert r.exit_code == 0, r.stderr
    r = run_cli(mmsr(work, "evaluate", "--run", "meanhist-loo-s0"))
    assert r.exit_code == 0, r.stderr
    record = json.loads(work.path(f"{C.RUNS_DIR}/meanhist-loo-s0/{C.metrics_file('test')}").read_text())
    assert set(record["metrics"]) == set(metrics.METRIC_NAMES) and record["n"] > 0
    r = run_cli(mmsr(work, "recommend", "--run", "meanhist-loo-s0", "--all-users", "--top-k", "3"))
    assert r.exit_code == 0 and len(r.stdout.splitlines()) > 1, r.stderr
    # the options outside its config are refused in one line, as for the built-in models
    assert models.fields_not_read("meanhist")[:3] == ("layers", "heads", "dropout")
    r = run_cli(mmsr(work, "train", "--model", "meanhist", "--heads", "4"))
    assert r.exit_code == 2 and "--heads: not used by model meanhist" in r.stderr


def test_a_metric_written_in_one_function_is_evaluated_and_tested(work, monkeypatch):  # noqa: F811
    """Recipe "add a metric": one registered function of the ranks and k."""
    monkeypatch.setattr(metrics, "REGISTRY", dict(metrics.REGISTRY))
    metrics.register("precision")(lambda ranks, k: (ranks <= k).double() / k)
    r = run_cli(mmsr(work, "evaluate", "--run", "s", "--metrics", "precision,hr", "--topk", "10"))
    assert r.exit_code == 0, r.stderr
    record = json.loads(work.path(f"{C.RUNS_DIR}/s/{C.metrics_file('test')}").read_text())
    ranks = np.load(work.path(f"{C.RUNS_DIR}/s/{record['ranks']}")).astype(np.float64)
    assert record["metrics"]["precision@10"] == pytest.approx((ranks <= 10).mean() / 10, abs=1e-12)
    assert record["metrics"]["hr@10"] == pytest.approx((ranks <= 10).mean(), abs=1e-12)
    # two runs compared with paired tests on the new metric
    r = run_cli(mmsr(work, "evaluate", "--compare", "m,s", "--metrics", "precision", "--topk", "5,10"))
    assert r.exit_code == 0 and "precision@5" in r.stdout, r.stderr


def recipes(path: Path) -> dict[str, str]:
    """``### Recipe: add a X`` / ``### Add a X`` sections of a Markdown file: title -> text."""
    text = path.read_text()
    parts = re.split(r"^### (?:Recipe: )?([Aa]dd an? [a-z ]+)$", text, flags=re.M)
    return {parts[i].lower(): parts[i + 1].split("\n## ")[0] for i in range(1, len(parts), 2)}


def test_each_recipe_in_the_docs_names_at_most_two_files():
    found = recipes(DOCS / "architecture.md")
    assert set(found) == {"add a model", "add a data source", "add a metric", "add an encoder"}
    linked = recipes(DOCS / "architecture-sources.md")
    for title, text in found.items():
        files = set(re.findall(r"`(mmsr_cli/[\w/<>.]+\.py)`", text + linked.get(title, "")))
        assert 1 <= len(files) <= 2, (title, files)
