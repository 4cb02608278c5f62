"""The `download` stage: fetch or ingest a dataset's raw files into ``<workdir>/<dataset>/raw/``.

Where the files come from is a source's business (:mod:`mmsr_cli.sources`): a known dataset
name is fetched by the source that claims it (Amazon 2014 categories over HTTP, Amazon 2023 from
the Hugging Face hub, the generated synthetic set); ``--from DIR`` is an offline copy in the
layout of one source, copied file by file, with an optional ``images/`` folder. This module
records the result: raw files of another layout left by an earlier run are removed (so
`preprocess` sees one), and the manifest lists the files, counts and image failures.
"""

from __future__ import annotations

import filecmp
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import contracts as C
from . import sources
from .errors import MmsrError
from .sources.base import DownloadResult, refuse_unread_options
from .sources.fetch import HttpOptions, ImageResult, check_http_url, remove_stale_temporaries
from .workdir import DatasetDir, atomic_path

KNOWN_DATASETS = sources.known_datasets()


@dataclass
class DownloadOptions(HttpOptions):
    images: bool = True
    base_url: str | None = None  # replaces the Amazon 2014 host (mirrors, tests)
    from_dir: Path | None = None
    benchmark: str | None = None  # Amazon 2023: an official split instead of the raw reviews
    revision: str | None = None  # Amazon 2023: hub revision (branch, tag or commit)

    def validate(self) -> None:
        C.RANGE_DOWNLOAD_WORKERS.check("--workers", self.workers)
        C.RANGE_RETRIES.check("--retries", self.retries)
        C.RANGE_TIMEOUT.check("--timeout", self.timeout)
        if self.base_url is not None:
            check_http_url(self.base_url, "--base-url")


def _remove_other_layouts(ds: DatasetDir, keep: Iterable[str], log: logging.Logger) -> None:
    """Delete raw files of another layout left by an earlier run, so `preprocess` sees one."""
    keep = set(keep)
    for rel in sources.all_raw_files():
        p = ds.path(rel)
        if rel not in keep and p.exists():
            log.info("%s: removed (left by an earlier download of another layout)", p)
            p.unlink()


# ----------------------------------------------------------------------------------------------
# --from DIR


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
    source, files = sources.detect_offline(src)
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
        layout=source.layout,
        files=list(files),
        bytes=sum(ds.path(rel).stat().st_size for rel in files),
        transferred=transferred,
        skipped=skipped,
        images=images,
        options={"from": str(src)},
    )


def _ingest_images(src: Path, dest: Path, log: logging.Logger) -> ImageResult:
    """Mirror the image files of ``src`` (names kept: they are item file names already)."""
    result = ImageResult()
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
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


# ----------------------------------------------------------------------------------------------
# The stage


MANIFEST_MAX_FAILURES = 1000  # the log has all of them


def run_download(ds: DatasetDir, opts: DownloadOptions) -> DownloadResult:
    """Run the stage for ``ds`` and record its manifest."""
    opts.validate()
    log = ds.logger(C.STAGE_DOWNLOAD)
    if opts.from_dir is not None:
        refuse_unread_options(opts, (), "only for downloads, not with --from")
        result = ingest_from(ds, opts, log)
    else:
        source = sources.for_dataset(ds.name)
        source.check_options(opts)
        result = source.download(ds, opts, log)
        _remove_other_layouts(ds, source.raw_files, log)
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
    options = {"source": result.source, "layout": result.layout, "images": opts.images, **result.options}
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=outputs, options=options, counts=counts, extra=extra)
    log.info("%s", result.summary())
    return result
