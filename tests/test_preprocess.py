"""`mmsr preprocess`: parsing of each raw format, k-core, dense ids, splits, errors (mmsr_cli/preprocess.py)."""

from __future__ import annotations

import gzip
import json
import re
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsr_cli import contracts as C
from mmsr_cli.errors import MmsrError
from mmsr_cli.preprocess import PreprocessOptions, k_core, n_test_items, split_samples
from mmsr_cli.workdir import DatasetDir

from conftest import shared_dataset, one_error_line

OUTPUTS = [C.ITEMS, C.USERS, C.INTERACTIONS] + [C.samples_file(s) for s in C.SPLITS]


def make_dataset(tmp_path, files: dict[str, str | bytes], name: str = "toy") -> DatasetDir:
    """Write raw files the way `mmsr download` leaves them, plus its manifest."""
    ds = DatasetDir.open(tmp_path, name)
    for rel, content in files.items():
        p = ds.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        p.write_bytes(content)
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=[C.RAW_DIR], options={})
    return ds


def tsv(*rows: tuple[str, str]) -> str:
    return "user_id\titem_ids\n" + "".join(f"{u}\t{items}\n" for u, items in rows)


def gz_lines(lines: list[str]) -> bytes:
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def preprocess(cli, ds: DatasetDir, *args):
    return cli(["preprocess", "--workdir", ds.workdir, "--dataset", ds.name, *args])


def samples(ds: DatasetDir, split: str) -> list[tuple]:
    """(user_id, history item ids, target item id, target_position) per sample, in file order."""
    items = pq.read_table(ds.path(C.ITEMS)).column("item_id").to_pylist()
    users = pq.read_table(ds.path(C.USERS)).column("user_id").to_pylist()
    t = pq.read_table(ds.path(C.samples_file(split)))
    assert t.schema.equals(C.SAMPLES_SCHEMA)
    assert t.column("sample_idx").to_pylist() == list(range(t.num_rows))
    return [
        (users[r["user_idx"]], "".join(items[i] for i in r["history"]), items[r["target"]], r["target_position"])
        for r in t.to_pylist()
    ]


# ----------------------------------------------------------------------------------------------
# Parsing


def test_sequence_format_texts_images_and_first_appearance_ids(cli, tmp_path):
    items_jsonl = "\n".join(
        json.dumps(o)
        for o in [
            {"asin": "b", "title": "L&#39;Oreal &amp; Co", "categories": ["Beauty", "  ", "Nails"], "brand": "   "},
            {"asin": "a", "title": "", "categories": [], "description": "Soft &lt;b&gt;", "price": 3.5},
            {"asin": "zz-unused", "title": "never used"},
        ]
    )
    ds = make_dataset(
        tmp_path,
        {
            C.RAW_SEQUENCES: tsv(("u1", "b a c"), ("u2", "c b a d")),
            C.RAW_ITEMS: items_jsonl + "\n",
            f"{C.RAW_IMAGES_DIR}/{C.safe_item_filename('a')}.png": b"png",
            f"{C.RAW_IMAGES_DIR}/{C.safe_item_filename('a')}.jpg": b"jpg",
            f"{C.RAW_IMAGES_DIR}/{C.safe_item_filename('c')}.txt": b"not an image",
        },
    )
    r = preprocess(cli, ds, "--core", "0")
    assert r.exit_code == 0, r.stderr
    assert "toy: 2 users, 4 items, 7 interactions, avg length 3.50, sparsity 12.50%" in r.stderr
    items = pq.read_table(ds.path(C.ITEMS))
    assert items.schema.equals(C.ITEMS_SCHEMA)
    # Ids: order of first appearance in the file (b, a, c from u1, then d from u2).
    assert items.to_pylist() == [
        dict(item_idx=0, item_id="b", title="L'Oreal & Co", categories=["Beauty", "Nails"], brand=None,
             description=None, features=None, image_path=None, n_interactions=2),
        dict(item_idx=1, item_id="a", title=None, categories=None, brand=None, description="Soft <b>",
             features=None, image_path="raw/images/a.jpg", n_interactions=2),
        dict(item_idx=2, item_id="c", title=None, categories=None, brand=None, description=None,
             features=None, image_path=None, n_interactions=2),
        dict(item_idx=3, item_id="d", title=None, categories=None, brand=None, description=None,
             features=None, image_path=None, n_interactions=1),
    ]
    users = pq.read_table(ds.path(C.USERS))
    assert users.to_pylist() == [
        dict(user_idx=0, user_id="u1", n_interactions=3),
        dict(user_idx=1, user_id="u2", n_interactions=4),
    ]
    inter = pq.read_table(ds.path(C.INTERACTIONS))
    assert inter.schema.equals(C.INTERACTIONS_SCHEMA)
    assert inter.column("item_idx").to_pylist() == [0, 1, 2, 2, 0, 1, 3]
    assert inter.column("timestamp").to_pylist() == [0, 1, 2, 0, 1, 2, 3]  # position as time
    assert inter.column("position").to_pylist() == [0, 1, 2, 0, 1, 2, 3]


def test_amazon_2014_reviews_and_python_literal_meta(cli, tmp_path):
    reviews = [
        # u1's times are out of file order; two ties at t=5 keep file order (y before x).
        {"reviewerID": "u1", "asin": "z", "unixReviewTime": 9, "overall": 5.0},
        {"reviewerID": "u2", "asin": "x", "unixReviewTime": 1},
        {"reviewerID": "u1", "asin": "y", "unixReviewTime": 5},
        {"reviewerID": "u1", "asin": "x", "unixReviewTime": 5},
        {"reviewerID": "u2", "asin": "y", "unixReviewTime": 2},
        {"reviewerID": "u2", "asin": "z", "unixReviewTime": 3},
    ]
    meta = [
        "{'asin': 'x', 'title': 'Rose &amp; Oud', 'categories': [['Beauty', 'Fragrance'], ['Other']], "
        "'brand': 'Acme', 'description': '  ', 'imUrl': 'http://example.invalid/x.jpg'}",
        # Not in the reviews: skipped without being evaluated, so its odd content does no harm.
        "{'asin': 'unused', 'title': __import__('os')}",
        '{"asin": "y", "categories": [], "description": "It\'s \\"great\\""}',
    ]
    ds = make_dataset(
        tmp_path,
        {C.RAW_REVIEWS: gz_lines([json.dumps(o) for o in reviews]), C.RAW_META: gz_lines(meta)},
    )
    r = preprocess(cli, ds, "--core", "2")
    assert r.exit_code == 0, r.stderr
    items = pq.read_table(ds.path(C.ITEMS)).to_pylist()
    assert [(i["item_id"], i["title"], i["categories"], i["brand"], i["description"]) for i in items] == [
        ("z", None, None, None, None),  # no metadata line
        ("x", "Rose & Oud", ["Beauty", "Fragrance"], "Acme", None),
        ("y", None, None, None, 'It\'s "great"'),
    ]
    inter = pq.read_table(ds.path(C.INTERACTIONS)).to_pydict()
    assert inter["user_idx"] == [0, 0, 0, 1, 1, 1]
    assert inter["item_idx"] == [2, 1, 0, 1, 2, 0]  # u1: y, x (tie, file order), z
    assert inter["timestamp"] == [5, 5, 9, 1, 2, 3]
    m = ds.read_manifest(C.STAGE_PREPROCESS)
    assert m["counts"]["format"] == "amazon2014" and m["counts"]["items_with_metadata"] == 2


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_generic_interactions(cli, tmp_path, kind):
    rows = [("u1", "i1", 30), ("u1", "i2", 10), ("u2", "i2", 5), ("u1", "i3", 20), ("u2", "i1", 6), ("u2", "i3", 7)]
    if kind == "csv":
        body = "user,item,timestamp,rating\n" + "".join(f"{u},{i},{t},5\n" for u, i, t in rows)
        files = {"raw/interactions.csv": body}
    else:
        table = pa.table({"user": [r[0] for r in rows], "item": [r[1] for r in rows], "timestamp": [r[2] for r in rows]})
        path = tmp_path / "i.parquet"
        pq.write_table(table, path)
        files = {"raw/interactions.parquet": path.read_bytes()}
    files[C.RAW_ITEMS] = json.dumps({"asin": "i2", "title": "Two"}) + "\n"
    ds = make_dataset(tmp_path, files)
    r = preprocess(cli, ds, "--core", "0")
    assert r.exit_code == 0, r.stderr
    assert samples(ds, "test") == [("u1", "i2i3", "i1", 2), ("u2", "i2i1", "i3", 2)]
    assert pq.read_table(ds.path(C.ITEMS)).column("title").to_pylist() == [None, "Two", None]


# ----------------------------------------------------------------------------------------------
# k-core


def test_k_core_removals_cascade_until_stable():
    # core 2: item d has 1 user -> u4 drops to 1 item -> c drops to 1 -> u3 drops to 1 -> gone.
    pairs = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "b"), ("u3", "c"), ("u4", "c"), ("u4", "d")]
    frame = pl.DataFrame(
        {"u": [int(u[1]) for u, _ in pairs], "i": [ord(i) for _, i in pairs], "ts": [0] * 8, "order": list(range(8))}
    )
    kept = k_core(frame, 2)
    assert sorted(zip(kept["u"], kept["i"])) == [(1, 97), (1, 98), (2, 97), (2, 98)]
    assert k_core(frame, 1).height == 8 and k_core(frame, 0).height == 8
    assert k_core(frame, 3).height == 0


def test_k_core_through_the_cli_with_cascade(cli, tmp_path):
    # core 3: item e only has u4 -> u4 falls to 2 -> item d falls to 2 -> u3 falls to 2 -> gone
    # (a single pass would keep u3, u4 and d).
    ds = make_dataset(
        tmp_path,
        {C.RAW_SEQUENCES: tsv(("u1", "a b c"), ("u2", "a b c"), ("u3", "c b d"), ("u4", "d d e"), ("u5", "a b c d"))},
    )
    r = preprocess(cli, ds, "--core", "3")
    assert r.exit_code == 0, r.stderr
    assert pq.read_table(ds.path(C.USERS)).column("user_id").to_pylist() == ["u1", "u2", "u5"]
    assert pq.read_table(ds.path(C.ITEMS)).column("item_id").to_pylist() == ["a", "b", "c"]
    counts = ds.read_manifest(C.STAGE_PREPROCESS)["counts"]
    assert (counts["dropped_users_core"], counts["dropped_items"]) == (2, 2)


# ----------------------------------------------------------------------------------------------
# Splits


def test_leave_one_out_exact_samples(cli, tmp_path):
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: tsv(("u1", "a b c d e"), ("u2", "f a g"), ("u3", "b c"))})
    r = preprocess(cli, ds, "--core", "0")
    assert r.exit_code == 0, r.stderr
    assert "dropped 1 users too short for the split" in r.stderr
    assert samples(ds, "train") == [("u1", "a", "b", 1), ("u1", "ab", "c", 2)]
    assert samples(ds, "valid") == [("u1", "abc", "d", 3), ("u2", "f", "a", 1)]
    assert samples(ds, "test") == [("u1", "abcd", "e", 4), ("u2", "fa", "g", 2)]
    assert ds.read_manifest(C.STAGE_PREPROCESS)["counts"]["dropped_users_short"] == 1


def test_ratio_split_exact_samples(cli, tmp_path):
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: tsv(("u1", "a b c d e f g"), ("u2", "h a b c"), ("u3", "i j"))})
    r = preprocess(cli, ds, "--core", "0", "--split", "ratio", "--test-ratio", "0.4")
    assert r.exit_code == 0, r.stderr
    # u1: n=7, floor(2.8)=2 test items; u2: n=4, floor(1.6)=1; u3: n=2 is too short.
    assert samples(ds, "train") == [("u1", "a", "b", 1), ("u1", "ab", "c", 2), ("u1", "abc", "d", 3), ("u2", "h", "a", 1)]
    assert samples(ds, "valid") == [("u1", "abcd", "e", 4), ("u2", "ha", "b", 2)]
    assert samples(ds, "test") == [("u1", "abcde", "f", 5), ("u1", "abcdef", "g", 6), ("u2", "hab", "c", 3)]
    assert ds.read_manifest(C.STAGE_PREPROCESS)["options"] == {
        "core": 0, "max_len": 50, "split": "ratio", "test_ratio": 0.4
    }


def test_ratio_floor_is_not_fooled_by_float_error():
    assert n_test_items(np.array([100, 10, 3]), "ratio", 0.29).tolist() == [29, 2, 1]


def test_max_len_keeps_the_most_recent_items(cli, tmp_path):
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: tsv(("u1", "a b c d e f"),)})
    r = preprocess(cli, ds, "--core", "0", "--max-len", "2")
    assert r.exit_code == 0, r.stderr
    assert samples(ds, "train") == [("u1", "a", "b", 1), ("u1", "ab", "c", 2), ("u1", "bc", "d", 3)]
    assert samples(ds, "valid") == [("u1", "cd", "e", 4)]
    assert samples(ds, "test") == [("u1", "de", "f", 5)]


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 40), min_size=1, max_size=12),
    split=st.sampled_from(["loo", "ratio"]),
    test_ratio=st.floats(0.01, 0.99),
    max_len=st.integers(1, 60),
)
def test_splits_never_leak(lengths, split, test_ratio, max_len):
    opts = PreprocessOptions(core=0, max_len=max_len, split=split, test_ratio=test_ratio)
    n = np.array(lengths, dtype=np.int64)
    n = n[n - n_test_items(n, split, test_ratio) >= 2]  # the users preprocess keeps
    if n.size == 0:
        return
    starts = np.concatenate([[0], np.cumsum(n)[:-1]])
    items = np.arange(int(n.sum()), dtype=np.int32)  # item = global index: positions are visible
    out = split_samples(items, n, opts)
    t = n_test_items(n, split, test_ratio)
    by_split = {s: out[s].to_pydict() for s in C.SPLITS}
    for s, d in by_split.items():
        for u, hist, target, pos in zip(d["user_idx"], d["history"], d["target"], d["target_position"]):
            # The history is the strict prefix right before the target, truncated to max_len.
            assert target == starts[u] + pos
            assert hist == list(range(starts[u] + max(0, pos - max_len), starts[u] + pos))
            assert 1 <= len(hist) <= max_len
    for u in range(len(n)):
        train = [p for uu, p in zip(by_split["train"]["user_idx"], by_split["train"]["target_position"]) if uu == u]
        valid = [p for uu, p in zip(by_split["valid"]["user_idx"], by_split["valid"]["target_position"]) if uu == u]
        test = [p for uu, p in zip(by_split["test"]["user_idx"], by_split["test"]["target_position"]) if uu == u]
        assert len(valid) == 1 and len(test) == t[u] and train == list(range(1, n[u] - t[u] - 1))
        assert max(train, default=0) < valid[0] < min(test)
        assert test == list(range(n[u] - t[u], n[u]))


# ----------------------------------------------------------------------------------------------
# Determinism, config


def test_rerun_gives_byte_identical_outputs(cli, tmp_path):
    ds = make_dataset(
        tmp_path,
        {C.RAW_SEQUENCES: tsv(("u1", "a b c d e"), ("u2", "f a g b"), ("u3", "b c a")),
         C.RAW_ITEMS: json.dumps({"asin": "a", "title": "A", "categories": ["x"]}) + "\n"},
    )
    assert preprocess(cli, ds, "--core", "0").exit_code == 0
    first = {rel: ds.path(rel).read_bytes() for rel in OUTPUTS}
    assert preprocess(cli, ds, "--core", "0").exit_code == 0
    assert {rel: ds.path(rel).read_bytes() for rel in OUTPUTS} == first


def test_config_file_sets_split_options(cli, tmp_path):
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: tsv(("u1", "a b c d e f g h i j"),)})
    cfg = tmp_path / "run.toml"
    cfg.write_text('[preprocess]\ncore = 0\nsplit = "ratio"\ntest-ratio = 0.3\n')
    r = cli(["preprocess", "--workdir", ds.workdir, "--dataset", ds.name, "--config", cfg])
    assert r.exit_code == 0, r.stderr
    assert [s[3] for s in samples(ds, "test")] == [7, 8, 9]


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no (new) outputs


GOOD_SEQ = tsv(("u1", "a b c"), ("u2", "a b c"))


@pytest.mark.parametrize(
    "files, args, expected",
    [
        ({C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: '{"asin": "a"}\n{"asin": "b", "title": }\n'}, [],
         r"items.jsonl:2: malformed JSON"),
        ({C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: '{"asin": "a"}\n\n{"title": "no asin"}\n'}, [],
         r"items.jsonl:3: field 'asin' missing"),
        ({C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: '{"asin": "a", "categories": "Beauty"}\n'}, [],
         r"items.jsonl:1: field 'categories' must be a list of strings"),
        ({C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: '{"asin": "a"}\n{"asin": "a"}\n'}, [],
         r"items.jsonl:2: duplicate asin 'a' \(first on line 1\)"),
        ({C.RAW_SEQUENCES: "user\titems\nu1\ta b c\n"}, [], r"sequences.tsv:1: expected the header"),
        ({C.RAW_SEQUENCES: GOOD_SEQ + "u3\n"}, [], r"sequences.tsv:4: expected 2 tab-separated fields"),
        ({C.RAW_SEQUENCES: GOOD_SEQ + "u1\td e f\n"}, [], r"sequences.tsv:4: user 'u1' appears on more than one line"),
        ({C.RAW_SEQUENCES: b"user_id\titem_ids\nu1\ta \xff c\n"}, [], r"sequences.tsv:2: not valid UTF-8"),
        ({C.RAW_REVIEWS: gz_lines(['{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}',
                                   '{"reviewerID": "u", "asin": "b", "unixReviewTime": 2}',
                                   '{"reviewerID": "u", "asin": "c"}'])}, [],
         r"reviews.json.gz:3: field 'unixReviewTime' missing"),
        ({C.RAW_REVIEWS: gz_lines(['{"reviewerID": "u", "asin": "a", "unixReviewTime": "yesterday"}'])}, [],
         r"reviews.json.gz:1: field 'unixReviewTime' must be an integer, got str"),
        ({C.RAW_REVIEWS: gz_lines(['{"reviewerID": "u", "asin": 7, "unixReviewTime": 1}'])}, [],
         r"reviews.json.gz:1: field 'asin' must be a string, got int"),
        ({C.RAW_REVIEWS: gz_lines(['{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}'] * 50)[:-12]}, [],
         r"reviews.json.gz:\d+: corrupt gzip data"),
        ({C.RAW_REVIEWS: b"not gzip at all"}, [], r"reviews.json.gz:1: corrupt gzip data"),
        ({C.RAW_REVIEWS: gz_lines([json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": 1})
                                   for u in "uvw" for i in "abc"]),
          C.RAW_META: gz_lines(["{'asin': 'a', 'categories': [['x']]}", "{'asin': 'b', 'title': 'broken"])},
         ["--core", "0"], r"meta.json.gz:2: malformed record"),
        ({C.RAW_REVIEWS: gz_lines([json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": 1})
                                   for u in "uvw" for i in "abc"]),
          C.RAW_META: gz_lines(["{'asin': 'a', 'categories': ['x']}"])},
         ["--core", "0"], r"meta.json.gz:1: field 'categories' must be a list of lists of strings"),
        ({"raw/interactions.csv": "user,item,timestamp\nu,a,1\nu,b,noon\n"}, [],
         r"interactions.csv:3: field 'timestamp' must be an integer"),
        ({"raw/interactions.csv": "user,item,timestamp\nu,a,1,7\n"}, [],
         r"interactions.csv:2: expected 3 comma-separated fields, got 4"),
        ({"raw/interactions.csv": "user,item,timestamp\nu,a,1\nu,b\n"}, [], r"interactions.csv:3: field 'timestamp' missing"),
        ({"raw/interactions.csv": "user,item,timestamp\n"}, [], r"interactions.csv: no interactions"),
        ({"raw/interactions.csv": "user,item,when\nu,a,1\n"}, [], r"interactions.csv: missing column\(s\) timestamp"),
        ({"raw/interactions.csv": "user,item,timestamp\nu,a,1\n", C.RAW_SEQUENCES: GOOD_SEQ}, [],
         r"several interaction files"),
        ({"raw/other.txt": "x"}, [], r"raw: no interaction file found"),
        ({C.RAW_SEQUENCES: GOOD_SEQ}, ["--core", "5"], r"no interactions left after the 5-core filter"),
        ({C.RAW_SEQUENCES: tsv(("u1", "a b"), ("u2", "b a"))}, ["--core", "2"], r"every user is too short"),
        ({C.RAW_SEQUENCES: GOOD_SEQ}, ["--split", "random"], r"--split: expected one of loo, ratio, official, got 'random'"),
        ({C.RAW_SEQUENCES: GOOD_SEQ}, ["--split", "ratio", "--test-ratio", "1.5"], r"--test-ratio: must be a number strictly between 0 and 1"),
        ({C.RAW_SEQUENCES: GOOD_SEQ}, ["--test-ratio", "0"], r"--test-ratio: must be a number strictly between 0 and 1"),
        ({C.RAW_SEQUENCES: GOOD_SEQ}, ["--max-len", "0"], r"--max-len: must be an integer in 1\.\.1000, got 0"),
        ({C.RAW_SEQUENCES: GOOD_SEQ}, ["--core", "-1"], r"--core: must be an integer in 0\.\.1000, got -1"),
        ({C.RAW_SEQUENCES: GOOD_SEQ}, ["--core", "five"], r"'--core'"),
    ],
)
def test_bad_input_is_one_line_error_and_writes_nothing(cli, tmp_path, files, args, expected):
    ds = make_dataset(tmp_path, files)
    r = preprocess(cli, ds, "--core", "0", *args)  # a later --core in ``args`` wins
    line = one_error_line(r)
    assert re.search(expected, line), line
    assert not any(ds.path(rel).exists() for rel in OUTPUTS)
    assert ds.read_manifest(C.STAGE_PREPROCESS) is None


def test_download_not_run_or_raw_missing(cli, tmp_path):
    r = cli(["preprocess", "--workdir", tmp_path, "--dataset", "nothing"])
    assert "no such dataset folder; run `mmsr download --dataset nothing` first" in one_error_line(r)
    ds = DatasetDir.open(tmp_path, "toy")
    ds.path(C.RAW_SEQUENCES).parent.mkdir(parents=True)
    ds.path(C.RAW_SEQUENCES).write_text(GOOD_SEQ)
    r = preprocess(cli, ds, "--core", "0")
    assert "stage 'download' has not been run" in one_error_line(r)
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=[C.RAW_DIR], options={})
    shutil.rmtree(ds.path(C.RAW_DIR))
    r = preprocess(cli, ds, "--core", "0")
    assert "output of stage 'download' is missing" in one_error_line(r)
    assert not any(ds.path(rel).exists() for rel in OUTPUTS)


def test_failed_rerun_keeps_previous_outputs(cli, tmp_path):
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: '{"asin": "a"}\n'})
    assert preprocess(cli, ds, "--core", "0").exit_code == 0
    before = {rel: ds.path(rel).read_bytes() for rel in OUTPUTS}
    manifest = ds.manifest_path(C.STAGE_PREPROCESS).read_bytes()
    # A new download with a broken metadata line.
    ds.path(C.RAW_ITEMS).write_text('{"asin": "a"}\n{"asin": "b",\n')
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=[C.RAW_DIR], options={})
    assert "items.jsonl:2: malformed JSON" in one_error_line(preprocess(cli, ds, "--core", "0"))
    assert {rel: ds.path(rel).read_bytes() for rel in OUTPUTS} == before
    assert ds.manifest_path(C.STAGE_PREPROCESS).read_bytes() == manifest
    assert not list(ds.root.glob(".*.tmp")) and not list(ds.root.glob(".*.parquet"))


def test_library_validates_options_without_the_cli():
    with pytest.raises(MmsrError, match="--split"):
        PreprocessOptions(split="LOO").validate()


# ----------------------------------------------------------------------------------------------
# The real data: paper Table 1


def test_amazon_beauty_matches_paper_table_1(cli, tmp_path):
    src = shared_dataset("amazon-beauty")
    ds = make_dataset(
        tmp_path,
        {C.RAW_SEQUENCES: (src / "sequences.tsv").read_bytes(), C.RAW_ITEMS: (src / "items.jsonl").read_bytes()},
        name="beauty",
    )
    r = preprocess(cli, ds)
    assert r.exit_code == 0, r.stderr
    assert "beauty: 22,363 users, 12,101 items, 198,502 interactions, avg length 8.88, sparsity 99.93%" in r.stderr
    counts = ds.read_manifest(C.STAGE_PREPROCESS)["counts"]
    assert (counts["users"], counts["items"], counts["interactions"]) == (22_363, 12_101, 198_502)
    assert counts["samples_valid"] == counts["samples_test"] == 22_363
    assert counts["samples_train"] == 198_502 - 3 * 22_363
    items = pq.read_table(ds.path(C.ITEMS), columns=["title", "brand"])
    assert items.column("title").null_count == 7
    assert "L'Oreal Paris" in items.column("brand").to_pylist()  # HTML entities unescaped
