"""The raw-source registry (mmsr_cli/sources): the recipe "add a data source" of
docs/architecture-sources.md holds, i.e. a source written in one module (here, this test) and
registered is downloaded by name, ingested with --from, detected and read by preprocess, with no
other file touched; and the built-in layouts are each claimed by exactly one source."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmsr_cli import contracts as C
from mmsr_cli import sources
from mmsr_cli.errors import MmsrError
from mmsr_cli.sources.base import DownloadResult, Source
from mmsr_cli.sources.records import LogBuilder, iter_lines
from mmsr_cli.workdir import DatasetDir, write_bytes_atomic

LOG = "raw/log.tsv"
ROWS = [("u1", "a", 3), ("u1", "b", 1), ("u1", "c", 2), ("u2", "b", 5), ("u2", "a", 6), ("u2", "c", 7),
        ("u3", "c", 1), ("u3", "a", 2), ("u3", "b", 3)]


def _tsv(rows) -> bytes:
    return "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows).encode()


class TabLog(Source):
    """A toy layout: raw/log.tsv with user<TAB>item<TAB>seconds lines; ``toy-tab`` is generated."""

    layout = "tablog"
    raw_files = (LOG,)
    names = ("toy-tab",)
    offline_hint = "log.tsv"
    interaction_files = ("log.tsv",)
    base_url_refused = "the toy log is generated"

    def download(self, ds, opts, log) -> DownloadResult:
        write_bytes_atomic(ds.path(LOG), _tsv(ROWS))
        size = ds.path(LOG).stat().st_size
        return DownloadResult(ds.name, "toy", self.layout, [LOG], size, size, 0, None)

    def offline_files(self, src: Path):
        return {LOG: src / "log.tsv"} if (src / "log.tsv").is_file() else None

    def read_log(self, paths, on_bytes=None):
        rows = LogBuilder()
        for lineno, line in iter_lines(paths[0], on_bytes):
            user, item, seconds = line.split("\t")
            rows.add(user, item, int(seconds))
        return rows.log()


@pytest.fixture
def toy_source(monkeypatch):
    monkeypatch.setattr(sources, "SOURCES", list(sources.SOURCES))  # the registration ends with the test
    return sources.register(TabLog())


def _sequences(ds: DatasetDir) -> dict[str, list[str]]:
    items = pq.read_table(ds.path(C.ITEMS)).column("item_id").to_pylist()
    users = pq.read_table(ds.path(C.USERS)).column("user_id").to_pylist()
    out: dict[str, list[str]] = {}
    for row in pq.read_table(ds.path(C.INTERACTIONS)).to_pylist():
        out.setdefault(users[row["user_idx"]], []).append(items[row["item_idx"]])
    return out


EXPECTED = {"u1": ["b", "c", "a"], "u2": ["b", "a", "c"], "u3": ["c", "a", "b"]}  # time order


def test_a_registered_source_is_downloaded_by_name_and_preprocessed(cli, tmp_path, toy_source):
    wd = tmp_path / "wd"
    r = cli(["download", "--workdir", wd, "--dataset", "toy-tab"])
    assert r.exit_code == 0, r.stderr
    ds = DatasetDir.open(wd, "toy-tab")
    assert json.loads(ds.manifest_path(C.STAGE_DOWNLOAD).read_text())["options"]["layout"] == "tablog"
    r = cli(["preprocess", "--workdir", wd, "--dataset", "toy-tab", "--core", "0"])
    assert r.exit_code == 0, r.stderr
    assert _sequences(ds) == EXPECTED
    assert json.loads(ds.manifest_path(C.STAGE_PREPROCESS).read_text())["counts"]["format"] == "tablog"
    r = cli(["download", "--workdir", wd, "--dataset", "toy-tab", "--base-url", "http://x"])
    assert r.exit_code == 2 and "--base-url: the toy log is generated" in r.stderr


def test_a_registered_source_is_ingested_with_from_and_replaces_another_layout(cli, tmp_path, toy_source):
    src = tmp_path / "copy"
    src.mkdir()
    (src / "log.tsv").write_bytes(_tsv(ROWS))
    wd = tmp_path / "wd"
    r = cli(["download", "--workdir", wd, "--dataset", "d", "--from", src])
    assert r.exit_code == 0, r.stderr
    ds = DatasetDir.open(wd, "d")
    assert ds.path(LOG).read_bytes() == _tsv(ROWS)
    assert cli(["preprocess", "--workdir", wd, "--dataset", "d", "--core", "0"]).exit_code == 0
    assert _sequences(ds) == EXPECTED
    # Another layout's download removes the toy's file (preprocess then sees one layout) ...
    assert cli(["download", "--workdir", wd, "--dataset", "d", "--from", Path(__file__).parent / "fixtures" / "download_sequences"]).exit_code == 0
    assert not ds.path(LOG).exists()
    # ... and an empty folder's message names the toy layout among those expected.
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli(["download", "--workdir", wd, "--dataset", "d", "--from", empty])
    assert r.exit_code == 2 and "log.tsv, with an optional images/ folder" in r.stderr


def test_two_layouts_in_raw_are_refused_naming_both(tmp_path, toy_source):
    ds = DatasetDir.open(tmp_path, "d")
    ds.path(LOG).parent.mkdir(parents=True)
    ds.path(LOG).write_bytes(_tsv(ROWS))
    ds.path(C.RAW_SEQUENCES).write_text("user_id\titem_ids\nu\ta b c\n")
    with pytest.raises(MmsrError, match=r"several interaction files \(sequences.tsv, log.tsv\); keep exactly one"):
        sources.detect_raw(ds)


def test_every_raw_file_and_dataset_name_belongs_to_one_layout():
    layouts: dict[str, str] = {}
    for source in sources.SOURCES:
        for rel in source.raw_files:
            assert rel.startswith(f"{C.RAW_DIR}/")
    names = sources.known_datasets()
    assert len(names) == len(set(names)) and {"beauty", "synthetic"} <= set(names)
    for name in (*names, "amazon2023-All_Beauty"):
        assert sum(s.downloads(name) for s in sources.SOURCES) == 1, name
    for source in sources.SOURCES:
        for name in source.interaction_files:
            assert layouts.setdefault(name, source.layout) == source.layout


@pytest.mark.parametrize("value", ["Infinity", "1e300", "99999999999999999999999", '"1.5"', "null"])
def test_review_timestamps_that_are_no_64_bit_integer_are_one_line(tmp_path, value):
    """Amazon 2014 and 2023 reviews go through one reader (records.read_review_log): a time out of
    range, not an integer or missing is one line naming the file, line and field."""
    from mmsr_cli.sources import amazon2023

    path = tmp_path / "reviews.jsonl"
    path.write_text('{"user_id": "u", "parent_asin": "a", "timestamp": %s}\n' % value)
    with pytest.raises(MmsrError, match=r"reviews.jsonl:1: field 'timestamp' (missing|must be an integer|.* is out of range)"):
        amazon2023.read_reviews(path)
