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


# ----------------------------------------------------------------------------------------------
# Evaluating trained runs (`mmsr evaluate`)


def evaluate_run(ds, run: str, split: str = "test", checkpoint: str = "best", device: str = "auto") -> dict:
    """Metrics of a run's checkpoint on ``split``, written to ``runs/<run>/metrics_<split>.json``."""
    import time

    from .runtime import progress, resolve_device
    from .training import load_run
    from .workdir import write_json_atomic

    if split not in ("valid", "test"):
        raise MmsrError(f"--split: expected valid or test, got {split!r}")
    dev = resolve_device(device)
    loaded = load_run(ds, run, checkpoint, dev)
    data = loaded.bundle.open_split(ds, split)
    t0 = time.perf_counter()
    with progress(transient=True) as bar:
        task = bar.add_task(f"{run} {split}", total=len(data))
        metrics = evaluate_split(loaded.model, data, loaded.train_config.batch_size, dev, lambda n: bar.advance(task, n))
    record = {
        "run": run,
        "dataset": ds.name,
        "split": split,
        "checkpoint": checkpoint,
        "n": metrics.pop("n"),
        "metrics": metrics,
        "seconds": round(time.perf_counter() - t0, 3),
        "protocol": "full ranking over all items, pessimistic ties, history items not excluded",
        "fingerprints": loaded.config.get("fingerprints", {}),
    }
    write_json_atomic(loaded.folder / f"metrics_{split}.json", record)
    return {"config": loaded.config, **record}


def experiment_key(config: dict) -> str:
    """A run's configuration without what only distinguishes repetitions (seed, name, device)."""
    import json

    from .training import NOT_EXPERIMENT

    train = {k: v for k, v in config["train"].items() if k not in NOT_EXPERIMENT}
    return json.dumps({"model": config["model"], "train": train, "dataset": config["dataset"]}, sort_keys=True)


def describe_experiment(config: dict) -> str:
    """Short label of an experiment: the model plus the options that differ from the defaults."""
    from dataclasses import asdict

    from .models.base import ModelConfig
    from .training import NOT_EXPERIMENT, TrainConfig

    mdef, tdef = asdict(ModelConfig()), asdict(TrainConfig())
    parts = [config["model"]["model"]]
    for key, value in config["model"].items():
        if key in ("model", "max_len") or key not in mdef:
            continue
        default = list(mdef[key]) if isinstance(mdef[key], tuple) else mdef[key]
        if value != default:
            parts.append(f"{key}={','.join(value) if isinstance(value, list) else value}")
    for key, value in config["train"].items():
        if key in NOT_EXPERIMENT or key == "model" or value == tdef.get(key):
            continue
        parts.append(f"{key}={value}")
    return " ".join(parts)


def compare_runs(records: list[dict]) -> list[dict]:
    """Group evaluated runs by experiment (config minus seed): mean and std (ddof 0) per metric."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(experiment_key(r["config"]), []).append(r)
    out = []
    for members in groups.values():
        names = list(members[0]["metrics"])
        values = {m: np.array([r["metrics"][m] for r in members], dtype=np.float64) for m in names}
        out.append(
            {
                "experiment": describe_experiment(members[0]["config"]),
                "runs": [r["run"] for r in members],
                "seeds": [r["config"]["train"]["seed"] for r in members],
                "mean": {m: float(v.mean()) for m, v in values.items()},
                "std": {m: float(v.std()) for m, v in values.items()},
            }
        )
    return out
