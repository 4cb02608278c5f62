"""Amazon 2014 (McAuley et al., SNAP/UCSD): 5-core review file + metadata file + item images.

* ``raw/reviews.json.gz``: JSON lines with ``reviewerID``, ``asin``, ``unixReviewTime`` (some
  dumps write Python literals instead of JSON; both are read);
* ``raw/meta.json.gz``: one Python-literal dict per line (``asin``, ``title``, ``categories`` as
  a list of category paths, ``brand``, ``description``, ``imUrl``), parsed with
  ``ast.literal_eval``, never ``eval``, and only for the items of the reviews.

A known category (``beauty``, ``clothing``, ...) is fetched over HTTP from the public host (or
``--base-url``), then the images of the items of the reviews from the metadata's ``imUrl``;
``--from DIR`` takes ``reviews[_*].json.gz`` + ``meta[_*].json.gz``. The same readers serve
download (which items, which image URLs) and preprocess (interactions, item texts).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterator

from .. import contracts as C
from ..errors import MmsrError
from ..runtime import progress
from .base import DownloadResult, Source
from .fetch import fetch_file, fetch_images
from .records import ItemMeta, OnBytes, RawLog, check_id, check_int64, clean_list, clean_text, iter_lines, \
    parse_record, read_review_log, required_id

BASE_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
CATEGORIES = {
    "beauty": "Beauty",
    "clothing": "Clothing_Shoes_and_Jewelry",
    "sports": "Sports_and_Outdoors",
    "toys": "Toys_and_Games",
    "kitchen": "Home_and_Kitchen",
    "phone": "Cell_Phones_and_Accessories",
}


def urls(name: str, base_url: str | None = None) -> dict[str, str]:
    """Raw file (relative to the dataset folder) -> URL for a known category."""
    category = CATEGORIES[name]
    base = (base_url or BASE_URL).rstrip("/")
    return {
        C.RAW_REVIEWS: f"{base}/reviews_{category}_5.json.gz",
        C.RAW_META: f"{base}/meta_{category}.json.gz",
    }


# ----------------------------------------------------------------------------------------------
# Reading


def _seconds(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MmsrError(f"{where}: field 'unixReviewTime' must be an integer, got {type(value).__name__}")
    return check_int64(value, where, "unixReviewTime", "seconds")


def read_reviews(path: Path, on_bytes: OnBytes | None = None) -> RawLog:
    """Reviews as interactions: user ``reviewerID``, item ``asin``, time ``unixReviewTime``."""
    return read_review_log(path, on_bytes, user="reviewerID", item="asin", time="unixReviewTime",
                           to_time=_seconds, allow_literal=True)


# Cheap look-up of a metadata line's asin, so only lines of wanted items go through literal_eval
# (the full metadata files have 10-20x more items than survive the 5-core filter).
_ASIN_RE = re.compile(r"""['"]asin['"]\s*:\s*(?:'([^'\\]*)'|"([^"\\]*)")""")


def meta_records(path: Path, wanted: set[str]) -> Iterator[tuple[str, dict, str]]:
    """(where, record, asin) of each metadata line of a wanted item; a repeated asin is an error.

    Lines whose asin is readable and not wanted are skipped without being parsed further (their
    asin is still checked: 'a ' would otherwise hide the metadata of item 'a').
    """
    first_line: dict[str, int] = {}
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        m = _ASIN_RE.search(line)
        if m is not None:
            asin = m.group(1) if m.group(1) is not None else m.group(2)
            if asin not in wanted:
                check_id(asin, where, "asin")
                continue
        rec = parse_record(line, where, allow_literal=True)
        asin = required_id(rec, "asin", where)
        if asin not in wanted:
            continue
        if asin in first_line:
            raise MmsrError(f"{where}: duplicate asin '{asin}' (first on line {first_line[asin]})")
        first_line[asin] = lineno
        yield where, rec, asin


def read_meta(path: Path, wanted: set[str]) -> dict[str, ItemMeta]:
    """Texts of the wanted items; categories: the first category path, general -> specific."""
    meta: dict[str, ItemMeta] = {}
    for where, rec, asin in meta_records(path, wanted):
        cats = rec.get("categories")
        if cats is not None:
            if not isinstance(cats, list) or not all(isinstance(p, list) for p in cats):
                raise MmsrError(f"{where}: field 'categories' must be a list of lists of strings")
            cats = cats[0] if cats else None
        meta[asin] = ItemMeta(
            title=clean_text(rec.get("title"), where, "title"),
            categories=clean_list(cats, where, "categories"),
            brand=clean_text(rec.get("brand"), where, "brand"),
            description=clean_text(rec.get("description"), where, "description"),
        )
    return meta


def image_urls(path: Path, wanted: set[str]) -> tuple[dict[str, str], int]:
    """``imUrl`` of each wanted item, and the number of wanted items without one."""
    found: dict[str, str] = {}
    for _, rec, asin in meta_records(path, wanted):
        url = rec.get("imUrl")
        if isinstance(url, str) and url.strip():
            found[asin] = url.strip()
    return dict(sorted(found.items())), len(wanted) - len(found)


# ----------------------------------------------------------------------------------------------
# The source


def _one(src: Path, pattern: str, exact: str) -> Path | None:
    if (src / exact).is_file():
        return src / exact
    matches = sorted(p for p in src.glob(pattern) if p.is_file())
    if len(matches) > 1:
        raise MmsrError(f"--from {src}: several files match {pattern} ({', '.join(p.name for p in matches)}); keep one")
    return matches[0] if matches else None


class Amazon2014(Source):
    layout = "amazon2014"
    raw_files = (C.RAW_REVIEWS, C.RAW_META)
    offline_hint = "reviews.json.gz + meta.json.gz (Amazon 2014)"
    names = tuple(CATEGORIES)
    reads = ("base_url",)  # a mirror of the host
    interaction_files = ("reviews.json.gz",)

    def download(self, ds, opts, log: logging.Logger) -> DownloadResult:
        files = urls(ds.name, opts.base_url)
        results = []
        with progress() as bar:
            for rel, url in files.items():
                task = bar.add_task(Path(rel).name, total=None)

                def on_bytes(done: int, total: int | None, task=task) -> None:
                    bar.update(task, completed=done, total=total)

                results.append(fetch_file(url, ds.path(rel), opts, log=log, on_bytes=on_bytes))
        images = None
        if opts.images:
            wanted = set(read_reviews(ds.path(C.RAW_REVIEWS)).items)
            found, no_url = image_urls(ds.path(C.RAW_META), wanted)
            images = fetch_images(found, ds.path(C.RAW_IMAGES_DIR), opts, log=log, no_url=no_url)
        return DownloadResult(
            dataset=ds.name, source=self.layout, layout=self.layout, files=list(files),
            bytes=sum(r.size for r in results), transferred=sum(r.downloaded for r in results),
            skipped=sum(r.skipped for r in results), images=images,
            options={"urls": files, "retries": opts.retries, "timeout": opts.timeout},
        )

    def offline_files(self, src: Path) -> dict[str, Path] | None:
        reviews = _one(src, "reviews_*.json.gz", "reviews.json.gz")
        meta = _one(src, "meta_*.json.gz", "meta.json.gz")
        return {C.RAW_REVIEWS: reviews, C.RAW_META: meta} if reviews or meta else None

    def read_log(self, paths: list[Path], on_bytes: OnBytes | None = None) -> RawLog:
        return read_reviews(paths[0], on_bytes)

    def read_meta(self, ds, wanted: set[str]) -> tuple[dict[str, ItemMeta], str | None]:
        path = ds.path(C.RAW_META)
        return (read_meta(path, wanted), C.RAW_META) if path.is_file() else ({}, None)


SOURCE = Amazon2014()
