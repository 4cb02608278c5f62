"""Where two or more trained runs differ: test metrics per history length and per kind of target.

    python scripts/bench_rank_breakdown.py --workdir W --dataset beauty --runs mmsr-bench-s0,sasrec-bench-s0 [--split test]

For each run, every sample of the split is ranked exactly as `mmsr evaluate` ranks it (full
ranking over all items, ties counted against the model: ``metrics.pessimistic_ranks``), and
HR@k / MRR@k / NDCG@k (%, ``--k``, default 10) are reported per bucket of history length (1-2,
3-4, 5-8, 9-16, 17+ items; empty groups are left out), per kind of target: a *repeat* (the target
already occurs in the history) or a new item, and by whether the step from the history's last item
to the target occurs in the training samples (some training sample has that last item and that
target: a *seen successor*) or not. The "all" row equals the run's `mmsr evaluate` result. Prints
a Markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq
import torch

from mmsr_cli import contracts as C
from mmsr_cli.data import to_device
from mmsr_cli.evaluation import batches
from mmsr_cli.metrics import pessimistic_ranks
from mmsr_cli.runs import load_run
from mmsr_cli.workdir import DatasetDir

BUCKETS = ((1, 2), (3, 4), (5, 8), (9, 16), (17, 10**9))


def sample_ranks(ds: DatasetDir, run: str, split: str, batch_size: int = 512) -> np.ndarray:
    loaded = load_run(ds, run, "best", torch.device("cpu"))
    data = loaded.bundle.open_split(ds, split)
    model = loaded.model.eval()
    out = np.empty(len(data), dtype=np.int64)
    with torch.no_grad():
        for idx in batches(len(data), batch_size):
            batch = to_device(data.collate(idx), torch.device("cpu"))
            out[idx] = pessimistic_ranks(model.score(batch), batch["target"]).cpu().numpy()
    return out


def seen_successors(ds: DatasetDir, last: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Whether each (last history item, target) pair is the (last item, target) of a training sample."""
    train = pq.read_table(ds.path(C.samples_file("train")), columns=["history", "target"])
    train_last = np.array([h[-1] for h in train.column("history").to_pylist()], dtype=np.int64)
    n = int(max(train_last.max(), train.column("target").to_numpy().max(), last.max(), targets.max())) + 1
    pairs = np.unique(train_last * n + train.column("target").to_numpy().astype(np.int64))
    return np.isin(last.astype(np.int64) * n + targets.astype(np.int64), pairs)


def metrics(ranks: np.ndarray, k: int = 10) -> tuple[float, float, float]:
    hit = ranks <= k
    return (
        100 * hit.mean(),
        100 * np.where(hit, 1.0 / ranks, 0.0).mean(),
        100 * np.where(hit, 1.0 / np.log2(ranks + 1), 0.0).mean(),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--runs", required=True, help="comma-separated run names")
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, default=10, help="cut-off of HR, MRR and NDCG")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = DatasetDir.open(args.workdir, args.dataset)
    table = pq.read_table(ds.path(C.samples_file(args.split)), columns=["history", "target"])
    histories = table.column("history").to_pylist()
    targets = table.column("target").to_numpy()
    lengths = np.array([len(h) for h in histories])
    repeat = np.array([t in set(h) for h, t in zip(histories, targets)])
    seen = seen_successors(ds, np.array([h[-1] for h in histories]), targets)
    runs = args.runs.split(",")
    ranks = {run: sample_ranks(ds, run, args.split) for run in runs}

    groups = [("all", np.ones(len(targets), bool))]
    groups += [(f"history {lo}-{hi}" if hi < 10**9 else f"history {lo}+", (lengths >= lo) & (lengths <= hi)) for lo, hi in BUCKETS]
    groups += [("target repeats a history item", repeat), ("target is a new item", ~repeat)]
    groups += [("last item -> target seen in training", seen), ("last item -> target not seen in training", ~seen)]
    k = args.k
    print(f"{args.dataset} {args.split}: {len(targets):,} samples; HR@{k} / MRR@{k} / NDCG@{k} (%) per group")
    print("| group | samples | " + " | ".join(runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    for name, mask in groups:
        if not mask.any():
            continue
        cells = []
        for run in runs:
            hr, mrr, ndcg = metrics(ranks[run][mask], k)
            cells.append(f"{hr:.2f} / {mrr:.2f} / {ndcg:.2f}")
        print(f"| {name} | {int(mask.sum()):,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
