"""Full-ranking metrics (paper section 5, "Evaluation Protocol") and split evaluation.

Protocol, shared by every model so that numbers are comparable:

* every sample is ranked against ALL items of the dataset (no sampled negatives);
* items of the user's history are NOT excluded from the ranking (the target may itself be a
  repeat purchase, and excluding would favour models differently);
* ties are broken pessimistically: rank = 1 + #items scoring strictly higher than the target
  + #other items scoring exactly as the target, so a constant model gets the worst rank;
* HR@k = [rank <= k]; MRR@k = 1/rank if rank <= k else 0; NDCG@k = 1/log2(rank + 1) if
  rank <= k else 0 (single relevant item, so the ideal DCG is 1 and there is no normalisation
  by the DCG of k relevant items).

Ranks are computed by counting on the device, batch by batch: no sorted ranking is materialised.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from .errors import MmsrError

KS = (5, 10, 20)
METRICS = ("hr", "mrr", "ndcg")
METRIC_NAMES = tuple(f"{m}@{k}" for m in METRICS for k in KS)


def check_metric(name: str) -> str:
    if name not in METRIC_NAMES:
        raise MmsrError(f"--metric: unknown metric {name!r} (expected one of {', '.join(METRIC_NAMES)})")
    return name


def pessimistic_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among all items ([B] int64), ties counted against the target.

    ``scores`` [B, n_items]; ``targets`` [B]. NaN scores count as the lowest possible score, so a
    model that outputs NaN ranks its targets last instead of first. History items are not
    excluded.
    """
    scores = torch.nan_to_num(scores.float(), nan=-math.inf)
    target_scores = scores.gather(1, targets.view(-1, 1).long())
    higher = (scores > target_scores).sum(1)
    ties = (scores == target_scores).sum(1) - 1  # the target itself is not a tie
    return 1 + higher + ties


def metrics_from_ranks(ranks: torch.Tensor, ks: Iterable[int] = KS) -> dict[str, torch.Tensor]:
    """Per-sample HR@k, MRR@k, NDCG@k ([B] float each) from 1-based ranks."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = hit.double()
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / ranks, torch.zeros_like(ranks))
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks))
    return out


def ranking_metrics(scores: torch.Tensor, targets: torch.Tensor, ks: Iterable[int] = KS) -> dict[str, float]:
    """Mean HR/MRR/NDCG@k of one score matrix (full ranking, pessimistic ties, no exclusion)."""
    per_sample = metrics_from_ranks(pessimistic_ranks(scores, targets), ks)
    return {name: float(v.mean()) for name, v in per_sample.items()}


class MetricAccumulator:
    """Sums per-sample metrics over batches on the device; ``result()`` gives the means."""

    def __init__(self, ks: Iterable[int] = KS):
        self.ks = tuple(ks)
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        for name, v in metrics_from_ranks(pessimistic_ranks(scores, targets), self.ks).items():
            self.sums[name] = self.sums.get(name, 0) + v.sum()
        self.n += len(targets)

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {f"{m}@{k}": 0.0 for m in METRICS for k in self.ks}
        return {name: float(total) / self.n for name, total in self.sums.items()}


def batches(n: int, batch_size: int) -> Iterable[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size), dtype=np.int64)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_split(model, split, batch_size: int, device: torch.device, progress=None) -> dict[str, float]:
    """Mean metrics of ``model`` over every sample of ``split`` (full ranking; see module doc).

    Returns the metrics plus ``n`` (number of samples).
    """
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    try:
        for idx in batches(len(split), batch_size):
            batch = to_device(split.collate(idx), device)
            acc.add(model.score(batch), batch["target"])
            if progress is not None:
                progress(len(idx))
    finally:
        model.train(was_training)
    return {**acc.result(), "n": acc.n}
