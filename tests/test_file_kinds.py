"""Files that are not files: a directory, a FIFO, a link looping onto itself, a link to nowhere in
place of a file a command reads (issue 21's hunt). Each is one line and exit 2 naming the path,
before anything is written; a FIFO must not block the reader forever (it waits for a writer that
never comes), so those cases run in a child process with a timeout.
"""

from __future__ import annotations

import os

import pytest

from conftest import one_error_line, run_cli_limited
from test_bad_inputs import mmsr, tree_hashes, work  # noqa: F401  (work is a fixture)

GIB = 1 << 30

# (file in the dataset folder, command reading it)
TARGETS = [
    ("manifests/preprocess.json", ["train", "--model", "sasrec", "--epochs", "1", "--dim", "8", "--run-name", "x"]),
    ("samples_train.parquet", ["train", "--model", "sasrec", "--epochs", "1", "--dim", "8", "--run-name", "x"]),
    ("runs/m/config.json", ["evaluate", "--run", "m"]),
    ("runs/m/best.pt", ["recommend", "--run", "m", "--all-users"]),
    ("runs/s/last.pt", ["train", "--model", "sasrec", "--epochs", "2", "--dim", "16", "--run-name", "s"]),
]


def _replace(path, kind: str) -> None:
    path.unlink()
    if kind == "directory":
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-loop":
        path.symlink_to(path.name)
    else:
        path.symlink_to("no-such-file")


# A resumable run whose last.pt is a link to nowhere has no checkpoint: it starts afresh, as
# when last.pt is missing; a directory there is refused.
CASES = [pytest.param(rel, command, kind, id=f"{rel}-{kind}") for rel, command in TARGETS
         for kind in ("directory", "symlink-loop", "dangling-symlink")
         if kind == "directory" or not rel.endswith("last.pt")]


@pytest.mark.parametrize("rel, command, kind", CASES)
def test_a_file_that_is_not_a_file_is_one_line(cli, work, rel, command, kind):  # noqa: F811
    _replace(work.path(rel), kind)
    before = tree_hashes(work.workdir)
    line = one_error_line(cli(mmsr(work, command[0], *command[1:])))
    assert os.path.basename(rel) in line, line
    assert tree_hashes(work.workdir) == before


@pytest.mark.slow  # a child process per case: on a regression the read blocks, and only a timeout ends it
@pytest.mark.parametrize("rel, command", TARGETS[::2], ids=[t[0] for t in TARGETS[::2]])
def test_a_fifo_in_place_of_a_file_does_not_block(work, rel, command):  # noqa: F811
    _replace(work.path(rel), "fifo")
    before = tree_hashes(work.workdir)
    r = run_cli_limited(mmsr(work, command[0], *command[1:]), 8 * GIB, timeout=300)
    line = one_error_line(r)
    assert os.path.basename(rel) in line and "is a FIFO" in line, line
    assert tree_hashes(work.workdir) == before


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.update(manifest_version=2), "manifest_version 2, this mmsr reads version 1"),
    (lambda m: m.pop("manifest_version"), "manifest_version None, this mmsr reads version 1"),
    (lambda m: m.pop("outputs"), "field 'outputs' is missing or malformed"),
    (lambda m: m.update(inputs=["preprocess"]), "field 'inputs' is missing or malformed"),
    (lambda m: m.update(fingerprint=7), "field 'fingerprint' is missing or malformed"),
], ids=["newer", "unversioned", "no-outputs", "inputs-list", "fingerprint-int"])
def test_a_manifest_of_another_version_is_one_line(cli, work, edit, expected):  # noqa: F811
    """A dataset folder written by another mmsr version (another manifest format) is refused in
    one line naming the manifest, not a KeyError inside the stage that reads it."""
    import json

    path = work.path("manifests/graphs__codes.json")
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    before = tree_hashes(work.workdir)
    line = one_error_line(cli(mmsr(work, "train", "--model", "mmsr", "--epochs", "1", "--dim", "8", "--run-name", "x")))
    assert "manifests/graphs__codes.json" in line and expected in line, line
    assert tree_hashes(work.workdir) == before
