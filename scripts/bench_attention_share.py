"""Where a trained MMSR's user vector takes its values from: the item itself, its sequence or its codes.

    python scripts/bench_attention_share.py --workdir W --dataset beauty-ratio --runs mmsr-bench-s0[,...] [--split test]

For each run (best-validation checkpoint, eval mode) and each HAN-GNN layer, over the last item
node of every sample (the node whose h^(L) is the user vector, section 4.4), prints the mean of:

* the attention weight of the node's self loop in each of the four aggregations of the layer:
  ``ho`` (phase 1 of ho->he, Eq. 12), ``he`` (phase 1 of he->ho, Eq. 13), ``hohe`` (phase 2 of
  ho->he) and ``heho`` (phase 2 of he->ho); the rest of each softmax goes to sequence neighbours
  (ho, heho) or to the item's modality codes (he, hohe);
* beta(ho->he), the update gate's weight of the ho->he order (Eq. 16-17);
* ``code share``: the share of the layer's output that is a sum of code-node values. With
  non-invasive phase 2 the output is beta * sum_j alpha^hohe_ij v_j + (1 - beta) * sum_j
  alpha^heho_ij v_j, both over values W_V h^(l), so the code share is beta * (1 - alpha^hohe_ii).

Only for ``--aggregator han --fusion adaptive`` runs without ``--invasive`` (the paper's model).
Used in docs/benchmarks.md to ask whether codes crowd the item's own ID out of the user vector.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

import mmsr_cli.models.layers as layers_module
from mmsr_cli.data import to_device
from mmsr_cli.runs import load_run
from mmsr_cli.workdir import DatasetDir

AGGREGATIONS = ("ho", "he", "hohe", "heho")  # the call order of HANLayer.forward (adaptive)


def self_weights(alpha: torch.Tensor, graph, nodes: torch.Tensor) -> torch.Tensor:
    """alpha of the self loop j = i of each node in ``nodes`` (one per node: every node has one)."""
    is_self = graph.row == graph.col
    weight = torch.zeros(graph.n_rows, dtype=alpha.dtype)
    weight[graph.row[is_self]] = alpha[is_self]
    return weight[nodes]


def shares(ds: DatasetDir, run: str, split: str, batch_size: int = 512) -> dict[int, dict[str, float]]:
    loaded = load_run(ds, run, "best", torch.device("cpu"))
    model = loaded.model.eval()
    model.every_node = True  # every aggregation over the whole graph, as the hooks below index it
    cfg = loaded.config["model"]
    if cfg.get("aggregator", "han") != "han" or cfg.get("fusion", "adaptive") != "adaptive" or cfg.get("invasive"):
        raise SystemExit(f"{run}: needs --aggregator han --fusion adaptive without --invasive")
    data = loaded.bundle.open_split(ds, split)
    recorded: list[tuple[torch.Tensor, object]] = []
    original = layers_module.neighbourhood_softmax

    def recording_softmax(scores, graph):
        alpha = original(scores, graph)
        recorded.append((alpha, graph))
        return alpha

    sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    n = 0
    layers_module.neighbourhood_softmax = recording_softmax
    try:
        with torch.no_grad():
            for start in range(0, len(data), batch_size):
                batch = to_device(data.collate(np.arange(start, min(start + batch_size, len(data)))), torch.device("cpu"))
                recorded.clear()
                model(batch)
                last = batch["last_node"]
                if model._last_inverse is not None:  # nodes are type-sorted inside the model
                    last = model._last_inverse[last]
                for layer_no, layer in enumerate(model.layers, start=1):
                    calls = recorded[4 * (layer_no - 1) : 4 * layer_no]
                    selfs = {name: self_weights(alpha, graph, last) for name, (alpha, graph) in zip(AGGREGATIONS, calls)}
                    beta = layer.last_gate[last, 0]
                    acc = sums[layer_no]
                    for name, w in selfs.items():
                        acc[f"self {name}"] += float(w.sum())
                    acc["beta(ho->he)"] += float(beta.sum())
                    acc["code share"] += float((beta * (1 - selfs["hohe"])).sum())
                n += len(last)
    finally:
        layers_module.neighbourhood_softmax = original
    return {layer: {k: v / n for k, v in acc.items()} for layer, acc in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--runs", required=True, help="comma-separated run names")
    ap.add_argument("--split", default="test", choices=["train", "valid", "test"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = DatasetDir.open(args.workdir, args.dataset)
    columns = [f"self {a}" for a in AGGREGATIONS] + ["beta(ho->he)", "code share"]
    print("| run | layer | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for run in args.runs.split(","):
        for layer, values in shares(ds, run, args.split).items():
            print(f"| {run} | {layer} | " + " | ".join(f"{values[c]:.3f}" for c in columns) + " |", flush=True)


if __name__ == "__main__":
    main()
