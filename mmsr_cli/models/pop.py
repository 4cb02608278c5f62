"""Pop: the most-popular baseline of the paper's Table 2 (no parameters)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MmsrError
from .base import DatasetInfo, ModelOptions, Recommender


class Pop(Recommender):
    """Most-popular baseline: every user gets the same ranking by training-target counts.

    No parameters. Scores are ``log(1 + count)``, a monotone transform of the counts (so the
    ranking is exactly the count ranking) whose softmax is the add-one popularity distribution,
    which makes its cross-entropy a meaningful reference value.
    """

    trainable = False  # no parameters: one pass gives its fixed result; no training option applies

    def __init__(self, config: ModelOptions, info: DatasetInfo):
        super().__init__()
        if info.item_popularity is None:
            raise MmsrError("model pop: the dataset info has no training-target counts")
        counts = torch.as_tensor(np.asarray(info.item_popularity), dtype=torch.float32)
        if counts.shape != (info.n_items,):
            raise MmsrError(f"model pop: expected {info.n_items} item counts, got {tuple(counts.shape)}")
        self.register_buffer("log_counts", torch.log1p(counts).view(-1, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.log_counts.new_ones(len(batch["target"]), 1)

    def item_embeddings(self) -> torch.Tensor:
        return self.log_counts
