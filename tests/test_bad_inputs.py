"""Bad input at every stage of the pipeline (issue 6).

Every refused input gives one line on stderr naming the file or option, exit status 2, no
traceback, and leaves the outputs of earlier runs byte for byte as they were (compared by hash)
with no temporary files behind. Odd but valid input (CMYK or palette images, repeated
interactions, a UTF-8 byte-order mark) succeeds instead. The download part checks that metadata
cannot steer files or requests anywhere it should not (item ids, redirects, content types, size).

Data and models are tiny: the 20-item toy chains of test_training, 16x16 images, mobilenet_v3_small
with random weights and the 1-layer T5 of test_features; nothing is downloaded.
"""

from __future__ import annotations

import builtins
import errno
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import threading
import warnings
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmsr_cli import contracts as C
from mmsr_cli.sources import amazon2014
from mmsr_cli.sources import fetch
from mmsr_cli.errors import MmsrError
from mmsr_cli.workdir import DatasetDir

from conftest import run_cli
from test_codes import make_dataset as make_codes_dataset
from test_codes import write_features
from test_download import JPEG, PNG, fast_opts
from test_features import IMAGE_NET, make_items, tiny_t5  # noqa: F401  (tiny_t5 is a fixture)
from test_preprocess import make_dataset, tsv
from test_training import N_TOY_ITEMS, make_toy


def assert_error(result, *needles: str) -> str:
    """Exit status 2, exactly one line on stderr, no traceback; the line holds every needle."""
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsr: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree_hashes(root: Path) -> dict[str, str]:
    """Content hash of every file under ``root`` (logs excluded: they record failed runs too)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and C.LOGS_DIR not in p.relative_to(root).parts[:2]
    }


def temporaries(root: Path) -> list[Path]:
    """Hidden files and folders: what an interrupted atomic write would leave."""
    return [p for p in root.rglob(".*")]


def gz(lines: list[str]) -> bytes:
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def reviews(users: str = "uvw", items: str = "abc") -> bytes:
    return gz([json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t})
               for t, (u, i) in enumerate((u, i) for u in users for i in items)])


# ----------------------------------------------------------------------------------------------
# A finished pipeline on the toy chains, copied for each test that breaks something in it.

MMSR_RUN = ["--model", "mmsr", "--epochs", "1", "--dim", "16", "--batch-size", "64"]
CODES = ["-c", "4", "-k", "2", "--ae-dim", "8", "--epochs", "5"]


def _ok(args: list) -> None:
    r = run_cli([str(a) for a in args])
    assert r.exit_code == 0, (args, r.stderr)


def build_pipeline(wd: Path) -> Path:
    """Workdir with dataset ``toy`` through every stage: images, image features, codes, graphs,
    an MMSR run ``m`` and a SASRec run ``s`` (evaluated), and ``recs.parquet`` from ``m``. The
    session fixture ``pipeline`` (conftest) builds it once for test_bad_inputs, test_locks and
    test_full_disk; tests work on copies (``work``) and never write there."""
    ds = make_toy(wd)
    rng = np.random.default_rng(0)
    images = ds.path(C.RAW_IMAGES_DIR)
    images.mkdir(parents=True)
    for i in range(N_TOY_ITEMS):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"i{i}.png")
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=[C.RAW_DIR], options={})
    w = ["--workdir", wd, "--dataset", "toy"]
    _ok(["preprocess", *w, "--core", "0", "--max-len", "8"])
    _ok(["extract-features", *w, *IMAGE_NET])
    _ok(["build-codes", *w, *CODES])
    _ok(["build-graphs", *w])
    _ok(["train", *w, *MMSR_RUN, "--run-name", "m"])
    _ok(["train", *w, "--model", "sasrec", "--epochs", "1", "--dim", "16", "--run-name", "s"])
    _ok(["evaluate", *w, "--run", "m"])
    _ok(["recommend", *w, "--run", "m", "--all-users", "--output", wd / "recs.parquet"])
    return wd


@pytest.fixture
def work(pipeline, tmp_path) -> DatasetDir:
    """A private copy of the finished pipeline."""
    shutil.copytree(pipeline, tmp_path / "wd")
    return DatasetDir.open(tmp_path / "wd", "toy")


def mmsr(ds: DatasetDir, command: str, *args) -> list:
    return [command, "--workdir", ds.workdir, "--dataset", ds.name, *args]


# ----------------------------------------------------------------------------------------------
# Raw data: preprocess refuses it and keeps the previous outputs

GOOD_SEQ = tsv(("u1", "a b c"), ("u2", "a b c"), ("u3", "c b a"))
GOOD_ITEMS = '{"asin": "a", "title": "Soap"}\n{"asin": "b", "title": "Brush"}\n'
PREPROCESS_OUTPUTS = [C.ITEMS, C.USERS, C.INTERACTIONS] + [C.samples_file(s) for s in C.SPLITS]


@pytest.mark.parametrize(
    "files, args, expected",
    [
        pytest.param({C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: '{"asin": "a"}\n{"asin": "b", "title": }\n'}, [],
                     "items.jsonl:2: malformed JSON", id="malformed-json-line"),
        pytest.param({C.RAW_REVIEWS: gz(['{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}',
                                         "{'reviewerID': 'u', 'asin': "])}, [],
                     "reviews.json.gz:2: malformed record", id="malformed-review-line"),
        pytest.param({C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: '{"asin": "a", "title": ' + "[" * 50_000 + "]" * 50_000 + "}\n"},
                     [], "items.jsonl:1: malformed record (nested too deeply)", id="json-nested-too-deeply"),
        pytest.param({C.RAW_REVIEWS: reviews("uvwxyz", "abcdefgh")[:-20]}, [],
                     "reviews.json.gz:", id="truncated-gzip-reviews"),
        pytest.param({C.RAW_REVIEWS: reviews(), C.RAW_META: gz([repr({"asin": "a", "title": "t" * 40})] * 50)[:-20]}, [],
                     "meta.json.gz:", id="truncated-gzip-meta"),
        pytest.param({C.RAW_SEQUENCES: b"user_id\titem_ids\nu1\ta caf\xe9 c\n"}, [],
                     "sequences.tsv:2: not valid UTF-8", id="latin1-bytes-in-sequences"),
        pytest.param({C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: b'{"asin": "a", "title": "Caf\xe9 cr\xe8me"}\n'}, [],
                     "items.jsonl:1: not valid UTF-8", id="latin1-bytes-in-items"),
        pytest.param({C.RAW_REVIEWS: reviews(), C.RAW_META: gzip.compress(b"{'asin': 'a', 'title': 'Caf\xe9'}\n")}, [],
                     "meta.json.gz:1: not valid UTF-8", id="latin1-bytes-in-gzip-meta"),
        pytest.param({"raw/interactions.csv": b"user,item,timestamp\nu1,caf\xe9,1\n"}, [],
                     "interactions.csv: not a readable CSV file", id="latin1-bytes-in-csv"),
        pytest.param({C.RAW_SEQUENCES: GOOD_SEQ.encode("utf-16")}, [],
                     "sequences.tsv:1: not valid UTF-8", id="utf16-sequences"),
        pytest.param({C.RAW_REVIEWS: gz([json.dumps({"reviewerID": "u", "asin": "a", "unixReviewTime": 10**30})])}, [],
                     "reviews.json.gz:1: field 'unixReviewTime' 1000000000000000000000000000000 is out of range",
                     id="timestamp-beyond-64-bit"),
        pytest.param({C.RAW_SEQUENCES: GOOD_SEQ + "\ta b c\n"}, [],
                     "sequences.tsv:5: field 'user_id' is empty", id="empty-user-id"),
        pytest.param({C.RAW_REVIEWS: reviews("uv", "abc")}, ["--core", "3"],
                     "no interactions left after the 3-core filter (2 users, 3 items before)",
                     id="k-core-leaves-nothing"),
        pytest.param({C.RAW_SEQUENCES: tsv(("u1", "a b"), ("u2", "b a"))}, [],
                     "every user is too short for the loo split", id="every-user-too-short"),
    ],
)
def test_bad_raw_data_keeps_the_previous_outputs(cli, tmp_path, files, args, expected):
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: GOOD_ITEMS})
    assert cli(mmsr(ds, "preprocess", "--core", "0")).exit_code == 0
    before = tree_hashes(ds.root)
    assert set(PREPROCESS_OUTPUTS) <= set(before)
    # A new download brings the bad files.
    shutil.rmtree(ds.path(C.RAW_DIR))
    for rel, content in files.items():
        ds.path(rel).parent.mkdir(parents=True, exist_ok=True)
        ds.path(rel).write_bytes(content.encode() if isinstance(content, str) else content)
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=[C.RAW_DIR], options={})
    raw_after = {k: v for k, v in tree_hashes(ds.root).items() if not k.startswith(C.RAW_DIR + "/")}
    line = assert_error(cli(mmsr(ds, "preprocess", "--core", "0", *args)), expected)
    assert str(ds.path(C.RAW_DIR)) in line  # the file at fault, by its full path
    assert {k: v for k, v in tree_hashes(ds.root).items() if not k.startswith(C.RAW_DIR + "/")} == raw_after
    assert all(before[rel] == raw_after[rel] for rel in PREPROCESS_OUTPUTS)
    assert temporaries(ds.root) == []


# User and item ids are matched exactly across files: every source reader refuses an id with a
# control character or surrounding whitespace (which would silently lose its metadata), naming
# the file, the line (or row) and the field. One case per source, field and kind of fault.

BAD_IDS = {"leading-space": " b", "trailing-space": "b ", "control": "b\x07", "nul": "b\x00x"}


def _parquet_bytes(users: list[str], items: list[str]) -> bytes:
    import pyarrow as pa

    sink = io.BytesIO()
    pq.write_table(pa.table({"user": users, "item": items, "timestamp": list(range(len(users)))}), sink)
    return sink.getvalue()


def _raw_with_bad_id(source: str, field: str, bad: str) -> tuple[dict, str]:
    """Raw files of ``source`` with ``bad`` in place of one user (u2) or item (b) id, and the
    place the error must name."""
    user, item = (bad.replace("b", "u2"), "b") if field in ("user_id", "reviewerID", "user") else ("u2", bad)
    users, items = ["u1", user, "u3"], ["a", item, "c"]
    if source == "sequences":
        return {C.RAW_SEQUENCES: tsv(("u1", "a b c"), (user, f"a {item} c"), ("u3", "c b a")),
                C.RAW_ITEMS: GOOD_ITEMS}, f"sequences.tsv:3: field '{field}'"
    if source == "items.jsonl":
        return {C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: "".join(json.dumps({"asin": i}) + "\n" for i in items)}, \
            f"items.jsonl:2: field '{field}'"
    if source == "reviews":
        lines = [json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t}) for t, (u, i) in enumerate(zip(users, items))]
        return {C.RAW_REVIEWS: gz(lines), C.RAW_META: gz([repr({"asin": "a"})])}, f"reviews.json.gz:2: field '{field}'"
    if source == "meta":
        return {C.RAW_REVIEWS: reviews(), C.RAW_META: gz([repr({"asin": i, "title": "t"}) for i in items])}, \
            f"meta.json.gz:2: field '{field}'"
    if source == "csv":
        return {"raw/interactions.csv": "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for t, (u, i) in enumerate(zip(users, items)))}, \
            f"interactions.csv:3: field '{field}'"
    return {"raw/interactions.parquet": _parquet_bytes(users, items)}, f"interactions.parquet: row 1: field '{field}'"


ID_FIELDS = [("sequences", "user_id"), ("sequences", "item_ids"), ("items.jsonl", "asin"), ("reviews", "reviewerID"),
             ("reviews", "asin"), ("meta", "asin"), ("csv", "user"), ("csv", "item"), ("parquet", "user"), ("parquet", "item")]


@pytest.mark.parametrize(
    "source, field, kind",
    # sequences.tsv separates item ids by whitespace: spaces around one are separators, not part of it
    [pytest.param(s, f, k, id=f"{s}-{f}-{k}") for s, f in ID_FIELDS for k in BAD_IDS
     if not (f == "item_ids" and "space" in k)],
)
def test_ids_with_control_characters_or_surrounding_whitespace_are_refused(cli, tmp_path, source, field, kind):
    files, where = _raw_with_bad_id(source, field, BAD_IDS[kind])
    ds = make_dataset(tmp_path, files)
    problem = "leading or trailing whitespace" if "space" in kind else "control character"
    line = assert_error(cli(mmsr(ds, "preprocess", "--core", "0")), where, problem)
    assert str(ds.path(C.RAW_DIR)) in line
    assert not ds.path(C.ITEMS).exists()


def test_review_ids_are_checked_before_any_image_is_fetched(tmp_path):
    path = tmp_path / "reviews.json.gz"
    path.write_bytes(gz([json.dumps({"reviewerID": "u", "asin": "a\t"})]))
    with pytest.raises(MmsrError, match=r"reviews.json.gz:1: field 'asin' has a control character \(U\+0009\)"):
        amazon2014.read_reviews(path)


@pytest.mark.parametrize("rel", [C.RAW_SEQUENCES, C.RAW_ITEMS])
def test_utf8_byte_order_mark_is_not_part_of_the_first_line(cli, tmp_path, rel):
    files = {C.RAW_SEQUENCES: GOOD_SEQ, C.RAW_ITEMS: GOOD_ITEMS}
    files[rel] = b"\xef\xbb\xbf" + files[rel].encode()  # as Excel and Notepad save UTF-8
    ds = make_dataset(tmp_path, files)
    r = cli(mmsr(ds, "preprocess", "--core", "0"))
    assert r.exit_code == 0, r.stderr
    assert pq.read_table(ds.path(C.USERS)).column("user_id").to_pylist() == ["u1", "u2", "u3"]
    items = pq.read_table(ds.path(C.ITEMS), columns=["item_id", "title"]).to_pylist()
    assert items[:2] == [{"item_id": "a", "title": "Soap"}, {"item_id": "b", "title": "Brush"}]


def test_repeated_interactions_are_kept_and_sparsity_counts_pairs(cli, tmp_path):
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: tsv(("u1", "a a b b c"), ("u2", "a b c c"))})
    r = cli(mmsr(ds, "preprocess", "--core", "0"))
    assert r.exit_code == 0, r.stderr
    # 9 interactions but only 6 of the 2 x 3 (user, item) cells: sparsity 0%, not -50%.
    assert "2 users, 3 items, 9 interactions, avg length 4.50, sparsity 0.00%" in r.stderr
    counts = ds.read_manifest(C.STAGE_PREPROCESS)["counts"]
    assert counts["sparsity"] == 0.0 and counts["repeated_interactions"] == 3
    assert pq.read_table(ds.path(C.INTERACTIONS)).num_rows == 9
    assert pq.read_table(ds.path(C.ITEMS)).column("n_interactions").to_pylist() == [3, 3, 3]


def test_users_and_items_vanishing_under_k_core(cli, tmp_path):
    # u5 has 2 items and goes; that leaves x and y with 2 readers each, and without them u4 has
    # 2 items left and goes too.
    seq = tsv(("u1", "a b c x"), ("u2", "a b c y"), ("u3", "c a b"), ("u4", "a b x y"), ("u5", "x y"))
    images = {f"{C.RAW_IMAGES_DIR}/{i}.png": PNG for i in "abxy"}
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: seq, **images})
    r = cli(mmsr(ds, "preprocess", "--core", "3"))
    assert r.exit_code == 0, r.stderr
    assert pq.read_table(ds.path(C.USERS)).column("user_id").to_pylist() == ["u1", "u2", "u3"]
    items = pq.read_table(ds.path(C.ITEMS), columns=["item_id", "image_path"]).to_pylist()
    assert items == [{"item_id": "a", "image_path": "raw/images/a.png"},
                     {"item_id": "b", "image_path": "raw/images/b.png"}, {"item_id": "c", "image_path": None}]
    counts = ds.read_manifest(C.STAGE_PREPROCESS)["counts"]
    assert (counts["dropped_users_core"], counts["dropped_items"], counts["items_with_image"]) == (2, 2, 2)
    inter = pq.read_table(ds.path(C.INTERACTIONS))
    assert inter.column("item_idx").to_pylist() == [0, 1, 2] * 2 + [2, 0, 1]


def test_item_id_cannot_reach_outside_the_images_folder(cli, tmp_path):
    evil = "../../x"
    seq = tsv(("u1", f"{evil} b c"), ("u2", f"{evil} b c"))
    safe = C.safe_item_filename(evil)
    assert "/" not in safe and not safe.startswith(".")
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: seq, f"{C.RAW_IMAGES_DIR}/{safe}.png": PNG,
                                 C.RAW_ITEMS: json.dumps({"asin": evil, "title": "evil"}) + "\n"})
    (tmp_path / "x.png").write_bytes(JPEG)  # where the raw id would point from raw/images/
    r = cli(mmsr(ds, "preprocess", "--core", "0"))
    assert r.exit_code == 0, r.stderr
    items = pq.read_table(ds.path(C.ITEMS), columns=["item_id", "title", "image_path"]).to_pylist()
    assert items[0] == {"item_id": evil, "title": "evil", "image_path": f"raw/images/{safe}.png"}


def test_empty_and_whitespace_titles_are_missing_texts(cli, tmp_path, tiny_t5):
    titles = {"a": "Soap", "b": "", "c": "   ", "d": "\u00a0\u2003\t"}
    lines = "".join(json.dumps({"asin": i, "title": t}) + "\n" for i, t in titles.items())
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: tsv(("u1", "a b c d e"), ("u2", "e d c b a")), C.RAW_ITEMS: lines})
    assert cli(mmsr(ds, "preprocess", "--core", "0")).exit_code == 0
    assert pq.read_table(ds.path(C.ITEMS)).column("title").to_pylist() == ["Soap", None, None, None, None]
    r = cli(mmsr(ds, "extract-features", "--modality", "text", "--model", tiny_t5, "--fields", "title"))
    assert r.exit_code == 0, r.stderr
    index = pq.read_table(ds.path(C.features_index_file("text"))).to_pylist()
    assert [row["reason"] for row in index] == [None] + ["empty text"] * 4
    # Only one item has a text: two codes cannot be made of it.
    before = tree_hashes(ds.root)
    assert_error(cli(mmsr(ds, "build-codes", "-c", "2", "-k", "1")), "--clusters 2: more than the 1 items with 'text' features")
    assert tree_hashes(ds.root) == before


# ----------------------------------------------------------------------------------------------
# Images: odd modes are converted to RGB, unusable files are missing items with a reason


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels but holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _write_odd_images(folder: Path) -> dict[str, str]:
    """name -> file for every case below."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8), "RGB")
    palette = rgb.quantize(16)
    files = {
        "rgb": ("rgb.png", rgb),
        "cmyk": ("cmyk.jpg", rgb.convert("CMYK")),
        "rgba-transparent": ("rgba.png", Image.new("RGBA", (24, 20), (10, 200, 30, 0))),
        "white": ("white.png", Image.new("RGB", (24, 20), (255, 255, 255))),
        "palette": ("palette.png", palette),
        "palette-as-rgb": ("palette-rgb.png", palette.convert("RGB")),
        "grey-alpha": ("la.png", Image.new("LA", (8, 8), (90, 128))),
        "bilevel": ("bilevel.png", Image.new("1", (9, 7), 1)),
        "grey16": ("grey16.png", Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16))),
        "one-pixel": ("one.png", Image.new("RGB", (1, 1), (200, 100, 0))),
        "large": ("large.png", Image.new("RGB", (3000, 2000), (30, 60, 90))),
    }
    out = {}
    for case, (name, img) in files.items():
        img.save(folder / name)
        out[case] = name
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    out["animated-gif"] = "anim.gif"
    for case, name, data in [
        ("zero-byte", "empty.jpg", b""),
        ("corrupt", "corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
        ("truncated", "truncated.png", (folder / "rgb.png").read_bytes()[:80]),
        ("text-as-png", "text.png", b"<html>not found</html>"),
        ("decompression-bomb", "bomb.png", _png_header(30_000, 30_000)),
        ("over-pixel-limit", "big-header.png", _png_header(10_000, 10_000)),  # PIL warns, not errs
    ]:
        (folder / name).write_bytes(data)
        out[case] = name
    os.symlink("/etc/hostname", folder / "link.png")
    out["symlink-outside"] = "link.png"
    return out


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Features of every odd image, extracted in one run: (row per case, features, stderr, warnings)."""
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("images")
    names = _write_odd_images(DatasetDir.open(wd, "toy").path(C.RAW_IMAGES_DIR))
    ds = make_items(wd, [{"image_path": f"{C.RAW_IMAGES_DIR}/{n}"} for n in names.values()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_cli(mmsr(ds, "extract-features", *IMAGE_NET, "--batch-size", "8"))
    assert r.exit_code == 0, r.stderr
    tensors = torch.load(ds.path(C.features_tensor_file("image")), weights_only=True)
    index = pq.read_table(ds.path(C.features_index_file("image"))).to_pylist()
    rows = dict(zip(names, index))
    return rows, tensors["features"], r.stderr, [str(w.message) for w in caught]


@pytest.mark.parametrize("case", ["rgb", "cmyk", "rgba-transparent", "palette", "grey-alpha", "bilevel",
                                  "grey16", "one-pixel", "large", "animated-gif"])
def test_odd_image_modes_are_converted_to_rgb(odd_images, case):
    rows, feats, _, _ = odd_images
    row = rows[case]
    assert not row["missing"] and row["reason"] is None
    f = feats[row["row"]]
    assert torch.isfinite(f).all() and f.abs().sum() > 0


def test_transparency_is_laid_on_white_and_palettes_keep_their_colours(odd_images):
    rows, feats, _, _ = odd_images
    torch.testing.assert_close(feats[rows["rgba-transparent"]["row"]], feats[rows["white"]["row"]])
    torch.testing.assert_close(feats[rows["palette"]["row"]], feats[rows["palette-as-rgb"]["row"]])


@pytest.mark.parametrize(
    "case, reason",
    [
        ("zero-byte", "empty image file"),
        ("corrupt", "unreadable image (OSError)"),
        ("truncated", "unreadable image (OSError)"),
        ("text-as-png", "unreadable image (UnidentifiedImageError)"),
        ("decompression-bomb", "image too large"),
        ("over-pixel-limit", "image too large"),
        ("symlink-outside", "image path outside the dataset folder"),
    ],
)
def test_unusable_images_are_missing_with_a_reason(odd_images, case, reason):
    rows, feats, stderr, caught = odd_images
    assert rows[case]["missing"] and rows[case]["reason"] == reason
    assert torch.all(feats[rows[case]["row"]] == 0)
    # The run itself succeeded with its one summary line: no PIL warning on stderr or raised.
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("extract-features toy/image")
    assert not [w for w in caught if "pixels" in w]


# ----------------------------------------------------------------------------------------------
# Features that K-means cannot use, or not fully


def _build_codes(cli, ds: DatasetDir):
    return cli(mmsr(ds, "build-codes", "--modality", "image", "-c", "5", "-k", "1", "--ae-dim", "4", "--epochs", "3"))


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_features_are_refused(cli, tmp_path, value):
    ds = make_codes_dataset(tmp_path, modalities=("image",))
    feats = np.random.default_rng(0).normal(size=(60, 8))
    feats[7, 2] = value  # e.g. an fp16 overflow in the encoder
    write_features(ds, "image", feats, set())
    before = tree_hashes(ds.root)
    assert_error(_build_codes(cli, ds), f"{ds.path(C.features_tensor_file('image'))}: features of 1 item(s) are "
                 "not finite (NaN or inf), first item_idx 7")
    assert tree_hashes(ds.root) == before


def test_fewer_distinct_features_than_clusters_leaves_codes_empty(cli, tmp_path):
    ds = make_codes_dataset(tmp_path, modalities=("image",))
    feats = np.random.default_rng(0).normal(size=(60, 8))
    feats[3:] = feats[0]  # 4 distinct vectors for 5 clusters
    write_features(ds, "image", feats, set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = _build_codes(cli, ds)
    assert r.exit_code == 0, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "40% empty" in r.stderr  # 2 of 5 codes
    assert not [w for w in caught if "distinct clusters" in str(w.message)]
    assert ds.read_manifest("codes:image")["counts"]["empty_codes"] == 2
    log = ds.path(f"{C.LOGS_DIR}/codes__image.log").read_text()
    assert "k-means: Number of distinct clusters (3) found smaller than n_clusters (5)" in log


# ----------------------------------------------------------------------------------------------
# Options out of range and unknown names: refused before anything is written


@pytest.mark.parametrize(
    "command, args, expected",
    [
        ("preprocess", ["--core", "-1"], "--core: must be an integer in 0..1000, got -1"),
        ("preprocess", ["--max-len", "0"], "--max-len: must be an integer in 1..1000, got 0"),
        ("preprocess", ["--split", "ratio", "--test-ratio", "1.5"], "--test-ratio: must be a number strictly between 0 and 1, got 1.5"),
        ("extract-features", ["--modality", "audio"], "--modality: expected image or text, got 'audio'"),
        ("extract-features", [*IMAGE_NET, "--name", "Image/2"], "--name: modality name 'Image/2' is invalid"),
        ("extract-features", [*IMAGE_NET, "--batch-size", "0"], "--batch-size: must be an integer in 1..128, got 0"),
        ("extract-features", [*IMAGE_NET, "--chunk-size", "-4"], "--chunk-size: must be an integer in 1..16384, got -4"),
        ("build-codes", ["-c", "3", "-k", "4"], "--top-k 4: must not exceed --clusters 3"),
        ("build-codes", ["-c", "21", "-k", "2"], "--clusters 21: more than the 20 items with 'image' features"),
        ("build-codes", ["-c", "0"], "--clusters: must be an integer in 1..10000, got 0"),
        ("build-codes", ["-k", "-2"], "--top-k: must be an integer in 1..100, got -2"),
        ("build-codes", ["--ae-dim", "0"], "--ae-dim: must be an integer in 1..2048, got 0"),
        ("build-codes", ["--lr", "inf"], "--lr: must be a number in (0, 10], got inf"),
        ("build-codes", ["--modality", "audio"], "stage 'features:audio' has not been run"),
        ("build-codes", ["--modality", "Au-dio"], "--modality: modality name 'Au-dio' is invalid"),
        ("build-graphs", ["--modalities", "audio"], "--modalities: no codes for audio (built: image)"),
        ("build-graphs", ["--modalities", "image,image"], "--modalities: a modality is named twice"),
        ("build-graphs", ["--splits", "train,dev"], "--splits: unknown split 'dev'"),
        ("train", [*MMSR_RUN, "--modalities", "audio"], "--modalities: audio is not a subset"),
        ("train", [*MMSR_RUN, "--modalities", "image,,text"], "--modalities: empty entry in 'image,,text'"),
        ("train", ["--model", "bert4rec"], "--model: unknown model 'bert4rec'"),
        ("train", [*MMSR_RUN, "--epochs", "0"], "--epochs: must be an integer in 1..10000, got 0"),
        ("train", [*MMSR_RUN, "--dropout", "1.5"], "--dropout: must be a number in [0, 1), got 1.5"),
        ("train", [*MMSR_RUN, "--lr", "nan"], "--lr: must be a number in (0, 10], got nan"),
        ("evaluate", ["--run", "m", "--split", "train"], "--split: expected valid or test, got 'train'"),
        ("evaluate", ["--run", "m", "--checkpoint", "worst"], "--checkpoint: expected best or last, got 'worst'"),
        ("recommend", ["--run", "m", "--all-users", "--top-k", "0"], "--top-k: must be an integer in 1..1000, got 0"),
        ("recommend", ["--run", "m", "--users", "u1,nobody"], "--users: unknown user 'nobody'"),
        ("recommend", ["--run", "../runs/m", "--all-users"], "--run: invalid run name '../runs/m'"),
    ],
)
def test_bad_options_change_nothing(cli, work, command, args, expected):
    before = tree_hashes(work.workdir)
    assert_error(cli(mmsr(work, command, *args)), expected)
    assert tree_hashes(work.workdir) == before
    assert temporaries(work.workdir) == []


def _numeric_options() -> list[tuple[str, str, str]]:
    """(command, option, 'int' or 'float') for every numeric option of every command."""
    import typer

    from mmsr_cli import commands  # noqa: F401  (registers the commands)
    from mmsr_cli.app import app

    group = typer.main.get_command(app)
    out = []
    for name, command in sorted(group.commands.items()):
        for param in command.params:
            kind = param.type_descriptor.annotation  # the parameter's Python type, Optional removed
            if kind in (int, float):
                out.append((name, max(param.opts, key=len), kind.__name__))
    return out


# Required options of each command, so that only the numeric option can be at fault.
REQUIRED = {"extract-features": ["--modality", "image"], "recommend": ["--run", "m"]}
NUMERIC = _numeric_options()


OUT_OF_RANGE = {"below": "-1000000000000", "above": "1000000000000", "nan": "nan"}  # nan: float options only


@pytest.mark.parametrize(
    "command, option, value",
    [pytest.param(c, o, v, id=f"{c}{o}-{name}") for c, o, kind in NUMERIC for name, v in OUT_OF_RANGE.items()
     if name != "nan" or kind == "float"],
)
def test_every_numeric_option_is_range_checked_where_parsed(cli, tmp_path, command, option, value):
    """Walks the commands: an int or float option without a range fails here, because the
    dataset does not exist and only a check at parse time can name the option first."""
    args = [command, "--workdir", tmp_path, *([] if command == "report" else ["--dataset", "nowhere"]),
            *REQUIRED.get(command, []), option, value]
    assert_error(cli(args), f"{option}: must be ")
    assert list(tmp_path.iterdir()) == []


def test_numeric_options_are_found():
    """The walk above sees the options (a rename in click would otherwise make it test nothing)."""
    found = {(c, o) for c, o, _ in NUMERIC}
    assert {("train", "--batch-size"), ("extract-features", "--batch-size"), ("build-codes", "--clusters"),
            ("evaluate", "--drop-ratio"), ("recommend", "--top-k"), ("preprocess", "--max-len"),
            ("download", "--timeout"), ("train", "--seed")} <= found
    assert len(found) >= 35


@pytest.mark.parametrize(
    "command, args",
    [("train", ["--model", "sasrec", "--batch-size", "4096", "--dim", "1024", "--layers", "16", "--heads", "64", "--epochs", "10000"]),
     ("extract-features", ["--modality", "image", "--batch-size", "128", "--chunk-size", "16384", "--workers", "8"]),
     ("build-codes", ["--clusters", "10000", "--top-k", "100", "--ae-dim", "2048"]),
     ("preprocess", ["--core", "1000", "--max-len", "1000", "--split", "ratio", "--test-ratio", "0.999"])],
    ids=["train", "extract-features", "build-codes", "preprocess"],
)
def test_range_ends_pass_the_parser(cli, tmp_path, command, args):
    """The largest accepted values get past parsing (to the missing dataset)."""
    assert_error(cli([command, "--workdir", tmp_path, "--dataset", "nowhere", *args]), "nowhere")


# ----------------------------------------------------------------------------------------------
# Stages out of order


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("preprocessed")
    make_toy(wd)
    return wd


@pytest.mark.parametrize(
    "command, args, expected",
    [
        ("preprocess", [], "no such dataset folder; run `mmsr download --dataset toy` first"),
        ("extract-features", IMAGE_NET, "no such dataset folder; run `mmsr preprocess --dataset toy` first"),
        ("build-codes", [], "no modality has features; run `mmsr extract-features --dataset toy"),
        ("build-graphs", ["--modalities", "image"], "run `mmsr build-codes --modality image --dataset toy` first"),
        ("train", ["--model", "mmsr"], "stage 'graphs:codes' has not been run; run `mmsr build-graphs --dataset toy` first"),
        ("train", ["--model", "sasrecf"], "has no modality codes; run `mmsr build-codes --modality NAME --dataset toy` first"),
        ("evaluate", ["--run", "m"], "no such run; run `mmsr train --dataset toy --run-name m` first"),
        ("recommend", ["--run", "m", "--all-users"], "no such run; run `mmsr train --dataset toy --run-name m` first"),
    ],
)
def test_stage_run_before_its_inputs_exist(cli, preprocessed, tmp_path, command, args, expected):
    wd = tmp_path / "wd"
    if command in ("preprocess", "extract-features"):
        wd.mkdir()  # nothing downloaded, nothing preprocessed
    else:
        shutil.copytree(preprocessed, wd)
    before = tree_hashes(wd)
    assert_error(cli([command, "--workdir", wd, "--dataset", "toy", *args]), expected)
    assert tree_hashes(wd) == before


# ----------------------------------------------------------------------------------------------
# Stale inputs: an earlier stage re-run with other options


@pytest.mark.parametrize(
    "command, args, expected",
    [
        ("build-codes", CODES, "stage 'features:image' is stale ('preprocess' was re-run since)"),
        # Codes whose features predate the new preprocess: refused, not joined with new samples.
        ("build-graphs", [], "stage 'codes:image' is stale (its input 'features:image' was built from 'preprocess'"),
        ("train", ["--model", "sasrecf", "--epochs", "1", "--dim", "16"], "stage 'codes:image' is stale"),
        ("train", [*MMSR_RUN, "--run-name", "again"], "stage 'graphs:codes' is stale ('preprocess' was re-run since)"),
        ("evaluate", ["--run", "m"], "stage 'graphs:codes' is stale"),
        ("recommend", ["--run", "s", "--all-users"], "run was trained on other 'preprocess' data than dataset 'toy' holds now"),
    ],
)
def test_outputs_of_an_earlier_preprocess_are_stale(cli, work, command, args, expected):
    assert cli(mmsr(work, "preprocess", "--core", "0", "--max-len", "6")).exit_code == 0
    before = tree_hashes(work.workdir)
    assert_error(cli(mmsr(work, command, *args)), expected)
    assert tree_hashes(work.workdir) == before


def test_runs_on_earlier_codes_are_stale(cli, work):
    assert cli(mmsr(work, "build-codes", "-c", "3", "-k", "1", "--ae-dim", "8", "--epochs", "5")).exit_code == 0
    before = tree_hashes(work.workdir)
    assert_error(cli(mmsr(work, "train", *MMSR_RUN, "--run-name", "again")),
                 "stage 'graphs:codes' is stale ('codes:image' was re-run since); re-run `mmsr build-graphs --dataset toy`")
    assert_error(cli(mmsr(work, "recommend", "--run", "m", "--users", "u1")), "stage 'graphs:codes' is stale")
    assert tree_hashes(work.workdir) == before


# ----------------------------------------------------------------------------------------------
# A full disk, an unwritable workdir


def _fill_disk(monkeypatch) -> None:
    """Every data write (Parquet, torch, numpy, Path.write_*) leaves a few bytes and fails with
    ENOSPC, as a write to a full disk does."""
    def full(target) -> None:  # a path or an open file
        if hasattr(target, "write"):
            target.write(b"partial")
            target = getattr(target, "name", None)
        else:
            with open(target, "wb") as f:
                f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if target is None else str(target))

    monkeypatch.setattr(pq, "write_table", lambda table, where, *a, **k: full(where))
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: full(f))
    monkeypatch.setattr(np, "save", lambda file, arr, *a, **k: full(file))
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: full(self))
    monkeypatch.setattr(Path, "write_text", lambda self, data, *a, **k: full(self))


@pytest.mark.parametrize(
    "command, args",
    [
        ("preprocess", ["--core", "0", "--max-len", "6"]),
        ("extract-features", [*IMAGE_NET, "--name", "image2"]),
        ("build-codes", ["-c", "3", "-k", "1", "--ae-dim", "8", "--epochs", "5"]),
        ("build-graphs", ["--no-codes"]),
        ("train", ["--model", "sasrec", "--epochs", "1", "--dim", "16", "--run-name", "new"]),
        ("evaluate", ["--run", "m", "--split", "valid"]),
        ("recommend", ["--run", "m", "--users", "u1"]),  # --output added below
    ],
)
def test_full_disk_is_one_line_and_keeps_every_earlier_output(cli, work, monkeypatch, command, args):
    if command == "recommend":
        args = [*args, "--output", work.workdir / "recs.parquet"]
    before = tree_hashes(work.workdir)
    with monkeypatch.context() as m:
        _fill_disk(m)
        r = cli(mmsr(work, command, *args))
    assert "no space left on device" in assert_error(r).lower()
    assert tree_hashes(work.workdir) == before  # no new file, no changed file, partial or not
    assert temporaries(work.workdir) == []


def _full_for(monkeypatch, marker: str) -> None:
    """Writing a file whose (temporary) name holds ``marker`` fails as on a full disk; others work."""
    real_parquet, real_save = pq.write_table, torch.save

    def full(target) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(pq, "write_table", lambda table, where, *a, **k: full(where) if marker in str(where)
                        else real_parquet(table, where, *a, **k))
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: full(f.name) if marker in str(getattr(f, "name", f))
                        else real_save(obj, f, *a, **k))


@pytest.mark.parametrize("marker", ["items", "samples_test"])
def test_preprocess_outputs_are_written_as_one(cli, tmp_path, monkeypatch, marker):
    """A failure on any output (the first or the last) leaves every output of the earlier run as
    it was, not a mix of old and new files."""
    seq = tsv(("u1", "a b c d"), ("u2", "a b c e"), ("u3", "c b a f"))
    ds = make_dataset(tmp_path, {C.RAW_SEQUENCES: seq, C.RAW_ITEMS: GOOD_ITEMS})
    assert cli(mmsr(ds, "preprocess", "--core", "0")).exit_code == 0
    before = tree_hashes(ds.root)
    with monkeypatch.context() as m:
        _full_for(m, marker)
        line = assert_error(cli(mmsr(ds, "preprocess", "--core", "2")), "no space left on device")  # other outputs
    assert f"{marker}.parquet" in line
    assert {rel: h for rel, h in tree_hashes(ds.root).items() if not rel.startswith("logs/")} == \
        {rel: h for rel, h in before.items() if not rel.startswith("logs/")}
    assert temporaries(ds.root) == []


def test_extract_features_tensor_and_index_are_written_as_one(cli, tmp_path, monkeypatch, tiny_t5):
    ds = make_items(tmp_path, [{"title": "Red lipstick", "brand": "Acme"}, {"title": ""}])
    text = ["extract-features", "--workdir", tmp_path, "--dataset", "toy", "--modality", "text", "--model", tiny_t5]
    assert cli([*text, "--fields", "title"]).exit_code == 0
    before = tree_hashes(ds.root)
    with monkeypatch.context() as m:
        _full_for(m, f".{C.features_index_file('text').rsplit('/', 1)[-1]}")  # the index, after the tensor
        assert_error(cli([*text, "--fields", "title,brand"]), "text.parquet: no space left on device")
    after = tree_hashes(ds.root)
    assert {rel: after.get(rel) for rel in (C.features_tensor_file("text"), C.features_index_file("text"))} == \
        {rel: before[rel] for rel in (C.features_tensor_file("text"), C.features_index_file("text"))}
    assert temporaries(ds.root) == []


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _refuse_writes_under(monkeypatch, root: Path, code: int) -> None:
    """Creating, opening for writing or renaming anything under ``root`` fails with ``code``,
    as on a read-only (EACCES) or full (ENOSPC) file system. Reads still work."""
    root_s = str(root.resolve())
    real_mkdir, real_open, real_builtin_open, real_replace = os.mkdir, os.open, builtins.open, os.replace

    def inside(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(root_s)

    def fail(path):
        raise OSError(code, os.strerror(code), os.fsdecode(path))

    def mkdir(path, *a, **k):
        return fail(path) if inside(path) and not os.path.isdir(path) else real_mkdir(path, *a, **k)

    def os_open(path, flags, *a, **k):
        return fail(path) if flags & _WRITE_FLAGS and inside(path) else real_open(path, flags, *a, **k)

    def open_(file, mode="r", *a, **k):
        return fail(file) if set(mode) & set("wax+") and inside(file) else real_builtin_open(file, mode, *a, **k)

    def replace(src, dst, *a, **k):
        return fail(dst) if inside(dst) else real_replace(src, dst, *a, **k)

    for module, name, fake in [(os, "mkdir", mkdir), (os, "open", os_open), (builtins, "open", open_),
                               (io, "open", open_), (os, "replace", replace), (os, "rename", replace)]:
        monkeypatch.setattr(module, name, fake)


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC, errno.EROFS], ids=["read-only", "full", "read-only-fs"])
@pytest.mark.parametrize(
    "command, args",
    [
        ("preprocess", ["--core", "0"]),
        ("build-codes", CODES),
        ("train", ["--model", "pop", "--run-name", "p"]),
    ],
)
def test_unwritable_workdir_is_one_line(cli, work, monkeypatch, code, command, args):
    shutil.rmtree(work.path(C.LOGS_DIR))  # the first thing a stage writes
    before = tree_hashes(work.workdir)
    with monkeypatch.context() as m:
        _refuse_writes_under(m, work.workdir, code)
        line = assert_error(cli(mmsr(work, command, *args)))
    assert line == f"mmsr: error: {work.path(C.LOGS_DIR)}: {os.strerror(code)}"
    assert tree_hashes(work.workdir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_chmod_read_only_workdir(cli, work):
    before = tree_hashes(work.workdir)
    for p in [work.workdir, *work.workdir.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
    try:
        assert_error(cli(mmsr(work, "preprocess", "--core", "0")), "Permission denied")
    finally:
        for p in [work.workdir, *work.workdir.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
    assert tree_hashes(work.workdir) == before


def test_a_log_line_that_cannot_be_written_prints_no_traceback(cli, work, monkeypatch):
    def full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(logging.FileHandler, "flush", full, raising=False)
    r = cli(mmsr(work, "preprocess", "--core", "0", "--max-len", "6"))
    assert r.exit_code == 0, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Logging error" not in r.stderr


# ----------------------------------------------------------------------------------------------
# A run that does not belong to the dataset or to its model


def _copy_run_to_other_dataset(ds: DatasetDir) -> list:
    shutil.copytree(ds.path("runs/m"), ds.workdir / "other" / "runs" / "m")
    return ["evaluate", "--workdir", ds.workdir, "--dataset", "other", "--run", "m"]


def _put_checkpoint(ds: DatasetDir, data: bytes | None = None, src: str = "runs/s/best.pt") -> None:
    target = ds.path("runs/m/best.pt")
    target.write_bytes(data if data is not None else ds.path(src).read_bytes())


def _rename_model(ds: DatasetDir) -> None:
    path = ds.path("runs/m/config.json")
    config = json.loads(path.read_text())
    config["model"].update(model="sasrec", modalities=[])
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "break_run, command, expected",
    [
        ("other-dataset", "evaluate", "run was trained on dataset 'toy', not 'other'"),
        ("sasrec-weights", "evaluate", "runs/m/best.pt: does not fit model mmsr"),
        ("sasrec-weights", "recommend", "runs/m/best.pt: does not fit model mmsr"),
        ("zero-byte", "evaluate", "runs/m/best.pt: not a readable checkpoint"),
        ("garbage", "recommend", "runs/m/best.pt: not a readable checkpoint"),
        ("config-not-json", "evaluate", "runs/m/config.json: not a valid run config (JSONDecodeError"),
        ("config-says-sasrec", "evaluate", "runs/m/best.pt: does not fit model sasrec"),
    ],
)
def test_checkpoint_of_another_dataset_or_model(cli, work, break_run, command, expected):
    args = mmsr(work, command, "--run", "m", *(["--all-users"] if command == "recommend" else []))
    if break_run == "other-dataset":
        args = _copy_run_to_other_dataset(work)
    elif break_run == "sasrec-weights":
        _put_checkpoint(work)
    elif break_run == "zero-byte":
        _put_checkpoint(work, b"")
    elif break_run == "garbage":
        _put_checkpoint(work, b"PK\x03\x04" + b"\0" * 100)
    elif break_run == "config-not-json":
        work.path("runs/m/config.json").write_text('{"model": ')
    else:
        _rename_model(work)
    before = tree_hashes(work.workdir)
    assert_error(cli(args), expected)
    assert tree_hashes(work.workdir) == before


@pytest.mark.parametrize(
    "fault, expected",
    [("no-such-run", "runs/gone: no such run"),
     ("no-checkpoint", "runs/m/best.pt"),
     ("bad-config", "runs/m/config.json: field 'model.dim': expected int"),
     ("other-dataset", "run was trained on dataset 'elsewhere'"),
     ("pairs-typo", "--pairs: run 'n' is not among the compared runs"),
     ("pairs-seeds", "--pairs: s and s1 are seeds of one experiment")],
)
def test_several_runs_are_all_checked_before_any_is_written(cli, work, fault, expected):
    """evaluate --compare: a run that cannot be evaluated is found before the metrics of the
    runs named before it are written (validate, then act)."""
    runs = "s,m"
    if fault == "no-such-run":
        runs = "s,gone"
    elif fault == "no-checkpoint":
        work.path("runs/m/best.pt").unlink()
    elif fault == "pairs-seeds":  # s1: run s again with another seed, so s:s1 is one experiment
        shutil.copytree(work.path("runs/s"), work.path("runs/s1"))
        config = json.loads(work.path("runs/s1/config.json").read_text())
        config["train"]["seed"] = 1
        work.path("runs/s1/config.json").write_text(json.dumps(config))
        runs = "s,s1"
    elif fault != "pairs-typo":
        path = work.path("runs/m/config.json")
        config = json.loads(path.read_text())
        if fault == "bad-config":
            config["model"]["dim"] = "16"
        else:
            config["dataset"] = "elsewhere"
        path.write_text(json.dumps(config))
    before = tree_hashes(work.workdir)
    pairs = {"pairs-typo": ["--pairs", "m:n"], "pairs-seeds": ["--pairs", "s:s1"]}.get(fault, [])
    assert_error(cli(mmsr(work, "evaluate", "--compare", runs, *pairs)), expected)
    assert tree_hashes(work.workdir) == before
    assert temporaries(work.workdir) == []


@pytest.mark.parametrize(
    "section, field, value, expected",
    [
        ("model", "dim", "16", "field 'model.dim': expected int, got str '16'"),
        ("model", "dropout", None, "field 'model.dropout': expected float, got NoneType"),
        ("model", "layers", True, "field 'model.layers': expected int, got bool"),
        ("model", "modalities", "image", "field 'model.modalities': expected a list of str"),
        ("model", "dims", 16, "field 'model.dims': unknown field"),
        ("train", "seed", 1.5, "field 'train.seed': expected int, got float"),
        ("train", "epochs", 0, "invalid value in the run config: --epochs: must be an integer in 1..10000"),
        ("model", "dropout", 2.0, "invalid value in the run config: --dropout: must be a number in [0, 1)"),
        ("train", None, [], "field 'train': expected an object, got list"),
    ],
    ids=["str-for-int", "null-float", "bool-for-int", "str-for-list", "unknown", "float-seed", "range", "dropout",
         "section-type"],
)
@pytest.mark.parametrize("command", ["evaluate", "recommend", "train"])
def test_run_config_fields_are_typed_where_read(cli, work, command, section, field, value, expected):
    """config.json is read through the typed configs: one line naming the file and the field, for
    every command that reads a run back (train reads it to resume)."""
    path = work.path("runs/m/config.json")
    config = json.loads(path.read_text())
    if field is None:
        config[section] = value
    else:
        config[section][field] = value
    path.write_text(json.dumps(config))
    args = {"evaluate": ["--run", "m"], "recommend": ["--run", "m", "--users", "u1"],
            "train": [*MMSR_RUN, "--run-name", "m"]}[command]
    before = tree_hashes(work.workdir)
    line = assert_error(cli(mmsr(work, command, *args)), expected)
    assert f"{path}:" in line
    assert tree_hashes(work.workdir) == before


# ----------------------------------------------------------------------------------------------
# --config files


@pytest.mark.parametrize(
    "content, expected",
    [
        ("[preprocess\ncore = 0\n", "run.toml: not valid TOML"),
        (b'[preprocess]\nsplit = "caf\xe9"\n', "run.toml: not valid TOML ('utf-8' codec can't decode"),
        ("preprocess = 3\n", "run.toml: [preprocess] must be a table"),
        ("[preprocess]\ncores = 0\n", "run.toml: [preprocess] has unknown option 'cores' (did you mean 'core'?)"),
        ("[preproces]\ncore = 0\n", "run.toml: [preproces] is not a command (did you mean 'preprocess'?)"),
        ('datset = "toy"\n', "run.toml: unknown top-level option 'datset' (did you mean 'dataset'?)"),
        ('[preprocess]\ncore = "five"\n', "Invalid value for '--core'"),
        ("[preprocess]\ncore = true\n", "run.toml: 'core' takes a value, not true"),
        ("[preprocess]\nmax-len = 0\n", "--max-len: must be an integer in 1..1000, got 0"),
        (None, "run.toml: is a directory, expected a regular file"),
    ],
    ids=["syntax", "latin1", "not-a-table", "unknown-key", "unknown-table", "unknown-top-level-key", "wrong-type", "bool-for-int", "out-of-range", "directory"],
)
def test_bad_config_file(cli, work, content, expected):
    cfg = work.workdir / "run.toml"
    if content is None:
        cfg.mkdir()
    else:
        cfg.write_bytes(content.encode() if isinstance(content, str) else content)
    before = tree_hashes(work.workdir)
    assert_error(cli(mmsr(work, "preprocess", "--config", cfg)), expected)
    assert tree_hashes(work.workdir) == before


def test_flag_in_config_file_takes_true_or_false(cli, work):
    cfg = work.workdir / "run.toml"
    cfg.write_text('[build-graphs]\nno-codes = "yes"\n')
    assert_error(cli(mmsr(work, "build-graphs", "--config", cfg)), "run.toml: 'no-codes' is a flag: expected true or false, got 'yes'")
    cfg.write_text("[build-graphs]\nno-codes = true\n")
    r = cli(mmsr(work, "build-graphs", "--config", cfg))
    assert r.exit_code == 0 and work.read_manifest("graphs:items") is not None, r.stderr


# ----------------------------------------------------------------------------------------------
# Download safety: metadata decides neither where files go nor what is fetched


class Site:
    """A local HTTP server: path -> (status, headers, body)."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.requests: list[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                site.requests.append(self.path)
                status, headers, body = site.pages.get(self.path, (404, {}, b""))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def add(self, path: str, body: bytes, content_type: str, length: bool = True) -> None:
        headers = {"Content-Type": content_type, **({"Content-Length": str(len(body))} if length else {})}
        self.pages[path] = (200, headers, body)

    def redirect(self, path: str, location: str) -> None:
        self.pages[path] = (302, {"Location": location, "Content-Length": "0"}, b"")


@pytest.fixture
def site():
    s = Site()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.mark.parametrize("item_id", ["../../x", "/etc/cron.d/x", "..", ".hidden", "a/../../b", "C:\\x", "x\0y"])
def test_item_ids_cannot_escape_the_images_folder(site, tmp_path, item_id):
    site.add("/i.png", PNG, "image/png")
    images = tmp_path / "work" / "raw" / "images"
    res = fetch.fetch_images({item_id: f"{site.base}/i.png"}, images, fast_opts())
    assert res.ok == 1 and res.failed == {}
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 1 and written[0].parent == images and not written[0].name.startswith(".")
    assert fetch.existing_image(images, item_id) == written[0]


def _redirect_chain(site: Site, hops: int) -> None:
    """/img -> /r0 -> /r1 -> ... -> /r{hops - 1} -> /i.png"""
    for i in range(hops - 1):
        site.redirect(f"/r{i}", f"{site.base}/r{i + 1}")
    site.redirect(f"/r{hops - 1}", f"{site.base}/i.png")
    site.redirect("/img", f"{site.base}/r0")


@pytest.mark.parametrize(
    "target, reason",
    [
        ("chain:2", None),  # an ordinary CDN redirect
        ("chain:7", "HTTP 302"),  # more than MAX_REDIRECTS
        ("/img", "HTTP 302"),  # a loop
        ("ftp://127.0.0.1:9/i.png", "refused (not http(s))"),
        ("file:///etc/passwd", "HTTP 302"),
    ],
    ids=["http", "too-many", "loop", "to-ftp", "to-file"],
)
def test_redirects_are_followed_only_to_http_and_only_a_few(site, tmp_path, target, reason):
    site.add("/i.png", PNG, "image/png")
    if target.startswith("chain:"):
        _redirect_chain(site, int(target.split(":")[1]))
    else:
        site.redirect("/img", target)
    res = fetch.fetch_images({"B1": f"{site.base}/img"}, tmp_path / "images", fast_opts(retries=1))
    if reason is None:
        assert res.ok == 1 and (tmp_path / "images" / "B1.png").read_bytes() == PNG
    else:
        assert res.ok == 0 and reason in res.failed["B1"]
        assert not list((tmp_path / "images").iterdir())
        assert len(site.requests) <= fetch.MAX_REDIRECTS + 1  # refused, not retried


@pytest.mark.parametrize(
    "body, content_type, length, saved, reason",
    [
        (JPEG, "image/jpeg", True, "B1.jpg", None),
        (PNG, "image/jpeg", True, "B1.png", None),  # named by what it is
        (b"<html>login</html>", "image/png", True, None, "body is not an image (content type 'image/png')"),
        (b"GIF89a" + b"\0" * 20, "text/html", True, None, "content type 'text/html' is not an image"),
        (b"<svg/>", "image/svg+xml", True, None, "unsupported image type 'image/svg+xml'"),
        (PNG * 40, "image/png", False, None, "over the 1000-byte cap"),  # no Content-Length to go by
        (PNG * 40, "image/png", True, None, "2880 bytes, over the 1000-byte cap"),
    ],
    ids=["jpeg", "png-said-jpeg", "html-said-png", "gif-said-html", "svg", "streamed-over-cap", "announced-over-cap"],
)
def test_image_answers_are_checked(site, tmp_path, body, content_type, length, saved, reason):
    site.add("/img", body, content_type, length=length)
    res = fetch.fetch_images({"B1": f"{site.base}/img"}, tmp_path / "images", fast_opts(max_image_bytes=1000))
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    if reason is None:
        assert res.ok == 1 and files == [saved]
    else:
        assert res.failed == {"B1": reason} and files == []
    assert len(site.requests) == 1  # a refused answer is not asked for again


def test_data_file_answered_with_an_html_page(cli, site, tmp_path):
    site.add("/amz/reviews_Beauty_5.json.gz", b"<html>Please log in</html>", "text/html; charset=utf-8")
    r = cli(["download", "-d", "beauty", "--base-url", f"{site.base}/amz", "--workdir", tmp_path, "--retries", "2"])
    assert_error(r, "reviews_Beauty_5.json.gz: the server answered with an HTML page, not the data file")
    assert not list((tmp_path / "beauty" / "raw").glob("reviews*")) and len(site.requests) == 1


def test_full_disk_while_downloading_is_not_a_connection_error(site, tmp_path, monkeypatch):
    body = bytes(range(256)) * 16
    site.add("/reviews.json.gz", body, "application/x-gzip")
    real_open = builtins.open

    class FullAfterFirstChunk:
        def __init__(self, f):
            self.f, self.chunks = f, 0

        def write(self, data):
            self.chunks += 1
            if self.chunks > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def flush(self):
            self.f.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(fetch, "open", lambda *a, **k: FullAfterFirstChunk(real_open(*a, **k)), raising=False)
    dest = tmp_path / "raw" / "reviews.json.gz"
    with pytest.raises(MmsrError, match=r"reviews.json.gz.part: cannot write \(No space left on device\); 1024 bytes kept"):
        fetch.fetch_file(f"{site.base}/reviews.json.gz", dest, fast_opts())
    assert site.requests == ["/reviews.json.gz"]  # no retries: waiting does not free the disk
    assert not dest.exists() and dest.with_name("reviews.json.gz.part").read_bytes() == body[:1024]
    monkeypatch.undo()
    assert fetch.fetch_file(f"{site.base}/reviews.json.gz", dest, fast_opts()).path.read_bytes() == body  # once there is space
