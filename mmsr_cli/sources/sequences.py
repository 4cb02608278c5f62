"""The sequence format: ``raw/sequences.tsv`` + ``raw/items.jsonl`` (synthetic set, ../shared/data).

``sequences.tsv`` has the header ``user_id<TAB>item_ids`` and one user per line, items oldest
first separated by spaces, no timestamps: the position in the line is the time.
``items.jsonl`` holds one JSON object per item (``asin``, ``title``, ``categories``, ``brand``,
``description``). ``--from DIR`` takes both (``items.jsonl`` is required there).
"""

from __future__ import annotations

from pathlib import Path

from .. import contracts as C
from ..errors import MmsrError
from .base import Source, items_jsonl_meta
from .records import LogBuilder, OnBytes, RawLog, check_id, iter_lines

HEADER = ["user_id", "item_ids"]


def read_sequences(path: Path, on_bytes: OnBytes | None = None) -> RawLog:
    rows = LogBuilder()
    seen_header = False
    for lineno, line in iter_lines(path, on_bytes):
        if not seen_header:
            if line.split("\t") != HEADER:
                raise MmsrError(f"{path}:{lineno}: expected the header 'user_id<TAB>item_ids', got {line[:60]!r}")
            seen_header = True
            continue
        if not line.strip():
            continue
        parts = line.split("\t")
        where = f"{path}:{lineno}"
        if len(parts) != 2:
            raise MmsrError(f"{where}: expected 2 tab-separated fields (user_id, item_ids), got {len(parts)}")
        user_id, item_ids = parts[0], parts[1].split()
        if not user_id.strip():
            raise MmsrError(f"{where}: field 'user_id' is empty")
        if not item_ids:
            raise MmsrError(f"{where}: field 'item_ids' is empty")
        check_id(user_id, where, "user_id")
        bad = C.ID_CONTROL_RE.search(parts[1])  # item ids are separated by spaces, nothing else
        if bad is not None:
            raise MmsrError(f"{where}: field 'item_ids' has a control character (U+{ord(bad.group()):04X}) in "
                            f"{parts[1]!r}; ids are matched exactly, fix the file")
        if user_id in rows.users.codes:
            raise MmsrError(f"{where}: user '{user_id}' appears on more than one line")
        for position, item in enumerate(item_ids):  # no timestamps: the position is the time
            rows.add(user_id, item, position)
    if not seen_header:
        raise MmsrError(f"{path}: empty file (expected the header 'user_id<TAB>item_ids')")
    return rows.log()


class Sequences(Source):
    layout = "sequences"
    raw_files = (C.RAW_SEQUENCES, C.RAW_ITEMS)
    offline_hint = "sequences.tsv + items.jsonl"
    interaction_files = ("sequences.tsv",)

    def offline_files(self, src: Path) -> dict[str, Path] | None:
        seq = src / "sequences.tsv"
        return {C.RAW_SEQUENCES: seq, C.RAW_ITEMS: src / "items.jsonl"} if seq.is_file() else None

    def read_log(self, paths: list[Path], on_bytes: OnBytes | None = None) -> RawLog:
        return read_sequences(paths[0], on_bytes)

    read_meta = staticmethod(items_jsonl_meta)


SOURCE = Sequences()
