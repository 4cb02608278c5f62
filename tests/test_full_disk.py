"""Every stage that writes, on a real full file system: a small tmpfs filled to the brim.

test_bad_inputs.py injects OSError(ENOSPC); real libraries do not always say so (numpy's short
write raises an OSError without errno, torch's writer a RuntimeError, pyarrow an ArrowIOError).
Here the finished toy pipeline is copied onto a tmpfs of its own size plus a little, the rest is
filled by a file outside the workdir, and each command must end with the one-line error (exit 2),
no temporary left and every earlier output unchanged. Mounting needs root (CAP_SYS_ADMIN); where
it is refused the tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import run_cli
from test_bad_inputs import CODES, IMAGE_NET, assert_error, temporaries, tree_hashes  # noqa: F401

pytestmark = pytest.mark.slow  # every writing command on a filled tmpfs

MIB = 1 << 20


def _mount_tmpfs(where: Path, size_bytes: int) -> None:
    where.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the real full-disk tests run where CI is root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); needs CAP_SYS_ADMIN")


def _fill(folder: Path, leave_bytes: int) -> None:
    """Write a filler file until the file system refuses, then give back ``leave_bytes``."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    block = b"\xa5" * (64 * 1024)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        try:
            while True:  # the last partial block, byte pages at a time
                f.write(block[:4096])
        except OSError:
            pass
    if leave_bytes:
        os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))


@pytest.fixture
def full_disk(pipeline, tmp_path):  # noqa: F811
    """``(workdir, fill)``: a copy of the toy pipeline on a tmpfs with 8 MiB to spare; ``fill(n)``
    fills it, leaving ``n`` bytes."""
    mount = tmp_path / "tmpfs"
    size = sum(p.stat().st_size for p in pipeline.rglob("*") if p.is_file())
    _mount_tmpfs(mount, size + 8 * MIB + 4096 * len(list(pipeline.rglob("*"))))
    try:
        shutil.copytree(pipeline, mount / "wd")
        yield mount / "wd", lambda leave: _fill(mount, leave)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


STAGES = [
    ("download", ["--dataset", "synthetic"]),
    ("preprocess", ["--core", "0", "--max-len", "6"]),
    ("extract-features", [*IMAGE_NET, "--name", "image2"]),
    ("build-codes", ["-c", "3", "-k", "1", "--ae-dim", "8", "--epochs", "5", "--modality", "image"]),
    ("build-graphs", ["--no-codes"]),
    ("train", ["--model", "sasrec", "--epochs", "1", "--dim", "16", "--run-name", "new"]),
    ("evaluate", ["--run", "m", "--split", "valid"]),
    ("recommend", ["--run", "m", "--users", "u1", "--output", "{wd}/recs.parquet"]),
    ("report", ["--output", "{wd}/report.md"]),
    ("tune", ["--model", "sasrec", "--trials", "1", "--epochs", "1", "--device", "cpu"]),
]


@pytest.mark.parametrize("command, args", STAGES, ids=[s[0] for s in STAGES])
def test_disk_full_to_the_brim_is_one_line_and_changes_nothing(full_disk, command, args):
    wd, fill = full_disk
    before = tree_hashes(wd)
    fill(0)
    line = assert_error(_run(command, args, wd), "no space left on device")
    assert str(wd) in line  # names the file (or folder) it could not write
    assert tree_hashes(wd) == before
    assert temporaries(wd) == []


@pytest.mark.parametrize("command, args", STAGES, ids=[s[0] for s in STAGES])
def test_disk_filling_up_mid_write_is_one_line_and_keeps_earlier_outputs(full_disk, command, args):
    """A few pages left: the libraries' writers fail part-way (numpy, torch and pyarrow do not all
    say ENOSPC), or the outputs fit because they replace files of the same size. Either the
    command succeeds or it ends with the one line; earlier files are intact either way."""
    wd, fill = full_disk
    before = tree_hashes(wd)
    fill(8192)
    r = _run(command, args, wd)
    if r.exit_code != 0:
        assert_error(r, "no space left on device")
        after = tree_hashes(wd)
        assert {k: after.get(k) for k in before} == before
    assert temporaries(wd) == []


def _run(command: str, args: list[str], wd: Path):
    args = [a.format(wd=wd) for a in args]
    if "--dataset" not in args:
        args = ["--dataset", "toy", *args]
    return run_cli([command, "--workdir", str(wd), *args])


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    _mount_tmpfs(mount, 4 * MIB)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _writers():
    import numpy as np
    import pyarrow as pa
    import torch

    from mmsr_cli.workdir import write_bytes_atomic, write_parquet_atomic, write_torch_atomic

    big = np.random.default_rng(0).random(256 * 1024)  # 2 MiB of incompressible float64
    return {
        "torch": lambda p: write_torch_atomic(p, {"w": torch.from_numpy(big)}),
        "parquet": lambda p: write_parquet_atomic(p, pa.table({"x": big})),
        "bytes": lambda p: write_bytes_atomic(p, big.tobytes()),
    }


@pytest.mark.parametrize("leave", [0, 64 * 1024, 1 * MIB], ids=["brim", "64KiB-left", "1MiB-left"])
@pytest.mark.parametrize("writer", ["torch", "parquet", "bytes"])
def test_every_writer_reports_a_real_full_disk(small_tmpfs, writer, leave):
    """The library's own words for a full disk differ (torch: RuntimeError, pyarrow: OSError
    without errno): each becomes the one error naming the file; the previous file stays."""
    from mmsr_cli.errors import MmsrError

    target = small_tmpfs / "out.bin"
    target.write_bytes(b"previous")
    _fill(small_tmpfs, leave)
    with pytest.raises(MmsrError, match="no space left on device") as e:
        _writers()[writer](target)
    assert str(target) in str(e.value)
    assert target.read_bytes() == b"previous"
    assert temporaries(small_tmpfs) == []
