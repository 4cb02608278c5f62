"""The `download` stage: fetch or ingest a dataset's raw files into ``<workdir>/<dataset>/raw/``.

Four sources:

* a known Amazon 2014 category (``beauty``, ``clothing``, ...): the public 5-core review file and
  the category's metadata file over HTTP, then the images of the items that occur in the 5-core
  reviews, from the metadata's ``imUrl``;
* ``--from DIR``: an offline copy in one of the layouts of :mod:`mmsr_cli.contracts` (Amazon
  files, sequence format or a generic interaction log), optionally with an ``images/`` folder;
* ``amazon2023-<Category>``: Amazon Reviews 2023 from the Hugging Face hub (raw reviews, or with
  ``--benchmark`` the official 5-core split files; metadata always) through ``huggingface_hub``,
  then the images of the items, from the metadata's image list (see :mod:`mmsr_cli.amazon2023`);
* ``synthetic``: the embedded demo dataset of :mod:`mmsr_cli.synthetic` (no network).

The HTTP engine (:func:`fetch_file`) streams into ``<file>.part``, resumes an interrupted
transfer with a ``Range`` request, checks the size the server announced, retries connection
errors and 5xx answers with exponential backoff, and renames the file to its final name only
when it is complete; a final file that exists is therefore complete and is skipped on re-runs.
A failed write (a full disk) is reported at once, not retried as if the connection had failed.

Item ids and image URLs come from untrusted metadata: an image is saved as
``raw/images/<safe_item_filename(id)><ext>`` (no id can name a path outside that folder), only
http(s) URLs and at most MAX_REDIRECTS http(s) redirects are followed, the answer must be an
image both by its Content-Type and by its first bytes (the extension is taken from the bytes),
and no more than ``max_image_bytes`` are read. A data file answered with an HTML page (a login or
error page) is refused.
"""

from __future__ import annotations

import ast
import filecmp
import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from . import __version__
from . import contracts as C
from .errors import MmsrError
from .workdir import DatasetDir, atomic_path, write_bytes_atomic

# ----------------------------------------------------------------------------------------------
# Known datasets

# McAuley et al.'s 2014 release (SNAP/UCSD): reviews_<Category>_5.json.gz and meta_<Category>.json.gz
AMAZON_BASE_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
AMAZON_CATEGORIES = {
    "beauty": "Beauty",
    "clothing": "Clothing_Shoes_and_Jewelry",
    "sports": "Sports_and_Outdoors",
    "toys": "Toys_and_Games",
    "kitchen": "Home_and_Kitchen",
    "phone": "Cell_Phones_and_Accessories",
}
SYNTHETIC = "synthetic"
KNOWN_DATASETS = (*AMAZON_CATEGORIES, SYNTHETIC)


def amazon_urls(name: str, base_url: str | None = None) -> dict[str, str]:
    """Raw file (relative to the dataset folder) -> URL for a known Amazon dataset."""
    category = AMAZON_CATEGORIES[name]
    base = (base_url or AMAZON_BASE_URL).rstrip("/")
    return {
        C.RAW_REVIEWS: f"{base}/reviews_{category}_5.json.gz",
        C.RAW_META: f"{base}/meta_{category}.json.gz",
    }


# Raw files of each layout `preprocess` understands (relative to the dataset folder).
RAW_INTERACTIONS_CSV = "raw/interactions.csv"
RAW_INTERACTIONS_PARQUET = "raw/interactions.parquet"
LAYOUT_FILES = {
    "sequences": (C.RAW_SEQUENCES, C.RAW_ITEMS),
    "amazon2014": (C.RAW_REVIEWS, C.RAW_META),
    "generic": (RAW_INTERACTIONS_CSV, RAW_INTERACTIONS_PARQUET, C.RAW_ITEMS),
}
ALL_LAYOUT_FILES = sorted({f for files in LAYOUT_FILES.values() for f in files})


# ----------------------------------------------------------------------------------------------
# Options and results


@dataclass
class DownloadOptions:
    images: bool = True
    workers: int = 8  # concurrent image downloads
    retries: int = 5  # extra attempts after the first, per file / image
    timeout: float = 60.0  # seconds without data before a connection attempt fails
    base_url: str | None = None  # replaces AMAZON_BASE_URL (mirrors, tests)
    from_dir: Path | None = None
    backoff: float = 1.0  # seconds before the first retry; doubles with each further one
    max_image_bytes: int = 10 << 20
    chunk_size: int = 1 << 20
    benchmark: str | None = None  # Amazon 2023: an official split instead of the raw reviews
    revision: str | None = None  # Amazon 2023: hub revision (branch, tag or commit)

    def validate(self) -> None:
        C.RANGE_DOWNLOAD_WORKERS.check("--workers", self.workers)
        C.RANGE_RETRIES.check("--retries", self.retries)
        C.RANGE_TIMEOUT.check("--timeout", self.timeout)
        if self.base_url is not None:
            check_http_url(self.base_url, "--base-url")


@dataclass
class FetchResult:
    url: str
    path: Path
    size: int  # bytes of the final file
    downloaded: int  # bytes transferred by this call (0 when skipped)
    skipped: bool  # the final file was already complete


@dataclass
class ImageResult:
    ok: int = 0  # images present after this run (new and already there)
    new: int = 0  # of which fetched or copied now
    no_url: int = 0  # items without an image URL in the metadata
    failed: dict[str, str] = field(default_factory=dict)  # item id -> reason
    bytes: int = 0  # bytes fetched or copied now
    skipped: list[str] = field(default_factory=list)  # --from: files of images/ that are not images


@dataclass
class DownloadResult:
    dataset: str
    source: str  # "amazon2014", "amazon2023", "from", "synthetic"
    layout: str  # key of LAYOUT_FILES
    files: list[str]  # raw files written or kept, relative to the dataset folder
    bytes: int  # total size of `files`
    transferred: int  # bytes fetched or copied by this run
    skipped: int  # files already complete
    images: ImageResult | None
    counts: dict[str, int] = field(default_factory=dict)
    commit: str | None = None  # Amazon 2023: the hub commit the files come from

    def summary(self) -> str:
        mb = self.bytes / 1e6
        parts = [
            f"download {self.dataset}: {len(self.files)} file(s), {mb:.1f} MB "
            f"({self.transferred / 1e6:.1f} MB new, {self.skipped} already complete)"
        ]
        if self.images is not None:
            im = self.images
            parts.append(f"images {im.ok} ok ({im.new} new), {len(im.failed)} failed, {im.no_url} without image source")
            if im.skipped:
                shown = ", ".join(im.skipped[:5]) + (", ..." if len(im.skipped) > 5 else "")
                parts.append(f"{len(im.skipped)} file(s) of images/ skipped, not {'/'.join(C.IMAGE_EXTENSIONS)}: {shown}")
        for key, value in self.counts.items():
            parts.append(f"{value} {key}")
        if self.commit:
            parts.append(f"commit {self.commit[:12]}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# HTTP engine


def check_http_url(url: str, what: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise MmsrError(f"{what}: expected an http(s) URL, got {url!r}")
    return url


class _Retryable(Exception):
    """A failure worth another attempt: connection trouble, a 5xx answer, a truncated body."""


_RETRY_STATUS = {408, 425, 429}


def _request(url: str, headers: Mapping[str, str] | None = None) -> urllib.request.Request:
    base = {"User-Agent": f"mmsr/{__version__}", "Accept-Encoding": "identity"}
    return urllib.request.Request(url, headers={**base, **(headers or {})})


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$")


MAX_REDIRECTS = 5


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow at most MAX_REDIRECTS redirects, and only to http(s) URLs.

    Image URLs come from untrusted metadata, and so do the servers' answers: urllib alone
    refuses file:// targets but would follow a redirect to ftp://.
    """

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        parts = urllib.parse.urlsplit(newurl)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise urllib.error.HTTPError(
                req.full_url, code, f"redirect to {newurl[:200]!r} refused (not http(s))", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def _open(url: str, headers: Mapping[str, str], timeout: float):
    """urlopen with errors sorted into retryable ones and final ones (MmsrError)."""
    try:
        return _OPENER.open(_request(url, headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code >= 500 or e.code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {e.code} {e.reason}") from e
        raise _HttpFinal(e.code, e.reason, e.headers) from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise _Retryable(f"{type(e).__name__}: {reason}") from e


class _HttpFinal(Exception):
    def __init__(self, code: int, reason: str, headers) -> None:
        super().__init__(f"HTTP {code} {reason}")
        self.code, self.reason, self.headers = code, reason, headers


def _checksum_file(part: Path) -> Path:
    return part.with_name(part.name + ".sha256")


def _drop_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _checksum_file(part).unlink(missing_ok=True)


def _verified_part(part: Path):
    """Where to resume ``part``: (bytes, running sha256 of them).

    While a part is written, ``<part>.sha256`` records the size and checksum of what has been
    appended so far. On resume the recorded prefix must match it: a longer tail (appended, not
    yet recorded, when the run was killed) is cut off, and a prefix that fails the check (or an
    unreadable record) is deleted, so the transfer restarts. A part without a record (left by an
    older mmsr) is taken as it is.
    """
    digest = hashlib.sha256()
    if not part.exists():
        return 0, digest
    size = part.stat().st_size
    record = _checksum_file(part)
    expected = None
    if record.exists():
        try:
            n_text, expected = record.read_text().split()
            n = int(n_text)
        except (OSError, ValueError):
            n = -1
    else:
        n = size
    ok = 0 <= n <= size
    if ok:
        with open(part, "rb") as f:
            left = n
            while left and ok:
                block = f.read(min(left, 1 << 20))
                ok = bool(block)
                digest.update(block)
                left -= len(block)
        ok = ok and (expected is None or digest.hexdigest() == expected)
    if not ok:
        _drop_part(part)
        return 0, hashlib.sha256()
    if size > n:
        os.truncate(part, n)
    return n, digest


def _fetch_once(
    url: str,
    part: Path,
    opts: DownloadOptions,
    on_bytes: Callable[[int, int | None], None] | None,
    transferred: list[int],
) -> None:
    """One attempt: continue ``part`` from its current size; adds the bytes received to
    ``transferred[0]`` (also when the attempt fails half-way).

    Raises _Retryable when the file is not complete yet (the data received so far stays in
    ``part`` for the next attempt), _HttpFinal on an answer that another attempt cannot fix.
    """
    have, digest = _verified_part(part)
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = _open(url, headers, opts.timeout)
    except _HttpFinal as e:
        if e.code == 416 and have:
            # Nothing left to send from offset `have`: complete if that is the file's size.
            m = _UNSATISFIED_RANGE.match(e.headers.get("Content-Range") or "")
            if m and int(m.group(1)) == have:
                return
            _drop_part(part)
            raise _Retryable("server refused to resume; restarting from the beginning") from e
        raise
    with resp:
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range") or "")
            if not m or int(m.group(1)) != have:
                _drop_part(part)
                raise _Retryable(f"server answered with another range ({resp.headers.get('Content-Range')}); restarting")
            total = int(m.group(3)) if m.group(3) != "*" else int(m.group(2)) + 1
            mode = "ab"
        elif resp.status == 200:
            # A full answer (the server ignored Range, or we asked for everything): start over.
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            have, mode, digest = 0, "wb", hashlib.sha256()
        else:
            raise _Retryable(f"unexpected HTTP {resp.status}")
        if _content_type(resp) == "text/html":  # a login, captive-portal or error page
            raise MmsrError(f"{url}: the server answered with an HTML page, not the data file; nothing saved")
        if on_bytes:
            on_bytes(have, total)
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        chunk = resp.read(opts.chunk_size)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Retryable(f"connection lost after {have} bytes ({type(e).__name__}: {e})") from e
                    if not chunk:
                        break
                    f.write(chunk)
                    f.flush()
                    have += len(chunk)
                    digest.update(chunk)
                    # Appends are checksummed: a resume continues only from recorded, verified bytes.
                    write_bytes_atomic(_checksum_file(part), f"{have} {digest.hexdigest()}\n".encode())
                    transferred[0] += len(chunk)
                    if on_bytes:
                        on_bytes(have, total)
        except OSError as e:  # writing, not reading (a full disk): another attempt cannot help
            kept = part.stat().st_size if part.exists() else 0
            raise MmsrError(f"{part}: cannot write ({e.strerror or e}); {kept} bytes kept, re-run to resume") from e
    if total is not None and have != total:
        if have > total:
            _drop_part(part)
            raise _Retryable(f"received {have} bytes, more than the announced {total}; restarting")
        raise _Retryable(f"connection closed after {have} of {total} bytes")


def fetch_file(
    url: str,
    dest: Path,
    opts: DownloadOptions,
    *,
    log: logging.Logger | None = None,
    on_bytes: Callable[[int, int | None], None] | None = None,
) -> FetchResult:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); skip when ``dest`` exists.

    ``on_bytes(done, total)`` reports progress. Raises MmsrError on a 4xx answer (at once,
    naming the URL) and when all attempts failed (the partial file is kept for a re-run).
    """
    log = log or logging.getLogger("mmsr.download")
    check_http_url(url, "URL")
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        _checksum_file(part).unlink(missing_ok=True)  # a record left by a kill right after the rename
        log.info("%s: already complete (%d bytes), skipped", dest, dest.stat().st_size)
        return FetchResult(url, dest, dest.stat().st_size, 0, True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    transferred = [0]
    last_error = ""
    attempts = opts.retries + 1
    for attempt in range(attempts):
        if attempt:
            delay = opts.backoff * 2 ** (attempt - 1)
            log.info("%s: retry %d/%d in %.1f s (%s)", url, attempt, opts.retries, delay, last_error)
            time.sleep(delay)
        try:
            resume_from = part.stat().st_size if part.exists() else 0
            log.info("%s: GET%s", url, f" from byte {resume_from}" if resume_from else "")
            _fetch_once(url, part, opts, on_bytes, transferred)
        except _Retryable as e:
            last_error = str(e)
            log.warning("%s: %s", url, e)
            continue
        except _HttpFinal as e:
            raise MmsrError(f"{url}: {e} (nothing saved)") from None
        if not part.exists():  # an empty body, complete by its Content-Length of 0
            part.touch()
        os.replace(part, dest)
        _checksum_file(part).unlink(missing_ok=True)
        size = dest.stat().st_size
        log.info("%s: complete, %d bytes -> %s", url, size, dest)
        return FetchResult(url, dest, size, transferred[0], False)
    kept = f"; {part.stat().st_size} bytes kept in {part.name}, re-run to resume" if part.exists() else ""
    raise MmsrError(f"{url}: download failed after {attempts} attempt(s): {last_error}{kept}")


# ----------------------------------------------------------------------------------------------
# Images

_IMAGE_TYPES = {
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/pjpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/x-ms-bmp": ".bmp",
}


def existing_image(images_dir: Path, item_id: str) -> Path | None:
    stem = C.safe_item_filename(item_id)
    for ext in C.IMAGE_EXTENSIONS:
        p = images_dir / (stem + ext)
        if p.exists():
            return p
    return None


def _image_extension(content_type: str, url: str) -> str | None:
    ext = _IMAGE_TYPES.get(content_type)
    if ext is None:  # another image/* subtype: trust the URL's suffix if it is one we know
        suffix = Path(urllib.parse.urlsplit(url).path).suffix.lower()
        ext = suffix if suffix in C.IMAGE_EXTENSIONS else None
    return ext


class _ImageRejected(Exception):
    """The server answered, but not with an image we accept (no point in retrying)."""


def fetch_image(url: str, item_id: str, images_dir: Path, opts: DownloadOptions) -> int:
    """Fetch one item image to ``images_dir/<safe name><ext>``; returns its size in bytes.

    Raises _ImageRejected or _Retryable (after all attempts) with the reason.
    """
    try:
        check = urllib.parse.urlsplit(url)
    except ValueError:
        raise _ImageRejected(f"malformed URL {url[:200]!r}") from None
    if check.scheme not in ("http", "https") or not check.netloc:
        # Metadata is untrusted: never let it read file:// or other local resources.
        raise _ImageRejected(f"not an http(s) URL: {url[:200]!r}")
    last: Exception | None = None
    for attempt in range(opts.retries + 1):
        if attempt:
            time.sleep(opts.backoff * 2 ** (attempt - 1))
        try:
            return _fetch_image_once(url, item_id, images_dir, opts)
        except _Retryable as e:
            last = e
        except _HttpFinal as e:
            raise _ImageRejected(str(e)) from None
    raise _Retryable(f"{last} (after {opts.retries + 1} attempt(s))")


def _content_type(resp) -> str:
    return (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()


# File signatures of the image types we keep: the body must be what the Content-Type claims.
_IMAGE_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF87a", ".gif"),
                (b"GIF89a", ".gif"), (b"BM", ".bmp"))


def sniff_image_extension(head: bytes) -> str | None:
    """The extension of the image type whose signature starts ``head``, else None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return next((ext for magic, ext in _IMAGE_MAGIC if head.startswith(magic)), None)


def _fetch_image_once(url: str, item_id: str, images_dir: Path, opts: DownloadOptions) -> int:
    resp = _open(url, {}, opts.timeout)
    with resp:
        content_type = _content_type(resp)
        if not content_type.startswith("image/"):
            raise _ImageRejected(f"content type {content_type or 'missing'!r} is not an image")
        if _image_extension(content_type, url) is None:  # refused before the body is fetched
            raise _ImageRejected(f"unsupported image type {content_type!r}")
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if expected is not None and expected > opts.max_image_bytes:
            raise _ImageRejected(f"{expected} bytes, over the {opts.max_image_bytes}-byte cap")
        data = bytearray()
        try:
            while True:
                chunk = resp.read(min(opts.chunk_size, opts.max_image_bytes + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
                if len(data) > opts.max_image_bytes:
                    raise _ImageRejected(f"over the {opts.max_image_bytes}-byte cap")
        except (OSError, http.client.HTTPException) as e:
            raise _Retryable(f"connection lost ({type(e).__name__}: {e})") from e
    if expected is not None and len(data) != expected:
        raise _Retryable(f"connection closed after {len(data)} of {expected} bytes")
    if not data:
        raise _ImageRejected("empty body")
    sniffed = sniff_image_extension(bytes(data[:16]))
    if sniffed is None:
        raise _ImageRejected(f"body is not an image (content type {content_type!r})")
    # The file is named by what it is: a PNG served as image/jpeg is saved as .png.
    write_bytes_atomic(images_dir / (C.safe_item_filename(item_id) + sniffed), bytes(data))
    return len(data)


def fetch_images(
    urls: Mapping[str, str],
    images_dir: Path,
    opts: DownloadOptions,
    *,
    log: logging.Logger | None = None,
    no_url: int = 0,
) -> ImageResult:
    """Fetch the images of ``urls`` (item id -> URL) with ``opts.workers`` threads.

    An image that is already there is kept; one that fails is recorded in the result (and
    the log) and does not stop the others.
    """
    log = log or logging.getLogger("mmsr.download")
    from .runtime import progress

    images_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(images_dir)
    result = ImageResult(no_url=no_url)
    todo = {}
    for item_id, url in urls.items():
        if existing_image(images_dir, item_id) is not None:
            result.ok += 1
        else:
            todo[item_id] = url
    log.info("images: %d present, %d to fetch, %d items without URL", result.ok, len(todo), no_url)
    if not todo:
        return result
    pool = ThreadPoolExecutor(max_workers=opts.workers)
    try:
        with progress() as bar:
            task = bar.add_task("images", total=len(todo))
            futures = {pool.submit(fetch_image, url, item, images_dir, opts): item for item, url in todo.items()}
            for fut in as_completed(futures):
                item = futures[fut]
                try:
                    size = fut.result()
                except (_ImageRejected, _Retryable) as e:
                    result.failed[item] = str(e)
                    log.warning("image of %s (%s): %s", item, todo[item], e)
                else:
                    result.ok += 1
                    result.new += 1
                    result.bytes += size
                bar.advance(task)
    finally:
        # On Ctrl-C or a fatal error (e.g. disk full) drop the queued images instead of
        # fetching them all first; images already written are complete files and are kept.
        pool.shutdown(wait=True, cancel_futures=True)
    result.failed = dict(sorted(result.failed.items()))
    return result


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files that a killed run left behind (atomic writes use hidden .tmp names)."""
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Amazon 2014 files


def _open_gzip_lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError, OSError) as e:
        raise MmsrError(f"{path}: not a readable gzip text file ({e}); delete it and re-run") from e


def review_asins(path: Path) -> set[str]:
    """The item ids (``asin``) of a review file (gzipped JSON lines)."""
    asins: set[str] = set()
    for lineno, line in _open_gzip_lines(path):
        if not line.strip():
            continue
        try:
            asin = json.loads(line)["asin"]
        except json.JSONDecodeError as e:
            raise MmsrError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except (KeyError, TypeError):
            raise MmsrError(f"{path}:{lineno}: field 'asin' missing") from None
        problem = C.id_problem(str(asin))
        if problem is not None:  # preprocess refuses it as well: say so before any image is fetched
            raise MmsrError(f"{path}:{lineno}: field 'asin' {problem} in {str(asin)!r}; ids are matched exactly, fix the file")
        asins.add(str(asin))
    return asins


_META_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"\\]*)['"]""")


def meta_image_urls(path: Path, asins: set[str]) -> tuple[dict[str, str], int]:
    """``imUrl`` of each item of ``asins`` in a metadata file; also the number without one.

    Metadata lines are Python dict literals: parsed with ast.literal_eval (never eval), and
    only for the items we need (a cheap regex finds the asin first).
    """
    urls: dict[str, str] = {}
    seen: set[str] = set()
    for lineno, line in _open_gzip_lines(path):
        if not line.strip():
            continue
        m = _META_ASIN.search(line)
        if m and m.group(1) not in asins:
            continue
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            raise MmsrError(f"{path}:{lineno}: not a Python dict literal") from None
        if not isinstance(record, dict) or "asin" not in record:
            raise MmsrError(f"{path}:{lineno}: field 'asin' missing")
        asin = str(record["asin"])
        if asin not in asins:
            continue
        seen.add(asin)
        url = record.get("imUrl")
        if isinstance(url, str) and url.strip():
            urls[asin] = url.strip()
    return dict(sorted(urls.items())), len(asins) - len(urls)


# ----------------------------------------------------------------------------------------------
# Stage drivers


def _remove_other_layouts(ds: DatasetDir, keep: Iterable[str], log: logging.Logger) -> None:
    """Delete raw files of another layout left by an earlier run, so `preprocess` sees one."""
    keep = set(keep)
    for rel in ALL_LAYOUT_FILES:
        p = ds.path(rel)
        if rel not in keep and p.exists():
            log.info("%s: removed (left by an earlier download of another layout)", p)
            p.unlink()


def download_amazon(ds: DatasetDir, opts: DownloadOptions, log: logging.Logger) -> DownloadResult:
    from .runtime import progress

    urls = amazon_urls(ds.name, opts.base_url)
    results = []
    with progress() as bar:
        for rel, url in urls.items():
            task = bar.add_task(Path(rel).name, total=None)

            def on_bytes(done: int, total: int | None, task=task) -> None:
                bar.update(task, completed=done, total=total)

            results.append(fetch_file(url, ds.path(rel), opts, log=log, on_bytes=on_bytes))
    _remove_other_layouts(ds, urls, log)
    images = None
    if opts.images:
        asins = review_asins(ds.path(C.RAW_REVIEWS))
        image_urls, no_url = meta_image_urls(ds.path(C.RAW_META), asins)
        images = fetch_images(image_urls, ds.path(C.RAW_IMAGES_DIR), opts, log=log, no_url=no_url)
    return DownloadResult(
        dataset=ds.name,
        source="amazon2014",
        layout="amazon2014",
        files=list(urls),
        bytes=sum(r.size for r in results),
        transferred=sum(r.downloaded for r in results),
        skipped=sum(r.skipped for r in results),
        images=images,
    )


def download_amazon2023(ds: DatasetDir, category: str, opts: DownloadOptions, log: logging.Logger) -> DownloadResult:
    from . import amazon2023

    if opts.base_url is not None:
        raise MmsrError("--base-url: not for Amazon 2023; set HF_ENDPOINT to use a mirror of the hub")
    hub = amazon2023.hub_download(ds.root, category, opts.benchmark, opts.revision, log)
    _remove_other_layouts(ds, (), log)
    images = None
    if opts.images:
        files = amazon2023.detect(ds.path(C.RAW_DIR))
        source = files.benchmarks[opts.benchmark] if opts.benchmark else files.reviews
        log_ = amazon2023.read_official(source) if opts.benchmark else amazon2023.read_reviews(source)
        urls, no_url = amazon2023.meta_image_urls(files.meta, set(log_.items))
        images = fetch_images(urls, ds.path(C.RAW_IMAGES_DIR), opts, log=log, no_url=no_url)
    return DownloadResult(
        dataset=ds.name,
        source="amazon2023",
        layout="amazon2023",
        files=hub.files,
        bytes=hub.bytes,
        transferred=hub.transferred,
        skipped=hub.skipped,
        images=images,
        commit=hub.commit,
    )


def detect_layout(src: Path) -> tuple[str, dict[str, Path]]:
    """The layout of an offline copy: (layout, raw file -> source file)."""
    if not src.is_dir():
        raise MmsrError(f"--from {src}: no such directory")

    def one(pattern: str, exact: str) -> Path | None:
        if (src / exact).is_file():
            return src / exact
        matches = sorted(p for p in src.glob(pattern) if p.is_file())
        if len(matches) > 1:
            raise MmsrError(f"--from {src}: several files match {pattern} ({', '.join(p.name for p in matches)}); keep one")
        return matches[0] if matches else None

    found = {}
    seq, items = src / "sequences.tsv", src / "items.jsonl"
    if seq.is_file():
        found["sequences"] = {C.RAW_SEQUENCES: seq, C.RAW_ITEMS: items}
    reviews = one("reviews_*.json.gz", "reviews.json.gz")
    meta = one("meta_*.json.gz", "meta.json.gz")
    if reviews or meta:
        found["amazon2014"] = {C.RAW_REVIEWS: reviews, C.RAW_META: meta}
    csv, parquet = src / "interactions.csv", src / "interactions.parquet"
    if csv.is_file() and parquet.is_file():
        raise MmsrError(f"--from {src}: both interactions.csv and interactions.parquet; keep one")
    if csv.is_file() or parquet.is_file():
        files = {RAW_INTERACTIONS_CSV: csv} if csv.is_file() else {RAW_INTERACTIONS_PARQUET: parquet}
        if items.is_file():
            files[C.RAW_ITEMS] = items
        found["generic"] = files
    if not found:
        raise MmsrError(
            f"--from {src}: no known layout; expected sequences.tsv + items.jsonl, or "
            "reviews.json.gz + meta.json.gz (Amazon 2014), or interactions.csv|parquet "
            "(+ items.jsonl), with an optional images/ folder"
        )
    if len(found) > 1:
        raise MmsrError(f"--from {src}: files of several layouts ({', '.join(found)}); keep one")
    layout, files = next(iter(found.items()))
    for rel, path in files.items():
        if path is None or not path.is_file():
            need = " + ".join(Path(r).name for r in files)
            raise MmsrError(f"--from {src}: {layout} layout needs {need}; {Path(rel).name} is missing")
    return layout, files


def _copy_atomic(src: Path, dest: Path) -> int:
    """Copy unless ``dest`` already has the same content; returns the bytes copied."""
    if dest.exists() and dest.stat().st_size == src.stat().st_size and filecmp.cmp(src, dest, shallow=False):
        return 0
    try:
        with atomic_path(dest, dest.suffix + ".tmp") as tmp:
            shutil.copyfile(src, tmp)
    except OSError as e:
        raise MmsrError(f"{src}: cannot copy to {dest} ({e.strerror or e})") from e
    return dest.stat().st_size


def ingest_from(ds: DatasetDir, opts: DownloadOptions, log: logging.Logger) -> DownloadResult:
    src = Path(opts.from_dir).expanduser().resolve()
    layout, files = detect_layout(src)
    transferred = skipped = 0
    for rel, path in files.items():
        copied = _copy_atomic(path, ds.path(rel))
        log.info("%s -> %s: %s", path, ds.path(rel), f"{copied} bytes copied" if copied else "unchanged")
        transferred += copied
        skipped += copied == 0
    _remove_other_layouts(ds, files, log)
    images = None
    src_images = src / "images"
    if opts.images and src_images.is_dir():
        images = _ingest_images(src_images, ds.path(C.RAW_IMAGES_DIR), log)
        transferred += images.bytes
    return DownloadResult(
        dataset=ds.name,
        source="from",
        layout=layout,
        files=list(files),
        bytes=sum(ds.path(rel).stat().st_size for rel in files),
        transferred=transferred,
        skipped=skipped,
        images=images,
    )


def _ingest_images(src: Path, dest: Path, log: logging.Logger) -> ImageResult:
    """Mirror the image files of ``src`` (names kept: they are item file names already)."""
    result = ImageResult()
    dest.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dest)
    wanted = set()
    for p in sorted(src.iterdir()):
        # .JPG is taken as .jpg (find_images matches extensions in any case); hidden files are not images
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in C.IMAGE_EXTENSIONS:
            log.info("%s: skipped, not an image file (extensions: %s, any case)", p, ", ".join(C.IMAGE_EXTENSIONS))
            result.skipped.append(p.name)
            continue
        wanted.add(p.name)
        copied = _copy_atomic(p, dest / p.name)
        result.ok += 1
        result.new += copied > 0
        result.bytes += copied
    for p in dest.iterdir():  # images of an earlier, different source would mislead preprocess
        if p.is_file() and p.name not in wanted:
            log.info("%s: removed (not in %s)", p, src)
            p.unlink()
    return result


def download_synthetic(ds: DatasetDir, opts: DownloadOptions, log: logging.Logger) -> DownloadResult:
    from .synthetic import generate_synthetic

    raw = ds.path(C.RAW_DIR)
    info = generate_synthetic(raw, images=opts.images)
    _remove_other_layouts(ds, LAYOUT_FILES["sequences"], log)
    files = [C.RAW_SEQUENCES, C.RAW_ITEMS, f"{C.RAW_DIR}/{info.latent_file}"]
    images = None
    if opts.images:
        images = ImageResult(ok=info.n_images, new=info.n_images, no_url=info.n_items - info.n_images)
    size = sum(ds.path(rel).stat().st_size for rel in files)
    log.info("synthetic: %d users, %d items, %d interactions", info.n_users, info.n_items, info.n_interactions)
    return DownloadResult(
        dataset=ds.name,
        source="synthetic",
        layout="sequences",
        files=files,
        bytes=size,
        transferred=size,
        skipped=0,
        images=images,
        counts={"users": info.n_users, "items": info.n_items, "interactions": info.n_interactions},
    )


MANIFEST_MAX_FAILURES = 1000  # the log has all of them


def run_download(ds: DatasetDir, opts: DownloadOptions) -> DownloadResult:
    """Run the stage for ``ds`` and record its manifest."""
    from . import amazon2023

    opts.validate()
    log = ds.logger(C.STAGE_DOWNLOAD)
    if amazon2023.category_of(ds.name) is None or opts.from_dir is not None:
        for flag, value in (("--benchmark", opts.benchmark), ("--revision", opts.revision)):
            if value is not None:
                raise MmsrError(f"{flag}: only for the hub download of Amazon 2023 (--dataset {amazon2023.DATASET_PREFIX}<Category>)")
    if opts.from_dir is not None:
        if opts.base_url is not None:
            raise MmsrError("--base-url: only for downloads, not with --from")
        result = ingest_from(ds, opts, log)
    elif ds.name == SYNTHETIC:
        if opts.base_url is not None:
            raise MmsrError("--base-url: the synthetic dataset is generated locally, it has no URL")
        result = download_synthetic(ds, opts, log)
    elif ds.name in AMAZON_CATEGORIES:
        result = download_amazon(ds, opts, log)
    elif (category := amazon2023.category_of(ds.name)) is not None:
        result = download_amazon2023(ds, category, opts, log)
    else:
        raise MmsrError(
            f"--dataset {ds.name}: unknown dataset; known: {', '.join(KNOWN_DATASETS)}, "
            "amazon2023-<Category> (or give --from DIR with a local copy)"
        )
    outputs = list(result.files)
    if ds.path(C.RAW_IMAGES_DIR).is_dir():  # preprocess reads whatever is there
        outputs.append(C.RAW_IMAGES_DIR)
    counts = {"files": len(result.files), "bytes": result.bytes, **result.counts}
    extra = {"commit": result.commit} if result.commit else {}
    if result.images is not None:
        im = result.images
        counts.update(images_ok=im.ok, images_failed=len(im.failed), images_no_url=im.no_url,
                      images_skipped=len(im.skipped))
        extra["image_failures"] = dict(list(im.failed.items())[:MANIFEST_MAX_FAILURES])
    options = {
        "source": result.source,
        "layout": result.layout,
        "images": opts.images,
    }
    if result.source == "amazon2014":
        options.update(urls=amazon_urls(ds.name, opts.base_url), retries=opts.retries, timeout=opts.timeout)
    elif result.source == "amazon2023":
        from .amazon2023 import REPO_ID

        options.update(repo=REPO_ID, revision=opts.revision, benchmark=opts.benchmark,
                       endpoint=os.environ.get("HF_ENDPOINT") or None)
    elif result.source == "from":
        options["from"] = str(Path(opts.from_dir).expanduser().resolve())
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=outputs, options=options, counts=counts, extra=extra)
    log.info("%s", result.summary())
    return result
