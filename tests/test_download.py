"""`mmsr download`: HTTP engine (resume, retries, errors; mmsr_cli/sources/fetch.py), images, --from ingest (mmsr_cli/download.py)."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from mmsr_cli import contracts as C
from mmsr_cli.download import KNOWN_DATASETS, DownloadOptions
from mmsr_cli.sources.amazon2014 import image_urls as meta_image_urls
from mmsr_cli.sources.fetch import fetch_file, fetch_images
from mmsr_cli.errors import MmsrError
from mmsr_cli.workdir import DatasetDir

from conftest import serve_http, shared_dataset, one_error_line

FIXTURES = Path(__file__).parent / "fixtures"
SEQ_FIXTURE = FIXTURES / "download_sequences"

# A body large enough to arrive in several chunks with the small chunk size used below.
PAYLOAD = bytes(range(256)) * 64  # 16 KiB
OVERLAP_WAIT = 30.0  # seconds a held request waits for the others; reached only when they never come


def fast_opts(**kw) -> DownloadOptions:
    return DownloadOptions(**{"backoff": 0.0, "retries": 3, "timeout": 5.0, "chunk_size": 1024, **kw})


# ----------------------------------------------------------------------------------------------
# A local HTTP server with Range support and scripted misbehaviour


class ServerState:
    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}  # path -> (body, content type)
        self.truncate_once: set[str] = set()  # first GET sends half the body, then hangs up
        self.ignore_range: set[str] = set()  # always answer 200 with the whole body
        self.fail_times: dict[str, int] = {}  # path -> number of 503 answers before success
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        # With overlap = n, the first requests are held until n of them are in flight at once (or
        # OVERLAP_WAIT seconds pass): concurrency is observed without depending on timing.
        self.overlap = 0
        self.in_flight: collections.Counter = collections.Counter()  # path -> requests held
        self.max_active = 0
        self.lock = threading.Lock()
        self.overlapped = threading.Condition(self.lock)

    def add(self, path: str, body: bytes, content_type: str = "application/octet-stream") -> None:
        self.files[path] = (body, content_type)

    def gets(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]


def _handler(state: ServerState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: a hang-up ends the body

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            with state.lock:
                state.requests.append((self.path, rng))
                failing = state.fail_times.get(self.path, 0)
                if failing:
                    state.fail_times[self.path] = failing - 1
                truncate = self.path in state.truncate_once
                state.truncate_once.discard(self.path)
            if failing:
                self.send_error(503, "busy")
                return
            # Concurrency is the number of distinct files requested at once (a client's retry of a
            # held request is the same file), counted before any byte of the answer: a client that
            # has its answer may start its next request before this thread runs again.
            with state.overlapped:
                state.in_flight[self.path] += 1
                state.max_active = max(state.max_active, len(+state.in_flight))
                if state.max_active >= state.overlap:
                    state.overlapped.notify_all()
                elif not state.overlapped.wait_for(lambda: state.max_active >= state.overlap, timeout=OVERLAP_WAIT):
                    state.overlap = 0  # never reached: later requests are not held (the test fails)
                state.in_flight[self.path] -= 1
            self._answer(rng, truncate)

        def _answer(self, rng: str | None, truncate: bool) -> None:
            if self.path not in state.files:
                self.send_error(404, "Not Found")
                return
            body, ctype = state.files[self.path]
            total = len(body)
            start = 0
            if rng and self.path not in state.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= total:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{total}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            else:
                self.send_response(200)
            part = body[start:]
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            if truncate:
                self.wfile.write(part[: len(part) // 2])
                self.wfile.flush()
                return  # the connection closes with the body half sent
            self.wfile.write(part)

    return Handler


@pytest.fixture
def server():
    state = ServerState()
    with serve_http(_handler(state)) as base:
        yield base, state


# ----------------------------------------------------------------------------------------------
# HTTP engine


def test_full_download_then_skip_if_complete(server, tmp_path):
    base, state = server
    state.add("/f.bin", PAYLOAD)
    dest = tmp_path / "f.bin"
    seen = []
    r = fetch_file(f"{base}/f.bin", dest, fast_opts(), on_bytes=lambda done, total: seen.append((done, total)))
    assert dest.read_bytes() == PAYLOAD and not r.skipped and r.downloaded == len(PAYLOAD)
    assert not (tmp_path / "f.bin.part").exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(seen) > 2  # progress while streaming
    r2 = fetch_file(f"{base}/f.bin", dest, fast_opts())
    assert r2.skipped and r2.downloaded == 0 and len(state.gets("/f.bin")) == 1  # no second request


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    base, state = server
    state.add("/big.gz", PAYLOAD)
    state.truncate_once.add("/big.gz")
    dest = tmp_path / "big.gz"
    r = fetch_file(f"{base}/big.gz", dest, fast_opts())
    assert dest.read_bytes() == PAYLOAD
    assert state.gets("/big.gz") == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert r.downloaded == len(PAYLOAD)  # half in each attempt, nothing twice


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    base, state = server
    state.add("/f.bin", PAYLOAD)
    state.ignore_range.add("/f.bin")
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:5000])  # left by an earlier run
    fetch_file(f"{base}/f.bin", dest, fast_opts())
    assert state.gets("/f.bin") == ["bytes=5000-"]
    assert dest.read_bytes() == PAYLOAD  # the 200 body replaced the part, not appended to it


def test_complete_part_file_is_finished_on_416(server, tmp_path):
    base, state = server
    state.add("/f.bin", PAYLOAD)
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)  # killed just before the rename
    fetch_file(f"{base}/f.bin", tmp_path / "f.bin", fast_opts())
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()


def test_5xx_is_retried_then_succeeds_and_gives_up_after_retries(server, tmp_path):
    base, state = server
    state.add("/f.bin", PAYLOAD)
    state.fail_times["/f.bin"] = 2
    fetch_file(f"{base}/f.bin", tmp_path / "a.bin", fast_opts(retries=2))
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD and len(state.gets("/f.bin")) == 3

    state.fail_times["/f.bin"] = 10
    with pytest.raises(MmsrError, match=r"/f.bin: download failed after 2 attempt\(s\): HTTP 503"):
        fetch_file(f"{base}/f.bin", tmp_path / "b.bin", fast_opts(retries=1))
    assert not (tmp_path / "b.bin").exists()


def test_404_is_one_line_error_without_files(cli, server, tmp_path):
    base, state = server
    r = cli(["download", "--dataset", "beauty", "--base-url", f"{base}/mirror", "--workdir", tmp_path])
    line = one_error_line(r)
    assert r.exit_code == 2
    assert f"{base}/mirror/reviews_Beauty_5.json.gz: HTTP 404" in line
    raw = tmp_path / "beauty" / "raw"
    assert not (raw / "reviews.json.gz").exists() and not (raw / "reviews.json.gz.part").exists()
    assert len(state.requests) == 1  # a 404 is not retried
    assert not (tmp_path / "beauty" / "manifests" / "download.json").exists()


# ----------------------------------------------------------------------------------------------
# Amazon dataset end to end, with images


def _gz(lines: list[str]) -> bytes:
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\1" * 64


def _amazon_site(base: str, state: ServerState) -> None:
    reviews = [
        {"reviewerID": "U1", "asin": "B1", "unixReviewTime": 1},
        {"reviewerID": "U1", "asin": "B2", "unixReviewTime": 2},
        {"reviewerID": "U2", "asin": "B3", "unixReviewTime": 3},
        {"reviewerID": "U2", "asin": "B4", "unixReviewTime": 4},
        {"reviewerID": "U2", "asin": "B5", "unixReviewTime": 5},
        {"reviewerID": "U3", "asin": "../evil", "unixReviewTime": 6},
    ]
    meta = [
        {"asin": "B1", "title": "one", "categories": [["Beauty"]], "imUrl": f"{base}/img/b1.png"},
        {"asin": "B2", "title": "two", "imUrl": f"{base}/img/b2.jpg"},
        {"asin": "B3", "title": "three", "imUrl": f"{base}/img/missing.jpg"},  # 404
        {"asin": "B4", "title": "four", "imUrl": f"{base}/img/page.html"},  # not an image
        {"asin": "B5", "title": "five"},  # no imUrl
        {"asin": "../evil", "imUrl": f"{base}/img/b1.png"},
        {"asin": "X9", "imUrl": f"{base}/img/not-in-5core.png"},  # not reviewed in the 5-core file
    ]
    state.add("/amz/reviews_Beauty_5.json.gz", _gz([json.dumps(r) for r in reviews]))
    state.add("/amz/meta_Beauty.json.gz", _gz([repr(m) for m in meta]))  # Python literals
    state.add("/img/b1.png", PNG, "image/png")
    state.add("/img/b2.jpg", JPEG, "image/jpeg; charset=binary")
    state.add("/img/page.html", b"<html></html>", "text/html")
    state.add("/img/not-in-5core.png", PNG, "image/png")


def test_amazon_download_with_images_and_rerun(cli, server, tmp_path):
    base, state = server
    _amazon_site(base, state)
    state.truncate_once.add("/amz/meta_Beauty.json.gz")  # resumed within the same run
    args = ["download", "-d", "beauty", "--base-url", f"{base}/amz", "--workdir", tmp_path,
            "--workers", "3", "--retries", "1"]
    r = cli(args)
    assert r.exit_code == 0, r.stderr
    assert "images 3 ok (3 new), 2 failed, 1 without image source" in r.stderr
    raw = tmp_path / "beauty" / "raw"
    assert (raw / "reviews.json.gz").read_bytes() == state.files["/amz/reviews_Beauty_5.json.gz"][0]
    assert (raw / "meta.json.gz").read_bytes() == state.files["/amz/meta_Beauty.json.gz"][0]
    images = raw / "images"
    evil = C.safe_item_filename("../evil")
    assert sorted(p.name for p in images.iterdir()) == sorted(["B1.png", "B2.jpg", f"{evil}.png"])
    assert (images / "B2.jpg").read_bytes() == JPEG
    assert not (tmp_path / "beauty" / "evil.png").exists()
    assert state.gets("/img/not-in-5core.png") == []
    m = json.loads((tmp_path / "beauty" / "manifests" / "download.json").read_text())
    assert m["counts"] == {**m["counts"], "files": 2, "images_ok": 3, "images_failed": 2, "images_no_url": 1}
    assert set(m["image_failures"]) == {"B3", "B4"} and "404" in m["image_failures"]["B3"]
    assert "not an image" in m["image_failures"]["B4"]
    assert set(m["outputs"]) == {"raw/reviews.json.gz", "raw/meta.json.gz", "raw/images"}
    assert DatasetDir.open(tmp_path, "beauty").require("download")["stage"] == "download"

    # Re-run: data files and present images are skipped; only the failed images are tried again.
    before = len(state.requests)
    r = cli(args)
    assert r.exit_code == 0, r.stderr
    assert "0.0 MB new, 2 already complete" in r.stderr and "images 3 ok (0 new)" in r.stderr
    again = sorted(p for p, _ in state.requests[before:])
    assert again == ["/img/missing.jpg", "/img/page.html"]


def test_image_cap_and_concurrency(server, tmp_path):
    base, state = server
    for i in range(12):
        state.add(f"/i{i}.png", PNG, "image/png")
    state.add("/huge.png", PNG * 100, "image/png")
    urls = {f"I{i}": f"{base}/i{i}.png" for i in range(12)}
    urls["HUGE"] = f"{base}/huge.png"
    urls["LOCAL"] = "file:///etc/passwd"  # metadata may not read local files
    urls["BROKEN"] = "http://[::1"
    state.overlap = 4
    res = fetch_images(urls, tmp_path / "images", fast_opts(workers=4, max_image_bytes=1000))
    assert res.ok == 12 and res.new == 12
    assert state.max_active == 4  # concurrent, and limited to --workers
    assert set(res.failed) == {"HUGE", "LOCAL", "BROKEN"}
    assert "cap" in res.failed["HUGE"] and "http" in res.failed["LOCAL"]
    assert not list((tmp_path / "images").glob("HUGE*")) and not list((tmp_path / "images").glob(".*"))


def test_meta_is_parsed_as_literals_never_evaluated(tmp_path):
    meta = tmp_path / "meta.json.gz"
    marker = tmp_path / "pwned"
    meta.write_bytes(_gz([
        repr({"asin": "B1", "imUrl": "http://x/1.jpg"}),
        f"__import__('pathlib').Path({str(marker)!r}).touch()",
    ]))
    with pytest.raises(MmsrError, match=r"meta.json.gz:2: malformed record \(not JSON nor a Python literal"):
        meta_image_urls(meta, {"B1"})
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# --from ingest


def test_from_sequence_format_with_images(cli, tmp_path):
    wd = tmp_path / "wd"
    r = cli(["download", "--dataset", "my-data", "--from", SEQ_FIXTURE, "--workdir", wd])
    assert r.exit_code == 0, r.stderr
    raw = wd / "my-data" / "raw"
    for name in ("sequences.tsv", "items.jsonl", "images/A1.png", "images/A3.png"):
        assert (raw / name).read_bytes() == (SEQ_FIXTURE / name).read_bytes()
    assert not (raw / "images" / "README.txt").exists()  # not an image file
    m = DatasetDir.open(wd, "my-data").require("download")
    assert m["options"]["layout"] == "sequences" and m["options"]["from"] == str(SEQ_FIXTURE.resolve())
    assert m["counts"]["images_ok"] == 2
    assert "images 2 ok (2 new)" in r.stderr

    fingerprint = m["fingerprint"]
    r = cli(["download", "--dataset", "my-data", "--from", SEQ_FIXTURE, "--workdir", wd])
    assert r.exit_code == 0 and "0.0 MB new, 2 already complete" in r.stderr
    assert DatasetDir.open(wd, "my-data").require("download")["fingerprint"] == fingerprint


@pytest.mark.parametrize("names", [("A1.PNG", "A3.Png"), ("A1.png", "A3.PNG")], ids=["all-upper", "mixed"])
def test_from_images_in_any_case_reach_their_items_and_skipped_files_are_named(cli, tmp_path, names):
    import shutil

    import pyarrow.parquet as pq

    src = tmp_path / "src"
    shutil.copytree(SEQ_FIXTURE, src)
    for old, new in zip(("A1.png", "A3.png"), names):
        (src / "images" / old).rename(src / "images" / new)
    wd = tmp_path / "wd"
    r = cli(["download", "--dataset", "d", "--from", src, "--workdir", wd])
    assert r.exit_code == 0, r.stderr
    assert "images 2 ok (2 new)" in r.stderr
    assert "1 file(s) of images/ skipped" in r.stderr and "README.txt" in r.stderr  # said, not silent
    assert DatasetDir.open(wd, "d").require("download")["counts"]["images_skipped"] == 1
    r = cli(["preprocess", "--dataset", "d", "--workdir", wd, "--core", "0"])
    assert r.exit_code == 0, r.stderr
    items = pq.read_table(wd / "d" / C.ITEMS).to_pydict()
    paths = dict(zip(items["item_id"], items["image_path"]))
    assert paths["A1"] == f"{C.RAW_IMAGES_DIR}/{names[0]}" and paths["A3"] == f"{C.RAW_IMAGES_DIR}/{names[1]}"


def test_from_switching_layout_removes_the_old_files(cli, tmp_path):
    wd = tmp_path / "wd"
    assert cli(["download", "-d", "d", "--from", SEQ_FIXTURE, "--workdir", wd, "--no-images"]).exit_code == 0
    generic = tmp_path / "generic"
    generic.mkdir()
    (generic / "interactions.csv").write_text("user,item,timestamp\nu1,i1,5\nu1,i2,7\n")
    r = cli(["download", "-d", "d", "--from", generic, "--workdir", wd])
    assert r.exit_code == 0, r.stderr
    raw = wd / "d" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["interactions.csv"]
    m = DatasetDir.open(wd, "d").require("download")
    assert m["options"]["layout"] == "generic" and list(m["outputs"]) == ["raw/interactions.csv"]


def test_from_amazon_files_under_their_original_names(cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "reviews_Toys_and_Games_5.json.gz").write_bytes(_gz(['{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}']))
    (src / "meta_Toys_and_Games.json.gz").write_bytes(_gz([repr({"asin": "a"})]))
    r = cli(["download", "-d", "toys", "--from", src, "--workdir", tmp_path / "wd"])
    assert r.exit_code == 0, r.stderr
    raw = tmp_path / "wd" / "toys" / "raw"
    assert (raw / "reviews.json.gz").read_bytes() == (src / "reviews_Toys_and_Games_5.json.gz").read_bytes()
    assert (raw / "meta.json.gz").exists()


def test_from_shared_amazon_beauty(cli, tmp_path):
    src = shared_dataset("amazon-beauty")
    r = cli(["download", "-d", "beauty", "--from", src, "--workdir", tmp_path])
    assert r.exit_code == 0, r.stderr
    raw = tmp_path / "beauty" / "raw"
    for name in ("sequences.tsv", "items.jsonl"):
        assert hashlib.sha256((raw / name).read_bytes()).digest() == hashlib.sha256((src / name).read_bytes()).digest()
    m = DatasetDir.open(tmp_path, "beauty").require("download")
    assert m["options"]["layout"] == "sequences" and "raw/images" not in m["outputs"]


# ----------------------------------------------------------------------------------------------
# One-line errors


def test_unknown_dataset_lists_known_names(cli, tmp_path):
    line = one_error_line(cli(["download", "--dataset", "movies", "--workdir", tmp_path]))
    assert "--dataset movies: unknown dataset" in line
    assert all(name in line for name in KNOWN_DATASETS) and "--from" in line
    assert not (tmp_path / "movies" / "manifests").exists()


def test_from_missing_or_unknown_layout(cli, tmp_path):
    line = one_error_line(cli(["download", "-d", "x", "--from", tmp_path / "nope", "--workdir", tmp_path]))
    assert f"--from {tmp_path / 'nope'}: no such directory" in line

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    line = one_error_line(cli(["download", "-d", "x", "--from", empty, "--workdir", tmp_path]))
    assert f"--from {empty}: no known layout" in line
    assert "sequences.tsv + items.jsonl" in line and "reviews.json.gz + meta.json.gz" in line

    (empty / "sequences.tsv").write_text("user_id\titem_ids\n")
    line = one_error_line(cli(["download", "-d", "x", "--from", empty, "--workdir", tmp_path]))
    assert "items.jsonl is missing" in line


def test_earlier_outputs_survive_a_failed_rerun(cli, tmp_path):
    wd = tmp_path / "wd"
    assert cli(["download", "-d", "d", "--from", SEQ_FIXTURE, "--workdir", wd]).exit_code == 0
    manifest = (wd / "d" / "manifests" / "download.json").read_text()
    one_error_line(cli(["download", "-d", "d", "--from", tmp_path / "gone", "--workdir", wd]))
    assert (wd / "d" / "manifests" / "download.json").read_text() == manifest
    DatasetDir.open(wd, "d").require("download")  # outputs still match their hashes


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--workers", "0"], "--workers: must be an integer in 1..64, got 0"),
        (["--retries", "-1"], "--retries: must be an integer in 0..100, got -1"),
        (["--base-url", "ftp://mirror"], "--base-url: expected an http(s) URL"),
    ],
)
def test_bad_options(cli, tmp_path, flags, message):
    assert message in one_error_line(cli(["download", "-d", "beauty", "--workdir", tmp_path, *flags]))
