"""Sequence batching (data.py), which feeds every sequence model: left padding, truncation to the
most recent items, and SequenceSplit.collate's columns, checked against matrices written by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmsr_cli import contracts as C
from mmsr_cli.data import SequenceSplit, pad_histories
from mmsr_cli.errors import MmsrError
from mmsr_cli.workdir import DatasetDir, write_parquet_atomic

# Histories (oldest first): [3], [0, 1], [4, 5, 6, 7, 8] (longer than max_len 3), [2, 2, 9]
FLAT = np.array([3, 0, 1, 4, 5, 6, 7, 8, 2, 2, 9])
PTR = np.array([0, 1, 3, 8, 11])
PAD = 10


def test_pad_histories_left_pads_and_keeps_the_most_recent_items():
    out, lengths = pad_histories(FLAT, PTR, np.array([0, 1, 2, 3]), max_len=3, pad_id=PAD)
    assert out.tolist() == [
        [PAD, PAD, 3],
        [PAD, 0, 1],
        [6, 7, 8],  # truncated: the last three of 4..8
        [2, 2, 9],  # repeats kept
    ]
    assert lengths.tolist() == [1, 2, 3, 3]
    assert out.dtype == np.int64 and lengths.dtype == np.int64


def test_pad_histories_any_row_order_repeats_and_widths():
    out, lengths = pad_histories(FLAT, PTR, np.array([2, 0, 2]), max_len=6, pad_id=PAD)
    assert out.tolist() == [[PAD, 4, 5, 6, 7, 8], [PAD] * 5 + [3], [PAD, 4, 5, 6, 7, 8]]
    assert lengths.tolist() == [5, 1, 5]
    out, lengths = pad_histories(FLAT, PTR, np.array([3, 1]), max_len=1, pad_id=PAD)
    assert out.tolist() == [[9], [1]] and lengths.tolist() == [1, 1]
    out, lengths = pad_histories(FLAT, PTR, np.array([], dtype=np.int64), max_len=4, pad_id=PAD)
    assert out.shape == (0, 4) and lengths.shape == (0,)


def write_samples(ds: DatasetDir, histories: list[list[int]], targets: list[int], users: list[int]) -> None:
    table = pa.table(
        {
            "sample_idx": pa.array(range(len(targets)), pa.int64()),
            "user_idx": pa.array(users, pa.int32()),
            "history": pa.array(histories, pa.list_(pa.int32())),
            "target": pa.array(targets, pa.int32()),
            "target_position": pa.array([len(h) for h in histories], pa.int32()),
        },
        schema=C.SAMPLES_SCHEMA,
    )
    ds.root.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(ds.path(C.samples_file("test")), table, C.SAMPLES_SCHEMA)


def test_sequence_split_collate_reads_the_samples_file(tmp_path):
    ds = DatasetDir.open(tmp_path, "toy")
    write_samples(ds, [[3], [0, 1], [4, 5, 6, 7, 8], [2, 2, 9]], [1, 2, 9, 0], [7, 4, 5, 6])
    split = SequenceSplit.open(ds, "test", max_len=3, n_items=PAD)
    assert len(split) == 4
    batch = split.collate(np.array([3, 0, 2]))
    assert set(batch) == {"history", "lengths", "target", "user_idx"}
    assert batch["history"].tolist() == [[2, 2, 9], [PAD, PAD, 3], [6, 7, 8]]
    assert batch["lengths"].tolist() == [3, 1, 3]
    assert batch["target"].tolist() == [0, 1, 9]
    assert batch["user_idx"].tolist() == [6, 7, 5]
    assert all(v.dtype == torch.int64 for v in batch.values())
    assert split.target_counts().tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize(
    "histories, targets, message",
    [
        ([[1], []], [0, 1], "a sample has an empty history"),
        ([[1], [10]], [0, 1], "field 'history' has item ids outside 0..9"),
        ([[1], [2]], [0, 10], "field 'target' has item ids outside 0..9"),
    ],
)
def test_sequence_split_refuses_samples_it_cannot_batch(tmp_path, histories, targets, message):
    ds = DatasetDir.open(tmp_path, "toy")
    write_samples(ds, histories, targets, [0, 1])
    with pytest.raises(MmsrError, match=message):
        SequenceSplit.open(ds, "test", max_len=3, n_items=PAD)
