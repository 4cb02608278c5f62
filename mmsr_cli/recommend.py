"""Top-K next-item lists for users from a trained run (`mmsr recommend`).

Each user's input is their latest history: the full chronological sequence of
``interactions.parquet`` (train, valid and test items alike), cut to the model's ``max_len``
most recent items. All items are scored (dot product, Eq. 7); ``exclude_seen`` removes every item
of the user's full sequence from the list.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import pyarrow as pa
import torch

from . import contracts as C
from . import memory
from .data import to_device
from .errors import MmsrError
from .runs import LoadedRun
from .workdir import DatasetDir, read_parquet

RECS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 1 = best
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("score", pa.float32(), nullable=False),
    ]
)


@dataclass
class RecommendOptions:
    users: list[str] | None = None  # original user ids; None with all_users
    all_users: bool = False
    top_k: int = 10
    exclude_seen: bool = False
    batch_size: int = 512

    def validate(self) -> "RecommendOptions":
        if bool(self.users) == self.all_users:
            raise MmsrError("give exactly one of --users U1,U2,... or --all-users")
        C.RANGE_TOP_K.check("--top-k", self.top_k)
        C.RANGE_TRAIN_BATCH.check("--batch-size", self.batch_size)  # the run's training batch size
        return self


@dataclass
class UserSequences:
    """Every user's full sequence, oldest first: ``flat[ptr[u]:ptr[u+1]]`` for user_idx u."""

    flat: np.ndarray
    ptr: np.ndarray
    user_ids: list[str]

    @classmethod
    def read(cls, ds: DatasetDir, n_users: int) -> "UserSequences":
        users = read_parquet(ds.path(C.USERS), C.USERS_SCHEMA)
        inter = read_parquet(ds.path(C.INTERACTIONS), C.INTERACTIONS_SCHEMA)
        u = inter.column("user_idx").to_numpy().astype(np.int64)
        pos = inter.column("position").to_numpy().astype(np.int64)
        items = inter.column("item_idx").to_numpy().astype(np.int64)
        if u.size and (u.min() < 0 or u.max() >= n_users):
            raise MmsrError(f"{ds.path(C.INTERACTIONS)}: field 'user_idx' outside 0..{n_users - 1}")
        order = np.lexsort((pos, u))
        ptr = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=n_users))]).astype(np.int64)
        uidx = users.column("user_idx").to_numpy()
        if not np.array_equal(uidx, np.arange(len(uidx))):
            raise MmsrError(f"{ds.path(C.USERS)}: field 'user_idx' is not 0..n-1 in order; re-run `mmsr preprocess`")
        return cls(items[order], ptr, users.column("user_id").to_pylist())

    def lookup(self, user_ids: list[str]) -> np.ndarray:
        index = {uid: i for i, uid in enumerate(self.user_ids)}
        rows = []
        for uid in user_ids:
            if uid not in index:
                raise MmsrError(f"--users: unknown user {uid!r} (not in {C.USERS})")
            rows.append(index[uid])
        return np.asarray(rows, dtype=np.int64)


@torch.no_grad()
def recommend(ds: DatasetDir, run: LoadedRun, opts: RecommendOptions, device: torch.device) -> pa.Table:
    """Top-K items of each requested user (RECS_SCHEMA rows, users in request order)."""
    opts.validate()
    info = run.bundle.info
    seqs = UserSequences.read(ds, info.n_users)
    rows = np.arange(info.n_users, dtype=np.int64) if opts.all_users else seqs.lookup(opts.users or [])
    empty = rows[seqs.ptr[rows + 1] == seqs.ptr[rows]]
    if len(empty):
        raise MmsrError(f"{ds.path(C.INTERACTIONS)}: user {seqs.user_ids[empty[0]]!r} has no interactions")
    items = read_parquet(ds.path(C.ITEMS), C.ITEMS_SCHEMA, C.ITEMS_LATER_COLUMNS)
    item_ids = np.asarray(items.column("item_id").to_pylist(), dtype=object)
    titles = np.asarray(items.column("title").to_pylist(), dtype=object)
    if len(item_ids) != info.n_items:
        raise MmsrError(f"{ds.path(C.ITEMS)}: {len(item_ids)} items, the run expects {info.n_items}")

    k = min(opts.top_k, info.n_items)
    out_user, out_rank, out_item, out_score = [], [], [], []
    model = run.model.to(device).eval()
    kind = run.bundle.kind

    def collate(positions: np.ndarray) -> dict:
        return next(iter(kind.history_batches(info, seqs.flat, seqs.ptr, rows[positions], len(positions))))[1]

    # batches scored a micro-batch at a time where one would pass the memory budget (memory.py)
    scoring = memory.measure(model, collate, (seqs.ptr[rows + 1] - seqs.ptr[rows]), len(rows), device)
    memory.check_fits(scoring, f"--batch-size {opts.batch_size}", "scoring")
    batch_size = scoring.micro_batch(opts.batch_size) if scoring is not None else opts.batch_size
    batches = kind.history_batches(info, seqs.flat, seqs.ptr, rows, batch_size)
    for batch_rows, batch in batches:
        scores = model.score(to_device(batch, device)).float()
        if opts.exclude_seen:
            counts = seqs.ptr[batch_rows + 1] - seqs.ptr[batch_rows]
            b = np.repeat(np.arange(len(batch_rows)), counts)
            seen = np.concatenate([seqs.flat[seqs.ptr[r] : seqs.ptr[r + 1]] for r in batch_rows])
            scores[torch.from_numpy(b).to(device), torch.from_numpy(seen).to(device)] = -torch.inf
        top_scores, top_items = torch.topk(scores, k, dim=1)
        top_scores, top_items = top_scores.cpu().numpy(), top_items.cpu().numpy()
        keep = np.isfinite(top_scores)  # seen items excluded when fewer than k remain
        ranks = np.cumsum(keep, axis=1)
        r_idx, c_idx = np.nonzero(keep)
        out_user.append(batch_rows[r_idx])
        out_rank.append(ranks[r_idx, c_idx])
        out_item.append(top_items[r_idx, c_idx])
        out_score.append(top_scores[r_idx, c_idx])
    users = np.concatenate(out_user) if out_user else np.zeros(0, np.int64)
    chosen = np.concatenate(out_item) if out_item else np.zeros(0, np.int64)
    user_ids = np.asarray(seqs.user_ids, dtype=object)
    return pa.table(
        {
            "user_id": pa.array(user_ids[users].tolist(), pa.string()),
            "rank": pa.array(np.concatenate(out_rank).astype(np.int32) if out_rank else np.zeros(0, np.int32)),
            "item_id": pa.array(item_ids[chosen].tolist(), pa.string()),
            "title": pa.array(titles[chosen].tolist(), pa.string()),
            "score": pa.array(np.concatenate(out_score).astype(np.float32) if out_score else np.zeros(0, np.float32)),
        },
        schema=RECS_SCHEMA,
    )


def _one_line(text: str | None) -> str:
    return "" if text is None else " ".join(text.split())


def write_stdout(table: pa.Table, fmt: str, stream: TextIO | None = None) -> None:
    """TSV (header, tabs/newlines in titles flattened) or JSON lines, one recommendation a line."""
    stream = stream or sys.stdout
    rows = table.to_pylist()
    if fmt == "tsv":
        stream.write("user_id\trank\titem_id\tscore\ttitle\n")
        for r in rows:
            stream.write(f"{r['user_id']}\t{r['rank']}\t{r['item_id']}\t{r['score']:.6g}\t{_one_line(r['title'])}\n")
    elif fmt == "jsonl":
        for r in rows:
            stream.write(json.dumps({**r, "score": round(float(r["score"]), 6)}, ensure_ascii=False) + "\n")
    else:
        raise MmsrError(f"--format: expected tsv or jsonl, got {fmt!r}")
    stream.flush()
