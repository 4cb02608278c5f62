"""GRU4Rec, a sequential baseline of the paper's Table 2."""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from .base import DatasetInfo
from .common import ItemTable, Regularised, by_length_groups


@dataclass
class GRU4RecConfig(Regularised):
    """GRU4Rec's options: embedding and GRU width, stacked GRU layers, dropout on the input and the output."""


class GRU4Rec(ItemTable):
    """GRU4Rec (Hidasi et al., ICLR 2016; paper ref. [18]): item embeddings -> GRU -> last hidden.

    Each left-padded history is flipped to right padding (items in columns 0..len-1) and run through
    the GRU without packing; the user vector is the top layer's output at the row's last real item
    (column len-1). A GRU is causal, so padding read after that column never reaches it: the result
    equals running each history alone, as packing did. To keep the padded steps few, each length
    group (``by_length_groups``) runs over its own longest history, in ~log2(max_len) GRU calls.
    On CPU this is ~1.4x faster per training step than packing (``pack_padded_sequence``), whose
    per-step bookkeeping dominated (docs/benchmarks.md, train).
    """

    config_class = GRU4RecConfig

    def __init__(self, config: GRU4RecConfig, info: DatasetInfo):
        super().__init__(config, info)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.dim,
            config.dim,
            num_layers=config.layers,
            batch_first=True,
            dropout=config.dropout if config.layers > 1 else 0.0,
        )
        self.out_dropout = nn.Dropout(config.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history = batch["history"]
        B, L = history.shape
        if B == 0:
            return self.item_emb.weight.new_zeros(0, self.dim)
        lengths = batch["lengths"].to(history.device).clamp(min=1, max=L)

        def encode(rows: torch.Tensor, steps: int) -> torch.Tensor:
            n = lengths[rows]
            # Row b's items occupy columns L-len_b .. L-1; read them into columns 0 .. len_b-1
            # (the columns after them, up to ``steps``, read padding: only later outputs see it).
            cols = (torch.arange(steps, device=history.device)[None, :] + (L - n)[:, None]) % L
            x = self.emb_dropout(self.item_emb(history[rows].gather(1, cols)))
            out, _ = self.gru(x)  # [rows, steps, d]: top layer's output after each step
            return out[torch.arange(len(rows), device=history.device), n - 1]

        return self.out_dropout(by_length_groups(lengths, encode))
