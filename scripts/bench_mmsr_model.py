"""Forward+backward time of MMSR on realistic synthetic graph batches, against a SASRec reference.

Batches are real MSGraphs (``graphs.build_msgraphs`` + ``GraphSplit.collate``) of synthetic
Beauty-like data: 12,101 items, histories of ~9 items (uniform 5..13, i.e. what Beauty's 8.9
interactions per user look like at their longest), each item with k codes out of c clusters in
each of two text-like modalities. One step = forward, cross-entropy over all items (Eq. 7),
backward, Adam step. The reference is the harness's SASRec (``models.sasrec.SASRec``, same
d, 2 blocks, 2 heads) on the same histories as ``data.SequenceSplit`` batches them (left-padded
to max_len = 50; SASRec itself drops the all-padding columns), with the same loss; the budget is
MMSR <= 2.5x SASRec per epoch.

    python scripts/bench_mmsr_model.py [--batch 512] [--steps 10] [--k 3] [--clusters 24] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from mmsr_cli import graphs
from mmsr_cli.data import pad_histories
from mmsr_cli.models.sasrec import SASRec
from mmsr_cli.models.base import DatasetInfo, ModalityInfo, ModelConfig
from mmsr_cli.models.mmsr import MMSR


def synthetic_graph_split(n_samples: int, n_items: int, k: int, clusters: int, seed: int):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 14, size=n_samples)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    hist = rng.choice(n_items, size=int(lengths.sum()), p=popularity / popularity.sum())
    hist_ptr = np.concatenate([[0], np.cumsum(lengths)])
    item_codes = [np.argsort(rng.random((n_items, clusters)), axis=1)[:, :k] for _ in range(2)]
    target = rng.integers(0, n_items, size=n_samples)
    infos = [ModalityInfo(name, clusters, 1, None, codes) for name, codes in zip(("text", "title"), item_codes)]
    split = graphs.GraphSplit(hist, hist_ptr, target, np.arange(n_samples), infos, n_items)
    histories = [hist[hist_ptr[s] : hist_ptr[s + 1]] for s in range(n_samples)]
    return split, histories, item_codes


# CPU time of the process: with one torch thread it measures the work itself, unlike wall time,
# which other processes on a shared machine inflate unevenly.
clock = time.process_time


def make_step(model, batches, targets):
    """A closure timing one training step (forward, CE over all items, backward, Adam)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = {"step": 0}

    def step() -> float:
        i = state["step"] % len(batches)
        state["step"] += 1
        t0 = clock()
        user = model(batches[i])
        loss = nn.functional.cross_entropy(user @ model.item_embeddings().T, targets[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return clock() - t0

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--clusters", type=int, default=24)
    ap.add_argument("--n-items", type=int, default=12101)
    ap.add_argument("--fusion", default="adaptive")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim, max_len, n_batches = 128, 50, 4
    split, histories, item_codes = synthetic_graph_split(args.batch * n_batches, args.n_items, args.k, args.clusters, seed=0)
    graph_batches = [split.collate(np.arange(b * args.batch, (b + 1) * args.batch)) for b in range(n_batches)]
    targets = [b["target"] for b in graph_batches]
    flat = np.concatenate(histories)
    ptr = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    seq_batches = []
    for b in range(n_batches):
        rows = np.arange(b * args.batch, (b + 1) * args.batch)
        history, _ = pad_histories(flat, ptr, rows, max_len, args.n_items)
        seq_batches.append({"history": torch.from_numpy(history)})

    mods = [ModalityInfo(name, args.clusters, dim, torch.randn(args.clusters, dim)) for name in ("text", "title")]
    info = DatasetInfo(n_items=args.n_items, n_users=args.batch * n_batches, max_len=max_len, modalities=mods)
    config = ModelConfig(dim=dim, layers=2, dropout=0.3, fusion=args.fusion)
    mmsr = MMSR(config, info)
    sasrec = SASRec(config, info)
    g = graph_batches[0]
    shape = {
        "graphs": args.batch,
        "nodes": int(g["node_type"].numel()),
        "item_nodes": int((g["node_type"] == 0).sum()),
        "edges": int(g["edge_rel"].numel()),
        "homogeneous_edges": int((g["edge_rel"] <= graphs.REL_BI).sum()),
        "heterogeneous_edges": int(((g["edge_rel"] == 0) | (g["edge_rel"] == graphs.REL_HETERO)).sum()),
        "sasrec_padded_len": int(seq_batches[0]["history"].shape[1]),
        "longest_history": int(max(len(h) for h in histories[: args.batch])),
    }
    # Steps of the two models alternate, so that load from other processes hits both alike.
    step_mmsr = make_step(mmsr, graph_batches, targets)
    step_sasrec = make_step(sasrec, seq_batches, targets)
    times_mmsr, times_sasrec = [], []
    for i in range(args.steps + 2):
        t_m, t_s = step_mmsr(), step_sasrec()
        if i >= 2:  # the first two steps warm up allocators
            times_mmsr.append(t_m)
            times_sasrec.append(t_s)
    t_mmsr, t_sasrec = float(np.median(times_mmsr)), float(np.median(times_sasrec))
    print(json.dumps({
        "threads": torch.get_num_threads(),
        "batch": shape,
        "fusion": args.fusion,
        "clock": "process CPU time",
        "mmsr_step_s": round(t_mmsr, 4),
        "sasrec_step_s": round(t_sasrec, 4),
        "ratio": round(t_mmsr / t_sasrec, 2),
        "ratio_of_medians_per_step": [round(m / s_, 2) for m, s_ in zip(times_mmsr, times_sasrec)],
    }, indent=1))


if __name__ == "__main__":
    main()
