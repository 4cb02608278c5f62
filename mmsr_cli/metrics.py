"""Ranking metrics: pessimistic full-ranking ranks, and a registry of metrics computed from them.

Protocol, shared by every model so that numbers are comparable (paper section 5, "Evaluation
Protocol"):

* every sample is ranked against ALL items of the dataset (no sampled negatives);
* items of the user's history are NOT excluded from the ranking (the target may itself be a
  repeat purchase, and excluding would favour models differently);
* ties are broken pessimistically: rank = 1 + #items scoring strictly higher than the target
  + #other items scoring exactly as the target, so a constant model gets the worst rank.

A metric is a function of the 1-based ranks ([B] float64) and a cut-off k, giving one value per
sample ([B] float64); a run's metric is its mean. Metrics are registered by name (as RecBole's
``metrics``), and `mmsr evaluate --metrics/--topk` choose which ones at which cut-offs:

* HR@k = [rank <= k]; MRR@k = 1/rank if rank <= k else 0; NDCG@k = 1/log2(rank + 1) if
  rank <= k else 0 (single relevant item, so the ideal DCG is 1 and there is no normalisation
  by the DCG of k relevant items).

Add a metric with ``@register("name")`` on such a function, in this module or your own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from . import contracts as C
from .errors import MmsrError, parse_list

MetricFn = Callable[[torch.Tensor, int], torch.Tensor]  # (ranks [B] float64, k) -> values [B] float64

REGISTRY: dict[str, MetricFn] = {}


def register(name: str) -> Callable[[MetricFn], MetricFn]:
    """Register ``fn(ranks, k)`` as metric ``name`` (``--metrics name``); returns ``fn``."""
    if not name or "@" in name or "," in name:
        raise ValueError(f"metric name {name!r}: non-empty, without '@' or ','")

    def add(fn: MetricFn) -> MetricFn:
        REGISTRY[name] = fn
        return fn

    return add


@register("hr")
def hit_ratio(ranks: torch.Tensor, k: int) -> torch.Tensor:
    return (ranks <= k).double()


@register("mrr")
def reciprocal_rank(ranks: torch.Tensor, k: int) -> torch.Tensor:
    return torch.where(ranks <= k, 1.0 / ranks, torch.zeros_like(ranks))


@register("ndcg")
def ndcg(ranks: torch.Tensor, k: int) -> torch.Tensor:
    return torch.where(ranks <= k, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks))


KS = (5, 10, 20)  # the default cut-offs
METRICS = ("hr", "mrr", "ndcg")  # the default metrics


def metric_names(metrics: Iterable[str] = METRICS, ks: Iterable[int] = KS) -> tuple[str, ...]:
    """``<metric>@<k>`` for each metric, then each cut-off (the order of tables and history.csv)."""
    return tuple(f"{m}@{k}" for m in metrics for k in ks)


METRIC_NAMES = metric_names()


@dataclass(frozen=True)
class Selection:
    """The metrics and cut-offs an evaluation computes (`mmsr evaluate --metrics/--topk`)."""

    metrics: tuple[str, ...] = METRICS
    ks: tuple[int, ...] = KS

    @property
    def names(self) -> tuple[str, ...]:
        return metric_names(self.metrics, self.ks)

    @classmethod
    def parse(cls, metrics: str | None, topk: str | None) -> "Selection":
        """``--metrics hr,ndcg --topk 10,20`` (None: the defaults), checked in one line each."""
        names = _entries(metrics, "--metrics") if metrics is not None else list(METRICS)
        for name in names:
            if name not in REGISTRY:
                raise MmsrError(f"--metrics: unknown metric {name!r} (expected one of {', '.join(REGISTRY)})")
        ks = []
        for entry in _entries(topk, "--topk") if topk is not None else [str(k) for k in KS]:
            try:
                k = int(entry)
            except ValueError:
                raise MmsrError(f"--topk: {entry!r} is not an integer") from None
            C.RANGE_TOP_K.check("--topk", k)
            ks.append(k)
        return cls(tuple(names), tuple(ks))


def _entries(value: str, option: str) -> list[str]:
    items = parse_list(value, option)
    if len(set(items)) != len(items):
        raise MmsrError(f"{option}: an entry is named twice in {value!r}")
    return items


def check_metric(name: str, names: Iterable[str] = METRIC_NAMES) -> str:
    names = tuple(names)
    if name not in names:
        raise MmsrError(f"--metric: unknown metric {name!r} (expected one of {', '.join(names)})")
    return name


def pessimistic_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among all items ([B] int64), ties counted against the target.

    ``scores`` [B, n_items]; ``targets`` [B]. NaN scores count as the lowest possible score, so a
    model that outputs NaN ranks its targets last instead of first. History items are not
    excluded.
    """
    if scores.dtype != torch.float32:
        scores = scores.float()
    target_scores = scores.gather(1, targets.view(-1, 1).long())
    # 1 + #higher + #ties other than itself = #items scoring >= the target (one pass, no copy);
    # a NaN score compares false, as -inf would against a target above -inf
    # Written as 1.0/0.0 floats and summed: on CPU ~10x faster than summing the bool matrix,
    # whose int64 cast copies it; float32 sums of ones are exact below 2^24 items.
    at_least = torch.empty(scores.shape, dtype=torch.float32 if scores.shape[1] < 1 << 24 else torch.float64,
                           device=scores.device)
    ranks = torch.ge(scores, target_scores, out=at_least).sum(1).long()
    # a NaN or -inf target ties with every NaN and -inf score and is below the rest: rank n
    lowest = torch.isnan(target_scores[:, 0]) | (target_scores[:, 0] == -math.inf)
    return torch.where(lowest, scores.shape[1], ranks)


def metrics_from_ranks(ranks: torch.Tensor, ks: Iterable[int] = KS,
                       metrics: Iterable[str] = METRICS) -> dict[str, torch.Tensor]:
    """Per-sample ``<metric>@<k>`` ([B] float each) from 1-based ranks, cut-off by cut-off."""
    ranks = ranks.double()
    metrics = tuple(metrics)
    return {f"{m}@{k}": REGISTRY[m](ranks, k) for k in ks for m in metrics}


def ranking_metrics(scores: torch.Tensor, targets: torch.Tensor, ks: Iterable[int] = KS) -> dict[str, float]:
    """Mean HR/MRR/NDCG@k of one score matrix (full ranking, pessimistic ties, no exclusion)."""
    per_sample = metrics_from_ranks(pessimistic_ranks(scores, targets), ks)
    return {name: float(v.mean()) for name, v in per_sample.items()}


class MetricAccumulator:
    """Sums per-sample metrics over batches on the device; ``result()`` gives the means."""

    def __init__(self, ks: Iterable[int] = KS, metrics: Iterable[str] = METRICS):
        self.ks = tuple(ks)
        self.metrics = tuple(metrics)
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    @property
    def names(self) -> list[str]:
        """The metrics in the order :func:`metrics_from_ranks` gives them."""
        return [f"{m}@{k}" for k in self.ks for m in self.metrics]

    def add(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns its ranks."""
        ranks = pessimistic_ranks(scores, targets)
        for name, v in metrics_from_ranks(ranks, self.ks, self.metrics).items():
            self.sums[name] = self.sums.get(name, 0) + v.sum()
        self.n += len(targets)
        return ranks

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {f"{m}@{k}": 0.0 for m in self.metrics for k in self.ks}
        return {name: float(total) / self.n for name, total in self.sums.items()}
