"""Amazon Reviews 2023 (McAuley Lab): fetch from the Hugging Face hub, detect and read its files.

The release is the hub dataset repository ``McAuley-Lab/Amazon-Reviews-2023``. Per category
(``All_Beauty``, ``Video_Games``, ...) it holds

* ``raw/review_categories/<Category>.jsonl``: one review per line (``user_id``, ``parent_asin``,
  ``timestamp`` in milliseconds, ...);
* ``raw/meta_categories/meta_<Category>.jsonl``: one item per line (``parent_asin``, ``title``,
  ``features`` and ``description`` lists, ``categories``, ``store``, ``images`` with
  ``thumb``/``large``/``hi_res`` URLs);
* ``benchmark/5core/<split>/<Category>.{train,valid,test}.csv``: the official 5-core splits
  (``user_id,parent_asin,rating,timestamp``; the ``*_w_his`` variants add a ``history`` column).

A dataset named ``amazon2023-<Category>`` is downloaded into ``raw/amazon2023/`` in that same
layout with :func:`huggingface_hub.hf_hub_download` (its resume of partial files, its up-to-date
checks, ``--revision`` pinning and the ``HF_ENDPOINT`` mirror variable), so a snapshot of the
release copied there by hand reads the same way. Items are ``parent_asin`` as in the benchmark.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import contracts as C
from ..errors import MmsrError
from .base import DownloadResult, Source
from .fetch import fetch_images
from .records import ItemMeta, LogBuilder, OnBytes, RawLog, check_int64, clean_list, clean_text, iter_lines, \
    jsonl_records, read_review_log, required_id

REPO_ID = "McAuley-Lab/Amazon-Reviews-2023"
DATASET_PREFIX = "amazon2023-"
RAW_SUBDIR = f"{C.RAW_DIR}/amazon2023"  # the release's layout below this folder
BENCHMARK_SPLITS = ("last_out", "last_out_w_his", "timestamp", "timestamp_w_his")
SPLIT_FILES = ("train", "valid", "test")
# Image size keys of a metadata image, largest first.
IMAGE_SIZES = ("hi_res", "large", "thumb")


def category_of(dataset: str) -> str | None:
    """``Video_Games`` for the dataset name ``amazon2023-Video_Games``; None for other names."""
    if not dataset.startswith(DATASET_PREFIX):
        return None
    category = dataset[len(DATASET_PREFIX):]
    if not category:
        raise MmsrError(f"--dataset {dataset}: name the category, e.g. {DATASET_PREFIX}All_Beauty")
    return category


def review_file(category: str) -> str:
    return f"raw/review_categories/{category}.jsonl"


def meta_file(category: str) -> str:
    return f"raw/meta_categories/meta_{category}.jsonl"


def benchmark_files(category: str, split: str) -> list[str]:
    return [f"benchmark/5core/{split}/{category}.{part}.csv" for part in SPLIT_FILES]


# ----------------------------------------------------------------------------------------------
# Download


@dataclass
class HubFiles:
    files: list[str]  # relative to the dataset folder
    bytes: int
    transferred: int  # bytes of the files that were absent or changed before this call
    skipped: int  # files already up to date
    commit: str | None  # the revision's commit hash, as the hub reported it


def hub_download(ds_root: Path, category: str, benchmark: str | None, revision: str | None,
                 log: logging.Logger) -> HubFiles:
    """Reviews + metadata, or the ``benchmark`` split files + metadata, into ``raw/amazon2023/``."""
    # huggingface_hub: only for the hub download
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    if benchmark is not None and benchmark not in BENCHMARK_SPLITS:
        raise MmsrError(f"--benchmark: expected one of {', '.join(BENCHMARK_SPLITS)}, got {benchmark!r}")
    names = [meta_file(category)]
    names += benchmark_files(category, benchmark) if benchmark else [review_file(category)]
    local_dir = ds_root / RAW_SUBDIR
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not when huggingface_hub was imported
    files, size, transferred, skipped = [], 0, 0, 0
    for name in names:
        before = _stamp(local_dir / name)
        try:
            path = hf_hub_download(
                REPO_ID, name, repo_type="dataset", revision=revision, local_dir=local_dir, endpoint=endpoint
            )
        except hf_errors.RevisionNotFoundError:
            raise MmsrError(f"--revision {revision}: not a revision of {REPO_ID}") from None
        except hf_errors.RemoteEntryNotFoundError:
            raise MmsrError(
                f"--dataset {DATASET_PREFIX}{category}: {name} is not in {REPO_ID} "
                "(category names are spelled as in the release, e.g. All_Beauty, Video_Games)"
            ) from None
        except hf_errors.RepositoryNotFoundError:
            raise MmsrError(f"{endpoint or 'huggingface.co'}: dataset {REPO_ID} not found") from None
        except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MmsrError(f"{name}: download from {endpoint or 'huggingface.co'} failed ({first})") from None
        files.append(f"{RAW_SUBDIR}/{name}")
        file_size = Path(path).stat().st_size
        size += file_size
        unchanged = before is not None and before == _stamp(Path(path))
        skipped += unchanged
        transferred += 0 if unchanged else file_size
        log.info("%s -> %s (%s)", name, path, "up to date" if unchanged else f"{file_size} bytes")
    return HubFiles(files, size, transferred, skipped, _local_commit(local_dir, names[0]))


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _local_commit(local_dir: Path, name: str) -> str | None:
    """The commit hash huggingface_hub recorded for a file it downloaded into ``local_dir``."""
    try:  # a private module of huggingface_hub: the commit is then simply not recorded
        from huggingface_hub._local_folder import read_download_metadata

        meta = read_download_metadata(local_dir, name)
    except (ImportError, OSError, ValueError):
        return None
    return meta.commit_hash if meta is not None else None


def image_url(images, where: str) -> str | None:
    """The largest URL of the main image (variant ``MAIN``, else the first) of a metadata record."""
    if images is None:
        return None
    if not isinstance(images, list) or not all(isinstance(im, dict) for im in images):
        raise MmsrError(f"{where}: field 'images' must be a list of objects")
    if not images:
        return None
    main = next((im for im in images if im.get("variant") == "MAIN"), images[0])
    for key in IMAGE_SIZES:
        url = main.get(key)
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            return url
    return None


def meta_image_urls(path: Path, wanted: set[str]) -> tuple[dict[str, str], int]:
    """Image URL of each wanted item (largest size of its main image), and the number without one."""
    urls: dict[str, str] = {}
    for where, rec, item in jsonl_records(path, "parent_asin", unique=False):
        if item in wanted:
            url = image_url(rec.get("images"), where)
            if url:
                urls[item] = url
    return dict(sorted(urls.items())), len(wanted) - len(urls)


# ----------------------------------------------------------------------------------------------
# Detecting and reading the files in raw/amazon2023/


@dataclass
class Files:
    category: str
    reviews: Path | None
    meta: Path | None
    benchmarks: dict[str, list[Path]]  # split -> [train, valid, test]


def detect(raw: Path) -> Files | None:
    """The release's files under ``raw/amazon2023/`` (one category), or None when there are none."""
    root = raw / "amazon2023"
    if not root.is_dir():
        return None
    cats = {p.name[: -len(".jsonl")] for p in (root / "raw/review_categories").glob("*.jsonl")}
    cats |= {p.name[len("meta_"): -len(".jsonl")] for p in (root / "raw/meta_categories").glob("meta_*.jsonl")}
    cats |= {p.name[: -len(".train.csv")] for p in (root / "benchmark/5core").glob("*/*.train.csv")}
    if not cats:
        return None
    if len(cats) > 1:
        raise MmsrError(f"{root}: files of several categories ({', '.join(sorted(cats))}); keep one")
    (cat,) = cats
    benchmarks = {}
    for split in BENCHMARK_SPLITS:
        paths = [root / rel for rel in benchmark_files(cat, split)]
        if any(p.is_file() for p in paths):
            for p in paths:
                if not p.is_file():
                    raise MmsrError(f"{p}: file not found (the {split} split needs train, valid and test)")
            benchmarks[split] = paths
    reviews, meta = root / review_file(cat), root / meta_file(cat)
    return Files(cat, reviews if reviews.is_file() else None, meta if meta.is_file() else None, benchmarks)


def _millis(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MmsrError(f"{where}: field 'timestamp' must be an integer (milliseconds)")
    try:
        return check_int64(int(value), where, "timestamp", "milliseconds")
    except (ValueError, OverflowError):  # '1.5', 'x', NaN, Infinity
        raise MmsrError(f"{where}: field 'timestamp' must be an integer (milliseconds), got {value!r}") from None


def read_reviews(path: Path, on_bytes: OnBytes | None = None) -> RawLog:
    """Reviews as interactions: user ``user_id``, item ``parent_asin``, time ``timestamp`` (ms)."""
    return read_review_log(path, on_bytes, user="user_id", item="parent_asin", time="timestamp",
                           to_time=_millis, allow_literal=False, ts_per_second=1000)


#: columns of the official split files that are read, found by name in their header line
OFFICIAL_COLUMNS = ("user_id", "parent_asin", "timestamp")


def _csv_fields(line: str, where: str) -> list[str]:
    if len(line) > csv.field_size_limit():  # a long history column: the line is in memory already
        csv.field_size_limit(len(line))
    try:
        return next(csv.reader([line]))
    except csv.Error as e:  # a field over csv's size limit, a stray quote in strict mode, ...
        raise MmsrError(f"{where}: not a readable CSV line ({e})") from None


def _official_header(fields: list[str], where: str) -> dict[str, int]:
    """Column name -> index of the read columns, from a split file's header line."""
    names = [f.strip() for f in fields]
    missing = [c for c in OFFICIAL_COLUMNS if c not in names]
    if missing:
        raise MmsrError(
            f"{where}: header line lacks column(s) {', '.join(missing)} (expected "
            f"user_id,parent_asin,rating,timestamp[,history]), got {','.join(fields)[:80]!r}"
        )
    return {c: names.index(c) for c in OFFICIAL_COLUMNS}


def read_official(paths: list[Path], on_bytes: OnBytes | None = None) -> RawLog:
    """The three split files of one official split; the frame gains ``split`` (0, 1, 2).

    Columns are found by name in each file's header line; ids go through the checks of every
    source (records.required_id: no empty ids, control characters or surrounding whitespace).
    Histories are not read from the ``history`` column of the ``*_w_his`` files: they are the
    user's earlier rows in time order, which is what the release wrote there.
    """
    rows = LogBuilder()
    split_col: list[int] = []
    offset = 0  # bytes of the files before this one, for the progress callback
    for split_idx, path in enumerate(paths):
        progress = None if on_bytes is None else (lambda done, offset=offset: on_bytes(offset + done))
        offset += path.stat().st_size
        columns: dict[str, int] | None = None
        for lineno, line in iter_lines(path, progress):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            fields = _csv_fields(line, where)
            if columns is None:
                columns = _official_header(fields, where)
                continue
            if len(fields) <= max(columns.values()):
                raise MmsrError(f"{where}: expected user_id,parent_asin,rating,timestamp; got {len(fields)} field(s)")
            record = {name: fields[i] for name, i in columns.items()}
            user, item = required_id(record, "user_id", where), required_id(record, "parent_asin", where)
            rows.add(user, item, _millis(record["timestamp"].strip(), where))
            split_col.append(split_idx)
        if columns is None:
            raise MmsrError(f"{path}: empty file; expected a header line user_id,parent_asin,rating,timestamp and rows")
    return rows.log(1000, split=np.asarray(split_col, dtype=np.int8))


def _string_list(value, where: str, name: str) -> list[str] | None:
    """A list of strings with the blanks dropped; a plain string counts as a list of one."""
    if isinstance(value, str):
        value = [value]
    return clean_list(value, where, name)


def read_meta(path: Path, wanted: set[str]) -> dict[str, ItemMeta]:
    """Item texts of the wanted items: title, features, description (joined), categories, store."""
    meta: dict[str, ItemMeta] = {}
    for where, rec, item in jsonl_records(path, "parent_asin"):
        if item not in wanted:
            continue
        description = _string_list(rec.get("description"), where, "description")
        meta[item] = ItemMeta(
            title=clean_text(rec.get("title"), where, "title"),
            categories=_string_list(rec.get("categories"), where, "categories"),
            brand=clean_text(rec.get("store"), where, "store"),
            description=" ".join(description) if description else None,
            features=_string_list(rec.get("features"), where, "features"),
        )
    return meta


# ----------------------------------------------------------------------------------------------
# The source


class Amazon2023(Source):
    layout = "amazon2023"
    name_pattern = f"{DATASET_PREFIX}<Category>"
    reads = ("benchmark", "revision")
    base_url_refused = "not for Amazon 2023; set HF_ENDPOINT to use a mirror of the hub"
    interaction_files = ("amazon2023/",)

    def downloads(self, dataset: str) -> bool:
        return category_of(dataset) is not None

    def download(self, ds, opts, log: logging.Logger) -> DownloadResult:
        hub = hub_download(ds.root, category_of(ds.name), opts.benchmark, opts.revision, log)
        images = None
        if opts.images:
            files = detect(ds.path(C.RAW_DIR))
            log_ = read_official(files.benchmarks[opts.benchmark]) if opts.benchmark else read_reviews(files.reviews)
            urls, no_url = meta_image_urls(files.meta, set(log_.items))
            images = fetch_images(urls, ds.path(C.RAW_IMAGES_DIR), opts, log=log, no_url=no_url)
        return DownloadResult(
            dataset=ds.name, source=self.layout, layout=self.layout, files=hub.files, bytes=hub.bytes,
            transferred=hub.transferred, skipped=hub.skipped, images=images, commit=hub.commit,
            options={"repo": REPO_ID, "revision": opts.revision, "benchmark": opts.benchmark,
                     "endpoint": os.environ.get("HF_ENDPOINT") or None},
        )

    def present(self, ds) -> list[str]:
        return ["amazon2023"] if detect(ds.path(C.RAW_DIR)) is not None else []

    def inputs(self, ds, split: str) -> list[Path]:
        """The review file, or the three files of the official split, of ``raw/amazon2023/``."""
        files = detect(ds.path(C.RAW_DIR))
        if split == "official":
            if not files.benchmarks:
                raise MmsrError(
                    f"{ds.path(RAW_SUBDIR)}: no official split files; run `mmsr download --dataset "
                    f"{ds.name} --benchmark last_out_w_his` (or another of {', '.join(BENCHMARK_SPLITS)})"
                )
            if len(files.benchmarks) > 1:
                raise MmsrError(
                    f"{ds.path(RAW_SUBDIR)}: files of several official splits ({', '.join(files.benchmarks)}); keep one"
                )
            return next(iter(files.benchmarks.values()))
        if files.reviews is None:
            raise MmsrError(
                f"{ds.path(RAW_SUBDIR)}: no review file; use --split official for the benchmark "
                f"files, or run `mmsr download --dataset {ds.name}` for the reviews"
            )
        return [files.reviews]

    def read_log(self, paths: list[Path], on_bytes: OnBytes | None = None) -> RawLog:
        return read_official(paths, on_bytes) if len(paths) > 1 else read_reviews(paths[0], on_bytes)

    def read_meta(self, ds, wanted: set[str]) -> tuple[dict[str, ItemMeta], str | None]:
        path = detect(ds.path(C.RAW_DIR)).meta
        if path is None:
            return {}, None
        return read_meta(path, wanted), str(path.relative_to(ds.root))


SOURCE = Amazon2023()
