"""A generic interaction log: ``raw/interactions.csv`` or ``raw/interactions.parquet``.

Columns ``user``, ``item``, ``timestamp`` (integer seconds; Parquet may also hold a timestamp
type), one interaction per row, plus the optional ``raw/items.jsonl`` of the sequence format for
item texts. ``--from DIR`` takes ``interactions.csv`` or ``interactions.parquet`` (not both) and
``items.jsonl`` when it is there.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .. import contracts as C
from ..errors import MmsrError
from .base import Source, items_jsonl_meta
from .records import OnBytes, RawLog, check_id

RAW_CSV = "raw/interactions.csv"
RAW_PARQUET = "raw/interactions.parquet"
_INTERACTION_COLUMNS = ("user", "item", "timestamp")


def _coded_log(df: pl.DataFrame, path: Path) -> RawLog:
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
    return RawLog(frame, user_names, item_names)


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
    return _coded_log(df.with_columns(timestamp=ts), path)


def read_interactions_parquet(path: Path) -> RawLog:
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
    return _coded_log(_check_generic(df, path, label), path)


class Generic(Source):
    layout = "generic"
    raw_files = (RAW_CSV, RAW_PARQUET, C.RAW_ITEMS)
    offline_hint = "interactions.csv|parquet (+ items.jsonl)"
    interaction_files = ("interactions.csv", "interactions.parquet")

    def offline_files(self, src: Path) -> dict[str, Path] | None:
        csv, parquet = src / "interactions.csv", src / "interactions.parquet"
        if csv.is_file() and parquet.is_file():
            raise MmsrError(f"--from {src}: both interactions.csv and interactions.parquet; keep one")
        if not (csv.is_file() or parquet.is_file()):
            return None
        files = {RAW_CSV: csv} if csv.is_file() else {RAW_PARQUET: parquet}
        if (src / "items.jsonl").is_file():
            files[C.RAW_ITEMS] = src / "items.jsonl"
        return files

    def format(self, ds) -> str:
        return "csv" if ds.path(RAW_CSV).is_file() else "parquet"

    def read_log(self, paths: list[Path], on_bytes: OnBytes | None = None) -> RawLog:
        path = paths[0]
        return read_interactions_csv(path) if path.suffix == ".csv" else read_interactions_parquet(path)

    read_meta = staticmethod(items_jsonl_meta)


SOURCE = Generic()
