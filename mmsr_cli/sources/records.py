"""Reading raw files line by line and record by record, for every source layout.

One place for what all layouts share: lines of plain or gzip files with their line numbers,
JSON (or, for Amazon 2014, Python-literal) records, ids checked so they can be matched exactly,
texts cleaned, ids numbered in order of first appearance, and the interaction log
(:class:`RawLog`) and item metadata (:class:`ItemMeta`) every source reader returns. Every
problem is one line naming the file, line and field.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import polars as pl

from .. import contracts as C
from ..errors import MmsrError

OnBytes = Callable[[int], None]

INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


@dataclass
class ItemMeta:
    title: str | None = None
    categories: list[str] | None = None
    brand: str | None = None
    description: str | None = None
    features: list[str] | None = None  # Amazon 2023: the item's bullet-point features


@dataclass
class RawLog:
    """Interactions with first-appearance codes; ``users[u]`` / ``items[i]`` are original ids."""

    frame: pl.DataFrame  # columns u (int32), i (int32), ts (int64), order (int64); official splits: split (int8)
    users: list[str]
    items: list[str]
    ts_per_second: int = 1  # 1000: ``ts`` is in milliseconds (Amazon 2023)


# ----------------------------------------------------------------------------------------------
# Lines (plain or gzip) with line numbers and one-line errors

_UTF8_BOM = b"\xef\xbb\xbf"


def iter_lines(path: Path, on_bytes: OnBytes | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line number, text without newline)``; gzip by file name; errors name file:line."""
    lineno = 0
    try:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
            for lineno, line in enumerate(stream, start=1):
                if lineno == 1 and line.startswith(_UTF8_BOM):  # written by Excel, Notepad, ...
                    line = line[len(_UTF8_BOM):]
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise MmsrError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
                if on_bytes is not None and lineno % 16384 == 0:
                    on_bytes(raw.tell())
                yield lineno, text.rstrip("\r\n")
            if on_bytes is not None:
                on_bytes(raw.tell())
    except FileNotFoundError as e:
        raise MmsrError(f"{path}: file not found") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise MmsrError(f"{path}:{lineno + 1}: corrupt gzip data ({e})") from e
    except IsADirectoryError as e:
        raise MmsrError(f"{path}: is a directory, expected a file") from e


def parse_record(text: str, where: str, allow_literal: bool) -> dict:
    """A JSON object, or with ``allow_literal`` a Python-literal dict (never ``eval``)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if not allow_literal:
            raise MmsrError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
        obj = _literal(text, where)
    except RecursionError:
        raise MmsrError(f"{where}: malformed record (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise MmsrError(f"{where}: expected an object, got {type(obj).__name__}")
    return obj


def _literal(text: str, where: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise MmsrError(f"{where}: malformed record (not JSON nor a Python literal: {type(e).__name__})") from e


# ----------------------------------------------------------------------------------------------
# Fields


def clean_text(value: Any, where: str, name: str) -> str | None:
    """HTML entities unescaped; empty or whitespace-only -> None; non-strings are an error."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise MmsrError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    text = html.unescape(value).strip()
    return text or None


def clean_list(value: Any, where: str, name: str) -> list[str] | None:
    """A list of strings, each cleaned like :func:`clean_text`, the blanks dropped; None when empty."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MmsrError(f"{where}: field '{name}' must be a list of strings")
    cats = [t for t in (clean_text(v, where, name) for v in value) if t is not None]
    return cats or None


def check_id(value: str, where: str, field: str) -> None:
    """Refuse a user or item id that cannot be matched exactly (contracts.id_problem)."""
    problem = C.id_problem(value)
    if problem is not None:
        raise MmsrError(f"{where}: field '{field}' {problem} in {value!r}; ids are matched exactly, fix the file")


def required_id(obj: dict, key: str, where: str) -> str:
    if key not in obj or obj[key] is None:
        raise MmsrError(f"{where}: field '{key}' missing")
    value = obj[key]
    if not isinstance(value, str):
        raise MmsrError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise MmsrError(f"{where}: field '{key}' is empty")
    check_id(value, where, key)
    return value


def check_int64(value: int, where: str, field: str, unit: str) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise MmsrError(f"{where}: field '{field}' {value} is out of range ({unit}, 64-bit)")
    return value


# ----------------------------------------------------------------------------------------------
# Interaction logs


class IdCoder:
    """Original id -> dense code in order of first appearance."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.names: list[str] = []

    def __call__(self, name: str) -> int:
        code = self.codes.get(name)
        if code is None:
            code = self.codes[name] = len(self.names)
            self.names.append(name)
        return code


class LogBuilder:
    """Collects (user, item, time) rows in file order and codes the ids as they come."""

    def __init__(self) -> None:
        self.users, self.items = IdCoder(), IdCoder()
        self.u: list[int] = []
        self.i: list[int] = []
        self.ts: list[int] = []

    def add(self, user: str, item: str, ts: int) -> None:
        self.u.append(self.users(user))
        self.i.append(self.items(item))
        self.ts.append(ts)

    def log(self, ts_per_second: int = 1, **extra: np.ndarray) -> RawLog:
        frame = pl.DataFrame(
            {
                "u": np.asarray(self.u, dtype=np.int32),
                "i": np.asarray(self.i, dtype=np.int32),
                "ts": np.asarray(self.ts, dtype=np.int64),
                "order": np.arange(len(self.u), dtype=np.int64),
                **extra,
            }
        )
        return RawLog(frame, self.users.names, self.items.names, ts_per_second)


def read_review_log(path: Path, on_bytes: OnBytes | None, *, user: str, item: str, time: str,
                    to_time: Callable[[Any, str], int], allow_literal: bool, ts_per_second: int = 1) -> RawLog:
    """A review file (JSON lines; with ``allow_literal`` Python-literal lines too) as interactions:
    one review per non-blank line, its ``user`` and ``item`` ids and ``to_time(record[time])``."""
    rows = LogBuilder()
    for lineno, line in iter_lines(path, on_bytes):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        rec = parse_record(line, where, allow_literal)
        user_id, item_id = required_id(rec, user, where), required_id(rec, item, where)
        if rec.get(time) is None:
            raise MmsrError(f"{where}: field '{time}' missing")
        rows.add(user_id, item_id, to_time(rec[time], where))
    return rows.log(ts_per_second)


# ----------------------------------------------------------------------------------------------
# Item metadata


def jsonl_records(path: Path, id_field: str, unique: bool = True) -> Iterator[tuple[str, dict, str]]:
    """(where, record, id) of each non-blank line of a JSON-lines file whose records are keyed by
    ``id_field``; a malformed line or id is a one-line error, and so is a repeated id when ``unique``."""
    first_line: dict[str, int] = {}
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        rec = parse_record(line, where, allow_literal=False)
        key = required_id(rec, id_field, where)
        if unique:
            if key in first_line:
                raise MmsrError(f"{where}: duplicate {id_field} '{key}' (first on line {first_line[key]})")
            first_line[key] = lineno
        yield where, rec, key


def read_items_jsonl(path: Path, wanted: set[str]) -> dict[str, ItemMeta]:
    """``items.jsonl`` (sequence and generic layouts): metadata of the ``wanted`` items; every
    line is validated, other items are ignored."""
    meta: dict[str, ItemMeta] = {}
    for where, rec, asin in jsonl_records(path, "asin"):
        item = ItemMeta(
            title=clean_text(rec.get("title"), where, "title"),
            categories=clean_list(rec.get("categories"), where, "categories"),
            brand=clean_text(rec.get("brand"), where, "brand"),
            description=clean_text(rec.get("description"), where, "description"),
        )
        if asin in wanted:
            meta[asin] = item
    return meta
