"""Carry a dataset's tuning studies and tested runs between machines that do not keep their disk.

    python scripts/bench_results_archive.py save WORKDIR DATASET DEST [--runs GLOB ...]
    python scripts/bench_results_archive.py restore WORKDIR DATASET DEST

``save`` writes into the folder DEST:
* ``studies.sqlite3``: a consistent copy of ``<dataset>/tune/studies.sqlite3`` (SQLite's online
  backup, safe while `mmsr tune` writes to it). Restored, `mmsr tune` resumes every study. A
  trial that was running is retried from its first epoch, since its ``last.pt`` stays behind.
* ``runs.tar.xz``: of every run matching a GLOB (default ``*-tuned-s*``, the runs of
  bench_tuned.sh) that has test metrics, the files that `mmsr report` and `mmsr evaluate
  --compare` read: config, history, metrics and per-sample ranks. Checkpoints are left out.

``restore`` puts both back: the study file only where the workdir has none, and each run only
where its folder is missing. It never overwrites newer work. Both steps write to a temporary
name first and then rename, so an interrupted call leaves no half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import sqlite3
import sys
import tarfile
import tempfile
from pathlib import Path

RESULT_FILES = ("config.json", "history.json", "history.csv")  # and metrics_*.json, ranks_*.npy


def result_files(run: Path) -> list[Path]:
    files = [run / name for name in RESULT_FILES if (run / name).exists()]
    return files + sorted(run.glob("metrics_*.json")) + sorted(run.glob("ranks_*.npy"))


def backup(source: Path, target: Path) -> None:
    """A consistent copy of the SQLite database ``source`` (its online backup API)."""
    target.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(target)) as out:
        src.backup(out)


def save(dataset: Path, dest: Path, patterns: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    studies = dataset / "tune" / "studies.sqlite3"
    if studies.exists():
        tmp = dest / ".studies.sqlite3.tmp"
        backup(studies, tmp)
        os.replace(tmp, dest / "studies.sqlite3")
        print(f"saved {studies} -> {dest / 'studies.sqlite3'}")
    runs = sorted(r for r in (dataset / "runs").iterdir()
                  if r.is_dir() and any(fnmatch.fnmatch(r.name, p) for p in patterns) and list(r.glob("metrics_test*.json")))
    if not runs:
        return
    fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=".runs.", suffix=".tmp")
    os.close(fd)
    with tarfile.open(tmp_name, "w:xz") as tar:
        for run in runs:
            for path in result_files(run):
                tar.add(path, arcname=f"{run.name}/{path.name}")
    os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would follow the file into a repository
    os.replace(tmp_name, dest / "runs.tar.xz")
    print(f"saved {len(runs)} runs -> {dest / 'runs.tar.xz'}: {', '.join(r.name for r in runs)}")


def restore(dataset: Path, dest: Path) -> None:
    studies, archive = dataset / "tune" / "studies.sqlite3", dest / "runs.tar.xz"
    if (dest / "studies.sqlite3").exists() and not studies.exists():
        studies.parent.mkdir(parents=True, exist_ok=True)
        tmp = studies.with_name(".studies.sqlite3.tmp")
        backup(dest / "studies.sqlite3", tmp)
        os.replace(tmp, studies)
        print(f"restored {studies}")
    if not archive.exists():
        return
    runs = dataset / "runs"
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        names = sorted({Path(m.name).parts[0] for m in members})
        missing = [n for n in names if not (runs / n).exists()]
        for name in missing:
            tmp = Path(tempfile.mkdtemp(dir=dataset, prefix=".restore-"))
            tar.extractall(tmp, members=[m for m in members if Path(m.name).parts[0] == name], filter="data")
            runs.mkdir(exist_ok=True)
            os.replace(tmp / name, runs / name)
            tmp.rmdir()
    print(f"restored {len(missing)} of {len(names)} runs into {runs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["save", "restore"])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("dataset")
    ap.add_argument("dest", type=Path)
    ap.add_argument("--runs", action="append", default=None, metavar="GLOB")
    args = ap.parse_args()
    dataset = args.workdir / args.dataset
    if not dataset.is_dir():
        print(f"bench_results_archive: error: {dataset}: no such dataset folder", file=sys.stderr)
        sys.exit(2)
    try:
        if args.action == "save":
            save(dataset, args.dest, args.runs or ["*-tuned-s*"])
        else:
            restore(dataset, args.dest)
    except (OSError, sqlite3.Error, tarfile.TarError) as e:  # a full disk, a damaged archive or database
        print(f"bench_results_archive: error: {args.dest}: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
