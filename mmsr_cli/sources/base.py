"""What a raw data source is: the interface every layout module of :mod:`mmsr_cli.sources` fills in.

A source knows one layout of ``<dataset>/raw/``. It may

* download datasets by name (``mmsr download --dataset NAME``): :meth:`Source.downloads`,
  :meth:`Source.download`;
* recognise an offline copy (``mmsr download --from DIR``): :meth:`Source.offline_files`;
* read its raw files for ``mmsr preprocess``: :attr:`Source.interaction_files`,
  :meth:`Source.present`, :meth:`Source.inputs`, :meth:`Source.read_log`, :meth:`Source.read_meta`.

``download`` and ``preprocess`` know no layout themselves; they ask the registry
(:mod:`mmsr_cli.sources`), so a layout's files are named, detected and parsed in its module only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import contracts as C
from ..errors import MmsrError
from .fetch import ImageResult
from .records import ItemMeta, OnBytes, RawLog, read_items_jsonl

if TYPE_CHECKING:
    from ..download import DownloadOptions
    from ..workdir import DatasetDir


@dataclass
class DownloadResult:
    dataset: str
    source: str  # "amazon2014", "amazon2023", "from", "synthetic"
    layout: str  # the layout of raw/: a source's ``layout``
    files: list[str]  # raw files written or kept, relative to the dataset folder
    bytes: int  # total size of `files`
    transferred: int  # bytes fetched or copied by this run
    skipped: int  # files already complete
    images: ImageResult | None
    counts: dict[str, int] = field(default_factory=dict)
    commit: str | None = None  # Amazon 2023: the hub commit the files come from
    options: dict[str, Any] = field(default_factory=dict)  # source-specific options for the manifest

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


HUB_ONLY = "only for the hub download of Amazon 2023 (--dataset amazon2023-<Category>)"


def refuse_unread_options(opts: "DownloadOptions", reads: tuple[str, ...], base_url_why: str) -> None:
    """One line naming the first source-specific download option given but not in ``reads``."""
    for flag, attr in (("--benchmark", "benchmark"), ("--revision", "revision")):
        if attr not in reads and getattr(opts, attr) is not None:
            raise MmsrError(f"{flag}: {HUB_ONLY}")
    if "base_url" not in reads and opts.base_url is not None:
        raise MmsrError(f"--base-url: {base_url_why}")


class Source:
    """One layout of raw/ (see the module docstring). Subclasses set the class attributes and
    override the methods of what they do; the defaults say "not this source"."""

    layout: str = ""  # the layout's name, recorded in the download manifest
    raw_files: tuple[str, ...] = ()  # files of raw/ (relative to the dataset folder) this layout owns
    names: tuple[str, ...] = ()  # dataset names `download` fetches with this source, for --help
    name_pattern: str | None = None  # a family of names it fetches, e.g. "amazon2023-<Category>"
    reads: tuple[str, ...] = ()  # source-specific download options it reads: base_url, benchmark, revision
    base_url_refused: str = ""  # why --base-url does not apply (when it does not read it)
    offline_hint: str = ""  # --from: the files that make this layout, for the "no known layout" message
    interaction_files: tuple[str, ...] = ()  # preprocess: the interaction files it reads, relative to raw/

    # -- download --------------------------------------------------------------------------------

    def downloads(self, dataset: str) -> bool:
        """Whether ``mmsr download --dataset <dataset>`` (no --from) is this source's to fetch."""
        return dataset in self.names

    def check_options(self, opts: "DownloadOptions") -> None:
        """Refuse a download option this source does not read (one line naming it)."""
        refuse_unread_options(opts, self.reads, self.base_url_refused)

    def download(self, ds: "DatasetDir", opts: "DownloadOptions", log: logging.Logger) -> DownloadResult:
        raise NotImplementedError(f"{type(self).__name__} downloads nothing")

    def offline_files(self, src: Path) -> dict[str, Path] | None:
        """``--from src``: raw file (relative to the dataset folder) -> file of ``src`` to copy
        there, or None when ``src`` holds no file of this layout. A file the layout needs is
        reported missing by the caller (a value that is None or not a file)."""
        return None

    # -- preprocess ------------------------------------------------------------------------------

    def present(self, ds: "DatasetDir") -> list[str]:
        """The interaction files of this layout found in ``ds``'s raw/ (names as in ``interaction_files``)."""
        return [name for name in self.interaction_files if ds.path(f"{C.RAW_DIR}/{name}").is_file()]

    def format(self, ds: "DatasetDir") -> str:
        """The raw format recorded by preprocess (the layout, or finer where it has several)."""
        return self.layout

    def inputs(self, ds: "DatasetDir", split: str) -> list[Path]:
        """The interaction files ``read_log`` reads for ``--split split``."""
        if split == "official":
            raise MmsrError(
                f"--split official: only for the official splits of Amazon Reviews 2023 (this dataset's raw "
                f"data is {self.format(ds)}); download them with `mmsr download --dataset amazon2023-<Category> --benchmark ...`"
            )
        return [ds.path(f"{C.RAW_DIR}/{self.present(ds)[0]}")]

    def read_log(self, paths: list[Path], on_bytes: OnBytes | None = None) -> RawLog:
        raise NotImplementedError

    def read_meta(self, ds: "DatasetDir", wanted: set[str]) -> tuple[dict[str, ItemMeta], str | None]:
        """Metadata of the ``wanted`` items and the file it came from (relative to the dataset
        folder), or ({}, None) when the layout's metadata file is absent."""
        return {}, None


def items_jsonl_meta(ds: "DatasetDir", wanted: set[str]) -> tuple[dict[str, ItemMeta], str | None]:
    """``raw/items.jsonl``, the optional metadata of the sequence and generic layouts."""
    path = ds.path(C.RAW_ITEMS)
    return (read_items_jsonl(path, wanted), C.RAW_ITEMS) if path.is_file() else ({}, None)
