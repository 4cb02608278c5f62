"""Split samples as padded history tensors, for the sequence models (GRU4Rec, SASRec, SASRecF, Pop).

A :class:`SequenceSplit` holds one ``samples_<split>.parquet`` as flat NumPy arrays (histories
concatenated, CSR offsets) and batches any list of sample indices into a left-padded
``[B, max_len]`` matrix in a few vectorised operations: no Python loop over samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import contracts as C
from .errors import MmsrError
from .workdir import DatasetDir, read_parquet


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch's tensors on ``device`` (copies overlap compute where the memory is pinned)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def pad_histories(flat: np.ndarray, ptr: np.ndarray, rows: np.ndarray, max_len: int, pad_id: int):
    """Left-padded ``[len(rows), max_len]`` matrix of histories ``flat[ptr[r]:ptr[r+1]]``.

    The most recent item sits in the last column; a history longer than ``max_len`` keeps its
    last ``max_len`` items. Returns (matrix int64, lengths int64).
    """
    rows = np.asarray(rows, dtype=np.int64)
    start, stop = ptr[rows], ptr[rows + 1]
    lengths = np.minimum(stop - start, max_len)
    # Column j of row b holds flat[stop_b - max_len + j] when that index is inside the history.
    cols = np.arange(max_len, dtype=np.int64)
    src = stop[:, None] - max_len + cols[None, :]
    valid = cols[None, :] >= (max_len - lengths)[:, None]
    out = np.full((len(rows), max_len), pad_id, dtype=np.int64)
    out[valid] = flat[src[valid]]
    return out, lengths.astype(np.int64)


@dataclass
class SequenceSplit:
    """One split's samples (base.SplitData): ``collate`` gives history, lengths, target, user_idx."""

    flat: np.ndarray  # all histories concatenated, oldest first
    ptr: np.ndarray  # [S+1] offsets into ``flat``
    target: np.ndarray  # [S]
    user_idx: np.ndarray  # [S]
    max_len: int
    n_items: int  # the padding id

    @classmethod
    def open(cls, ds: DatasetDir, split: str, max_len: int, n_items: int | None = None) -> "SequenceSplit":
        path = ds.path(C.samples_file(split))
        if n_items is None:
            n_items = int(ds.require(C.STAGE_PREPROCESS, verify=False)["counts"]["items"])
        table = read_parquet(path, C.SAMPLES_SCHEMA)
        history = table.column("history").combine_chunks()
        if history.null_count:
            raise MmsrError(f"{path}: field 'history' has null entries")
        offsets = history.offsets.to_numpy().astype(np.int64)
        flat = history.values.to_numpy(zero_copy_only=False).astype(np.int64)
        target = table.column("target").to_numpy().astype(np.int64)
        user_idx = table.column("user_idx").to_numpy().astype(np.int64)
        if len(target) and (np.diff(offsets).min() < 1):
            raise MmsrError(f"{path}: a sample has an empty history; re-run `mmsr preprocess --dataset {ds.name}`")
        for name, arr in (("history", flat), ("target", target)):
            if arr.size and (arr.min() < 0 or arr.max() >= n_items):
                raise MmsrError(f"{path}: field '{name}' has item ids outside 0..{n_items - 1}")
        return cls(flat, offsets, target, user_idx, max_len, n_items)

    def __len__(self) -> int:
        return len(self.target)

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        history, lengths = pad_histories(self.flat, self.ptr, idx, self.max_len, self.n_items)
        return {
            "history": torch.from_numpy(history),
            "lengths": torch.from_numpy(lengths),
            "target": torch.from_numpy(self.target[idx]),
            "user_idx": torch.from_numpy(self.user_idx[idx]),
        }

    def target_counts(self) -> np.ndarray:
        """How often each item is a target in this split ([n_items], int64)."""
        return np.bincount(self.target, minlength=self.n_items).astype(np.int64)


def prefetched(split, index_batches: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """(indices, ``split.collate(indices)``) for each batch, the next batch collated in a
    background thread while the caller computes on this one: a DataLoader with one worker,
    without a worker process. Collating is NumPy and torch work that releases the GIL, so it
    runs beside the training step on a second core (MMSR's per-batch graph building, tens of
    milliseconds per batch of 512); no collate draws random numbers, so the batches are the
    same as collated inline. An error in collate is raised where its batch is taken."""
    batches = iter(index_batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmsr-collate") as pool:
        upcoming = next(batches, None)
        pending = None if upcoming is None else pool.submit(split.collate, upcoming)
        while pending is not None:
            indices, batch = upcoming, pending.result()
            upcoming = next(batches, None)
            pending = None if upcoming is None else pool.submit(split.collate, upcoming)
            yield indices, batch

