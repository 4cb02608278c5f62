#!/usr/bin/env python
"""Time and peak memory of `mmsr preprocess` on a sequence-format dataset (default: Amazon Beauty).

Each measurement runs in a fresh process so that peak RSS (``ru_maxrss`` from ``wait4``) belongs
to that run alone. Two figures per configuration, median of ``--runs`` runs:

- stage: ``mmsr_cli.preprocess.run`` only, timed inside the child, after imports;
  peak RSS of that child (imports included) and the RSS growth during the stage;
- cli: the whole ``mmsr preprocess`` command, wall time seen from outside and its peak RSS
  (interpreter start and imports of every registered command included).

Usage: python scripts/bench_preprocess.py [--data DIR] [--runs 3]
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-beauty"

_STAGE_CHILD = r"""
import json, resource, sys, time
from mmsr_cli.preprocess import PreprocessOptions, run
from mmsr_cli.workdir import DatasetDir
workdir, name, core, max_len, split, ratio = sys.argv[1:7]
opts = PreprocessOptions(core=int(core), max_len=int(max_len), split=split, test_ratio=float(ratio))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
result = run(DatasetDir.open(workdir, name), opts)
seconds = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "maxrss_kib": after, "growth_kib": after - before,
                  "counts": result.counts}))
"""


def _spawn(argv: list[str]) -> tuple[float, int, str, str]:
    """Run a child, return (wall seconds, its own peak RSS in KiB, stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, argv[:4]))} failed: {stderr.strip()}")
    return wall, usage.ru_maxrss, stdout, stderr


def _setup(data: Path, workdir: Path, name: str) -> None:
    from mmsr_cli import contracts as C
    from mmsr_cli.workdir import DatasetDir

    ds = DatasetDir.open(workdir, name)
    raw = ds.path(C.RAW_DIR)
    raw.mkdir(parents=True)
    shutil.copyfile(data / "sequences.tsv", ds.path(C.RAW_SEQUENCES))
    shutil.copyfile(data / "items.jsonl", ds.path(C.RAW_ITEMS))
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=[C.RAW_DIR], options={"from": str(data)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not (args.data / "sequences.tsv").exists():
        raise SystemExit(f"bench: {args.data}/sequences.tsv not found")

    configs = [("loo", "0.2"), ("ratio", "0.2")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mmsr-bench-") as tmp:
        workdir = Path(tmp)
        name = "bench"
        _setup(args.data, workdir, name)
        mmsr = shutil.which("mmsr") or sys.exit("bench: `mmsr` is not on PATH")
        for split, ratio in configs:
            stage_s, stage_rss, stage_growth, cli_s, cli_rss = [], [], [], [], []
            counts = {}
            for _ in range(args.runs):
                _, rss, out, _ = _spawn(
                    [sys.executable, "-c", _STAGE_CHILD, str(workdir), name, "5", "50", split, ratio]
                )
                res = json.loads(out.strip().splitlines()[-1])
                counts = res["counts"]
                stage_s.append(res["seconds"])
                stage_rss.append(rss)
                stage_growth.append(res["growth_kib"])
                wall, rss, _, _ = _spawn(
                    [mmsr, "preprocess", "--workdir", str(workdir), "--dataset", name, "--split", split,
                     "--test-ratio", ratio]
                )
                cli_s.append(wall)
                cli_rss.append(rss)
            med = statistics.median
            rows.append(
                f"| {split} | {counts['users']:,} / {counts['items']:,} / {counts['interactions']:,} | "
                f"{counts['samples_train']:,} / {counts['samples_valid']:,} / {counts['samples_test']:,} | "
                f"{med(stage_s):.2f} s | {med(stage_rss) / 1024:.0f} MiB (+{med(stage_growth) / 1024:.0f}) | "
                f"{med(cli_s):.2f} s | {med(cli_rss) / 1024:.0f} MiB |"
            )

    print(f"dataset: {args.data}; {args.runs} runs each, median; python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs visible")
    print()
    print("| split | users / items / interactions | samples train / valid / test | stage time | "
          "stage peak RSS (growth) | CLI wall time | CLI peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
