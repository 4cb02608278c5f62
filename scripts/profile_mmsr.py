"""Where an MMSR training step spends its time, on a prepared dataset's real graph batches.

    python scripts/profile_mmsr.py --workdir W --dataset beauty [--steps 6] [--batch 512] [--threads 1]

Runs ``--steps`` training steps (after one warm-up step) of MMSR with the dataset's graphs and
`mmsr train`'s defaults, and reports, per step, the process CPU time of each phase: collating the
batch (memory-mapped graphs -> tensors), the forward pass split into the node encoder (section
4.2), the edge bookkeeping (type sort, CSR structures), each HAN-GNN component (type-specific
projections W_Q/W_K/W_V, homogeneous attention Eq. 12+14, heterogeneous attention Eq. 13+14,
update gate Eq. 16-17), the scores against all items plus cross-entropy (Eq. 7), the backward
pass, and the Adam step. Phases are timed with ``time.process_time`` (process CPU time, which
other processes on the machine do not inflate); forward components with ``torch.profiler``
scopes (the profiler's CPU total of each scope, wall-clock based; the attention scopes include the
projections they call, so those rows overlap).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from mmsr_cli.models import build_model, layers, mmsr
from mmsr_cli.models.base import ModelConfig
from mmsr_cli.inputs import load_dataset
from mmsr_cli.workdir import DatasetDir

SCOPES = {
    "encoder (4.2)": (mmsr.NodeEncoder, "forward"),
    "edge structures (type sort, CSR)": (layers.RelationEdges, "__init__"),
    "projections W_Q/W_K/W_V": (layers.TypedLinear, "forward"),
    "homogeneous attention (Eq. 12, 14)": (layers.HANLayer, "_homogeneous"),
    "heterogeneous attention (Eq. 13, 14)": (layers.HANLayer, "_heterogeneous"),
    "update gate (Eq. 16-17)": (layers.UpdateGate, "forward"),
}


def wrap_scopes() -> None:
    for label, (cls, name) in SCOPES.items():
        original = getattr(cls, name)

        def wrapped(*args, __original=original, __label=label, **kwargs):
            with record_function(__label):
                return __original(*args, **kwargs)

        setattr(cls, name, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ds = DatasetDir.open(args.workdir, args.dataset)
    bundle = load_dataset(ds, ModelConfig(model="mmsr"))
    split = bundle.open_split(ds, "train")
    model = build_model(bundle.model_config, bundle.info)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    wrap_scopes()
    rng = np.random.default_rng(0)

    phases: dict[str, list[float]] = defaultdict(list)
    scope_cpu: dict[str, float] = defaultdict(float)
    backward_ops: dict[str, float] = defaultdict(float)
    nodes = edges = 0
    for step in range(args.steps + 1):
        idx = np.sort(rng.choice(len(split), size=args.batch, replace=False))
        t0 = time.process_time()
        batch = split.collate(idx)
        t1 = time.process_time()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            users = model(batch)
        t2 = time.process_time()
        loss = F.cross_entropy(users @ model.item_embeddings().T, batch["target"])
        t3 = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof_backward:
            loss.backward()
        t4 = time.process_time()
        optimizer.step()
        t5 = time.process_time()
        if step == 0:
            continue  # warm-up
        nodes += int(batch["node_type"].shape[0])
        edges += int(batch["edge_index"].shape[1])
        for name, value in (("collate", t1 - t0), ("forward", t2 - t1), ("scores + cross-entropy (Eq. 7)", t3 - t2),
                            ("backward", t4 - t3), ("Adam step", t5 - t4)):
            phases[name].append(value)
        for event in prof.key_averages():
            if event.key in SCOPES:
                scope_cpu[event.key] += event.cpu_time_total / 1e6
        for event in prof_backward.key_averages():
            backward_ops[event.key] += event.self_cpu_time_total / 1e6
    steps = args.steps
    total = sum(np.mean(v) for v in phases.values())
    print(f"MMSR step on {args.dataset}: batch {args.batch}, {nodes / steps:,.0f} nodes, {edges / steps:,.0f} edges; "
          f"{steps} steps, process CPU time, torch threads {args.threads}")
    print("| phase | s/step | share |")
    print("|---|---|---|")
    for name, values in phases.items():
        print(f"| {name} | {np.mean(values):.3f} | {np.mean(values) / total:.0%} |")
        if name == "forward":
            for label in SCOPES:
                value = scope_cpu[label] / steps
                print(f"| &nbsp;&nbsp;{label} | {value:.3f} | {value / total:.0%} |")
    print(f"| total | {total:.3f} | 100% |")
    top = sorted(backward_ops.items(), key=lambda kv: -kv[1])[:8]
    print("backward, top ops by self CPU time (profiler, s/step): " + "; ".join(f"{k} {v / steps:.3f}" for k, v in top))
    print("(forward sub-rows are torch.profiler CPU totals of each scope; the attention scopes include "
          "the projections they call, so the sub-rows overlap)")


if __name__ == "__main__":
    main()
