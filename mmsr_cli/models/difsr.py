"""DIF-SR: decoupled side information fusion (a group C baseline of Table 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MmsrError
from .base import DatasetInfo
from .common import (
    Attentive, ItemTable, ModalityCodeChannels, SideInfoInput,
    SideInfoLayer, WithModalities, by_length_groups, causal_allowed, check_heads,
)


class DecoupledAttention(nn.Module):
    """DIF attention (Xie et al., SIGIR 2022, "Decoupled Side Information Fusion" module).

    Separate attention maps per head from the item representation, the position embedding and
    each attribute (here: each modality channel), each with its own W_Q / W_K:
    ``att_ID = (R W_Q^ID)(R W_K^ID)^T``, ``att_p = (P W_Q^p)(P W_K^p)^T``,
    ``att_fj = (E^fj W_Q^fj)(E^fj W_K^fj)^T``; they are fused into one map
    ``F(att_ID, att_f1.., att_p)`` (sum, concat or gate), scaled by 1/sqrt(d_h), masked, softmaxed
    and applied to the item-ID values only, ``V = R W_V``. Attribute heads are ``code_dim / heads``
    wide (at least 1), as the reference code sizes attributes by their own hidden size.

    A missing modality channel of item i or j contributes 0 to ``att_fj[i, j]``. The fusions
    follow the reference implementation: ``concat`` is a linear map of the maps' concatenated rows
    and ``gate`` a vanilla attention (MLP over each map's row, softmax over maps) choosing a
    per-row mix; both read rows of ``max_len`` keys, with disallowed keys zeroed and rows aligned
    at the most recent position, so padding never enters them.
    """

    FUSIONS = ("sum", "concat", "gate")

    def __init__(self, dim: int, heads: int, side_dims: list[int], max_len: int, fusion: str, dropout: float):
        super().__init__()
        if fusion not in self.FUSIONS:
            raise MmsrError(f"DIF-SR attention fusion: expected one of {', '.join(self.FUSIONS)}, got {fusion!r}")
        self.heads, self.head_dim, self.max_len, self.fusion = heads, dim // heads, max_len, fusion
        self.item_qk = nn.Linear(dim, 2 * dim)
        self.value = nn.Linear(dim, dim)
        # Side sources: position (dim) then each modality (its code_dim).
        self.side_qk = nn.ModuleList(nn.Linear(sd, 2 * heads * max(1, sd // heads)) for sd in side_dims)
        n_maps = 1 + len(side_dims)
        if fusion == "concat":
            self.fuse_maps = nn.Linear(n_maps * max_len, max_len)
        elif fusion == "gate":
            self.fuse_maps = nn.Sequential(nn.Linear(max_len, max_len), nn.ReLU(), nn.Linear(max_len, 1))
        self.out = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)

    def _scores(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        B, L, _ = x.shape
        q, k = proj(x).view(B, L, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return q @ k.transpose(-1, -2)  # [B, H, L, L]

    def attention_maps(self, r, sides, side_masks) -> torch.Tensor:
        """[B, H, L, L, 1 + S] unscaled maps: item ID first, then each side source in order."""
        maps = [self._scores(r, self.item_qk)]
        for x, mask, proj in zip(sides, side_masks, self.side_qk):
            pair = (mask[:, :, None] & mask[:, None, :]).unsqueeze(1)  # both items have the channel
            maps.append(self._scores(x, proj) * pair)
        return torch.stack(maps, dim=-1)

    def fuse(self, maps: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """F(att_ID, att_f.., att_p): [B, H, L, L, n] -> [B, H, L, L]."""
        if self.fusion == "sum":
            return maps.sum(-1)
        B, H, L, _, n = maps.shape
        # Rows of max_len keys, the most recent key last; disallowed / absent keys are zero.
        rows = (maps * allowed[:, None, :, :, None]).permute(0, 1, 2, 4, 3)  # [B, H, L, n, L]
        rows = F.pad(rows, (self.max_len - L, 0))
        if self.fusion == "concat":
            return self.fuse_maps(rows.flatten(-2))[..., self.max_len - L :]
        weights = torch.softmax(self.fuse_maps(rows).squeeze(-1), dim=-1)  # [B, H, L, n]
        return (rows * weights.unsqueeze(-1)).sum(-2)[..., self.max_len - L :]

    def forward(self, r, sides, side_masks, allowed):
        B, L, D = r.shape
        fused = self.fuse(self.attention_maps(r, sides, side_masks), allowed) / math.sqrt(self.head_dim)
        probs = self.attn_dropout(torch.softmax(fused.masked_fill(~allowed[:, None], float("-inf")), dim=-1))
        v = self.value(r).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # item-ID values
        return self.out((probs @ v).transpose(1, 2).reshape(B, L, D))


@dataclass
class DIFSRConfig(Attentive, WithModalities):
    """DIF-SR's options: width, layers, heads, dropout, and the side-information modalities."""


class DIFSR(SideInfoInput, ModalityCodeChannels, ItemTable):
    """DIF-SR (Xie et al., SIGIR 2022: "Decoupled Side Information Fusion for Sequential
    Recommendation"; paper ref. [49]).

    Side information moves from the input to the attention layer: the layers' input is the item-ID
    embedding alone (LayerNorm + dropout), and every layer computes decoupled attention maps from
    the item representation, the position embedding and each modality channel (the mean code
    embedding, code_dim wide), fuses them (``DecoupledAttention``; gate fusion by default, as in
    the authors' Amazon configs) and aggregates item-ID values. The user vector is the last
    position's output.

    Auxiliary attribute predictors (DIF-SR's "Prediction with AAP"): during training one linear predictor per
    modality reads the user vector and predicts the target item's modality codes (multi-hot,
    binary cross-entropy averaged over the codes), added to the harness's cross-entropy with
    weight ``ATTRIBUTE_LOSS_WEIGHT``. The authors' lambda = 10 (Beauty) / 5 (Sports) weighs a BCE
    averaged over hundreds of sparse categories; averaged over c modality codes with k of them
    positive the same BCE is an order of magnitude larger, and lambda = 10 outweighed the CE
    (synthetic data, 150 steps: valid NDCG@10 0.061 vs 0.103 without the predictors, 0.099 with
    lambda = 1). lambda = 1 keeps them an auxiliary objective.
    """

    ATTRIBUTE_LOSS_WEIGHT = 1.0

    config_class = DIFSRConfig

    def __init__(self, config: DIFSRConfig, info: DatasetInfo, fusion: str = "gate"):
        super().__init__(config, info)
        check_heads(config.dim, config.heads)
        code_dims = self.init_code_channels(info, "difsr")
        self.max_len = info.max_len
        self.pos_emb = nn.Embedding(info.max_len, config.dim)
        self.input_norm = nn.LayerNorm(config.dim)
        self.emb_dropout = nn.Dropout(config.dropout)
        side_dims = [config.dim, *code_dims]
        # Scale: a code channel (unit mean norm) starts ~15x smaller than the positions (~11.3),
        # and its attention map ~200x smaller than the item map; a LayerNorm per code channel puts
        # it at the scale of the LayerNorm'd item rows.
        self.side_norm = nn.ModuleList(nn.LayerNorm(cd) for cd in code_dims)
        self.layers = nn.ModuleList(
            SideInfoLayer(DecoupledAttention(config.dim, config.heads, side_dims, info.max_len, fusion, config.dropout),
                          config.dim, config.dropout)
            for _ in range(config.layers)
        )
        self.attribute_predictors = nn.ModuleList(nn.Linear(config.dim, m.n_codes) for m in info.modalities)
        self._training_users: tuple[torch.Tensor, torch.Tensor] | None = None  # (history, users)

    def side_sources(self, history: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Position embedding [B, L, d] then each modality channel [B, L, code_dim], with masks."""
        B, L = history.shape
        positions = torch.arange(self.max_len - L, self.max_len, device=history.device)
        sides = [self.pos_emb(positions)[None].expand(B, L, -1)]
        masks = [torch.ones(B, L, dtype=torch.bool, device=history.device)]
        for i, norm in enumerate(self.side_norm):
            emb, available = self.modality_channel(i, history)
            sides.append(norm(emb) * available.unsqueeze(-1))
            masks.append(available)
        return sides, masks

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, is_item, keep, r = self.id_input(batch)  # r: item IDs only
        L = history.shape[1]

        def encode(rows: torch.Tensor, steps: int) -> torch.Tensor:
            cut = slice(L - steps, L)
            items = is_item[rows, cut]
            h, keep_h, allowed = r[rows, cut], keep[rows, cut], causal_allowed(items)
            # the side sources of the group's own span (each slot's depends on its item and
            # position alone): no batch-wide tensors sliced, and their gradients zero-filled, per group
            s, s_masks = self.side_sources(history[rows, cut])
            s_masks = [m & items for m in s_masks]
            for layer in self.layers:
                h = layer(h, s, s_masks, allowed, keep_h)
            return h[:, -1]

        users = by_length_groups(is_item.sum(1).clamp(min=1), encode)
        # The harness calls auxiliary_loss right after scoring the same training batch: reuse.
        self._training_users = (batch["history"], users) if self.training else None
        return users

    def target_code_labels(self, i: int, targets: torch.Tensor) -> torch.Tensor:
        """[B, n_codes] multi-hot of the targets' codes in modality ``i`` (none: all zero)."""
        codes = getattr(self, f"item_codes_{i}")[targets]  # [B, k], -1 = none
        labels = torch.zeros(len(targets), self.code_tables[i].num_embeddings + 1, device=targets.device)
        labels.scatter_(1, codes.masked_fill(codes < 0, labels.shape[1] - 1), 1.0)
        return labels[:, :-1]

    def auxiliary_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """DIF-SR's AAP loss: lambda * sum over modalities of BCE(predictor(u), target's codes)."""
        cached = self._training_users
        users = cached[1] if cached is not None and cached[0] is batch["history"] else self(batch)
        self._training_users = None
        loss = users.new_zeros(())
        for i, predictor in enumerate(self.attribute_predictors):
            labels = self.target_code_labels(i, batch["target"].to(users.device))
            loss = loss + F.binary_cross_entropy_with_logits(predictor(users), labels)
        return self.ATTRIBUTE_LOSS_WEIGHT * loss
