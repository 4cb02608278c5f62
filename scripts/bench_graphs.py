"""Benchmark MSGraph construction and batching on a preprocessed dataset.

    python scripts/bench_graphs.py --workdir /tmp/gw --dataset beauty [--modalities 2 --clusters 32 --k 3]

Needs `mmsr preprocess` to have run. Codes: by default random top-k code sets (``--modalities``
modalities, ``--clusters`` codes each, ``--k`` per item, ``--missing`` share of items without the
modality) so the figures do not depend on build-codes; ``--real`` times the whole
`mmsr build-graphs` stage on the dataset's own codes instead. Reports, per split: construction
time of all graphs (median of ``--repeat`` runs, one core: set OMP/MKL threads to 1 yourself if
you want to be sure), mean nodes and edges per graph; the collate time of ``--batch``-sample
batches drawn at random (graphs built for the batch; median over 200 batches), and the peak RSS.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import statistics
import tempfile
import time

import numpy as np

from mmsr_cli import contracts as C
from mmsr_cli import graphs as G
from mmsr_cli.models.base import ModalityInfo
from mmsr_cli.workdir import DatasetDir


def random_codes(n_items: int, n_codes: int, k: int, missing: float, rng: np.random.Generator) -> np.ndarray:
    # k distinct codes per item: the first k of a random permutation of the codes
    codes = np.argsort(rng.random((n_items, n_codes)), axis=1)[:, :k].astype(np.int64)
    codes[rng.random(n_items) < missing] = -1
    return codes


def stage_with_random_codes(ds: DatasetDir, codes: list[np.ndarray], splits: list[str], repeat: int) -> None:
    """Time the whole build_graphs stage (read, check, count every graph, manifest) on a copy of the
    dataset's preprocess outputs, with the random codes standing in for build-codes."""

    tmp = DatasetDir.open(tempfile.mkdtemp(prefix="bench-graphs-ds-"), ds.name)
    for rel in ds.read_manifest(C.STAGE_PREPROCESS)["outputs"]:
        (tmp.path(rel)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ds.path(rel), tmp.path(rel))
    shutil.copytree(ds.path(C.MANIFESTS_DIR), tmp.path(C.MANIFESTS_DIR), ignore=lambda d, names: [
        n for n in names if not n.startswith((C.STAGE_PREPROCESS, C.STAGE_DOWNLOAD))])
    names = [f"m{i}" for i in range(len(codes))]
    for name in names:
        tmp.path(C.codes_file(name)).parent.mkdir(parents=True, exist_ok=True)
        tmp.path(C.codes_file(name)).write_text(name)
        tmp.write_manifest(C.modality_stage(C.STAGE_CODES, name), outputs=[C.codes_file(name)], options={})
    by_name = dict(zip(names, codes))
    G._available_modalities = lambda _ds: names
    G._load_modality_info = lambda _ds, name, variant: ModalityInfo(
        name, int(by_name[name].max()) + 1, 32, None, by_name[name])
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = G.build_graphs(tmp, G.BuildGraphsOptions(splits=tuple(splits)))
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    G.GraphSplit.open(tmp, splits[0])
    print(f"  whole stage (read, check, count, manifest), all splits: median {statistics.median(times):.2f}s "
          f"of {repeat}; {result.bytes_written} bytes; GraphSplit.open({splits[0]}) (reads the samples) "
          f"{time.perf_counter() - t0:.2f}s")
    shutil.rmtree(tmp.workdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--modalities", type=int, default=2)
    ap.add_argument("--clusters", type=int, default=32)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--missing", type=float, default=0.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--splits", default="train,valid,test")
    ap.add_argument("--real", action="store_true", help="time `build-graphs` on the dataset's codes")
    args = ap.parse_args()
    ds = DatasetDir.open(args.workdir, args.dataset)
    ds.require(C.STAGE_PREPROCESS)
    splits = args.splits.split(",")
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, numpy {np.__version__}")

    if args.real:
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = G.build_graphs(ds, G.BuildGraphsOptions(splits=tuple(splits)))
            times.append(time.perf_counter() - t0)
        print(f"build-graphs ({', '.join(result.modalities) or 'no modalities'}): median {statistics.median(times):.2f}s "
              f"of {args.repeat}, {result.bytes_written} bytes")
        for split, c in result.counts.items():
            print(f"  {split}: {c['samples']} graphs, {c['mean_nodes']:.1f} nodes, {c['mean_edges']:.1f} edges each")
        splits_of = {s: G.GraphSplit.open(ds, s, result.variant) for s in splits}
    else:
        n_items = G._n_items(ds)
        rng = np.random.default_rng(0)
        codes = [random_codes(n_items, args.clusters, args.k, args.missing, rng) for _ in range(args.modalities)]
        print(f"random codes: {args.modalities} modalities, c={args.clusters}, k={args.k}, missing={args.missing}")
        infos = [ModalityInfo(f"m{i}", args.clusters, 32, None, c) for i, c in enumerate(codes)]
        splits_of = {}
        for split in splits:
            flat, ptr, target, user_idx, _ = G._read_samples(ds.path(C.samples_file(split)))
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                arrays = G.build_msgraphs(flat, ptr, codes, n_items)
                times.append(time.perf_counter() - t0)
            splits_of[split] = G.GraphSplit(flat, ptr, target, user_idx, infos, n_items)
            S = arrays.n_samples
            print(
                f"  {split}: {S} graphs ({len(flat)} history entries) built in median {statistics.median(times):.2f}s "
                f"(min {min(times):.2f}s); {arrays.node_ptr[-1] / S:.1f} nodes, "
                f"{arrays.edge_ptr[-1] / S:.1f} edges, {arrays.pos_ptr[-1] / S:.1f} positions per graph"
            )

        if args.modalities:
            stage_with_random_codes(ds, codes, splits, args.repeat)

    rng = np.random.default_rng(1)
    for split, split_data in splits_of.items():
        times = []
        for _ in range(200):
            idx = rng.integers(0, len(split_data), args.batch)
            t0 = time.perf_counter()
            split_data.collate(idx)
            times.append(time.perf_counter() - t0)
        print(f"  collate {split} (graphs built for the batch), batch {args.batch}: median {statistics.median(times) * 1e3:.2f} ms")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
