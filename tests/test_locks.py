"""Concurrent writers: one stage at a time per dataset folder, one `train` at a time per run.

The holders here are real processes (a second `mmsr train`, or a child that holds the lock while
a stage would run); a holder killed with SIGKILL must not block the next writer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from mmsr_cli import contracts as C
from test_bad_inputs import CODES, assert_error, mmsr, tree_hashes, work  # noqa: F401

pytestmark = pytest.mark.slow  # real concurrent processes holding and contending for locks

ROOT = Path(__file__).resolve().parents[1]


def _child(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _hold_lock(lock_file: Path) -> subprocess.Popen:
    """A process that holds ``lock_file`` through mmsr's own lock until it is killed."""
    code = ("import sys, time; from mmsr_cli.workdir import writer_lock\n"
            "with writer_lock(sys.argv[1], 'test'):\n    print('held', flush=True); time.sleep(600)")
    proc = _child(["-c", code, str(lock_file)])
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize(
    "command, args",
    [
        ("preprocess", ["--core", "0", "--max-len", "6"]),
        ("build-codes", CODES),
        ("build-graphs", []),
        ("download", ["--from", "{raw}"]),
    ],
)
def test_a_second_stage_on_one_dataset_is_refused_and_a_killed_holder_blocks_nothing(work, command, args):  # noqa: F811
    args = [a.format(raw=work.path(C.RAW_DIR)) for a in args]
    holder = _hold_lock(work.path(C.DATASET_LOCK))
    try:
        before = tree_hashes(work.workdir)
        line = assert_error(run_cli(mmsr(work, command, *args)), f"dataset {work.name} is being written by")
        assert f"mmsr pid {holder.pid}" in line  # names the holder
        assert tree_hashes(work.workdir) == before
    finally:
        _kill(holder)
    r = run_cli(mmsr(work, command, *args))
    assert r.exit_code == 0, r.stderr


def test_two_trainings_of_one_run(work):  # noqa: F811
    """A second `train` of a run that is training is refused; after the first is killed, the run
    resumes; a training of another run goes on meanwhile."""
    train = ["--model", "sasrec", "--dim", "16", "--device", "cpu", "--patience", "0"]
    first = _child(["-m", "mmsr_cli", *map(str, mmsr(work, "train", *train, "--epochs", "1000", "--run-name", "long"))])
    lock = work.path(C.run_lock("long"))
    try:
        deadline = time.monotonic() + 120
        while f"pid {first.pid}" not in (lock.read_text() if lock.exists() else ""):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first training never took its lock"
            time.sleep(0.2)
        line = assert_error(run_cli(mmsr(work, "train", *train, "--epochs", "1", "--run-name", "long")),
                            "run long is being written by", f"mmsr pid {first.pid}")
        assert str(lock) in line
        other = run_cli(mmsr(work, "train", *train, "--epochs", "1", "--run-name", "other"))
        assert other.exit_code == 0, other.stderr
    finally:
        _kill(first)
    r = run_cli(mmsr(work, "train", *train, "--epochs", "1", "--run-name", "long", "--no-resume"))
    assert r.exit_code == 0, r.stderr


def test_stages_of_different_datasets_run_side_by_side(work, tmp_path):  # noqa: F811
    holder = _hold_lock(work.workdir / "elsewhere" / C.DATASET_LOCK)
    try:
        r = run_cli(mmsr(work, "build-graphs"))
        assert r.exit_code == 0, r.stderr
    finally:
        _kill(holder)
