"""Evaluation beyond accuracy: catalogue coverage, popularity of what is recommended, and every
accuracy metric split by how popular the target item was in training.

* An item's *training popularity* is the number of users who met it before their validation target
  (inputs.train_interactions: training samples' histories and targets, validation histories).
* Buckets of target items: ``rare`` holds the items seen by at most ``RARE_MAX`` training users
  (never or rarely seen, 0 included); the other items, from the most popular down, fill ``head``
  until it holds a third of their training interactions, then ``torso`` (the next third), then
  ``tail`` (the rest; many items with few interactions each).
* ``coverage@k``: share of the catalogue that appears in at least one top-k list of the split;
  ``avg_pop@k``: mean training popularity of the items of the top-k lists (a popularity-biased model
  scores high). Top-k lists are the k best scores (history items are not removed, as in ranking).
* Per bucket: HR/MRR/NDCG@k over the samples whose target is in the bucket, with their number.
"""

from __future__ import annotations

import numpy as np
import torch

from .inputs import train_interactions
from .metrics import KS, metrics_from_ranks, pessimistic_ranks

BUCKETS = ("head", "torso", "tail", "rare")
RARE_MAX = 2  # at most this many training users: a rare item


def item_popularity(ds, n_users: int, n_items: int) -> np.ndarray:
    """[n_items] int64: training users per item (see the module docstring)."""
    pairs = train_interactions(ds, n_users, n_items)
    return np.bincount(pairs[:, 1], minlength=n_items).astype(np.int64)


def popularity_buckets(popularity: np.ndarray, rare_max: int = RARE_MAX) -> np.ndarray:
    """[n_items] int8: index into BUCKETS of each item."""
    bucket = np.full(len(popularity), BUCKETS.index("rare"), dtype=np.int8)
    frequent = np.flatnonzero(popularity > rare_max)
    if frequent.size == 0:
        return bucket
    order = frequent[np.argsort(-popularity[frequent], kind="stable")]  # most popular first
    share_before = (np.cumsum(popularity[order]) - popularity[order]) / popularity[order].sum()
    bucket[order] = np.where(share_before < 1 / 3, 0, np.where(share_before < 2 / 3, 1, 2))
    return bucket


class BeyondAccuracy:
    """Accumulates coverage, recommended popularity and per-bucket metrics over scored batches."""

    def __init__(self, popularity: np.ndarray, rare_max: int = RARE_MAX, ks=KS):
        self.ks = tuple(ks)
        self.rare_max = rare_max
        self.popularity = torch.as_tensor(popularity, dtype=torch.float64)
        self.bucket = torch.as_tensor(popularity_buckets(popularity, rare_max), dtype=torch.long)
        n_items = len(popularity)
        self.seen = {k: torch.zeros(n_items, dtype=torch.bool) for k in self.ks}
        self.pop_sum = {k: 0.0 for k in self.ks}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(len(BUCKETS), dtype=torch.float64)
        self.n = 0

    def __call__(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        scores, targets = scores.detach().float().cpu(), targets.detach().long().cpu()
        top = torch.nan_to_num(scores, nan=-torch.inf).topk(min(max(self.ks), scores.shape[1]), dim=1).indices
        for k in self.ks:
            self.seen[k][top[:, :k].reshape(-1)] = True
            self.pop_sum[k] += float(self.popularity[top[:, :k]].sum())
        b = self.bucket[targets]
        for name, v in metrics_from_ranks(pessimistic_ranks(scores, targets), self.ks).items():
            self.sums[name] = self.sums.get(name, torch.zeros(len(BUCKETS), dtype=torch.float64)).index_add(0, b, v)
        self.counts += torch.bincount(b, minlength=len(BUCKETS)).double()
        self.n += len(targets)

    def result(self) -> dict:
        n_items = len(self.popularity)
        out: dict = {}
        for k in self.ks:
            out[f"coverage@{k}"] = float(self.seen[k].sum()) / n_items
            out[f"avg_pop@{k}"] = self.pop_sum[k] / (self.n * min(k, n_items)) if self.n else 0.0
        items = torch.bincount(self.bucket, minlength=len(BUCKETS))
        buckets = {}
        for i, name in enumerate(BUCKETS):
            n = int(self.counts[i])
            pops = self.popularity[self.bucket == i]
            buckets[name] = {
                "n": n,
                "items": int(items[i]),
                "popularity_range": [int(pops.min()), int(pops.max())] if len(pops) else None,
                "metrics": {m: (float(s[i]) / n if n else None) for m, s in self.sums.items()},
            }
        out["buckets"] = buckets
        out["definition"] = {
            "popularity": "training users per item (before their validation target)",
            "rare_max": self.rare_max,
            "head_torso_tail": "other items by popularity, thirds of their training interactions",
        }
        return out


def flat_metrics(beyond: dict, metric_names=None) -> dict[str, float]:
    """coverage@k, avg_pop@k and ``<metric>/<bucket>`` of a result, as one flat name -> value dict
    (for --compare's mean and std over seeds); a bucket without samples is left out."""
    out = {k: v for k, v in beyond.items() if k.startswith(("coverage@", "avg_pop@"))}
    for name, b in beyond["buckets"].items():
        for m, v in b["metrics"].items():
            if v is not None and (metric_names is None or m in metric_names):
                out[f"{m}/{name}"] = v
    return out
