"""Full-ranking evaluation of a model over a split, and of trained runs (`mmsr evaluate`).

Every sample is ranked against all items with pessimistic ties and no history exclusion
(metrics.py: the protocol and the metric registry); ranks are computed by counting on the device,
batch by batch: no sorted ranking is materialised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from . import contracts as C
from . import distributed, memory
from . import robustness as R
from .data import prefetched, to_device
from .errors import MmsrError
from .metrics import MetricAccumulator, Selection
from .popularity import BeyondAccuracy, item_popularity
from .runs import load_run, recorded_codes
from .runtime import code_version, keep_freed_memory, progress, resolve_device
from .significance import write_ranks
from .workdir import write_json_atomic


#: at most this many scores [rows, n_items] exist at once during evaluation (64 MiB in float32)
SCORE_CHUNK_ELEMENTS = 1 << 24


def _by_history_length(split, rows: np.ndarray) -> np.ndarray | None:
    """The order of ``rows`` by history length (stable), so that each batch holds histories of
    about one length: the sequence models cut each batch's padding to its longest history, and
    on Amazon Beauty most histories are far shorter than the longest of a random batch. None
    for a split without history lengths."""
    lengths = memory.history_lengths(split)
    return None if lengths is None else np.argsort(lengths[rows], kind="stable")


def batches(n: int, batch_size: int) -> Iterable[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size), dtype=np.int64)


@torch.no_grad()
def evaluate_split(model, split, batch_size: int, device: torch.device, progress=None, observe=None,
                   ranks: list | None = None, on_scores=None, selection: Selection = Selection(),
                   micro_batch: int | None = None) -> dict[str, float]:
    """Mean metrics of ``model`` over every sample of ``split`` (full ranking; see module doc).

    Returns the metrics plus ``n`` (number of samples). ``observe(model)`` runs after each batch
    is scored (e.g. :class:`GateStatistics` reading the model's last forward). Under torchrun
    (distributed.py) each rank scores its slice of the samples and the sums are all-reduced.
    ``ranks``, a list, receives each batch's target ranks (CPU int64, sample order; one process);
    ``on_scores(scores, targets)`` sees each batch's score matrix (popularity.BeyondAccuracy);
    ``selection`` the metrics and cut-offs (metrics.py; default HR, MRR, NDCG @5/10/20).
    Batches are scored ``micro_batch`` samples at a time where a batch of ``batch_size`` would
    pass the memory budget (memory.py; measured here when not given).
    """
    keep_freed_memory()
    if micro_batch is None:
        scoring = memory.measure(model, split.collate, memory.history_lengths(split), len(split), device)
        memory.check_fits(scoring, f"--batch-size {batch_size}", "scoring")
        micro_batch = scoring.micro_batch(batch_size) if scoring is not None else batch_size
    batch_size = min(batch_size, micro_batch)
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(selection.ks, selection.metrics)
    rows = distributed.shard(np.arange(len(split), dtype=np.int64))  # all rows in one process
    order = _by_history_length(split, rows)
    if order is not None:
        rows = rows[order]
    first_rank = len(ranks) if ranks is not None else 0
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
    if ranks is not None and order is not None and len(ranks) > first_rank:  # back to sample order
        scored = torch.cat(ranks[first_rank:])
        restored = torch.empty_like(scored)
        restored[torch.from_numpy(order)] = scored
        ranks[first_rank:] = [restored]
    acc.sums, acc.n = distributed.all_reduce_sums(acc.sums, acc.n, acc.names, device)
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
        loaded.model.set_item_codes(bundle.info.modalities)
        data = bundle.open_split(ds, split, disorder_seed)
    codes = recorded_codes(ds, loaded.config)  # runs trained before config.json recorded them
    config = loaded.config if codes is None else {**loaded.config, "codes": codes}
    return _Evaluation(loaded, data, applied, config, dev)


def evaluate_run(
    ds, run: str, split: str = "test", checkpoint: str = "best", device: str = "auto", setting=None,
    selection: Selection = Selection(),
) -> dict:
    """Metrics of a run's checkpoint on ``split``, written to ``runs/<run>/metrics_<split>.json``,
    or, under a robustness ``setting`` (robustness.Setting: dropped or perturbed modalities, paper
    section 5.4 and Figure 1), to ``runs/<run>/metrics_<split>_<setting>.json``. MMSR runs with
    adaptive fusion also record their update-gate statistics (:class:`GateStatistics`).
    ``selection``: the metrics and cut-offs recorded (metrics.py)."""
    return evaluate_runs(ds, [run], split, checkpoint, device, setting, selection)[0]


def evaluate_runs(
    ds, runs: list[str], split: str = "test", checkpoint: str = "best", device: str = "auto", setting=None,
    selection: Selection = Selection(),
) -> list[dict]:
    """``evaluate_run`` for several runs, validate-then-act: every run is loaded and checked
    against the options first (and let go again, so memory holds one run at a time), so a run
    that cannot be evaluated is reported before any metrics file is written."""
    dev = resolve_device(device)
    if len(runs) > 1:
        for run in runs:
            prepare_evaluation(ds, run, split, checkpoint, dev, setting)
    return [_score(ds, run, split, checkpoint, setting, prepare_evaluation(ds, run, split, checkpoint, dev, setting),
                   selection) for run in runs]


def _score(ds, run: str, split: str, checkpoint: str, setting, ev: _Evaluation, selection: Selection) -> dict:
    """Score ``ev`` and write its metrics file; returns the record with its config and file name."""
    loaded, data = ev.loaded, ev.data
    gates = gate_statistics_for(loaded.model, loaded.config)
    info = loaded.bundle.info
    beyond = BeyondAccuracy(item_popularity(ds, info.n_users, info.n_items))
    t0 = time.perf_counter()
    ranks: list[torch.Tensor] = []
    with progress(transient=True) as bar:
        task = bar.add_task(f"{run} {split}", total=len(data))
        metrics = evaluate_split(
            loaded.model, data, loaded.train_config.batch_size, ev.device, lambda n: bar.advance(task, n), observe=gates,
            ranks=ranks, on_scores=beyond, selection=selection,
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
        "code": code_version(),  # the code that evaluated; the run's config.json has the code that trained
    }
    if ev.applied is not None:
        record["setting"] = ev.applied
    if gates is not None and gates.result() is not None:
        record["gates"] = gates.result()
    record["beyond"] = beyond.result()  # coverage, recommended popularity, popularity buckets
    setting_name = setting.name if setting is not None else ""
    record["ranks"] = C.ranks_file(split, setting_name)  # per-sample ranks for paired tests (significance.py)
    write_ranks(loaded.folder / record["ranks"], torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64))
    name = C.metrics_file(split, setting_name)
    write_json_atomic(loaded.folder / name, record)
    return {"config": ev.config, "file": name, **record}
