#!/usr/bin/env python
"""Seconds per training step of the sequence baselines with and without length groups
(``models.common.by_length_groups``), same weights, same real batch.

The batch: ``--batch`` training samples of a prepared dataset (``mmsr preprocess`` and, for the
models that read codes, ``mmsr build-codes``), drawn with ``--seed``. One step = forward,
cross-entropy over all items, backward, Adam. "one pass" runs every row over the batch's longest
history, as the models did before length groups; "grouped" is the models' forward. The two
alternate step by step on one model (the machine may be shared); the median of ``--steps`` steps
after one warm-up step is reported as process CPU time (robust to other processes on the machine)
and as wall-clock time.

Usage: python scripts/bench_length_groups.py --workdir W --dataset beauty-ratio
           [--models sasrec,trans2d] [--steps 5] [--threads 1] [--batch 512] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmsr_cli.errors import MmsrError
from mmsr_cli.models import build_model, difsr, gru4rec, gru4recf, nova, sasrec, srgnn, trans2d
from mmsr_cli.models.common import by_length_groups
from mmsr_cli.models.base import ModelConfig
from mmsr_cli.inputs import load_dataset
from mmsr_cli.workdir import DatasetDir

GROUPED = ["gru4rec", "sasrec", "sasrecf", "srgnn", "gru4recf", "nova", "difsr", "trans2d"]
MODULES = (gru4rec, sasrec, srgnn, gru4recf, nova, difsr, trans2d)  # the modules that call by_length_groups


def one_pass(lengths, encode):
    """Every row over the batch's longest history: the models' forward before length groups."""
    return encode(torch.arange(len(lengths)), int(lengths.max()))


def bench(ds: DatasetDir, name: str, steps: int, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    bundle = load_dataset(ds, ModelConfig(model=name, dim=128, layers=2, heads=2, dropout=0.3), verify=False)
    model = build_model(bundle.model_config, bundle.info).train()
    split = bundle.open_split(ds, "train")
    batch = split.collate(np.random.default_rng(seed).choice(len(split), batch_size, replace=False))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    grouped = by_length_groups

    def step(forward) -> tuple[float, float]:
        for module in MODULES:
            module.by_length_groups = forward
        w0, c0 = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(model.score(batch), batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - w0, time.process_time() - c0

    times: dict[str, list[tuple[float, float]]] = {"grouped": [], "one pass": []}
    try:
        for i in range(steps + 1):
            for label, forward in (("grouped", grouped), ("one pass", one_pass)):
                t = step(forward)
                if i:
                    times[label].append(t)
    finally:
        for module in MODULES:
            module.by_length_groups = grouped
    lengths = batch["lengths"].float()
    row = {"model": name, "mean length": float(lengths.mean()), "max length": int(lengths.max())}
    for label, ts in times.items():
        row[f"{label} cpu"] = statistics.median(t[1] for t in ts)
        row[f"{label} wall"] = statistics.median(t[0] for t in ts)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--dataset", default="beauty-ratio")
    ap.add_argument("--models", default=",".join(GROUPED))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    models = [m for m in a.models.split(",") if m]
    unknown = sorted(set(models) - set(GROUPED))
    if unknown:
        raise SystemExit(f"--models: {', '.join(unknown)} not among the length-grouped models {', '.join(GROUPED)}")
    torch.set_num_threads(a.threads)
    try:
        ds = DatasetDir.open(a.workdir, a.dataset)
    except MmsrError as e:
        raise SystemExit(f"bench_length_groups: error: {e}") from None
    print(
        f"# {a.dataset}, batch {a.batch} (seed {a.seed}), dim 128, 2 layers, {a.threads} torch thread(s), "
        f"median of {a.steps} steps; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| model | mean / max length | one pass cpu s/step | grouped cpu s/step | speed-up | one pass wall | grouped wall |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in models:
        try:
            r = bench(ds, name, a.steps, a.batch, a.seed)
        except MmsrError as e:  # missing stages or files: the CLI's one-line message, no traceback
            raise SystemExit(f"bench_length_groups: error: {e}") from None
        print(
            f"| {name} | {r['mean length']:.1f} / {r['max length']} | {r['one pass cpu']:.3f} | {r['grouped cpu']:.3f} "
            f"| {r['one pass cpu'] / r['grouped cpu']:.1f}x | {r['one pass wall']:.3f} | {r['grouped wall']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
