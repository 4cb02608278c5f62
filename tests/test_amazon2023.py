"""Amazon Reviews 2023 through the real huggingface_hub code path, from a local hub server.

The server answers the URLs ``hf_hub_download`` asks for (``/datasets/<repo>/resolve/<revision>/
<path>``, HEAD with ETag, X-Repo-Commit and Content-Length, GET with Range) from fixture files
written in the release's layout and formats: review and metadata JSON lines for two categories
and the official 5-core split files (``last_out_w_his``) made by the release's rules.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmsr_cli import contracts as C
from mmsr_cli.sources.amazon2023 import REPO_ID, benchmark_files, meta_file, review_file
from mmsr_cli.workdir import DatasetDir

from conftest import tiny_hf_model, one_error_line

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CATEGORIES = ("All_Beauty", "Video_Games")
MAX_LEN = 4


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def release_files(image_base: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(hub path -> bytes, image path -> bytes) of a two-category release."""
    files, images = {}, {}
    for c, cat in enumerate(CATEGORIES):
        rng = np.random.default_rng(c)
        n_items = 12
        reviews, per_user = [], {}
        for u in range(20):
            for k in range(int(rng.integers(3, 8))):
                item = f"B{c}{int(rng.integers(0, n_items)):03d}"
                ts = 1_600_000_000_000 + int(rng.integers(0, 10**9))
                reviews.append({"rating": 5.0, "title": "ok", "text": "fine", "images": [], "asin": item + "X",
                                "parent_asin": item, "user_id": f"AU{c}{u:02d}", "timestamp": ts,
                                "helpful_vote": 0, "verified_purchase": True})
                per_user.setdefault(f"AU{c}{u:02d}", []).append((item, ts))
        files[review_file(cat)] = "".join(json.dumps(r) + "\n" for r in reviews).encode()
        meta = []
        for i in range(n_items - 1):  # the last item has no metadata
            item = f"B{c}{i:03d}"
            imgs = [] if i == 0 else [
                {"thumb": f"{image_base}/{item}_thumb.jpg", "large": f"{image_base}/{item}_large.jpg",
                 "variant": "MAIN", "hi_res": None if i % 2 else f"{image_base}/{item}_hires.jpg"}]
            for im in imgs:
                for key in ("large", "hi_res"):
                    if im[key]:
                        images[urllib.parse.urlsplit(im[key]).path] = _jpeg(hash((c, i, key)) % 1000)
            meta.append({"main_category": cat, "title": f"Product {i} of {cat}", "average_rating": 4.5,
                         "rating_number": 3, "features": [f"feature {i}a", f"feature {i}b"],
                         "description": [f"Made for {cat}.", "Second line."], "price": None, "images": imgs,
                         "videos": [], "store": f"Store{i % 3}", "categories": [cat, "Sub"], "details": {},
                         "parent_asin": item, "bought_together": None})
        files[meta_file(cat)] = "".join(json.dumps(m) + "\n" for m in meta).encode()
        # The official last_out split: per user, time order, repeats dropped (earliest kept).
        parts = {"train": [], "valid": [], "test": []}
        for user, rows in per_user.items():
            rows.sort(key=lambda r: r[1])
            seen, seq = set(), []
            for item, ts in rows:
                if item not in seen:
                    seen.add(item)
                    seq.append((item, ts))
            for k, (item, ts) in enumerate(seq):
                part = "test" if k == len(seq) - 1 else "valid" if k == len(seq) - 2 else "train"
                his = " ".join(i for i, _ in seq[:k])
                parts[part].append(f"{user},{item},5.0,{ts},{his}")
        for rel, part in zip(benchmark_files(cat, "last_out_w_his"), ("train", "valid", "test")):
            files[rel] = ("user_id,parent_asin,rating,timestamp,history\n" + "\n".join(parts[part]) + "\n").encode()
    return files, images


class Hub:
    def __init__(self, files: dict[str, bytes], images: dict[str, bytes]):
        self.files, self.images = files, images
        self.gets: list[str] = []


def _handler(hub: Hub):
    prefix = f"/datasets/{REPO_ID}/resolve/"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args) -> None:
            pass

        def _find(self):
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            if path in hub.images:
                return hub.images[path], "image/jpeg", None
            if not path.startswith(prefix):
                return None, None, "RepoNotFound"
            revision, _, name = path[len(prefix):].partition("/")
            if revision not in ("main", COMMIT):
                return None, None, "RevisionNotFound"
            if name not in hub.files:
                return None, None, "EntryNotFound"
            return hub.files[name], "application/octet-stream", None

        def _head(self, body: bytes | None, ctype: str | None, error: str | None) -> int:
            if body is None:
                self.send_response(404)
                self.send_header("X-Error-Code", error)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return 0
            start = 0
            rng = self.headers.get("Range")
            if rng and self.command == "GET":
                start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            return start

        def do_HEAD(self) -> None:
            self._head(*self._find())

        def do_GET(self) -> None:
            body, ctype, error = self._find()
            hub.gets.append(urllib.parse.urlsplit(self.path).path)
            start = self._head(body, ctype, error)
            if body is not None:
                self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), None)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    files, images = release_files(f"{base}/images")
    state = Hub(files, images)
    httpd.RequestHandlerClass = _handler(state)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", base)
    # conftest puts the session offline; this server is the hub here (huggingface_hub reads the
    # setting at import, so its module value is lifted too; children read the variable).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield state
    httpd.shutdown()
    httpd.server_close()


def _read_csv(data: bytes) -> list[list[str]]:
    return [line.split(",") for line in data.decode().splitlines()[1:]]


# ----------------------------------------------------------------------------------------------


def test_official_split_is_kept_exactly(cli, hub, tmp_path):
    name = "amazon2023-Video_Games"
    r = cli(["download", "--workdir", tmp_path, "--dataset", name, "--benchmark", "last_out_w_his",
             "--revision", COMMIT])
    assert r.exit_code == 0, r.stderr
    ds = DatasetDir.open(tmp_path, name)
    raw = ds.path("raw/amazon2023")
    for rel in [meta_file("Video_Games"), *benchmark_files("Video_Games", "last_out_w_his")]:
        assert (raw / rel).read_bytes() == hub.files[rel]  # the release's layout, byte for byte
    assert not (raw / review_file("Video_Games")).exists()
    manifest = json.loads(ds.path("manifests/download.json").read_text())
    assert manifest["options"]["revision"] == COMMIT and manifest["commit"] == COMMIT
    # largest image of each item: hi_res where there is one, else large; item 0 has no image
    images = sorted(p.name for p in ds.path(C.RAW_IMAGES_DIR).iterdir())
    assert len(images) == 10 and "B1000.jpg" not in images
    assert ds.path(f"{C.RAW_IMAGES_DIR}/B1002.jpg").read_bytes() == hub.images["/images/B1002_hires.jpg"]
    assert ds.path(f"{C.RAW_IMAGES_DIR}/B1001.jpg").read_bytes() == hub.images["/images/B1001_large.jpg"]

    r = cli(["preprocess", "--workdir", tmp_path, "--dataset", name, "--split", "official",
             "--max-len", str(MAX_LEN)])
    assert r.exit_code == 0, r.stderr
    items = pq.read_table(ds.path(C.ITEMS)).to_pylist()
    users = pq.read_table(ds.path(C.USERS)).column("user_id").to_pylist()
    item_id = [it["item_id"] for it in items]
    for part, rel in zip(C.SPLITS, benchmark_files("Video_Games", "last_out_w_his")):
        rows = [row for row in _read_csv(hub.files[rel]) if row[4]]  # a first interaction is no sample
        want = sorted((u, i, tuple(h.split()[-MAX_LEN:])) for u, i, _, _, h in rows)
        got = pq.read_table(ds.path(C.samples_file(part))).to_pylist()
        have = sorted((users[s["user_idx"]], item_id[s["target"]], tuple(item_id[h] for h in s["history"])) for s in got)
        assert have == want, part
    by_id = {it["item_id"]: it for it in items}
    assert by_id["B1003"]["features"] == ["feature 3a", "feature 3b"]
    assert by_id["B1003"]["description"] == "Made for Video_Games. Second line."
    assert by_id["B1003"]["brand"] == "Store0" and by_id["B1003"]["image_path"] == "raw/images/B1003.jpg"
    assert by_id["B1011"]["title"] is None  # no metadata line
    ts = pq.read_table(ds.path(C.INTERACTIONS)).column("timestamp").to_numpy()
    assert 1_600_000_000 <= ts.min() and ts.max() < 1_700_000_000  # milliseconds -> seconds

    # A re-run fetches no data file again (huggingface_hub's up-to-date check of local_dir).
    before = [g for g in hub.gets if "/resolve/" in g]
    r = cli(["download", "--workdir", tmp_path, "--dataset", name, "--benchmark", "last_out_w_his",
             "--revision", COMMIT])
    assert r.exit_code == 0, r.stderr
    assert [g for g in hub.gets if "/resolve/" in g] == before
    assert "(0.0 MB new, 4 already complete)" in r.stderr


def test_raw_reviews_preprocess_with_loo(cli, hub, tmp_path):
    name = "amazon2023-All_Beauty"
    r = cli(["download", "--workdir", tmp_path, "--dataset", name, "--no-images"])
    assert r.exit_code == 0, r.stderr
    r = cli(["preprocess", "--workdir", tmp_path, "--dataset", name, "--core", "2", "--max-len", "5"])
    assert r.exit_code == 0, r.stderr
    ds = DatasetDir.open(tmp_path, name)
    items = pq.read_table(ds.path(C.ITEMS))
    assert set(items.column("item_id").to_pylist()) <= {f"B0{i:03d}" for i in range(12)}  # parent_asin
    assert pq.read_table(ds.path(C.samples_file("test"))).num_rows == pq.read_table(ds.path(C.USERS)).num_rows
    # the official split needs the benchmark files
    line = one_error_line(cli(["preprocess", "--workdir", tmp_path, "--dataset", name, "--split", "official"]))
    assert "no official split files" in line and "--benchmark" in line


def test_hub_errors_are_one_line(cli, hub, tmp_path):
    line = one_error_line(cli(["download", "--workdir", tmp_path, "--dataset", "amazon2023-No_Such_Category"]))
    assert "raw/meta_categories/meta_No_Such_Category.jsonl is not in McAuley-Lab/Amazon-Reviews-2023" in line
    line = one_error_line(cli(["download", "--workdir", tmp_path, "--dataset", "amazon2023-All_Beauty",
                               "--revision", "v9"]))
    assert "--revision v9: not a revision" in line
    line = one_error_line(cli(["download", "--workdir", tmp_path, "--dataset", "amazon2023-All_Beauty",
                               "--benchmark", "random"]))
    assert "--benchmark: expected one of last_out" in line
    line = one_error_line(cli(["download", "--workdir", tmp_path, "--dataset", "synthetic", "--benchmark", "last_out"]))
    assert "--benchmark: only for the hub download of Amazon 2023" in line
    line = one_error_line(cli(["preprocess", "--workdir", tmp_path, "--dataset", "nothing", "--split", "official"]))
    assert "nothing" in line


def test_malformed_release_file_names_file_and_field(cli, hub, tmp_path):
    rel = benchmark_files("All_Beauty", "last_out")[1]
    hub.files.update({r: b"user_id,parent_asin,rating,timestamp\nU1,B1,5.0,17\n" for r in benchmark_files("All_Beauty", "last_out")})
    hub.files[rel] = b"user_id,parent_asin,rating,timestamp\nU1,B1,5.0,yesterday\n"
    name = "amazon2023-All_Beauty"
    r = cli(["download", "--workdir", tmp_path, "--dataset", name, "--benchmark", "last_out", "--no-images"])
    assert r.exit_code == 0, r.stderr
    line = one_error_line(cli(["preprocess", "--workdir", tmp_path, "--dataset", name, "--split", "official"]))
    assert f"{rel.split('/')[-1]}:2: field 'timestamp' must be an integer" in line
    for p in ("items.parquet", "samples_train.parquet"):
        assert not DatasetDir.open(tmp_path, name).path(p).exists()


@pytest.mark.slow
def test_hub_fixture_to_one_trained_epoch(cli, hub, tmp_path, one_thread):
    """The issue's bar: download a category, preprocess its official split, extract text features
    with a tiny SigLIP text tower, build codes and graphs, train MMSR one epoch."""
    name = "amazon2023-All_Beauty"
    model = tiny_hf_model("siglip-text", tmp_path / "tiny-siglip")
    w = ["--workdir", tmp_path / "work", "--dataset", name]
    steps = [
        ["download", *w, "--benchmark", "last_out_w_his", "--no-images"],
        ["preprocess", *w, "--split", "official", "--max-len", "5"],
        ["extract-features", *w, "--modality", "text", "--model", model, "--fields", "title,features,description",
         "--device", "cpu"],
        ["build-codes", *w, "--clusters", "3", "--top-k", "2"],
        ["build-graphs", *w],
        ["train", *w, "--model", "mmsr", "--epochs", "1", "--dim", "16", "--batch-size", "32", "--device", "cpu"],
    ]
    for args in steps:
        r = cli(args)
        assert r.exit_code == 0, (args[0], r.stderr)
    ds = DatasetDir.open(tmp_path / "work", name)
    import torch

    feats = torch.load(ds.path(C.features_tensor_file("text")), weights_only=True)
    feats = feats["features"] if isinstance(feats, dict) else feats
    assert tuple(feats.shape) == (12, 16)  # the SigLIP head's pooled output, one row per item
    history = json.loads(ds.path("runs/mmsr-official-s0/history.json").read_text())
    assert [h["epoch"] for h in history] == [1]


_GOOD_SPLIT = b"user_id,parent_asin,rating,timestamp\nU1,B1,5.0,17\nU1,B2,5.0,18\n"


@pytest.mark.parametrize("content, expected", [
    (b"user_id,parent_asin,rating,timestamp\nU1\x01x,B1,5.0,17\n", "field 'user_id' has a control character (U+0001)"),
    (b"user_id,parent_asin,rating,timestamp\nU1,B\x7f1,5.0,17\n", "field 'parent_asin' has a control character (U+007F)"),
    (b"user_id,parent_asin,rating,timestamp\nU1, B1,5.0,17\n", "field 'parent_asin' has leading or trailing whitespace"),
    (b"user_id,parent_asin,rating,timestamp\n\"U1 \",B1,5.0,17\n", "field 'user_id' has leading or trailing whitespace"),
    (b"user_id,parent_asin,rating,timestamp\n,B1,5.0,17\n", "field 'user_id' is empty"),
    (b"user_id,parent_asin,rating,timestamp\nU1,   ,5.0,17\n", "field 'parent_asin' is empty"),
    (b"user_id,rating,timestamp\nU1,5.0,17\n", "header line lacks column(s) parent_asin"),
    (b"U1,B1,5.0,17\n", "header line lacks column(s) user_id, parent_asin, timestamp"),
    (b"", "empty file; expected a header line"),
    (b"user_id,parent_asin,rating,timestamp\nU1,B1\n", "expected user_id,parent_asin,rating,timestamp; got 2 field(s)"),
], ids=["control-user", "control-item", "space-item", "space-user", "empty-user", "blank-item", "missing-column",
        "no-header", "empty-file", "short-row"])
def test_official_split_ids_and_columns_are_checked(cli, hub, tmp_path, content, expected):
    """The official split CSVs go through the id checks of every source (issue 21): an id with a
    control character or surrounding whitespace, an empty id, a missing column are one line
    naming the file and line, not ids silently stripped or columns taken by position."""
    parts = benchmark_files("All_Beauty", "last_out")
    hub.files.update({rel: _GOOD_SPLIT for rel in parts})
    hub.files[parts[1]] = content  # the valid split file
    name = "amazon2023-All_Beauty"
    r = cli(["download", "--workdir", tmp_path, "--dataset", name, "--benchmark", "last_out", "--no-images"])
    assert r.exit_code == 0, r.stderr
    ds = DatasetDir.open(tmp_path, name)
    line = one_error_line(cli(["preprocess", "--workdir", tmp_path, "--dataset", name, "--split", "official"]))
    assert parts[1].split("/")[-1] in line and expected in line, line
    assert not ds.path("samples_train.parquet").exists()


def test_official_split_columns_by_name_and_long_history(cli, hub, tmp_path):
    """Columns are read by their header names (another order reads the same), and a history
    field longer than csv's default field limit (131,072 characters) is read, not a traceback."""
    parts = benchmark_files("All_Beauty", "last_out_w_his")
    long_history = " ".join(f"B{i:09d}" for i in range(20000))  # ~220,000 characters
    rows = {"train": "U1,B1,5.0,17,\nU2,B1,5.0,17,\nU2,B2,5.0,18,B1\n", "valid": "U1,B2,5.0,18,B1\n",
            "test": f"U1,B3,5.0,19,{long_history}\nU2,B3,5.0,19,B1 B2\n"}
    for rel, part in zip(parts, ("train", "valid", "test")):
        header = "user_id,parent_asin,rating,timestamp,history\n"
        body = rows[part]
        if part == "valid":  # another column order
            header = "timestamp,rating,parent_asin,user_id,history\n"
            body = "18,5.0,B2,U1,B1\n"
        hub.files[rel] = (header + body).encode()
    name = "amazon2023-All_Beauty"
    r = cli(["download", "--workdir", tmp_path, "--dataset", name, "--benchmark", "last_out_w_his", "--no-images"])
    assert r.exit_code == 0, r.stderr
    r = cli(["preprocess", "--workdir", tmp_path, "--dataset", name, "--split", "official", "--core", "0"])
    assert r.exit_code == 0, r.stderr
    ds = DatasetDir.open(tmp_path, name)
    users = pq.read_table(ds.path(C.USERS)).column("user_id").to_pylist()
    item_id = pq.read_table(ds.path(C.ITEMS)).column("item_id").to_pylist()
    valid = pq.read_table(ds.path(C.samples_file("valid"))).to_pylist()
    assert [(users[s["user_idx"]], item_id[s["target"]]) for s in valid] == [("U1", "B2")]
