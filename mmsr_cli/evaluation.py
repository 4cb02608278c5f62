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
from dataclasses import dataclass
from typing import Any, Iterable

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

    def add(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Add a batch; returns its ranks."""
        ranks = pessimistic_ranks(scores, targets)
        for name, v in metrics_from_ranks(ranks, self.ks).items():
            self.sums[name] = self.sums.get(name, 0) + v.sum()
        self.n += len(targets)
        return ranks

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {f"{m}@{k}": 0.0 for m in METRICS for k in self.ks}
        return {name: float(total) / self.n for name, total in self.sums.items()}


#: at most this many scores [rows, n_items] exist at once during evaluation (64 MiB in float32)
SCORE_CHUNK_ELEMENTS = 1 << 24


def batches(n: int, batch_size: int) -> Iterable[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size), dtype=np.int64)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_split(model, split, batch_size: int, device: torch.device, progress=None, observe=None,
                   ranks: list | None = None, on_scores=None) -> dict[str, float]:
    """Mean metrics of ``model`` over every sample of ``split`` (full ranking; see module doc).

    Returns the metrics plus ``n`` (number of samples). ``observe(model)`` runs after each batch
    is scored (e.g. :class:`GateStatistics` reading the model's last forward). Under torchrun
    (distributed.py) each rank scores its slice of the samples and the sums are all-reduced.
    ``ranks``, a list, receives each batch's target ranks (CPU int64, sample order; one process);
    ``on_scores(scores, targets)`` sees each batch's score matrix (popularity.BeyondAccuracy).
    """
    from . import distributed
    from .data import prefetched
    from .runtime import keep_freed_memory

    keep_freed_memory()
    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    rows = distributed.shard(np.arange(len(split), dtype=np.int64))  # all rows in one process
    try:
        for idx, batch in prefetched(split, (rows[positions] for positions in batches(len(rows), batch_size))):
            batch = to_device(batch, device)
            users, items = model.user_and_item_vectors(batch)
            # the score matrix a few rows at a time: memory stays flat as the item count grows
            step = max(1, SCORE_CHUNK_ELEMENTS // max(1, items.shape[0]))
            for start in range(0, users.shape[0], step):
                scores = users[start : start + step] @ items.T
                targets = batch["target"][start : start + step]
                batch_ranks = acc.add(scores, targets)
                if ranks is not None:
                    ranks.append(batch_ranks.cpu())
                if on_scores is not None:
                    on_scores(scores, targets)
            if observe is not None:
                observe(model)
            if progress is not None:
                progress(len(idx))
    finally:
        model.train(was_training)
    names = [f"{m}@{k}" for k in acc.ks for m in METRICS]  # metrics_from_ranks' order
    acc.sums, acc.n = distributed.all_reduce_sums(acc.sums, acc.n, names, device)
    return {**acc.result(), "n": acc.n}


# ----------------------------------------------------------------------------------------------
# MMSR's update gate (Eq. 16-17): which fusion order the nodes choose


class GateStatistics:
    """Per layer and node type: how many nodes weight ho->he (beta_0) above he->ho (beta_1), and
    the mean beta_0, over every batch an MMSR model with adaptive fusion scored."""

    def __init__(self, type_names: list[str]):
        self.type_names = list(type_names)  # node type t -> name ("item", then the modalities)
        self.nodes: list[np.ndarray] = []  # per layer [n_types] node counts
        self.hohe: list[np.ndarray] = []  # per layer [n_types] nodes with beta_0 > beta_1
        self.beta_hohe: list[np.ndarray] = []  # per layer [n_types] sums of beta_0

    def __call__(self, model) -> None:
        gates, node_type = model.gate_values(), model.gate_node_type
        if not gates or node_type is None or any(g is None for g in gates):
            return
        n_types = len(self.type_names)
        t = node_type.long()
        for layer, beta in enumerate(gates):
            counts = torch.bincount(t, minlength=n_types).cpu().numpy()
            chose = torch.bincount(t, weights=(beta[:, 0] > beta[:, 1]).double(), minlength=n_types).cpu().numpy()
            sums = torch.bincount(t, weights=beta[:, 0].double(), minlength=n_types).cpu().numpy()
            if layer == len(self.nodes):
                self.nodes.append(np.zeros(n_types, np.int64))
                self.hohe.append(np.zeros(n_types))
                self.beta_hohe.append(np.zeros(n_types))
            self.nodes[layer] += counts.astype(np.int64)
            self.hohe[layer] += chose
            self.beta_hohe[layer] += sums

    def result(self) -> list[dict] | None:
        """One dict per layer: node type -> nodes, share choosing ho->he / he->ho, mean beta_0."""
        if not self.nodes:
            return None
        out = []
        for nodes, hohe, beta in zip(self.nodes, self.hohe, self.beta_hohe):
            layer = {}
            for t, name in enumerate(self.type_names):
                n = int(nodes[t])
                share = float(hohe[t]) / n if n else None
                layer[name] = {
                    "nodes": n,
                    "hohe_share": share,
                    "heho_share": None if share is None else 1.0 - share,
                    "mean_beta_hohe": float(beta[t]) / n if n else None,
                }
            out.append(layer)
        return out


def gate_statistics_for(model, config: dict) -> GateStatistics | None:
    """A GateStatistics for an MMSR model with adaptive fusion, else None."""
    if not hasattr(model, "gate_values") or config["model"].get("fusion") != "adaptive":
        return None
    model.every_node = True  # the statistics cover every node's gate, not only the pooled nodes'
    return GateStatistics(["item", *config["model"]["modalities"]])


# ----------------------------------------------------------------------------------------------
# Evaluating trained runs (`mmsr evaluate`)


@dataclass
class _Evaluation:
    """A run made ready for scoring: everything that can refuse its options or files is done."""

    loaded: Any  # training.LoadedRun
    data: Any  # the split's samples, under the setting if any
    applied: dict | None  # the setting as recorded, with the items it touched
    config: dict  # config.json plus the codes it was trained on
    device: Any


def prepare_evaluation(ds, run: str, split: str, checkpoint: str, dev, setting=None) -> _Evaluation:
    """Load ``run`` and apply ``setting``: every check of ``evaluate_run`` before any scoring."""
    from . import contracts as C
    from . import robustness as R
    from .training import load_run, recorded_codes

    if split not in ("valid", "test"):
        raise MmsrError(f"--split: expected valid or test, got {split!r}")
    loaded = load_run(ds, run, checkpoint, dev)
    bundle, applied = loaded.bundle, None
    if setting is None:
        data = bundle.open_split(ds, split)
    else:
        applied = setting.record()
        disorder_seed = None
        if setting.drop_modality:
            bundle, applied["dropped_items"] = R.apply_drop(ds, bundle, setting.drop_modality, setting.drop_ratio, setting.seed)
        elif setting.perturb == C.PERTURB_MISMATCHED:
            bundle, applied["displaced_items"] = R.apply_mismatch(bundle, setting.perturb_ratio, setting.seed)
        else:
            disorder_seed = setting.seed
        R.set_code_channels(loaded.model, bundle.info.modalities)
        data = R.open_split(ds, bundle, split, disorder_seed)
    codes = recorded_codes(ds, loaded.config)  # runs trained before config.json recorded them
    config = loaded.config if codes is None else {**loaded.config, "codes": codes}
    return _Evaluation(loaded, data, applied, config, dev)


def evaluate_run(
    ds, run: str, split: str = "test", checkpoint: str = "best", device: str = "auto", setting=None
) -> dict:
    """Metrics of a run's checkpoint on ``split``, written to ``runs/<run>/metrics_<split>.json``,
    or, under a robustness ``setting`` (robustness.Setting: dropped or perturbed modalities, paper
    section 5.4 and Figure 1), to ``runs/<run>/metrics_<split>_<setting>.json``. MMSR runs with
    adaptive fusion also record their update-gate statistics (:class:`GateStatistics`)."""
    return evaluate_runs(ds, [run], split, checkpoint, device, setting)[0]


def evaluate_runs(
    ds, runs: list[str], split: str = "test", checkpoint: str = "best", device: str = "auto", setting=None
) -> list[dict]:
    """``evaluate_run`` for several runs, validate-then-act: every run is loaded and checked
    against the options first (and let go again, so memory holds one run at a time), so a run
    that cannot be evaluated is reported before any metrics file is written."""
    from .runtime import resolve_device

    dev = resolve_device(device)
    if len(runs) > 1:
        for run in runs:
            prepare_evaluation(ds, run, split, checkpoint, dev, setting)
    return [_score(ds, run, split, checkpoint, setting, prepare_evaluation(ds, run, split, checkpoint, dev, setting))
            for run in runs]


def _score(ds, run: str, split: str, checkpoint: str, setting, ev: _Evaluation) -> dict:
    """Score ``ev`` and write its metrics file; returns the record with its config and file name."""
    import time

    from . import contracts as C
    from .runtime import progress
    from .workdir import write_json_atomic

    loaded, data = ev.loaded, ev.data
    gates = gate_statistics_for(loaded.model, loaded.config)
    from .popularity import BeyondAccuracy, item_popularity

    info = loaded.bundle.info
    beyond = BeyondAccuracy(item_popularity(ds, info.n_users, info.n_items))
    t0 = time.perf_counter()
    ranks: list[torch.Tensor] = []
    with progress(transient=True) as bar:
        task = bar.add_task(f"{run} {split}", total=len(data))
        metrics = evaluate_split(
            loaded.model, data, loaded.train_config.batch_size, ev.device, lambda n: bar.advance(task, n), observe=gates,
            ranks=ranks, on_scores=beyond,
        )
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
    if ev.applied is not None:
        record["setting"] = ev.applied
    if gates is not None and gates.result() is not None:
        record["gates"] = gates.result()
    record["beyond"] = beyond.result()  # coverage, recommended popularity, popularity buckets
    setting_name = setting.name if setting is not None else ""
    record["ranks"] = C.ranks_file(split, setting_name)  # per-sample ranks for paired tests (significance.py)
    from .significance import write_ranks

    write_ranks(loaded.folder / record["ranks"], torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64))
    name = C.metrics_file(split, setting_name)
    write_json_atomic(loaded.folder / name, record)
    return {"config": ev.config, "file": name, **record}


def experiment_key(config: dict) -> str:
    """A run's configuration without what only distinguishes repetitions (seed, name, device)."""
    import json

    from .training import NOT_EXPERIMENT, with_config_defaults

    config = with_config_defaults(config)  # fields added after a run was trained count with their defaults
    train = {k: v for k, v in config["train"].items() if k not in NOT_EXPERIMENT}
    key = {"model": config["model"], "train": train, "dataset": config["dataset"], "codes": config.get("codes") or {}}
    return json.dumps(key, sort_keys=True)


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
            parts.append(option_token(key, value))
    for key, value in config["train"].items():
        if key in NOT_EXPERIMENT or key == "model" or value == tdef.get(key):
            continue
        parts.append(option_token(key, value))
    return " ".join(parts)


def option_token(key: str, value) -> str:
    """``key=value`` as experiment labels write a config field (lists comma-joined)."""
    return f"{key}={','.join(value) if isinstance(value, list) else value}"


def compare_runs(records: list[dict]) -> list[dict]:
    """Group evaluated runs by experiment (config minus seed): mean and std (ddof 0) per metric."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(experiment_key(r["config"]), []).append(r)
    out = []
    for members in groups.values():
        members.sort(key=lambda r: (r["config"]["train"]["seed"], r["run"]))  # seeds listed in order
        names = list(members[0]["metrics"])
        values = {m: np.array([r["metrics"][m] for r in members], dtype=np.float64) for m in names}
        out.append(
            {
                "experiment": describe_experiment(members[0]["config"]),
                "model": members[0]["config"]["model"]["model"],
                "runs": [r["run"] for r in members],
                "seeds": [r["config"]["train"]["seed"] for r in members],
                "mean": {m: float(v.mean()) for m, v in values.items()},
                "std": {m: float(v.std()) for m, v in values.items()},
            }
        )
    labels = [g["experiment"] for g in out]
    for g, members in zip(out, groups.values()):  # same options, other codes: name the codes
        if labels.count(g["experiment"]) > 1:
            config = members[0]["config"]
            if config.get("codes"):
                g["experiment"] += " " + describe_codes(config["codes"])
            elif "codes" not in config:  # an old run whose codes were rebuilt since (training.recorded_codes)
                g["experiment"] += " codes-unknown"
    return out


def describe_codes(codes: dict) -> str:
    """``c=30 k=3`` (or ``no-codes``) of a run config's codes record; per modality when they differ."""

    def one(o: dict) -> str:
        return "no-codes" if o.get("codes_mode") == "items" else f"c={o.get('clusters')} k={o.get('top_k')}"

    parts = {name: one(o) for name, o in sorted(codes.items())}
    if len(set(parts.values())) == 1:
        return next(iter(parts.values()))
    return " ".join(f"{name}:{v}" for name, v in parts.items())
