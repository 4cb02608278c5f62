"""Shared test helpers: run the `mmsr` CLI in-process, the way a user's shell would."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

def _shared_data_dir() -> Path:
    """The read-only benchmark data: $MMSR_SHARED_DATA, else ../shared/data beside the checkout,
    else /work/shared/data (where CI's clean clones live elsewhere)."""
    candidates = [Path(__file__).resolve().parents[1].parent / "shared" / "data", Path("/work/shared/data")]
    if os.environ.get("MMSR_SHARED_DATA"):
        candidates.insert(0, Path(os.environ["MMSR_SHARED_DATA"]))
    return next((p for p in candidates if p.is_dir()), candidates[0])


SHARED_DATA = _shared_data_dir()


# ----------------------------------------------------------------------------------------------
# Datasets built once per session: the toy datasets that many test files rebuild (preprocess,
# hand-made codes, build-graphs through the CLI) are built on first use and copied afterwards.
# Under pytest-xdist (scripts/test.sh runs two workers) the workers share one cache beside their
# own temporary folders: the first worker to need a dataset builds it under a file lock, into a
# private folder renamed into place when complete, and the others wait for it and copy it.

_DATASET_CACHE: Path | None = None


def _shared_cache_root(tmp_path_factory, name: str) -> Path:
    """A folder for ``name`` that every xdist worker of this session sees (the parent of the
    workers' base temporary folders), or this session's own one without xdist."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / name
        root.mkdir(exist_ok=True)
        return root
    return tmp_path_factory.mktemp(name)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (created), across the processes of this machine."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(folder: Path, build) -> Path:
    """``folder`` built by ``build(scratch)`` once across the workers: ``build`` fills a scratch
    folder that is renamed to ``folder`` only when it returned, so a failed build leaves nothing
    the next caller would take for finished."""
    import shutil

    with _locked(folder.with_name(folder.name + ".lock")):
        if not folder.exists():
            scratch = folder.with_name(f"{folder.name}.building-{os.getpid()}")
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            build(scratch)
            scratch.rename(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory):
    global _DATASET_CACHE
    _DATASET_CACHE = _shared_cache_root(tmp_path_factory, "dataset-cache")
    yield
    _DATASET_CACHE = None


def cached_dataset(key: str, workdir, name: str, build):
    """``build(workdir, name)`` (returns a DatasetDir) run once per session and ``key``; every call
    gets its own copy in ``workdir/name`` (manifests hold no absolute paths; copies keep mtimes)."""
    import shutil

    from mmsr_cli.workdir import DatasetDir

    workdir = Path(workdir)
    if _DATASET_CACHE is None:  # outside a pytest session
        return build(workdir, name)
    # One entry per key and name: a dataset built under a key may be wanted under several names.
    source = build_once(_DATASET_CACHE / f"{key}--{name}", lambda scratch: build(scratch, name))
    shutil.copytree(source / name, workdir / name)
    return DatasetDir.open(workdir, name)


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """The toy dataset through every stage with two runs (test_bad_inputs.build_pipeline), built
    once per session (and shared by the xdist workers); the tests that use it copy it first."""
    from test_bad_inputs import build_pipeline

    return build_once(_shared_cache_root(tmp_path_factory, "pipeline") / "wd", build_pipeline)


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(args: list[str]) -> CliResult:
    """Run ``mmsr ARGS`` through the real entry point (``mmsr_cli.app.main``)."""
    from mmsr_cli import app as app_module

    out, err = io.StringIO(), io.StringIO()
    console = app_module.console
    old_file = console.file
    console.file = err
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                app_module.main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        console.file = old_file
    return CliResult(code, out.getvalue(), err.getvalue())


# MMSR_TEST_CUDA selects the device of the `cuda`-marked tests: unset, the session sees no GPU at
# all (CUDA_VISIBLE_DEVICES is emptied before torch is imported), so every other test, which
# asserts CPU results, runs on the CPU whatever the machine, and the cuda tests skip; "1" keeps
# the GPUs visible and runs the cuda tests on cuda (scripts/gpu_check.sh); "cpu" runs the cuda
# tests on the CPU, to check their plumbing where no GPU is (gpu_check.sh --cpu-dry-run).
CUDA_TESTS = os.environ.get("MMSR_TEST_CUDA", "")


def pytest_configure(config) -> None:
    """Every test runs torch on one thread (and its children get OMP_NUM_THREADS=1): tiny models
    train fastest that way, and on a shared 2-core machine two threads fighting other processes
    are many times slower than one."""
    if CUDA_TESTS != "1":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # No test reaches the Hugging Face hub (tiny models are saved to folders, test_amazon2023 has
    # a local hub server and lifts this): a name the encoders look up there, such as a registered
    # encoder's ``--model letters``, is then answered "not cached" at once, not after
    # huggingface_hub's five retries (23 s of back-off each) where the hub cannot be reached.
    # Set before huggingface_hub is imported, which reads it once; children inherit it.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


# The files that take longest, longest first (CPU seconds of a full run, measured on the shared
# 2-core machine): scripts/test.sh runs the suite on two pytest-xdist workers, each taking whole
# files (--dist loadfile) in collection order, so these start first and the cheap files fill in
# at the end, and the two workers finish about together.
HEAVY_FIRST = ["test_memory.py", "test_bench_scripts.py", "test_distributed.py", "test_interruption.py",
               "test_sweep.py", "test_determinism.py", "test_tune.py", "test_hostile_images.py", "test_recommend.py",
               "test_locks.py", "test_bad_inputs.py", "test_synthetic.py", "test_fuzz.py", "test_report.py",
               "test_training.py"]


def pytest_collection_modifyitems(config, items) -> None:
    """The heavy files first (HEAVY_FIRST; within a file the order is kept). ``cuda`` tests run
    where MMSR_TEST_CUDA asks for them and a device is usable; elsewhere they are skipped with
    the reason, which names the setting or the hardware, never our code."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    import torch

    if CUDA_TESTS == "cpu" or (CUDA_TESTS == "1" and torch.cuda.is_available()):
        return
    if CUDA_TESTS == "1":
        reason = "MMSR_TEST_CUDA=1 but torch.cuda.is_available() is False"
    else:
        reason = "cuda test: run with MMSR_TEST_CUDA=1 on a CUDA machine (scripts/gpu_check.sh)"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def cuda_device() -> str:
    """The device of a `cuda` test: cuda, or cpu under MMSR_TEST_CUDA=cpu (a dry run)."""
    return "cpu" if CUDA_TESTS == "cpu" else "cuda"


@pytest.fixture
def one_thread():
    """Kept for the tests that name it: the whole session runs on one torch thread."""
    import torch

    assert torch.get_num_threads() == 1
    yield


def one_error_line(r) -> str:
    """The one-line error of a failed command (exit status 2, ``mmsr: error: ...``); returns it."""
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsr: error:"), r.stderr
    return lines[0]


@contextlib.contextmanager
def serve_http(handler: type):
    """A threaded HTTP server on a free loopback port answering with ``handler`` (a
    BaseHTTPRequestHandler class); yields its base URL and shuts it down afterwards."""
    import threading
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def cli():
    return run_cli


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/data. Where it is absent the test fails (CI has the data,
    and a silently skipped Table-1 check proves nothing), unless MMSR_SKIP_SHARED_DATA=1 asks
    for a skip on a machine known to lack it."""
    path = SHARED_DATA / name
    if not (path / "sequences.tsv").exists():
        if os.environ.get("MMSR_SKIP_SHARED_DATA") == "1":
            pytest.skip(f"{path} not available (MMSR_SKIP_SHARED_DATA=1)")
        pytest.fail(f"{path} not available: set MMSR_SHARED_DATA to the shared data folder, or "
                    f"MMSR_SKIP_SHARED_DATA=1 to skip the tests that need it", pytrace=False)
    return path


def make_items(tmp_path, rows: list[dict], name: str = "toy"):
    """items.parquet from ``rows`` (item_idx in order) and a preprocess manifest."""
    import pyarrow as pa

    from mmsr_cli import contracts as C
    from mmsr_cli.workdir import DatasetDir, write_parquet_atomic

    ds = DatasetDir.open(tmp_path, name)
    cols = {f: [r.get(f) for r in rows] for f in ("title", "categories", "brand", "description", "features", "image_path")}
    table = pa.table(
        {
            "item_idx": pa.array(range(len(rows)), pa.int32()),
            "item_id": [f"I{i}" for i in range(len(rows))],
            **cols,
            "n_interactions": pa.array([5] * len(rows), pa.int32()),
        }
    )
    write_parquet_atomic(ds.path(C.ITEMS), table, C.ITEMS_SCHEMA)
    ds.write_manifest(C.STAGE_PREPROCESS, outputs=[C.ITEMS], options={})
    return ds


@dataclass
class LimitedRun:
    exit_code: int
    stdout: str
    stderr: str
    peak_rss_mib: float  # the child's own peak resident memory (wait4), not the test's


def run_cli_limited(args: list, memory_limit_bytes: int, timeout: float = 600) -> LimitedRun:
    """Run ``mmsr ARGS`` in a child process whose address space is capped (RLIMIT_AS): a memory
    regression then fails there with MemoryError or a refused allocation instead of taking the
    machine down with the OOM killer."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mmsr_cli", *map(str, args)], stdout=out, stderr=err,
                                env=env, preexec_fn=cap)
        deadline = time.monotonic() + timeout
        while True:  # wait4: this child's own rusage (peak RSS), not the maximum over all children
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise TimeoutError(f"mmsr {args[0]} ran over {timeout} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return LimitedRun(proc.returncode, out.read(), err.read(), usage.ru_maxrss / 1024)


# ----------------------------------------------------------------------------------------------
# Tiny, randomly initialised Hugging Face models saved to a folder (no hub access in tests)

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [
    str(d) for d in range(10)
]


def tiny_hf_model(kind: str, folder: Path) -> Path:
    """Save a tiny random ``kind`` model to ``folder``: text towers ``siglip-text``/``clip-text``
    (with a WordPiece tokenizer), image models ``clip``, ``siglip``, ``dinov2``, ``vit`` (with an
    image processor at 32x32 pixels)."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    if kind in ("siglip-text", "clip-text"):
        (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
        T.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
        text = dict(small, vocab_size=len(TINY_VOCAB), max_position_embeddings=24)
        if kind == "siglip-text":
            model = T.SiglipTextModel(T.SiglipTextConfig(**text, pad_token_id=0, bos_token_id=2, eos_token_id=3))
        else:
            model = T.CLIPTextModelWithProjection(T.CLIPTextConfig(**text, projection_dim=8, bos_token_id=2, eos_token_id=3))
        model.save_pretrained(folder)
        return folder
    vision = dict(small, image_size=32, patch_size=8)
    if kind == "clip":
        model = T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**vision, projection_dim=8))
        processor = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "siglip":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**vision))
        processor = T.SiglipImageProcessor(size={"height": 32, "width": 32})
    elif kind == "dinov2":
        model = T.Dinov2Model(T.Dinov2Config(**vision))
        processor = T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif kind == "vit":
        model = T.ViTModel(T.ViTConfig(**vision), add_pooling_layer=False)
        processor = T.ViTImageProcessor(size={"height": 32, "width": 32})
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def assert_metrics_match_ranks(folder: Path, split: str = "test", setting: str = "") -> dict:
    """Every metric of ``metrics_<split>[_<setting>].json`` equals its value computed here from the
    per-sample ranks stored beside it (HR, MRR, NDCG at each cut-off); returns the record."""
    import json

    import numpy as np

    from mmsr_cli import contracts as C
    from mmsr_cli.metrics import KS

    record = json.loads((folder / C.metrics_file(split, setting)).read_text())
    ranks = np.load(folder / record["ranks"], allow_pickle=False).astype(np.float64)
    assert len(ranks) == record["n"] > 0
    expected = {}
    for k in KS:
        hit = ranks <= k
        expected[f"hr@{k}"] = hit.mean()
        expected[f"mrr@{k}"] = np.where(hit, 1 / ranks, 0).mean()
        expected[f"ndcg@{k}"] = np.where(hit, 1 / np.log2(ranks + 1), 0).mean()
    assert record["metrics"] == pytest.approx(expected, abs=1e-12)
    return record


def assert_same(a, b, where: str = "") -> None:
    """Nested dicts, lists and tensors equal bit for bit (checkpoint states); ``where`` names the first difference."""
    import torch  # here, not at the top: conftest hides the GPUs before torch is first imported

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where
