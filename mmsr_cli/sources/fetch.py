"""The HTTP engine of `mmsr download`: data files with resume, item images with strict checks.

:func:`fetch_file` streams into ``<file>.part``, resumes an interrupted transfer with a ``Range``
request, checks the size the server announced, retries connection errors and 5xx answers with
exponential backoff, and renames the file to its final name only when it is complete; a final
file that exists is therefore complete and is skipped on re-runs. A failed write (a full disk)
is reported at once, not retried as if the connection had failed.

Item ids and image URLs come from untrusted metadata: :func:`fetch_images` saves an image as
``raw/images/<safe_item_filename(id)><ext>`` (no id can name a path outside that folder), follows
only http(s) URLs and at most MAX_REDIRECTS http(s) redirects, requires an image both by its
Content-Type and by its first bytes (the extension is taken from the bytes), and reads no more
than ``max_image_bytes``. A data file answered with an HTML page (a login or error page) is refused.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .. import __version__
from .. import contracts as C
from ..errors import MmsrError
from ..runtime import progress
from ..workdir import write_bytes_atomic


@dataclass
class HttpOptions:
    workers: int = 8  # concurrent image downloads
    retries: int = 5  # extra attempts after the first, per file / image
    timeout: float = 60.0  # seconds without data before a connection attempt fails
    backoff: float = 1.0  # seconds before the first retry; doubles with each further one
    max_image_bytes: int = 10 << 20
    chunk_size: int = 1 << 20


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
    opts: HttpOptions,
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
    opts: HttpOptions,
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


def fetch_image(url: str, item_id: str, images_dir: Path, opts: HttpOptions) -> int:
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


def _fetch_image_once(url: str, item_id: str, images_dir: Path, opts: HttpOptions) -> int:
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
    opts: HttpOptions,
    *,
    log: logging.Logger | None = None,
    no_url: int = 0,
) -> ImageResult:
    """Fetch the images of ``urls`` (item id -> URL) with ``opts.workers`` threads.

    An image that is already there is kept; one that fails is recorded in the result (and
    the log) and does not stop the others.
    """
    log = log or logging.getLogger("mmsr.download")
    images_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(images_dir)
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


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files that a killed run left behind (atomic writes use hidden .tmp names)."""
    for p in folder.glob(".*.tmp"):
        p.unlink(missing_ok=True)
