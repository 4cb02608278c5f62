"""Interrupted stages resume or restart cleanly (`download`, `extract-features`, `build-graphs`,
`train`).

Each case stops a real ``python -m mmsr_cli`` subprocess with SIGINT (Ctrl-C) or SIGKILL at a
seeded random point, then runs the stage again; the outputs must equal an uninterrupted run's:
byte for byte for data files (manifests are compared by their output hashes and fingerprints,
since they also hold creation times), and the same weights, optimizer state and metrics for
`train`. A Ctrl-C must end with one line on stderr and exit status 130.

Random points are reproducible and independent of timing: the subprocess watches its own
progress through a hook (:data:`HOOK`: the n-th call of a function such as ``numpy.save``,
``os.replace``, the checksum record of a download or the save of a feature chunk sends the
signal, n drawn from a seeded RNG over the calls an uninterrupted run makes). No test polls a
child's progress from outside, so a loaded machine cannot move the kill point.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

from mmsr_cli import contracts as C
from mmsr_cli.training import without_measurements

from conftest import assert_same, run_cli, serve_http

pytestmark = pytest.mark.slow  # kills and resumes fresh `python -m mmsr_cli` processes

INTERRUPTED = "mmsr: interrupted; completed outputs are kept, re-run to resume"
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
IMAGE_FEATURES = ["--modality", "image", "--model", "mobilenet_v3_small", "--weights", "none",
                  "--chunk-size", "30", "--batch-size", "10", "--workers", "1"]
TRAIN = ["--model", "mmsr", "--epochs", "3", "--dim", "16", "--batch-size", "128", "--max-steps", "4",
         "--patience", "0", "--device", "cpu"]
# Early stopping on: at lr 1e-9 the weights barely move, so the validation metric does not improve
# after epoch 1 and the run stops after epoch 3 with patience 2 (checked on the reference run).
TRAIN_PATIENT = ["--model", "mmsr", "--epochs", "5", "--dim", "16", "--batch-size", "128", "--max-steps", "2",
                 "--patience", "2", "--lr", "1e-9", "--device", "cpu", "--run-name", "patient"]

# Run `mmsr ARGS` with one function hooked: its n-th call sends the signal to this process. After
# SIGINT the main thread waits for Python's handler to raise where the call was about to happen.
HOOK = r"""
import importlib, os, signal, sys, threading, time
module, attr, n, signame = sys.argv[1:5]
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, name)
calls = 0
def hooked(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(n):
        os.kill(os.getpid(), getattr(signal, signame))
        if threading.current_thread() is threading.main_thread():
            time.sleep(60)
    return original(*args, **kwargs)
setattr(owner, name, hooked)
from mmsr_cli.app import main
main(sys.argv[5:])
"""


def mmsr_args(workdir: Path, command: str, *args) -> list[str]:
    return [command, "--workdir", str(workdir), "--dataset", "synthetic", *map(str, args)]


def hooked_run(target: str, n: int, sig: str, args: list[str]) -> subprocess.CompletedProcess:
    module, _, attr = target.partition(":")
    cmd = [sys.executable, "-c", HOOK, module, attr, str(n), sig, *args]
    return subprocess.run(cmd, env=CHILD_ENV, capture_output=True, text=True, timeout=600)


def assert_interrupted(res: subprocess.CompletedProcess, sig: str) -> None:
    if sig in ("SIGINT", "SIGTERM"):  # Ctrl-C, kill: one line, exit 128 + signal number, no traceback
        assert res.returncode == 128 + getattr(signal, sig) and res.stderr.strip() == INTERRUPTED, res.stderr
    else:
        assert res.returncode == -signal.SIGKILL, res.stderr


def count_calls(monkeypatch, target: str) -> list[int]:
    """Count the calls of ``module:attr`` in this process (during an uninterrupted reference run)."""
    import importlib

    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, calls = getattr(owner, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def run_counting(args: list[str], targets: list[str]) -> dict[str, int]:
    """Run ``mmsr ARGS`` in this process; how often it called each target."""
    with pytest.MonkeyPatch.context() as mp:
        calls = {t: count_calls(mp, t) for t in targets}
        cli_ok(args)
    return {t: c[0] for t, c in calls.items()}


def data_files(root: Path, under: str = "") -> dict[str, bytes]:
    """Files of a dataset folder (or of ``under`` in it), manifests and logs aside."""
    base = root / under if under else root
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in (C.MANIFESTS_DIR, C.LOGS_DIR)
    }


def untimed(obj):
    """``obj`` without its timings (keys naming seconds)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def manifest_core(root: Path, stage: str) -> dict:
    """A manifest without its creation time, command line and timings."""
    m = json.loads((root / C.MANIFESTS_DIR / (stage.replace(":", "__") + ".json")).read_text())
    return untimed({k: m[k] for k in ("outputs", "inputs", "fingerprint", "options", "counts") if k in m})


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders anywhere under the dataset folder (hidden names)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def clone(workdir: Path, dest: Path) -> Path:
    """A copy of ``workdir``'s synthetic dataset in the workdir ``dest``."""
    shutil.copytree(workdir / "synthetic", dest / "synthetic")
    return dest


def cli_ok(args: list[str]):
    r = run_cli(args)
    assert r.exit_code == 0, r.stderr
    return r


# ----------------------------------------------------------------------------------------------
# One uninterrupted pipeline on the synthetic dataset; each stage's input state is kept


GRAPH_TARGETS = ["mmsr_cli.graphs:_build_chunk", "os:replace"]
TRAIN_TARGETS = ["torch.nn.functional:cross_entropy", "torch:save", "mmsr_cli.training:write_history"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """Workdirs of the synthetic dataset before features, before graphs, before train, and done;
    and how often build-graphs and train call the functions the kills are hooked to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work = tmp_path_factory.mktemp("reference")
        snaps = tmp_path_factory.mktemp("snapshots")
        root = work / "synthetic"
        cli_ok(mmsr_args(work, "download"))
        cli_ok(mmsr_args(work, "preprocess"))
        shutil.copytree(root, snaps / "features" / "synthetic")
        cli_ok(mmsr_args(work, "extract-features", *IMAGE_FEATURES))
        cli_ok(mmsr_args(work, "build-codes", "--clusters", "8", "--top-k", "2", "--epochs", "20"))
        shutil.copytree(root, snaps / "graphs" / "synthetic")
        cli_ok(mmsr_args(work, "build-graphs"))
        shutil.copytree(root, snaps / "train" / "synthetic")
        train_calls = run_counting(mmsr_args(work, "train", *TRAIN), TRAIN_TARGETS)
        patient_calls = run_counting(mmsr_args(work, "train", *TRAIN_PATIENT), ["torch:save"])
        # Once more over existing graphs, as in the killed runs below (one more rename).
        graph_calls = run_counting(mmsr_args(work, "build-graphs"), GRAPH_TARGETS)
    finally:
        torch.set_num_threads(threads)
    return {"features": snaps / "features", "graphs": snaps / "graphs", "train": snaps / "train", "done": work,
            "calls": {**graph_calls, **train_calls}, "patient_saves": patient_calls["torch:save"]}


# ----------------------------------------------------------------------------------------------
# download


class RangeServer:
    """Serves ``files`` with Range support and records each GET's (path, Range header)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.ranges: list[tuple[str, str | None]] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                state.ranges.append((self.path, rng))
                body = state.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                try:
                    self.wfile.write(body[start:])
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed

        self.handler = Handler


@pytest.fixture
def range_server():
    server = RangeServer()
    with serve_http(server.handler) as base:
        server.base = base
        yield server


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_download_killed_mid_transfer_resumes_from_the_part_file(range_server, tmp_path, sig):
    rng = random.Random(f"download-{sig}")
    reviews = rng.randbytes(4 << 20)  # 4 MiB: arrives in 1 MiB appends to reviews.json.gz.part
    meta = rng.randbytes(100_000)
    range_server.files.update({"/amz/reviews_Beauty_5.json.gz": reviews, "/amz/meta_Beauty.json.gz": meta})
    args = ["download", "--workdir", str(tmp_path / "w"), "--dataset", "beauty", "--base-url",
            f"{range_server.base}/amz", "--no-images", "--retries", "0"]
    part = tmp_path / "w" / "beauty" / "raw" / "reviews.json.gz.part"
    record = part.with_name(part.name + ".sha256")
    # Killed as the n-th append is about to be recorded in <part>.sha256: n MiB are in the part,
    # n - 1 of them recorded.
    n = rng.randint(2, 4)
    res = hooked_run("mmsr_cli.sources.fetch:write_bytes_atomic", n, sig, args)
    assert_interrupted(res, sig)
    assert not (tmp_path / "w" / "beauty" / "raw" / "reviews.json.gz").exists()
    recorded, digest = record.read_text().split()
    recorded = int(recorded)
    assert recorded == (n - 1) << 20 and part.stat().st_size == n << 20
    assert part.read_bytes() == reviews[: n << 20] and hashlib.sha256(reviews[:recorded]).hexdigest() == digest
    if sig == "SIGKILL":  # a damaged recorded byte: the transfer restarts from the beginning
        data = bytearray(part.read_bytes())
        data[recorded // 2] ^= 0xFF
        part.write_bytes(bytes(data))
        expected_range = None
    else:  # an unrecorded tail (here garbage) is cut off: resume right after the recorded bytes
        with open(part, "ab") as f:
            f.write(b"garbage" * 100)
        expected_range = f"bytes={recorded}-"

    before = len(range_server.ranges)
    cli_ok(args)
    assert range_server.ranges[before] == ("/amz/reviews_Beauty_5.json.gz", expected_range)
    raw = tmp_path / "w" / "beauty" / "raw"
    assert (raw / "reviews.json.gz").read_bytes() == reviews and (raw / "meta.json.gz").read_bytes() == meta
    assert sorted(p.name for p in raw.iterdir()) == ["meta.json.gz", "reviews.json.gz"]  # no part, no record
    assert leftovers(tmp_path / "w" / "beauty") == []

    straight = tmp_path / "straight"
    cli_ok([*args[:2], str(straight), *args[3:]])
    assert manifest_core(straight / "beauty", "download") == manifest_core(tmp_path / "w" / "beauty", "download")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_synthetic_download_killed_at_a_random_write_restarts_cleanly(pipeline, tmp_path, monkeypatch, sig):
    ref = pipeline["done"] / "synthetic"
    calls = count_calls(monkeypatch, "os:replace")
    cli_ok(mmsr_args(tmp_path / "count", "download"))
    monkeypatch.undo()
    n = random.Random(f"synthetic-{sig}").randint(1, calls[0])
    res = hooked_run("os:replace", n, sig, mmsr_args(tmp_path / "w", "download"))
    assert_interrupted(res, sig)
    root = tmp_path / "w" / "synthetic"
    assert not (root / C.MANIFESTS_DIR / "download.json").exists() or n == calls[0]

    cli_ok(mmsr_args(tmp_path / "w", "download"))
    assert data_files(root, C.RAW_DIR) == data_files(ref, C.RAW_DIR)
    assert manifest_core(root, "download") == manifest_core(ref, "download")
    assert leftovers(root) == []


# ----------------------------------------------------------------------------------------------
# extract-features


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_features_killed_after_random_chunks_resume_to_identical_files(pipeline, tmp_path, sig):
    work = clone(pipeline["features"], tmp_path)
    root = work / "synthetic"
    partial = root / C.FEATURES_DIR / "image.partial"
    # Killed as the n-th of 10 chunks of 30 items is about to be saved: n - 1 chunks are kept.
    n = random.Random(f"features-{sig}").randint(2, 9)
    res = hooked_run("mmsr_cli.features:_save_chunk", n, sig, mmsr_args(work, "extract-features", *IMAGE_FEATURES))
    assert_interrupted(res, sig)
    done = len(list(partial.glob("chunk_*.pt")))
    assert done == n - 1 and not (root / C.features_tensor_file("image")).exists()

    r = cli_ok(mmsr_args(work, "extract-features", *IMAGE_FEATURES))
    assert f"{done} chunk(s) resumed" in r.stderr
    ref = pipeline["done"] / "synthetic"
    assert data_files(root, C.FEATURES_DIR) == {
        k: v for k, v in data_files(ref, C.FEATURES_DIR).items()
    }
    assert manifest_core(root, "features:image") == manifest_core(ref, "features:image")
    assert leftovers(root) == []


# ----------------------------------------------------------------------------------------------
# build-graphs


@pytest.mark.parametrize(
    "target,sig,n",
    [
        ("mmsr_cli.graphs:_build_chunk", "SIGKILL", None),  # while the graphs are being counted
        ("mmsr_cli.graphs:_build_chunk", "SIGINT", None),
        ("os:replace", "SIGKILL", 2),  # the old folder moved away, the new one not yet in place
    ],
)
def test_build_graphs_killed_at_a_random_write_rebuilds_identical_graphs(pipeline, tmp_path, target, sig, n):
    ref = pipeline["done"] / "synthetic"
    work = clone(pipeline["done"], tmp_path)  # over existing graphs, as a re-run would be
    root = work / "synthetic"
    shutil.rmtree(root / C.RUNS_DIR)
    n = n or random.Random(f"graphs-{target}-{sig}").randint(1, pipeline["calls"][target])
    res = hooked_run(target, n, sig, mmsr_args(work, "build-graphs"))
    assert_interrupted(res, sig)

    cli_ok(mmsr_args(work, "build-graphs"))
    assert data_files(root, C.GRAPHS_DIR) == data_files(ref, C.GRAPHS_DIR)
    assert manifest_core(root, "graphs:codes") == manifest_core(ref, "graphs:codes")
    assert leftovers(root) == []


# ----------------------------------------------------------------------------------------------
# train


def checkpoint_state(folder: Path) -> dict:
    """What a resumed run must reproduce: weights, optimizer, early stopping (best, the count of
    epochs without improvement, stopped), metrics."""
    last = torch.load(folder / "last.pt", weights_only=True)
    history = [without_measurements(row) for row in last["history"]]
    return {
        "best.pt": torch.load(folder / "best.pt", weights_only=True),
        "model": last["model"],
        "optimizer": last["optimizer"],
        "rng": last["rng"],
        "epoch": last["epoch"],
        "best": last["best"],
        "bad_epochs": last["bad_epochs"],
        "stopped": last["stopped"],
        "history": history,
        "history.json": [without_measurements(row) for row in json.loads((folder / "history.json").read_text())],
        "config.json": json.loads((folder / "config.json").read_text()),
    }


@pytest.mark.parametrize(
    "target,sig,last",
    [
        ("torch.nn.functional:cross_entropy", "SIGKILL", False),  # mid-epoch, before a training step
        ("torch.nn.functional:cross_entropy", "SIGINT", False),
        ("torch:save", "SIGKILL", False),  # between best.pt and last.pt, or before an epoch's last.pt
        ("torch:save", "SIGTERM", False),  # `kill`, `timeout`: the write in progress removes its temporary
        ("mmsr_cli.training:write_history", "SIGKILL", True),  # after the final last.pt, before history
    ],
)
def test_train_killed_at_a_random_step_resumes_to_the_same_weights_and_metrics(pipeline, tmp_path, target, sig, last):
    work = clone(pipeline["train"], tmp_path)
    calls = pipeline["calls"][target]
    n = calls if last else random.Random(f"train-{target}-{sig}").randint(1, calls)
    res = hooked_run(target, n, sig, mmsr_args(work, "train", *TRAIN))
    assert_interrupted(res, sig)
    if sig != "SIGKILL":  # a handled signal leaves no temporary behind, before any re-run
        assert leftovers(work / "synthetic") == []

    r = cli_ok(mmsr_args(work, "train", *TRAIN))
    assert "best epoch" in r.stderr
    folder = work / "synthetic" / C.RUNS_DIR / "mmsr-loo-s0"
    ref = pipeline["done"] / "synthetic" / C.RUNS_DIR / "mmsr-loo-s0"
    assert_same(checkpoint_state(folder), checkpoint_state(ref))
    assert leftovers(work / "synthetic") == []


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_train_killed_with_early_stopping_pending_resumes_its_count(pipeline, tmp_path, sig):
    """Killed as the final last.pt (epoch 3, the second epoch without improvement) is about to be
    saved: the resumed run starts from epoch 2's last.pt, whose count of epochs without
    improvement (1) must carry over, so that epoch 3 stops the run as it did straight through."""
    ref = pipeline["done"] / "synthetic" / C.RUNS_DIR / "patient"
    last = torch.load(ref / "last.pt", weights_only=True)
    epochs = [row["epoch"] for row in last["history"]]
    assert (epochs, last["best"]["epoch"], last["bad_epochs"], last["stopped"]) == ([1, 2, 3], 1, 2, True)
    work = clone(pipeline["train"], tmp_path)
    n = pipeline["patient_saves"]  # best.pt and last.pt of epoch 1, last.pt of epochs 2 and 3
    assert n == 4
    res = hooked_run("torch:save", n, sig, mmsr_args(work, "train", *TRAIN_PATIENT))
    assert_interrupted(res, sig)
    folder = work / "synthetic" / C.RUNS_DIR / "patient"
    pending = torch.load(folder / "last.pt", weights_only=True)
    assert (pending["epoch"], pending["bad_epochs"], pending["stopped"]) == (2, 1, False)

    r = cli_ok(mmsr_args(work, "train", *TRAIN_PATIENT))
    assert "resume patient from epoch 2" in (work / "synthetic" / C.LOGS_DIR / "train.log").read_text()
    assert "(early stop)" in r.stderr or "early stop" in r.stderr
    assert_same(checkpoint_state(folder), checkpoint_state(ref))
    assert leftovers(work / "synthetic") == []


# ----------------------------------------------------------------------------------------------
# Temporaries of killed writers


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from mmsr_cli import workdir

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # that process has exited
    parent = os.getppid()  # alive
    names = {
        f".items.parquet.mmsr{dead}-abcd_123.parquet": False,  # a killed write: removed
        f".last.pt.mmsr{dead}-zz99zz99.pt": False,
        f".reviews.json.gz.mmsr{dead}-a1b2c3d4.gz.tmp": False,
        f".items.parquet.mmsr{parent}-abcd_123.parquet": True,  # a running writer's: kept
        f".notes.mmsr{dead}-short": True,  # not one of our names: kept
        ".hidden": True,
        "items.parquet": True,
    }
    folder = tmp_path / "ds"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"x")
    (folder / f".codes.mmsr{dead}-qwertyui").mkdir()  # build-graphs' temporary folder
    (folder / f".codes.mmsr{dead}-qwertyui" / "meta.json").write_text("{}")
    workdir.write_json_atomic(folder / "new.json", {"a": 1})  # the first write there cleans up
    kept = sorted(p.name for p in folder.iterdir())
    assert kept == sorted([n for n, keep in names.items() if keep] + ["new.json"])


def test_ctrl_c_while_the_cli_is_imported_is_one_line(monkeypatch, capsys):
    """The console script (mmsr_cli.entry:run) guards the import of the CLI itself."""
    from mmsr_cli import entry

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(entry.importlib, "import_module", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        entry.run()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "mmsr: interrupted; completed outputs are kept, re-run to resume\n"
