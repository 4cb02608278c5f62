"""scripts/sweep_codes.sh (paper section 5.5, Figure 5): the c x k code-construction sweep, run as a
user would (bash, one `mmsr` process per step) on the synthetic dataset: c = 4, k in {1, 2} (each
(c, k) costs four processes, about 15 s of CPU; the whole file stays under a minute)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmsr_cli import contracts as C
from mmsr_cli.workdir import DatasetDir, path_sha256

from test_codes import blobs, write_features

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep_codes.sh"
HEADER = ["dataset", "c", "k", "seed", "run", "n",
          "hr@5", "hr@10", "hr@20", "mrr@5", "mrr@10", "mrr@20", "ndcg@5", "ndcg@10", "ndcg@20"]

pytestmark = [pytest.mark.slow,  # runs scripts/sweep_codes.sh over the pipeline in fresh processes
              pytest.mark.skipif(shutil.which("bash") is None, reason="bash not available")]


def prepared_synthetic(cli, workdir: Path) -> DatasetDir:
    """The synthetic dataset up to extract-features (hand-made image features stand in for the CNN)."""
    ds = DatasetDir.open(workdir, "synthetic")
    for args in (["download", "--no-images"], ["preprocess"]):
        r = cli([args[0], "--workdir", workdir, "--dataset", "synthetic", *args[1:]])
        assert r.exit_code == 0, r.stderr
    write_features(ds, "image", blobs(pq.read_metadata(ds.path(C.ITEMS)).num_rows, 16, 4, seed=0), missing={0, 1})
    return ds


def sweep(workdir: Path, **env) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MMSR_WORKDIR": str(workdir),
        "MMSR": f"{sys.executable} -m mmsr_cli",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT), "synthetic"], env=env, capture_output=True, text=True, timeout=3600)


def test_sweep_builds_every_c_k_in_its_own_dataset_and_tabulates_the_test_metrics(cli, tmp_path, one_thread):
    base = prepared_synthetic(cli, tmp_path)
    before = path_sha256(base.root)
    r = sweep(
        tmp_path,
        CLUSTERS="4",
        TOPK="1,2",
        CODES_OPTS="--epochs 2 --ae-dim 8",
        TRAIN_OPTS="--epochs 1 --dim 8 --batch-size 512 --max-steps 1 --device cpu",
    )
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "synthetic-sweep-codes.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == HEADER
    table = [dict(zip(HEADER, row)) for row in rows[1:]]
    assert [(row["c"], row["k"], row["seed"]) for row in table] == [("4", "1", "0"), ("4", "2", "0")]
    for row in table:
        c, k = int(row["c"]), int(row["k"])
        assert row["dataset"] == f"synthetic-c{c}k{k}" and row["run"] == f"mmsr-c{c}k{k}-s0"
        ds = DatasetDir.open(tmp_path, row["dataset"])
        options = ds.read_manifest("codes:image")["options"]
        assert (options["clusters"], options["top_k"]) == (c, k)  # each copy holds its own codes
        run = ds.path(f"{C.RUNS_DIR}/{row['run']}")
        config = json.loads((run / "config.json").read_text())
        assert (config["codes"]["image"]["clusters"], config["codes"]["image"]["top_k"]) == (c, k)
        record = json.loads((run / "metrics_test.json").read_text())
        assert int(row["n"]) == record["n"] > 0
        assert {m: float(row[m]) for m in HEADER[6:]} == record["metrics"]
        assert 0.0 <= float(row["hr@20"]) <= 1.0
    # k codes per item: graphs of k = 2 hold more code links than those of k = 1
    edges = {(row["c"], row["k"]): DatasetDir.open(tmp_path, row["dataset"]).read_manifest("graphs:codes")["counts"]
             ["train"]["edges"] for row in table}
    assert edges[("4", "2")] > edges[("4", "1")]
    # the prepared dataset is left as it was (no codes, graphs or runs written into it)
    assert path_sha256(base.root) == before
    assert not any(base.path(d).exists() for d in (C.CODES_DIR, C.GRAPHS_DIR, C.RUNS_DIR))
    assert not list(tmp_path.glob("*.sweep-tmp.*")) and not list(tmp_path.glob("*.tsv.tmp*"))


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"CLUSTERS": "4,x"}, "CLUSTERS: 'x' is not an integer >= 1"),
        ({"TOPK": "0"}, "TOPK: '0' is not an integer >= 1"),
        ({"SEEDS": " "}, "SEEDS: no values"),
        ({"MMSR_WORKDIR": "/nonexistent/mmsr-workdir"}, "workdir /nonexistent/mmsr-workdir not found"),
        ({}, "synthetic: not a prepared dataset"),
    ],
)
def test_bad_sweep_settings_are_one_line_errors_before_any_step(tmp_path, env, needle):
    r = sweep(tmp_path, **env)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_default_mmsr_command_is_the_one_on_path(tmp_path):
    """MMSR unset means `mmsr` from PATH; the script's own `mmsr` helper must not call itself
    (it recursed until bash died, silently, after copying the dataset)."""
    work = tmp_path / "work"
    (work / "synthetic" / "manifests").mkdir(parents=True)
    (work / "synthetic" / "manifests" / "features__title.json").write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "mmsr"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\necho "mmsr: error: fake stops here" >&2\nexit 2\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MMSR"}
    env.update(MMSR_WORKDIR=str(work), PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", CLUSTERS="4", TOPK="1")
    r = subprocess.run(["bash", str(SCRIPT), "synthetic"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "fake stops here" in r.stderr
    assert calls.read_text().splitlines() == [f"build-codes --workdir {work} --dataset synthetic-c4k1 --clusters 4 --top-k 1"]


def test_outdated_copy_is_replaced_by_renames_and_dead_sweeps_leftovers_are_deleted(tmp_path):
    """A sweep killed while it replaced an outdated copy must never leave a half-deleted copy that
    looks current: the copy is swapped by renames, and the next sweep deletes the folders a dead
    sweep left beside it (those of a sweep still running stay)."""
    work = tmp_path / "work"
    base = work / "synthetic"
    (base / "manifests").mkdir(parents=True)
    (base / "manifests" / "features__title.json").write_text('{"fingerprint": "new"}')
    (base / "items.parquet").write_text("items")
    copy = work / "synthetic-c4k1"
    (copy / "manifests").mkdir(parents=True)
    (copy / "manifests" / "features__title.json").write_text('{"fingerprint": "old"}')  # made before a re-run
    (copy / "runs" / "mmsr-c4k1-s0").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    leftovers = [work / f"synthetic-c4k1.sweep-tmp.{dead_pid}", work / f"synthetic-c4k1.sweep-old.{dead_pid}"]
    running = work / f"synthetic-c4k1.sweep-tmp.{os.getpid()}"
    for folder in (*leftovers, running):
        (folder / "manifests").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mmsr"
    fake.write_text('#!/bin/sh\necho "mmsr: error: fake stops here" >&2\nexit 2\n')
    fake.chmod(0o755)
    env = {**os.environ, "MMSR": str(fake), "MMSR_WORKDIR": str(work), "CLUSTERS": "4", "TOPK": "1"}
    r = subprocess.run(["bash", str(SCRIPT), "synthetic"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "fake stops here" in r.stderr
    assert (copy / "manifests" / "features__title.json").read_text() == '{"fingerprint": "new"}'
    assert (copy / "items.parquet").read_text() == "items" and not (copy / "runs").exists()
    assert not any(p.exists() for p in leftovers) and running.is_dir()
    assert sorted(p.name for p in work.iterdir()) == ["synthetic", "synthetic-c4k1", running.name]
