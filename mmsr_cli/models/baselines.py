"""Baselines of the paper's Table 2, in the shared harness (base.Recommender).

All of them score candidates by a dot product with the item-ID embedding table (paper Eq. 7) and
are trained with cross-entropy over all items, like MMSR, so that differences come from the
representation learning only. Sequence inputs are left-padded histories (``mmsr_cli.data``):
``history`` [B, L] with pad id ``n_items``, most recent item in the last column.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MmsrError
from .base import DatasetInfo, ModelConfig, Recommender, code_embedding_table


class Pop(Recommender):
    """Most-popular baseline: every user gets the same ranking by training-target counts.

    No parameters. Scores are ``log(1 + count)``, a monotone transform of the counts (so the
    ranking is exactly the count ranking) whose softmax is the add-one popularity distribution,
    which makes its cross-entropy a meaningful reference value.
    """

    def __init__(self, config: ModelConfig, info: DatasetInfo):
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


class _ItemTable(Recommender):
    """Item-ID embeddings with a padding row ``n_items``; scoring uses rows 0..n_items-1."""

    def __init__(self, config: ModelConfig, info: DatasetInfo):
        super().__init__()
        self.n_items = info.n_items
        self.dim = config.dim
        self.item_emb = nn.Embedding(info.n_items + 1, config.dim, padding_idx=info.n_items)
        nn.init.normal_(self.item_emb.weight, std=config.dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[info.n_items].zero_()

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight[: self.n_items]


def by_length_groups(lengths: torch.Tensor, encode: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``encode(rows, steps)`` over groups of rows of similar history length, in the batch's order.

    Rows are grouped by length (1, 2, 3-4, 5-8, ...: each row at most doubles its steps) and
    ``encode`` gets the indices of one group's rows and the group's longest length; it returns one
    output row per given row. For a model whose output for a history does not depend on the
    padding beside it (causal or masked, no batch statistics) the result equals one pass over
    the batch's longest history, with much less padded work where lengths spread: a Beauty batch
    of 512 training samples (mean 6.3 items) always holds a 50-item history, and attention over it
    costs O(50^2) per row; grouped, ~1.4x the real steps in at most log2(max_len) + 1 calls.
    """
    if not len(lengths):
        return encode(lengths, 1)
    bounds = 2 ** torch.arange(max(int(lengths.max()) - 1, 1).bit_length() + 1, device=lengths.device)
    group = torch.bucketize(lengths, bounds)  # group g: 2^(g-1) < len <= 2^g
    order = torch.argsort(group, stable=True)
    parts = [
        encode(rows, int(lengths[rows].max()))
        for rows in torch.split(order, torch.bincount(group).tolist())
        if len(rows)
    ]
    return torch.cat(parts)[torch.argsort(order)]


def causal_allowed(is_item: torch.Tensor) -> torch.Tensor:
    """[B, L, L]: query i may see key j <= i holding an item, and always itself (a padding row
    then never sees an empty key set, which would give NaN)."""
    L = is_item.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=is_item.device)
    causal = torch.ones(L, L, dtype=torch.bool, device=is_item.device).tril()
    return causal[None] & (is_item[:, None, :] | eye[None])


class GRU4Rec(_ItemTable):
    """GRU4Rec (Hidasi et al., ICLR 2016; paper ref. [18]): item embeddings -> GRU -> last hidden.

    Each left-padded history is flipped to right padding (items in columns 0..len-1) and run through
    the GRU without packing; the user vector is the top layer's output at the row's last real item
    (column len-1). A GRU is causal, so padding read after that column never reaches it: the result
    equals running each history alone, as packing did. To keep the padded steps few, each length
    group (``by_length_groups``) runs over its own longest history, in ~log2(max_len) GRU calls.
    On CPU this is ~1.4x faster per training step than packing (``pack_padded_sequence``), whose
    per-step bookkeeping dominated (docs/benchmarks.md, train).
    """

    def __init__(self, config: ModelConfig, info: DatasetInfo):
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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position i sees positions <= i holding items (and itself)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise MmsrError(f"--heads: {heads} does not divide --dim {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """[B, L, D]; with ``last_only`` the last position's output alone [B, 1, D] (its query
        against every key)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, allowed = q[:, :, -1:], allowed[:, -1:]
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


class SASRec(_ItemTable):
    """SASRec (Kang & McAuley, ICDM 2018; paper ref. [22]).

    Item embeddings (scaled by sqrt(d)) plus learned absolute position embeddings, ``layers``
    causal self-attention blocks, a final LayerNorm; the user vector is the output at the last
    (most recent) position. Trained with cross-entropy over all items, as the paper's harness
    does for every model (not the original's sampled binary cross-entropy).
    """

    def __init__(self, config: ModelConfig, info: DatasetInfo):
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


class ModalityCodeChannels:
    """Mixin: modality channels of items from their modality codes (SASRecF, GRU4RecF, NOVA, ...).

    An item's channel ``e_m`` in modality ``m`` is the mean of the embeddings of its top-k codes
    (build-codes); the code tables start from the cluster centres (``code_embedding_table``:
    rescaled to unit mean norm) and are trained. An item without codes in a modality has that
    channel masked: ``modality_channel`` returns a zero vector and ``available`` False for it, and
    the padding item ``n_items`` has no codes. Call ``init_code_channels`` from ``__init__``.
    """

    reads_codes = True

    def init_code_channels(self, info: DatasetInfo, model_name: str) -> list[int]:
        """Registers ``code_tables`` and ``item_codes_<i>`` buffers; returns each modality's code_dim."""
        if not info.modalities:
            raise MmsrError(f"model {model_name} needs at least one modality with codes; run `mmsr build-codes` first")
        self.modality_names = [m.name for m in info.modalities]
        self.code_tables = nn.ModuleList()
        for i, m in enumerate(info.modalities):
            if m.item_codes is None:
                raise MmsrError(f"model {model_name}: modality '{m.name}' has no item codes")
            codes = torch.as_tensor(np.asarray(m.item_codes), dtype=torch.long).view(info.n_items, -1)
            if codes.numel() and (codes.max() >= m.n_codes or codes.min() < -1):
                raise MmsrError(f"model {model_name}: modality '{m.name}' has code ids outside 0..{m.n_codes - 1}")
            # Padding row n_items has no codes.
            codes = torch.cat([codes, codes.new_full((1, codes.shape[1]), -1)])
            self.register_buffer(f"item_codes_{i}", codes, persistent=False)
            try:  # centres rescaled to unit mean norm, as for MMSR (see code_embedding_table)
                table = code_embedding_table(m)
            except ValueError as e:
                raise MmsrError(f"model {model_name}: {e}") from e
            self.code_tables.append(table)
        return [m.code_dim for m in info.modalities]

    def set_item_codes(self, modalities) -> None:
        """Replace each modality's item codes (the padding row keeps none); same modalities only."""
        if list(self.modality_names) != [m.name for m in modalities]:
            raise MmsrError(f"model modalities {self.modality_names} != {[m.name for m in modalities]}")
        for i, m in enumerate(modalities):
            buffer = getattr(self, f"item_codes_{i}")
            codes = torch.as_tensor(np.asarray(m.item_codes), dtype=buffer.dtype).view(buffer.shape[0] - 1, -1)
            buffer[:-1] = codes.to(buffer.device)  # the last row is the padding item (no codes)

    def modality_channel(self, i: int, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean code embedding of modality ``i`` for ``items`` [...] -> ([..., code_dim], available [...])."""
        codes = getattr(self, f"item_codes_{i}")[items]  # [..., k]
        valid = codes >= 0
        emb = self.code_tables[i](codes.clamp(min=0)) * valid.unsqueeze(-1)
        count = valid.sum(-1, keepdim=True)
        return emb.sum(-2) / count.clamp(min=1), count.squeeze(-1) > 0


class SASRecF(ModalityCodeChannels, SASRec):
    """SASRec^F: early fusion of item ID and modality channels (paper section 3.1, Eq. 3-4).

    Each history item's channels are fused first, ``E_i = sigma(W cat[e_v; e_m1; e_m2; ...])``
    (sigma: GELU), then SASRec models the fused sequence (Eq. 4). A modality channel ``e_m`` of an
    item is the mean of the embeddings of its modality codes (build-codes' top-k codes); the code
    tables start from the cluster centres and are trained. An item without codes in a modality has
    that channel masked to zero, so only its available channels feed W. Candidates are scored
    against the item-ID table (Eq. 7) like the other models.
    """

    def __init__(self, config: ModelConfig, info: DatasetInfo):
        super().__init__(config, info)
        code_dims = self.init_code_channels(info, "sasrecf")
        self.fuse = nn.Linear(config.dim + sum(code_dims), config.dim)  # W of Eq. 3
        self.fuse_act = nn.GELU()  # sigma of Eq. 3
        # Scale: W and GELU shrink the fused rows to ~0.3 of an item row's norm, so after SASRec's
        # sqrt(d) they start at 3.4 beside positions of 11.3. A LayerNorm brings every fused row
        # to an item row's scale (per-coordinate std 1/sqrt(d)) before the sqrt(d).
        self.fuse_norm = nn.LayerNorm(config.dim)

    def fused_item_table(self) -> torch.Tensor:
        """Eq. 3 for every item: [n_items + 1, d]; the padding row is zero."""
        items = torch.arange(self.n_items + 1, device=self.item_emb.weight.device)
        channels = [self.item_emb(items)]
        for i in range(len(self.code_tables)):
            emb, _ = self.modality_channel(i, items)  # missing -> zero channel (masked)
            channels.append(emb)
        fused = self.fuse_act(self.fuse(torch.cat(channels, dim=-1)))
        fused = self.fuse_norm(fused) / math.sqrt(self.dim)
        return fused * (items != self.n_items).unsqueeze(-1)

    def input_embeddings(self, history: torch.Tensor) -> torch.Tensor:
        # Fusing the whole table is cheaper than fusing B * L history slots once B * L > n_items.
        return F.embedding(history, self.fused_item_table())
