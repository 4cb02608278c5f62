"""SASRec, a sequential baseline of the paper's Table 2, and its causal self-attention blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MmsrError
from .base import DatasetInfo
from .common import Attentive, ItemTable, by_length_groups, causal_allowed, check_heads


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position i sees positions <= i holding items (and itself)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        check_heads(dim, heads)
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """[B, L, D]; with ``last_only`` the last position's output alone [B, 1, D] (its query
        against every key)."""
        B, L, D = x.shape
        if last_only:  # keys and values of every position, the query of the last one alone
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, -1:], weight[:D], bias[:D]).view(B, 1, 1, self.heads, D // self.heads)
            kv = F.linear(x, weight[D:], bias[D:]).view(B, L, 2, self.heads, D // self.heads)
            q, (k, v), allowed = q.permute(2, 0, 3, 1, 4)[0], kv.permute(2, 0, 3, 1, 4), allowed[:, -1:]
        else:
            q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(B, q.shape[2], D))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + FFN(LN(x)) (SASRec, Kang & McAuley 2018, sec. III-B/C)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """[B, L, D]; with ``last_only`` the last position alone [B, 1, D] (the rest of a last
        block's output is never read)."""
        attended = self.attn(self.attn_norm(x), allowed, last_only)
        if last_only:
            x, keep = x[:, -1:], keep[:, -1:]
        x = x + self.dropout(attended)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x * keep  # padding positions stay zero


@dataclass
class SASRecConfig(Attentive):
    """SASRec's options: width, transformer blocks, heads, dropout."""


class SASRec(ItemTable):
    """SASRec (Kang & McAuley, ICDM 2018; paper ref. [22]).

    Item embeddings (scaled by sqrt(d)) plus learned absolute position embeddings, ``layers``
    causal self-attention blocks, a final LayerNorm; the user vector is the output at the last
    (most recent) position. Trained with cross-entropy over all items, as the paper's harness
    does for every model (not the original's sampled binary cross-entropy).
    """

    config_class = SASRecConfig

    def __init__(self, config: SASRecConfig, info: DatasetInfo):
        super().__init__(config, info)
        self.max_len = info.max_len
        self.pos_emb = nn.Embedding(info.max_len, config.dim)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config.dim, config.heads, config.dropout) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.dim)

    def input_embeddings(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L, d] embeddings of the history items (padding rows are zero)."""
        return self.item_emb(history)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history = batch["history"]
        B, L = history.shape
        if L > self.max_len:
            raise MmsrError(f"history length {L} exceeds the model's max_len {self.max_len}")
        is_item = history != self.n_items  # [B, L]
        keep = is_item.unsqueeze(-1).to(self.item_emb.weight.dtype)
        positions = torch.arange(self.max_len - L, self.max_len, device=history.device)
        x = self.input_embeddings(history) * math.sqrt(self.dim) + self.pos_emb(positions)[None]
        x = self.emb_dropout(x) * keep
        # Columns before a row's first item change nothing (positions count from the end): each
        # length group runs the blocks over its own span only.
        span = (is_item.cumsum(1) > 0).sum(1).clamp(min=1)

        def encode(rows: torch.Tensor, steps: int) -> torch.Tensor:
            h, items = x[rows, L - steps :], is_item[rows, L - steps :]
            allowed, keep_h = causal_allowed(items), keep[rows, L - steps :]
            for i, block in enumerate(self.blocks):
                # the user vector reads the last position only: when scoring (no dropout to keep
                # in step with training runs), the last block computes that position alone
                last_only = not self.training and i + 1 == len(self.blocks)
                h = block(h, allowed, keep_h, last_only)
            return self.final_norm(h[:, -1])

        return by_length_groups(span, encode)
