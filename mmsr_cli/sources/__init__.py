"""Raw data sources: one module per layout of ``<dataset>/raw/``, found through this registry.

| module          | downloads                        | --from DIR                         | preprocess reads |
|-----------------|----------------------------------|------------------------------------|------------------|
| sequences.py    | -                                | sequences.tsv + items.jsonl        | sequences.tsv, items.jsonl |
| amazon2014.py   | beauty, clothing, ... (HTTP)     | reviews[_*].json.gz + meta[_*].json.gz | reviews.json.gz, meta.json.gz |
| amazon2023.py   | amazon2023-<Category> (HF hub)   | -                                  | amazon2023/ (the release's layout) |
| generic.py      | -                                | interactions.csv or .parquet (+ items.jsonl) | the same |
| synthetic.py    | synthetic (generated)            | -                                  | (sequence format) |

Each module defines a :class:`~mmsr_cli.sources.base.Source` and registers it here (``SOURCE``
in :data:`BUILT_IN`); :func:`register` adds another. ``download`` (:mod:`mmsr_cli.download`) and
``preprocess`` (:mod:`mmsr_cli.preprocess`) know no layout themselves. The HTTP engine they
share is :mod:`mmsr_cli.sources.fetch`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import contracts as C
from ..errors import MmsrError
from .base import DownloadResult, Source
from .records import ItemMeta, RawLog

if TYPE_CHECKING:
    from ..workdir import DatasetDir

__all__ = ["SOURCES", "DownloadResult", "ItemMeta", "RawLog", "Source", "register", "registered", "for_dataset",
           "detect_offline", "detect_raw", "known_datasets", "known_patterns", "all_raw_files"]

SOURCES: list[Source] = []  # the registry, in detection order (register() appends)


def register(source: Source) -> Source:
    """Add ``source`` to the registry (once); returns it."""
    if any(s is source for s in SOURCES):
        raise ValueError(f"source {type(source).__name__} is registered already")
    SOURCES.append(source)
    return source


def registered() -> list[Source]:
    return list(SOURCES)


def _built_in() -> None:
    # the built-in layouts, registered in this order once register() exists
    from . import amazon2014, amazon2023, generic, sequences, synthetic

    for module in (sequences, amazon2014, generic, amazon2023, synthetic):
        register(module.SOURCE)


_built_in()


def known_datasets() -> tuple[str, ...]:
    """Dataset names `download` fetches without --from."""
    return tuple(n for s in SOURCES for n in s.names)


def known_patterns() -> tuple[str, ...]:
    """Families of dataset names `download` fetches without --from, e.g. amazon2023-<Category>."""
    return tuple(s.name_pattern for s in SOURCES if s.name_pattern)


def all_raw_files() -> list[str]:
    return sorted({f for s in SOURCES for f in s.raw_files})


def for_dataset(name: str) -> Source:
    """The source that downloads ``--dataset name`` (no --from)."""
    for source in SOURCES:
        if source.downloads(name):
            return source
    raise MmsrError(
        f"--dataset {name}: unknown dataset; known: {', '.join(known_datasets() + known_patterns())} "
        "(or give --from DIR with a local copy)"
    )


def detect_offline(src: Path) -> tuple[Source, dict[str, Path]]:
    """The layout of an offline copy: (source, raw file -> source file)."""
    if not src.is_dir():
        raise MmsrError(f"--from {src}: no such directory")
    found = {}
    for source in SOURCES:
        files = source.offline_files(src)
        if files is not None:
            found[source.layout] = (source, files)
    if not found:
        hints = ", or ".join(s.offline_hint for s in SOURCES if s.offline_hint)
        raise MmsrError(f"--from {src}: no known layout; expected {hints}, with an optional images/ folder")
    if len(found) > 1:
        raise MmsrError(f"--from {src}: files of several layouts ({', '.join(found)}); keep one")
    layout, (source, files) = next(iter(found.items()))
    for rel, path in files.items():
        if path is None or not path.is_file():
            need = " + ".join(Path(r).name for r in files)
            raise MmsrError(f"--from {src}: {layout} layout needs {need}; {Path(rel).name} is missing")
    return source, files


def detect_raw(ds: "DatasetDir") -> Source:
    """The source whose interaction files are in ``ds``'s raw/ (exactly one must be)."""
    raw = ds.path(C.RAW_DIR)
    if not raw.is_dir():
        raise MmsrError(f"{raw}: raw data folder not found; run `mmsr download --dataset {ds.name}` first")
    present = [(s, name) for s in SOURCES for name in s.present(ds)]
    if not present:
        expected = [name for s in SOURCES for name in s.interaction_files]
        raise MmsrError(f"{raw}: no interaction file found (expected one of {', '.join(expected)})")
    if len(present) > 1:
        raise MmsrError(f"{raw}: several interaction files ({', '.join(name for _, name in present)}); keep exactly one")
    return present[0][0]
