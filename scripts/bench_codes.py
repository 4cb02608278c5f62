#!/usr/bin/env python
"""Time and peak memory of `mmsr build-codes` on Amazon Beauty's MiniLM title features.

Needs a workdir where Beauty is preprocessed and ``title`` features exist; when they do not,
they are made first (``mmsr extract-features --modality text --name title --model minilm
--fields title``, a few minutes on 2 cores). Each configuration runs ``--runs`` times in fresh
processes; the table shows the median time of the stage (after imports) and the peak RSS, and
the autoencoder / cluster figures of the last run (identical across runs: seeded).

Usage: python scripts/bench_codes.py [--workdir DIR] [--data DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-beauty"

_CHILD = r"""
import json, resource, sys, time
import numpy as np
from mmsr_cli.codes import CodesOptions, run
from mmsr_cli.workdir import DatasetDir
workdir, name, opts_json = sys.argv[1:4]
opts = CodesOptions(**json.loads(opts_json))
t0 = time.perf_counter()
(result,) = run(DatasetDir.open(workdir, name), opts)
wall = time.perf_counter() - t0
s = result.sizes
print(json.dumps({"seconds": wall, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "mse": result.ae_mse, "epochs": result.ae_epochs, "n_codes": result.n_codes,
                  "sizes": [int(s.min()), float(np.median(s)), int(s.max())], "empty": float((s == 0).mean()),
                  "n_items": result.n_items, "dim": result.dim}))
"""


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv[:4])} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--dataset", default="beauty")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    wd, name = str(args.workdir), args.dataset

    from mmsr_cli.workdir import DatasetDir

    ds = DatasetDir.open(args.workdir, name)
    mmsr = [sys.executable, "-m", "mmsr_cli"]
    if ds.read_manifest("preprocess") is None:
        _run(mmsr + ["download", "--workdir", wd, "-d", name, "--from", str(args.data), "--no-images"])
        _run(mmsr + ["preprocess", "--workdir", wd, "-d", name])
    if ds.read_manifest("features:title") is None:
        _run(mmsr + ["extract-features", "--workdir", wd, "-d", name, "--modality", "text", "--name", "title",
                     "--model", "minilm", "--fields", "title"])

    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}", file=sys.stderr)
    configs = [
        ("c=30, k=3 (defaults)", {}),
        ("c=100, k=5", {"clusters": 100, "top_k": 5}),
        ("--no-codes", {"no_codes": True}),
    ]
    print("| configuration | stage time (median) | peak RSS | AE held-out MSE (epochs) | codes | items per code min / median / max | empty codes |")
    print("|---|---|---|---|---|---|---|")
    for label, extra in configs:
        opts = {"modalities": ["title"], **extra}
        results = [json.loads(_run([sys.executable, "-c", _CHILD, wd, name, json.dumps(opts)]).splitlines()[-1])
                   for _ in range(args.runs)]
        r = results[-1]
        sizes = "-" if extra.get("no_codes") else "{} / {:g} / {}".format(*r["sizes"])
        empty = "-" if extra.get("no_codes") else f"{r['empty']:.0%}"
        print(f"| {label} | {statistics.median(x['seconds'] for x in results):.1f} s | "
              f"{max(x['maxrss_kib'] for x in results) / 1024:.0f} MiB | {r['mse']:.4g} ({r['epochs']}) | "
              f"{r['n_codes']:,} | {sizes} | {empty} |")


if __name__ == "__main__":
    main()
