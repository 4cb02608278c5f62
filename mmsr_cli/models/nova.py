"""NOVA: non-invasive self-attention for side information (a group C baseline of Table 2)."""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from .base import DatasetInfo
from .common import (
    Attentive, ItemTable, ModalityCodeChannels, SideInfoInput,
    SideInfoLayer, WithModalities, by_length_groups, causal_allowed, check_heads,
)


class NonInvasiveAttention(nn.Module):
    """NOVA layer attention (Liu et al., AAAI 2021, section "Non-invasive Self-attention").

    ``NOVA(R, S) = softmax(Q K^T / sqrt(d_h)) V`` with ``Q = F(R, S) W_Q``, ``K = F(R, S) W_K`` and
    ``V = R W_V``: side information S only shapes the attention map, the values (and so the
    layer's output space) stay pure item-ID representations. F is NOVA's gating fusion
    (section "Fusion Operations"): ``F(f_1..f_m) = sum_c G_c f_c, G = sigmoid([f_1..f_m] W^F)``
    over the item representation and every side channel; a masked (missing) channel has G_c = 0.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.gate = nn.Linear(dim, 1)  # W^F
        self.qk = nn.Linear(dim, 2 * dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def fuse(self, r: torch.Tensor, side: torch.Tensor, side_mask: torch.Tensor) -> torch.Tensor:
        """F(R, S): r [B, L, d], side [B, L, S, d], side_mask [B, L, S] -> [B, L, d]."""
        channels = torch.cat([r.unsqueeze(2), side], dim=2)  # [B, L, 1 + S, d]
        available = torch.cat([side_mask.new_ones(side_mask.shape[:2] + (1,)), side_mask], dim=2)
        gates = torch.sigmoid(self.gate(channels)) * available.unsqueeze(-1)
        return (gates * channels).sum(2)

    def forward(self, r, side, side_mask, allowed):
        B, L, D = r.shape
        fused = self.fuse(r, side, side_mask)
        q, k = self.qk(fused).view(B, L, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        v = self.value(r).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # pure item IDs
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(B, L, D))


@dataclass
class NOVAConfig(Attentive, WithModalities):
    """NOVA's options: width, layers, heads, dropout, and the side-information modalities."""


class NOVA(SideInfoInput, ModalityCodeChannels, ItemTable):
    """NOVA (Liu et al., AAAI 2021: "Noninvasive Self-attention for Side Information Fusion in
    Sequential Recommendation"; paper ref. [28]).

    The layers' input and values are the item-ID embeddings only; the side information - the
    position embedding (NOVA treats position as side information) and one channel per modality
    (the mean code embedding projected to d; masked where the item has no codes) - enters the
    queries and keys through the gating fusion of every layer (``NonInvasiveAttention``). The
    user vector is the last position's output. Backbone: the harness's unidirectional blocks with
    cross-entropy on the next item (NOVA-BERT's bidirectional Cloze training does not fit the
    shared next-item harness); the non-invasive layer is the paper's.
    """

    config_class = NOVAConfig

    def __init__(self, config: NOVAConfig, info: DatasetInfo):
        super().__init__(config, info)
        check_heads(config.dim, config.heads)
        code_dims = self.init_code_channels(info, "nova")
        self.max_len = info.max_len
        self.pos_emb = nn.Embedding(info.max_len, config.dim)
        self.side_proj = nn.ModuleList(nn.Linear(cd, config.dim) for cd in code_dims)
        # Scale: a projected code channel starts at norm ~0.75 beside LayerNorm'd item rows and
        # positions of ~11.3, so the gate would start by ignoring it; a LayerNorm per channel puts
        # it at the item rows' scale.
        self.side_norm = nn.ModuleList(nn.LayerNorm(config.dim) for _ in code_dims)
        self.input_norm = nn.LayerNorm(config.dim)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            SideInfoLayer(NonInvasiveAttention(config.dim, config.heads, config.dropout), config.dim, config.dropout)
            for _ in range(config.layers)
        )

    def side_information(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S: [B, L, 1 + M, d] (position, then each modality) and its mask [B, L, 1 + M]."""
        B, L = history.shape
        positions = torch.arange(self.max_len - L, self.max_len, device=history.device)
        side = [self.pos_emb(positions)[None].expand(B, L, -1)]
        mask = [torch.ones(B, L, dtype=torch.bool, device=history.device)]
        for i, (proj, norm) in enumerate(zip(self.side_proj, self.side_norm)):
            emb, available = self.modality_channel(i, history)
            side.append(norm(proj(emb)) * available.unsqueeze(-1))
            mask.append(available)
        return torch.stack(side, dim=2), torch.stack(mask, dim=2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, is_item, keep, r = self.id_input(batch)  # R_0: item IDs only
        L = history.shape[1]

        def encode(rows: torch.Tensor, steps: int) -> torch.Tensor:
            cut = slice(L - steps, L)
            # S of the group's own span: the same rows as the batch's (each slot's S depends on
            # its item and position alone), where slicing a batch-wide [B, L, 1 + M, d] S for
            # each group cost a zero-filled batch-sized gradient per group (15 % of a step)
            s, s_mask = self.side_information(history[rows, cut])
            h, keep_h = r[rows, cut], keep[rows, cut]
            allowed = causal_allowed(is_item[rows, cut])
            for layer in self.layers:
                h = layer(h, s, s_mask, allowed, keep_h)
            return h[:, -1]

        return by_length_groups(is_item.sum(1).clamp(min=1), encode)
