#!/usr/bin/env python
"""Seconds per epoch of `mmsr train` for the sequence baselines on a real dataset (default Beauty).

Ingests the dataset (``mmsr download --from``) and preprocesses it (leave-one-out, max_len 50) in a
temporary workdir, then trains each model for ``--epochs`` epochs with the paper's settings
(dim 128, batch 512, Adam 1e-3) in a fresh process, and reads ``history.json``: training seconds
per epoch (all batches), full-ranking validation seconds per epoch, and the process's peak RSS.
Also times `mmsr evaluate` on the test split.

Usage: python scripts/bench_train.py [--data DIR] [--epochs 2] [--models pop,gru4rec,sasrec]
       [--threads N] [--workdir DIR (kept, to re-use the preprocessed data)]
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-beauty"


def mmsr(*args: str, env: dict | None = None) -> tuple[float, int]:
    """Run ``mmsr ARGS`` in a child; (wall seconds, peak RSS KiB of the child)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mmsr_cli", *args], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"mmsr {' '.join(args)} failed")
    return wall, usage.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--models", default="pop,gru4rec,sasrec")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--max-steps", type=int, default=0,
                    help="train only N batches per epoch and extrapolate the epoch time (0: full epochs)")
    a = ap.parse_args()
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="mmsr-bench-train-"))
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    name = "bench"
    base = ["--workdir", str(workdir), "--dataset", name]
    if not (workdir / name / "manifests" / "preprocess.json").exists():
        mmsr("download", *base, "--from", str(a.data), "--no-images")
        mmsr("preprocess", *base)
    counts = json.loads((workdir / name / "manifests" / "preprocess.json").read_text())["counts"]
    import torch

    rows = []
    load_before = os.getloadavg()[0]
    for model in a.models.split(","):
        run = f"bench-{model}"
        extra = [] if model == "pop" else ["--epochs", str(a.epochs), "--patience", "0", "--max-steps", str(a.max_steps)]
        wall, rss = mmsr("train", *base, "--model", model, "--run-name", run, "--no-resume", "--device", "cpu", *extra, env=env)
        history = json.loads((workdir / name / "runs" / run / "history.json").read_text())
        eval_wall, _ = mmsr("evaluate", *base, "--run", run, "--device", "cpu", env=env)
        test = json.loads((workdir / name / "runs" / run / "metrics_test.json").read_text())
        rows.append(
            {
                "model": model,
                "epochs": len(history),
                "step_s": statistics.median(h["train_seconds"] / h["steps"] for h in history),
                "full_steps": -(-counts["samples_train"] // 512),
                "valid_s": statistics.median(h["valid_seconds"] for h in history),
                "steps": history[0]["steps"],
                "rss_mib": rss / 1024,
                "wall": wall,
                "eval_wall": eval_wall,
                "test_seconds": test["seconds"],
                "hr10": test["metrics"]["hr@10"],
            }
        )
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads default), Python {platform.python_version()}")
    print(f"Load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
          "(other processes share the cores: figures are upper bounds when it exceeds the core count)")
    print(f"Data: {a.data.name}: {counts['users']:,} users, {counts['items']:,} items, "
          f"{counts['samples_train']:,} training samples, loo, max_len 50; dim 128, batch 512\n")
    timed = f"{a.max_steps} steps/epoch timed, epoch extrapolated" if a.max_steps else "full epochs"
    print(f"({a.epochs} epoch(s) per model, {timed})\n")
    print("| model | s/step | train s/epoch (steps) | valid s/epoch (full ranking) | s/epoch total | peak RSS MiB | evaluate test s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        train_epoch = r["step_s"] * r["full_steps"]
        print(f"| {r['model']} | {r['step_s']:.3f} | {train_epoch:.0f} ({r['full_steps']}) | {r['valid_s']:.1f} | "
              f"{train_epoch + r['valid_s']:.0f} | {r['rss_mib']:.0f} | {r['test_seconds']:.1f} |")


if __name__ == "__main__":
    main()
