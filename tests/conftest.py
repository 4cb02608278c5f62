"""Shared test helpers: run the `mmsr` CLI in-process, the way a user's shell would."""

from __future__ import annotations

import contextlib
import io
import os
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


@pytest.fixture
def one_thread():
    """Run torch on one thread: tiny models train fastest that way, and on a shared 2-core machine
    two threads fighting other processes are many times slower than one."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def cli():
    return run_cli


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test where it is absent."""
    path = SHARED_DATA / name
    if not (path / "sequences.tsv").exists():
        pytest.skip(f"{path} not available")
    return path
