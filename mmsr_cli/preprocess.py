"""`mmsr preprocess`: raw logs -> dense ids, k-core, chronological sequences and split samples.

Input is ``<dataset>/raw/`` as written by ``mmsr download``, in the layout of one source of
:mod:`mmsr_cli.sources` (sequence files, Amazon 2014, Amazon 2023, a generic interaction log),
which reads it: this module only filters, numbers and splits. Item metadata is optional in every
layout (items without it get null texts). Images are found as
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

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from . import contracts as C
from . import sources
from .errors import MmsrError
from .runtime import progress
from .sources.records import ItemMeta
from .workdir import DatasetDir, commit_atomic, parquet_writer, upstream

SPLIT_METHODS = ("loo", "ratio", "official")

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
# Images


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
    opts.validate()
    source = sources.detect_raw(ds)
    fmt = source.format(ds)
    paths = source.inputs(ds, opts.split)
    src = paths[0].parent if len(paths) > 1 else paths[0]
    official = opts.split == "official"
    with progress(transient=True) as bar:
        task = bar.add_task(f"reading {src.name}", total=sum(p.stat().st_size for p in paths))
        raw = source.read_log(paths, lambda done: bar.update(task, completed=done))
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

    meta, meta_file = source.read_meta(ds, set(item_ids))
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
    tables = {C.ITEMS: (result.items, C.ITEMS_SCHEMA), C.USERS: (result.users, C.USERS_SCHEMA),
              C.INTERACTIONS: (result.interactions, C.INTERACTIONS_SCHEMA),
              **{C.samples_file(s): (result.samples[s], C.SAMPLES_SCHEMA) for s in C.SPLITS}}
    # One set: a failure on any file (a full disk) leaves every earlier output as it was.
    commit_atomic({ds.path(rel): parquet_writer(table, schema) for rel, (table, schema) in tables.items()})
    outputs = list(tables)
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
