"""Manifests, stage order, staleness and atomic writes (mmsr_cli/workdir.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from mmsr_cli import contracts as C
from mmsr_cli.errors import MmsrError
from mmsr_cli.workdir import (
    DatasetDir,
    atomic_path,
    read_parquet,
    upstream,
    validate_dataset_name,
    validate_modality_name,
    write_parquet_atomic,
)


def _ds(tmp_path) -> DatasetDir:
    ds = DatasetDir.open(tmp_path, "toy")
    ds.root.mkdir(parents=True)
    return ds


def test_require_names_the_command_to_run(tmp_path):
    ds = _ds(tmp_path)
    with pytest.raises(MmsrError, match=r"run `mmsr preprocess --dataset toy` first"):
        ds.require(C.STAGE_PREPROCESS)
    with pytest.raises(MmsrError, match=r"mmsr build-codes --modality title --dataset toy"):
        ds.require(C.modality_stage(C.STAGE_CODES, "title"))


def test_missing_dataset_folder_is_reported(tmp_path):
    ds = DatasetDir.open(tmp_path, "nothing")
    with pytest.raises(MmsrError, match="no such dataset folder"):
        ds.require(C.STAGE_DOWNLOAD)


def test_manifest_records_hashes_and_detects_changed_output(tmp_path):
    ds = _ds(tmp_path)
    (ds.root / "a.txt").write_text("one")
    m = ds.write_manifest("download", outputs=["a.txt"], options={"x": 1}, counts={"n": 1})
    assert set(m["outputs"]) == {"a.txt"} and m["options"] == {"x": 1}
    assert ds.require("download")["fingerprint"] == m["fingerprint"]
    (ds.root / "a.txt").write_text("two")
    with pytest.raises(MmsrError, match="changed since stage 'download' wrote it"):
        ds.require("download")
    (ds.root / "a.txt").unlink()
    with pytest.raises(MmsrError, match="output of stage 'download' is missing"):
        ds.require("download")


def test_rerunning_upstream_makes_downstream_stale(tmp_path):
    ds = _ds(tmp_path)
    (ds.root / "raw.txt").write_text("v1")
    up = ds.write_manifest("download", outputs=["raw.txt"], options={})
    (ds.root / "items.parquet").write_text("derived")
    ds.write_manifest("preprocess", inputs=upstream(up), outputs=["items.parquet"], options={})
    ds.require("preprocess")
    # Same content again: still fresh (fingerprints are content hashes, not timestamps).
    ds.write_manifest("download", outputs=["raw.txt"], options={})
    ds.require("preprocess")
    (ds.root / "raw.txt").write_text("v2")
    ds.write_manifest("download", outputs=["raw.txt"], options={})
    with pytest.raises(MmsrError, match="stale"):
        ds.require("preprocess")


def test_staleness_is_followed_up_the_whole_chain(tmp_path):
    """codes <- features <- preprocess: a re-run preprocess makes codes stale although the features
    manifest codes was built from is unchanged (and the features' outputs may be gone)."""
    ds = _ds(tmp_path)
    (ds.root / "items.parquet").write_text("v1")
    pre = ds.write_manifest("preprocess", outputs=["items.parquet"], options={})
    (ds.root / "features.npy").write_text("f")
    feats = ds.write_manifest("features:title", inputs=upstream(pre), outputs=["features.npy"], options={})
    (ds.root / "codes.parquet").write_text("c")
    ds.write_manifest("codes:title", inputs=upstream(feats), outputs=["codes.parquet"], options={})
    (ds.root / "features.npy").unlink()
    ds.require("codes:title")
    (ds.root / "items.parquet").write_text("v2")
    ds.write_manifest("preprocess", outputs=["items.parquet"], options={})
    with pytest.raises(MmsrError, match=r"stage 'codes:title' is stale \(its input 'features:title' was built from "
                       r"'preprocess' data that was re-run since\); re-run `mmsr extract-features"):
        ds.require("codes:title")


def test_corrupt_manifest_is_one_clear_error(tmp_path):
    ds = _ds(tmp_path)
    ds.manifest_path("download").parent.mkdir(parents=True)
    ds.manifest_path("download").write_text("{not json")
    with pytest.raises(MmsrError, match="corrupt manifest"):
        ds.require("download")


def test_atomic_path_keeps_previous_output_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind


def test_parquet_roundtrip_is_deterministic_and_schema_checked(tmp_path):
    table = pa.table({"user_idx": [0, 1], "user_id": ["a", "b"], "n_interactions": [5, 6]})
    write_parquet_atomic(tmp_path / "u1.parquet", table, C.USERS_SCHEMA)
    write_parquet_atomic(tmp_path / "u2.parquet", table, C.USERS_SCHEMA)
    assert (tmp_path / "u1.parquet").read_bytes() == (tmp_path / "u2.parquet").read_bytes()
    assert read_parquet(tmp_path / "u1.parquet", C.USERS_SCHEMA).schema == C.USERS_SCHEMA
    with pytest.raises(MmsrError, match="missing column"):
        read_parquet(tmp_path / "u1.parquet", C.ITEMS_SCHEMA)
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(MmsrError, match="bad.parquet: not a readable Parquet file"):
        read_parquet(tmp_path / "bad.parquet")


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".hidden", "x" * 65])
def test_dataset_names_cannot_escape_the_workdir(name):
    with pytest.raises(MmsrError, match="--dataset"):
        validate_dataset_name(name)


@pytest.mark.parametrize("name", ["Image", "1text", "a-b", ""])
def test_bad_modality_names(name):
    with pytest.raises(MmsrError):
        validate_modality_name(name)


def test_safe_item_filename_stays_inside_folder():
    assert C.safe_item_filename("B004756YJA") == "B004756YJA"
    for evil in ["../../etc/passwd", "/abs", "..", "a/b", ".hidden"]:
        name = C.safe_item_filename(evil)
        assert "/" not in name and not name.startswith(".") and name
    assert C.safe_item_filename("a/b") != C.safe_item_filename("a_b")


def test_manifest_is_json_with_versions(tmp_path):
    ds = _ds(tmp_path)
    (ds.root / "a.txt").write_text("x")
    ds.write_manifest("download", outputs=["a.txt"], options={})
    data = json.loads(ds.manifest_path("download").read_text())
    assert data["versions"]["python"] and "torch" in data["versions"]
