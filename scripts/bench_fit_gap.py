"""How well trained runs fit their training data against held-out data: underfitting or overfitting?

    python scripts/bench_fit_gap.py --workdir W --dataset beauty --runs mmsr-bench-s0,sasrec-bench-s0 [--train-samples 20000]

For each run (best-validation checkpoint, eval mode: no dropout), ranks a seeded random subset of
the training samples and every validation sample exactly as `mmsr evaluate` does (full ranking,
pessimistic ties) and prints HR@10 / MRR@10 / NDCG@10 (%) and the mean cross-entropy over all
items (Eq. 7, the training loss without dropout) as a Markdown table. A model with a low training
HR and a validation HR close to it underfits; a high training HR far above validation overfits.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from mmsr_cli.data import to_device
from mmsr_cli.metrics import pessimistic_ranks
from mmsr_cli.runs import load_run
from mmsr_cli.workdir import DatasetDir


def fit(ds: DatasetDir, run: str, split: str, n: int | None, seed: int, batch_size: int = 512) -> dict[str, float]:
    loaded = load_run(ds, run, "best", torch.device("cpu"))
    model = loaded.model.eval()
    data = loaded.bundle.open_split(ds, split)
    idx = np.arange(len(data))
    if n is not None and n < len(data):
        idx = np.sort(np.random.default_rng(seed).choice(len(data), n, replace=False))
    ranks, ce = [], 0.0
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            batch = to_device(data.collate(idx[start : start + batch_size]), torch.device("cpu"))
            scores = model.score(batch)
            ranks.append(pessimistic_ranks(scores, batch["target"]).numpy())
            ce += F.cross_entropy(scores, batch["target"], reduction="sum").item()
    r = np.concatenate(ranks)
    hit = r <= 10
    return {
        "n": len(r),
        "hr@10": 100 * hit.mean(),
        "mrr@10": 100 * np.where(hit, 1.0 / r, 0.0).mean(),
        "ndcg@10": 100 * np.where(hit, 1.0 / np.log2(r + 1), 0.0).mean(),
        "ce": ce / len(r),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--runs", required=True, help="comma-separated run names")
    ap.add_argument("--train-samples", type=int, default=20000, help="training samples ranked (seeded subset)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = DatasetDir.open(args.workdir, args.dataset)
    print("| run | split | samples | HR@10 | MRR@10 | NDCG@10 | cross-entropy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for run in args.runs.split(","):
        for split, n in (("train", args.train_samples), ("valid", None)):
            m = fit(ds, run, split, n, args.seed)
            print(f"| {run} | {split} | {m['n']:,} | {m['hr@10']:.2f} | {m['mrr@10']:.2f} | {m['ndcg@10']:.2f} | {m['ce']:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
