"""data.prefetched: batches collated one ahead in a background thread, as if collated inline."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mmsr_cli.data import prefetched
from mmsr_cli.errors import MmsrError


class Split:
    """Collates indices into a tensor and records which thread did it; index 13 is corrupt."""

    def __init__(self):
        self.threads = []

    def collate(self, indices):
        self.threads.append(threading.current_thread().name)
        if 13 in indices:
            raise MmsrError("samples.parquet: field 'history' is corrupt at row 13")
        return {"target": torch.as_tensor(indices) * 2}


def test_batches_come_in_order_equal_to_inline_collation_from_another_thread():
    split = Split()
    index_batches = [np.arange(i, i + 3) for i in range(0, 12, 3)]
    got = list(prefetched(split, index_batches))
    assert [i.tolist() for i, _ in got] == [b.tolist() for b in index_batches]
    for indices, batch in got:
        assert torch.equal(batch["target"], torch.as_tensor(indices) * 2)
    assert split.threads and all(name.startswith("mmsr-collate") for name in split.threads)
    assert list(prefetched(split, [])) == []


def test_a_collate_error_is_raised_where_its_batch_is_taken():
    batches = prefetched(Split(), [np.array([0, 1]), np.array([12, 13]), np.array([2])])
    first, _ = next(batches)
    assert first.tolist() == [0, 1]
    with pytest.raises(MmsrError, match="field 'history' is corrupt"):
        next(batches)
