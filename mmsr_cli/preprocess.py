"""`mmsr preprocess`: raw logs -> dense ids, k-core, chronological sequences and split samples.

Input is ``<dataset>/raw/`` as written by ``mmsr download``, in one of three formats:

- sequence format: ``raw/sequences.tsv`` (``user_id<TAB>item_ids``, items oldest first, no
  timestamps: the position in the line is the time) + ``raw/items.jsonl``;
- Amazon 2014: ``raw/reviews.json.gz`` (JSON lines with reviewerID, asin, unixReviewTime) +
  ``raw/meta.json.gz`` (one Python-literal dict per line, parsed with ``ast.literal_eval``);
- generic: ``raw/interactions.csv`` or ``raw/interactions.parquet`` (columns user, item,
  timestamp) + optional ``raw/items.jsonl``.

Item metadata is optional in every format (items without it get null texts). Images are found as
``raw/images/<safe_item_filename(item_id)>.<ext>``.

Order and ids (deterministic, independent of hashing or thread scheduling):
- each user's sequence is sorted by timestamp; ties keep the order of the interaction file;
- ``user_idx`` and ``item_idx`` number the kept users and items 0, 1, ... in the order of their
  first appearance in the interaction file (for the sequence format: line by line, left to
  right; for Amazon Beauty this is the S3Rec/P5 numbering minus one);
- samples are ordered by ``user_idx`` then ``target_position``.

Filtering: iterative k-core (every user and every item has >= ``core`` interactions, repeated
until nothing changes; ``core`` 0 or 1 disables it). Then users too short for the split are
dropped (they would have no validation sample with a non-empty history), and items left with no
interaction go with them; this last step can leave an item below ``core`` (only with core < 3 or
a large ``test_ratio``), which is reported in the counts. Repeated (user, item) pairs are kept:
every review is one interaction (sparsity counts distinct pairs; the repeats are counted apart).
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from . import contracts as C
from .errors import MmsrError
from .workdir import DatasetDir, upstream, write_parquet_atomic

SPLIT_METHODS = ("loo", "ratio", "official")

RAW_INTERACTIONS_CSV = "raw/interactions.csv"
RAW_INTERACTIONS_PARQUET = "raw/interactions.parquet"

# Primary interaction file of each raw format; exactly one must be present.
_FORMAT_FILES = {
    "sequences": C.RAW_SEQUENCES,
    "amazon2014": C.RAW_REVIEWS,
    "csv": RAW_INTERACTIONS_CSV,
    "parquet": RAW_INTERACTIONS_PARQUET,
}

# floor(test_ratio * n) with a tolerance, so that 0.29 * 100 counts as 29, not 28.999...
_RATIO_EPS = 1e-9


@dataclass(frozen=True)
class PreprocessOptions:
    core: int = 5
    max_len: int = 50
    split: str = "loo"
    test_ratio: float = 0.2

    def validate(self) -> "PreprocessOptions":
        C.RANGE_CORE.check("--core", self.core)
        C.RANGE_MAX_LEN.check("--max-len", self.max_len)
        if self.split not in SPLIT_METHODS:
            raise MmsrError(f"--split: expected one of {', '.join(SPLIT_METHODS)}, got {self.split!r}")
        C.RANGE_RATIO.check("--test-ratio", self.test_ratio)
        return self

    def manifest_options(self) -> dict[str, Any]:
        opts = asdict(self)
        if self.split != "ratio":  # test_ratio has no effect on leave-one-out
            opts["test_ratio"] = None
        if self.split == "official":  # the release's files are 5-core already; no filter is applied
            opts["core"] = None
        return opts


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
    fmt: str
    ts_per_second: int = 1  # 1000: ``ts`` is in milliseconds (Amazon 2023)


@dataclass
class PreprocessResult:
    items: pa.Table
    users: pa.Table
    interactions: pa.Table
    samples: dict[str, pa.Table]
    counts: dict[str, Any] = field(default_factory=dict)

    def summary(self, dataset: str) -> str:
        c = self.counts
        line = (
            f"{dataset}: {c['users']:,} users, {c['items']:,} items, {c['interactions']:,} "
            f"interactions, avg length {c['avg_len']:.2f}, sparsity {c['sparsity'] * 100:.2f}%; "
            f"samples train {c['samples_train']:,}, valid {c['samples_valid']:,}, "
            f"test {c['samples_test']:,}"
        )
        if c["dropped_users_short"]:
            line += f"; dropped {c['dropped_users_short']:,} users too short for the split"
        return line


# ----------------------------------------------------------------------------------------------
# Reading lines (plain or gzip) with line numbers and one-line errors


_UTF8_BOM = b"\xef\xbb\xbf"


def _iter_lines(path: Path, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[int, str]]:
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


def _clean_text(value: Any, where: str, name: str) -> str | None:
    """HTML entities unescaped; empty or whitespace-only -> None; non-strings are an error."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise MmsrError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    text = html.unescape(value).strip()
    return text or None


def _clean_categories(value: Any, where: str, name: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MmsrError(f"{where}: field '{name}' must be a list of strings")
    cats = [t for t in (_clean_text(v, where, name) for v in value) if t is not None]
    return cats or None


def _required_id(obj: dict, key: str, where: str) -> str:
    if key not in obj or obj[key] is None:
        raise MmsrError(f"{where}: field '{key}' missing")
    value = obj[key]
    if not isinstance(value, str):
        raise MmsrError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise MmsrError(f"{where}: field '{key}' is empty")
    check_id(value, where, key)
    return value


def check_id(value: str, where: str, field: str) -> None:
    """Refuse a user or item id that cannot be matched exactly (contracts.id_problem)."""
    problem = C.id_problem(value)
    if problem is not None:
        raise MmsrError(f"{where}: field '{field}' {problem} in {value!r}; ids are matched exactly, fix the file")


# ----------------------------------------------------------------------------------------------
# Interaction logs


class _Coder:
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


def _frame(u: list[int] | np.ndarray, i: list[int] | np.ndarray, ts: list[int] | np.ndarray) -> pl.DataFrame:
    n = len(u)
    return pl.DataFrame(
        {
            "u": np.asarray(u, dtype=np.int32),
            "i": np.asarray(i, dtype=np.int32),
            "ts": np.asarray(ts, dtype=np.int64),
            "order": np.arange(n, dtype=np.int64),
        }
    )


def read_sequences(path: Path, on_bytes: Callable[[int], None] | None = None) -> RawLog:
    users, items = _Coder(), _Coder()
    u_col: list[int] = []
    i_col: list[int] = []
    ts_col: list[int] = []
    seen_header = False
    for lineno, line in _iter_lines(path, on_bytes):
        if not seen_header:
            if line.split("\t") != ["user_id", "item_ids"]:
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
        if user_id in users.codes:
            raise MmsrError(f"{where}: user '{user_id}' appears on more than one line")
        u = users(user_id)
        u_col.extend([u] * len(item_ids))
        i_col.extend(items(i) for i in item_ids)
        ts_col.extend(range(len(item_ids)))  # no timestamps: the position is the time
    if not seen_header:
        raise MmsrError(f"{path}: empty file (expected the header 'user_id<TAB>item_ids')")
    return RawLog(_frame(u_col, i_col, ts_col), users.names, items.names, "sequences")


def _parse_record(text: str, where: str, allow_literal: bool) -> dict:
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
    """A Python-literal record (Amazon 2014 metadata); never ``eval``."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise MmsrError(f"{where}: malformed record (not JSON nor a Python literal: {type(e).__name__})") from e


def read_amazon_reviews(path: Path, on_bytes: Callable[[int], None] | None = None) -> RawLog:
    users, items = _Coder(), _Coder()
    u_col: list[int] = []
    i_col: list[int] = []
    ts_col: list[int] = []
    for lineno, line in _iter_lines(path, on_bytes):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        # Some 2014 review dumps are Python literals rather than JSON; accept both.
        rec = _parse_record(line, where, allow_literal=True)
        user_id = _required_id(rec, "reviewerID", where)
        asin = _required_id(rec, "asin", where)
        if "unixReviewTime" not in rec or rec["unixReviewTime"] is None:
            raise MmsrError(f"{where}: field 'unixReviewTime' missing")
        ts = rec["unixReviewTime"]
        if isinstance(ts, bool) or not isinstance(ts, int):
            raise MmsrError(f"{where}: field 'unixReviewTime' must be an integer, got {type(ts).__name__}")
        if not _INT64_MIN <= ts <= _INT64_MAX:
            raise MmsrError(f"{where}: field 'unixReviewTime' {ts} is out of range (seconds, 64-bit)")
        u_col.append(users(user_id))
        i_col.append(items(asin))
        ts_col.append(ts)
    return RawLog(_frame(u_col, i_col, ts_col), users.names, items.names, "amazon2014")


_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
_INTERACTION_COLUMNS = ("user", "item", "timestamp")


def _coded_log(df: pl.DataFrame, path: Path, fmt: str) -> RawLog:
    """user/item strings + int64 timestamp (file order) -> first-appearance codes."""
    if df.height == 0:
        raise MmsrError(f"{path}: no interactions")
    df = df.with_row_index("order")
    user_names = df.select(pl.col("user").unique(maintain_order=True)).to_series().to_list()
    item_names = df.select(pl.col("item").unique(maintain_order=True)).to_series().to_list()
    ucodes = pl.DataFrame({"user": user_names, "u": np.arange(len(user_names), dtype=np.int32)})
    icodes = pl.DataFrame({"item": item_names, "i": np.arange(len(item_names), dtype=np.int32)})
    frame = (
        df.join(ucodes, on="user", how="left")
        .join(icodes, on="item", how="left")
        .sort("order")
        .select("u", "i", pl.col("timestamp").alias("ts"), pl.col("order").cast(pl.Int64))
    )
    return RawLog(frame, user_names, item_names, fmt)


def _check_generic(df: pl.DataFrame, path: Path, row_label: Callable[[int], str]) -> pl.DataFrame:
    missing = [c for c in _INTERACTION_COLUMNS if c not in df.columns]
    if missing:
        raise MmsrError(f"{path}: missing column(s) {', '.join(missing)} (expected user, item, timestamp)")
    df = df.select(_INTERACTION_COLUMNS)
    for col in ("user", "item"):
        bad = df.select(pl.col(col).is_null() | (pl.col(col).str.strip_chars() == "")).to_series()
        if bad.any():
            raise MmsrError(f"{row_label(int(bad.arg_true()[0]))}: field '{col}' missing")
        bad = df.select(
            pl.col(col).str.contains(C.ID_CONTROL_RE.pattern) | (pl.col(col).str.strip_chars() != pl.col(col))
        ).to_series()
        if bad.any():
            row = int(bad.arg_true()[0])
            check_id(df[col][row], row_label(row), col)
    bad = df["timestamp"].is_null()
    if bad.any():
        raise MmsrError(f"{row_label(int(bad.arg_true()[0]))}: field 'timestamp' missing")
    return df


def _locate_csv_error(path: Path) -> None:
    """Slow path after a failed fast read: name the first line with a wrong field count."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            for row in reader:
                if len(row) != len(header or []):
                    raise MmsrError(
                        f"{path}:{reader.line_num}: expected {len(header or [])} comma-separated fields, got {len(row)}"
                    )
    except (csv.Error, UnicodeDecodeError) as e:
        raise MmsrError(f"{path}: not a readable CSV file ({e})") from e


def read_interactions_csv(path: Path) -> RawLog:
    try:
        df = pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as e:
        _locate_csv_error(path)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MmsrError(f"{path}: not a readable CSV file ({first})") from e
    label = lambda row: f"{path}:{row + 2}"  # noqa: E731  (1-based line, after the header)
    df = _check_generic(df, path, label)
    ts = df.select(pl.col("timestamp").str.strip_chars().cast(pl.Int64, strict=False)).to_series()
    bad = ts.is_null()
    if bad.any():
        row = int(bad.arg_true()[0])
        raise MmsrError(
            f"{label(row)}: field 'timestamp' must be an integer (seconds), got {df['timestamp'][row]!r}"
        )
    return _coded_log(df.with_columns(timestamp=ts), path, "csv")


def read_interactions_parquet(path: Path) -> RawLog:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise MmsrError(f"{path}: not a readable Parquet file ({e})") from e
    label = lambda row: f"{path}: row {row}"  # noqa: E731
    missing = [c for c in _INTERACTION_COLUMNS if c not in table.column_names]
    if missing:
        raise MmsrError(f"{path}: missing column(s) {', '.join(missing)} (expected user, item, timestamp)")
    ts_col = table.column("timestamp")
    if pa.types.is_timestamp(ts_col.type):
        ts_col = ts_col.cast(pa.timestamp("s")).cast(pa.int64())
    elif pa.types.is_integer(ts_col.type):
        ts_col = ts_col.cast(pa.int64())
    else:
        raise MmsrError(f"{path}: column 'timestamp' must be integer seconds or a timestamp, got {ts_col.type}")
    cols = {}
    for name in ("user", "item"):
        col = table.column(name)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_integer(col.type)):
            raise MmsrError(f"{path}: column '{name}' must be strings or integers, got {col.type}")
        cols[name] = col.cast(pa.string())
    df = pl.from_arrow(pa.table({"user": cols["user"], "item": cols["item"], "timestamp": ts_col}))
    return _coded_log(_check_generic(df, path, label), path, "parquet")


# ----------------------------------------------------------------------------------------------
# Item metadata


def jsonl_records(path: Path, id_field: str, unique: bool = True) -> Iterator[tuple[str, dict, str]]:
    """(where, record, id) of each non-blank line of a JSON-lines file whose records are keyed by
    ``id_field``; a malformed line or id is a one-line error, and so is a repeated id when ``unique``."""
    first_line: dict[str, int] = {}
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        rec = _parse_record(line, where, allow_literal=False)
        key = _required_id(rec, id_field, where)
        if unique:
            if key in first_line:
                raise MmsrError(f"{where}: duplicate {id_field} '{key}' (first on line {first_line[key]})")
            first_line[key] = lineno
        yield where, rec, key


def read_items_jsonl(path: Path, wanted: set[str]) -> dict[str, ItemMeta]:
    """Metadata of the ``wanted`` items; every line is validated, other items are ignored."""
    meta: dict[str, ItemMeta] = {}
    for where, rec, asin in jsonl_records(path, "asin"):
        item = ItemMeta(
            title=_clean_text(rec.get("title"), where, "title"),
            categories=_clean_categories(rec.get("categories"), where, "categories"),
            brand=_clean_text(rec.get("brand"), where, "brand"),
            description=_clean_text(rec.get("description"), where, "description"),
        )
        if asin in wanted:
            meta[asin] = item
    return meta


# Cheap look-up of a metadata line's asin, so only lines of kept items go through literal_eval
# (the full 2014 metadata files have 10-20x more items than survive the 5-core filter).
_ASIN_RE = re.compile(r"""['"]asin['"]\s*:\s*(?:'([^'\\]*)'|"([^"\\]*)")""")


def read_amazon_meta(path: Path, wanted: set[str], on_bytes: Callable[[int], None] | None = None) -> dict[str, ItemMeta]:
    """Metadata of the ``wanted`` items from a 2014 ``meta_*.json.gz`` (Python-literal lines).

    Lines whose asin is readable and not wanted are skipped without being parsed further.
    """
    meta: dict[str, ItemMeta] = {}
    first_line: dict[str, int] = {}
    for lineno, line in _iter_lines(path, on_bytes):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        m = _ASIN_RE.search(line)
        if m is not None:
            asin = m.group(1) if m.group(1) is not None else m.group(2)
            if asin not in wanted:
                check_id(asin, where, "asin")  # 'a ' would otherwise hide the metadata of item 'a'
                continue
        rec = _parse_record(line, where, allow_literal=True)
        asin = _required_id(rec, "asin", where)
        if asin not in wanted:
            continue
        if asin in first_line:
            raise MmsrError(f"{where}: duplicate asin '{asin}' (first on line {first_line[asin]})")
        first_line[asin] = lineno
        cats = rec.get("categories")
        if cats is not None:
            if not isinstance(cats, list) or not all(isinstance(p, list) for p in cats):
                raise MmsrError(f"{where}: field 'categories' must be a list of lists of strings")
            cats = cats[0] if cats else None  # the first category path, general -> specific
        meta[asin] = ItemMeta(
            title=_clean_text(rec.get("title"), where, "title"),
            categories=_clean_categories(cats, where, "categories"),
            brand=_clean_text(rec.get("brand"), where, "brand"),
            description=_clean_text(rec.get("description"), where, "description"),
        )
    return meta


def find_images(ds: DatasetDir, item_ids: list[str]) -> list[str | None]:
    """``raw/images/<safe name>.<ext>`` per item (first extension in IMAGE_EXTENSIONS order)."""
    folder = ds.path(C.RAW_IMAGES_DIR)
    if not folder.is_dir():
        return [None] * len(item_ids)
    rank = {ext: k for k, ext in enumerate(C.IMAGE_EXTENSIONS)}
    best: dict[str, tuple[int, str]] = {}
    for p in folder.iterdir():
        ext = p.suffix.lower()
        if ext in rank and p.is_file():
            cand = (rank[ext], p.name)
            if p.stem not in best or cand < best[p.stem]:
                best[p.stem] = cand
    out: list[str | None] = []
    for item_id in item_ids:
        hit = best.get(C.safe_item_filename(item_id))
        out.append(f"{C.RAW_IMAGES_DIR}/{hit[1]}" if hit else None)
    return out


# ----------------------------------------------------------------------------------------------
# Filtering and splitting


def k_core(frame: pl.DataFrame, core: int) -> pl.DataFrame:
    """Iteratively drop users and items with fewer than ``core`` interactions until stable."""
    if core <= 1:
        return frame
    while True:
        before = frame.height
        frame = frame.filter((pl.len().over("u") >= core) & (pl.len().over("i") >= core))
        if frame.height == before:
            return frame


def n_test_items(lengths: np.ndarray, split: str, test_ratio: float) -> np.ndarray:
    """Test targets per user: 1 for leave-one-out, max(1, floor(ratio * n)) for ratio."""
    if split == "loo":
        return np.ones_like(lengths)
    return np.maximum(1, np.floor(test_ratio * lengths + _RATIO_EPS).astype(lengths.dtype))


def _ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenation of ``arange(s, s + c)`` for each (s, c), and the owner index of each value."""
    counts = np.maximum(counts, 0)
    owner = np.repeat(np.arange(len(counts)), counts)
    if owner.size == 0:
        return np.zeros(0, dtype=np.int64), owner
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    values = np.arange(owner.size, dtype=np.int64) - first[owner] + starts[owner]
    return values, owner


def _samples(items: np.ndarray, user_start: np.ndarray, owner: np.ndarray, pos: np.ndarray, max_len: int) -> pa.Table:
    """One sample per (user, target position): history = up to ``max_len`` items before it."""
    start = user_start[owner]
    g = start + pos  # global index of the target in ``items``
    h_begin = np.maximum(start, g - max_len)
    h_len = g - h_begin
    offsets = np.concatenate([[0], np.cumsum(h_len)]).astype(np.int32)
    flat, _ = _ranges(h_begin, h_len)
    history = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(items[flat], pa.int32()))
    return pa.table(
        {
            "sample_idx": pa.array(np.arange(len(g), dtype=np.int64)),
            "user_idx": pa.array(owner.astype(np.int32)),
            "history": history,
            "target": pa.array(items[g].astype(np.int32)),
            "target_position": pa.array(pos.astype(np.int32)),
        }
    ).cast(C.SAMPLES_SCHEMA)


def split_samples(items: np.ndarray, lengths: np.ndarray, opts: PreprocessOptions) -> dict[str, pa.Table]:
    """Train/valid/test samples of users whose sorted items are consecutive in ``items``.

    Positions of user u (length n, t = number of test targets):
      test:  n-t .. n-1 (each with its full history, earlier test items included)
      valid: n-t-1
      train: 1 .. n-t-2 (every prefix of what is left; position 0 has no history)
    Every user must have n - t >= 2 (callers drop the others).
    """
    user_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    n = lengths.astype(np.int64)
    t = n_test_items(n, opts.split, opts.test_ratio)
    out = {}
    pos, owner = _ranges(np.ones_like(n), n - t - 2)  # positions 1 .. n-t-2
    out["train"] = _samples(items, user_start, owner, pos, opts.max_len)
    owner = np.arange(len(n))
    out["valid"] = _samples(items, user_start, owner, n - t - 1, opts.max_len)
    pos, owner = _ranges(n - t, t)
    out["test"] = _samples(items, user_start, owner, pos, opts.max_len)
    return out


# ----------------------------------------------------------------------------------------------
# The stage


def detect_format(ds: DatasetDir) -> str:
    from . import amazon2023

    raw = ds.path(C.RAW_DIR)
    if not raw.is_dir():
        raise MmsrError(f"{raw}: raw data folder not found; run `mmsr download --dataset {ds.name}` first")
    present = [fmt for fmt, rel in _FORMAT_FILES.items() if ds.path(rel).is_file()]
    if amazon2023.detect(raw) is not None:
        present.append("amazon2023")
    if not present:
        expected = ", ".join(rel.removeprefix("raw/") for rel in _FORMAT_FILES.values())
        raise MmsrError(f"{raw}: no interaction file found (expected one of {expected}, or amazon2023/)")
    if len(present) > 1:
        names = ", ".join(_FORMAT_FILES.get(f, amazon2023.RAW_SUBDIR).removeprefix("raw/") for f in present)
        raise MmsrError(f"{raw}: several interaction files ({names}); keep exactly one")
    return present[0]


def _amazon2023_source(ds: DatasetDir, split: str) -> Path | list[Path]:
    """The review file, or the three files of the official split, of ``raw/amazon2023/``."""
    from . import amazon2023

    files = amazon2023.detect(ds.path(C.RAW_DIR))
    if split == "official":
        if not files.benchmarks:
            raise MmsrError(
                f"{ds.path(amazon2023.RAW_SUBDIR)}: no official split files; run `mmsr download --dataset "
                f"{ds.name} --benchmark last_out_w_his` (or another of {', '.join(amazon2023.BENCHMARK_SPLITS)})"
            )
        if len(files.benchmarks) > 1:
            raise MmsrError(
                f"{ds.path(amazon2023.RAW_SUBDIR)}: files of several official splits ({', '.join(files.benchmarks)}); "
                "keep one"
            )
        return next(iter(files.benchmarks.values()))
    if files.reviews is None:
        raise MmsrError(
            f"{ds.path(amazon2023.RAW_SUBDIR)}: no review file; use --split official for the benchmark "
            f"files, or run `mmsr download --dataset {ds.name}` for the reviews"
        )
    return files.reviews


def source_files(ds: DatasetDir, fmt: str, split: str) -> Path | list[Path]:
    if fmt == "amazon2023":
        return _amazon2023_source(ds, split)
    if split == "official":
        raise MmsrError(
            f"--split official: only for the official splits of Amazon Reviews 2023 (this dataset's raw "
            f"data is {fmt}); download them with `mmsr download --dataset amazon2023-<Category> --benchmark ...`"
        )
    return ds.path(_FORMAT_FILES[fmt])


def read_log(ds: DatasetDir, fmt: str, src: Path | list[Path], on_bytes: Callable[[int], None] | None = None) -> RawLog:
    if fmt == "amazon2023":
        from . import amazon2023

        return amazon2023.read_official(src, on_bytes) if isinstance(src, list) else amazon2023.read_reviews(src, on_bytes)
    if fmt == "sequences":
        return read_sequences(src, on_bytes)
    if fmt == "amazon2014":
        return read_amazon_reviews(src, on_bytes)
    if fmt == "csv":
        return read_interactions_csv(src)
    return read_interactions_parquet(src)


def read_meta(ds: DatasetDir, fmt: str, wanted: set[str]) -> tuple[dict[str, ItemMeta], str | None]:
    if fmt == "amazon2023":
        from . import amazon2023

        path = amazon2023.detect(ds.path(C.RAW_DIR)).meta
        if path is None:
            return {}, None
        return amazon2023.read_meta(path, wanted), str(path.relative_to(ds.root))
    if fmt == "amazon2014":
        path = ds.path(C.RAW_META)
        return (read_amazon_meta(path, wanted), C.RAW_META) if path.is_file() else ({}, None)
    path = ds.path(C.RAW_ITEMS)
    return (read_items_jsonl(path, wanted), C.RAW_ITEMS) if path.is_file() else ({}, None)


def official_samples(items: np.ndarray, lengths: np.ndarray, split_of: np.ndarray, max_len: int) -> tuple[dict[str, pa.Table], int]:
    """Samples of an official split: each row of a split file is one sample of that split, its
    history the user's earlier rows (all files, time order). Rows with no earlier row are no
    sample (a user's first interaction); their number is returned too."""
    user_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    owner_all = np.repeat(np.arange(len(lengths)), lengths)
    pos_all = np.arange(len(items), dtype=np.int64) - user_start[owner_all]
    out = {}
    for k, split in enumerate(C.SPLITS):
        sel = (split_of == k) & (pos_all >= 1)
        out[split] = _samples(items, user_start, owner_all[sel], pos_all[sel], max_len)
    return out, int((pos_all == 0).sum())


def build(ds: DatasetDir, opts: PreprocessOptions, log: Any = None) -> PreprocessResult:
    """Everything but the writes: parse, filter, number, split. Raises MmsrError on bad input."""
    from .runtime import progress

    opts.validate()
    fmt = detect_format(ds)
    source = source_files(ds, fmt, opts.split)
    paths = source if isinstance(source, list) else [source]
    src = paths[0].parent if len(paths) > 1 else paths[0]
    official = opts.split == "official"
    with progress(transient=True) as bar:
        task = bar.add_task(f"reading {src.name}", total=sum(p.stat().st_size for p in paths))
        raw = read_log(ds, fmt, source, lambda done: bar.update(task, completed=done))
    if raw.frame.height == 0:
        raise MmsrError(f"{src}: no interactions")
    counts: dict[str, Any] = {
        "format": fmt,
        "raw_users": len(raw.users),
        "raw_items": len(raw.items),
        "raw_interactions": raw.frame.height,
    }

    frame = raw.frame if official else k_core(raw.frame, opts.core)  # the official files are 5-core
    if frame.height == 0:
        raise MmsrError(
            f"{src}: no interactions left after the {opts.core}-core filter "
            f"({counts['raw_users']:,} users, {counts['raw_items']:,} items before); try a smaller --core"
        )

    # Chronological order per user; ties keep file order (``order``), so the sort is stable.
    # Official splits: at equal times train rows come before valid rows before test rows.
    frame = frame.sort(["u", "ts", "split", "order"] if official else ["u", "ts", "order"])
    per_user = frame.group_by("u", maintain_order=True).len()
    lengths = per_user["len"].to_numpy().astype(np.int64)
    if official:  # every row stays where the release put it
        keep_user = np.ones(len(lengths), dtype=bool)
    else:
        keep_user = lengths - n_test_items(lengths, opts.split, opts.test_ratio) >= 2
    dropped = int((~keep_user).sum())
    if dropped:
        frame = frame.filter(pl.col("u").is_in(per_user["u"].filter(pl.Series(keep_user)).implode()))
    if frame.height == 0:
        raise MmsrError(
            f"{src}: every user is too short for the {opts.split} split (need a validation and a test "
            f"item after at least one history item); lower --core/--test-ratio or use more data"
        )

    # Dense ids in order of first appearance in the interaction file (codes are that order).
    frame = frame.with_columns(
        user_idx=(pl.col("u").rank("dense") - 1).cast(pl.Int32),
        item_idx=(pl.col("i").rank("dense") - 1).cast(pl.Int32),
    )
    frame = frame.with_columns(position=pl.int_range(pl.len(), dtype=pl.Int32).over("user_idx"))
    user_codes = frame.select(pl.col("u").unique().sort()).to_series().to_numpy()
    item_codes = frame.select(pl.col("i").unique().sort()).to_series().to_numpy()
    user_ids = [raw.users[c] for c in user_codes]
    item_ids = [raw.items[c] for c in item_codes]
    user_len = frame.group_by("user_idx").len().sort("user_idx")["len"].to_numpy()
    item_len = frame.group_by("item_idx").len().sort("item_idx")["len"].to_numpy()

    meta, meta_file = read_meta(ds, fmt, set(item_ids))
    if meta_file is None and log is not None:
        log.warning("no item metadata file in raw/: titles, categories, brands are null")
    images = find_images(ds, item_ids)
    blank = ItemMeta()
    metas = [meta.get(i, blank) for i in item_ids]

    items = pa.table(
        {
            "item_idx": pa.array(np.arange(len(item_ids), dtype=np.int32)),
            "item_id": pa.array(item_ids, pa.string()),
            "title": pa.array([m.title for m in metas], pa.string()),
            "categories": pa.array([m.categories for m in metas], pa.list_(pa.string())),
            "brand": pa.array([m.brand for m in metas], pa.string()),
            "description": pa.array([m.description for m in metas], pa.string()),
            "features": pa.array([m.features for m in metas], pa.list_(pa.string())),
            "image_path": pa.array(images, pa.string()),
            "n_interactions": pa.array(item_len.astype(np.int32)),
        }
    )
    users = pa.table(
        {
            "user_idx": pa.array(np.arange(len(user_ids), dtype=np.int32)),
            "user_id": pa.array(user_ids, pa.string()),
            "n_interactions": pa.array(user_len.astype(np.int32)),
        }
    )
    timestamp = (pl.col("ts") // raw.ts_per_second).alias("timestamp")
    interactions = frame.select("user_idx", "item_idx", timestamp, "position").to_arrow()

    item_seq = frame["item_idx"].to_numpy().astype(np.int32)
    if official:
        split_of = frame["split"].to_numpy()
        samples, no_history = official_samples(item_seq, user_len.astype(np.int64), split_of, opts.max_len)
        counts["rows_without_history"] = no_history
    else:
        samples = split_samples(item_seq, user_len.astype(np.int64), opts)

    n_users, n_items, n_inter = len(user_ids), len(item_ids), frame.height
    # Sparsity counts (user, item) pairs: a repeated purchase fills no new cell of the matrix
    # (counting it would push sparsity below 0 on small data with many repeats).
    n_pairs = frame.select(pl.struct("user_idx", "item_idx").n_unique()).item()
    counts.update(
        users=n_users,
        items=n_items,
        interactions=n_inter,
        avg_len=round(n_inter / n_users, 4),
        sparsity=round(1.0 - n_pairs / (n_users * n_items), 6),
        repeated_interactions=n_inter - n_pairs,
        dropped_users_core=counts["raw_users"] - n_users - dropped,
        dropped_items=counts["raw_items"] - n_items,
        dropped_users_short=dropped,
        items_below_core=int((item_len < opts.core).sum()) if opts.core > 1 and not official else 0,
        items_with_metadata=sum(1 for i in item_ids if i in meta),
        items_with_image=sum(1 for p in images if p is not None),
        metadata_file=meta_file,
        **{f"samples_{s}": samples[s].num_rows for s in C.SPLITS},
    )
    return PreprocessResult(items, users, interactions, samples, counts)


def run(ds: DatasetDir, opts: PreprocessOptions) -> PreprocessResult:
    """The `preprocess` stage: check upstream, build, write atomically, record the manifest."""
    opts.validate()
    download = ds.require(C.STAGE_DOWNLOAD)
    log = ds.logger(C.STAGE_PREPROCESS)
    log.info("preprocess %s with %s", ds.name, opts)
    result = build(ds, opts, log)
    write_parquet_atomic(ds.path(C.ITEMS), result.items, C.ITEMS_SCHEMA)
    write_parquet_atomic(ds.path(C.USERS), result.users, C.USERS_SCHEMA)
    write_parquet_atomic(ds.path(C.INTERACTIONS), result.interactions, C.INTERACTIONS_SCHEMA)
    outputs = [C.ITEMS, C.USERS, C.INTERACTIONS]
    for split in C.SPLITS:
        write_parquet_atomic(ds.path(C.samples_file(split)), result.samples[split], C.SAMPLES_SCHEMA)
        outputs.append(C.samples_file(split))
    ds.write_manifest(
        C.STAGE_PREPROCESS,
        inputs=upstream(download),
        outputs=outputs,
        options=opts.manifest_options(),
        counts=result.counts,
    )
    log.info("%s", result.summary(ds.name))
    log.info("counts %s", json.dumps(result.counts, sort_keys=True))
    return result
