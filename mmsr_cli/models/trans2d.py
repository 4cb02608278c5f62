"""Trans2D: 2D attention over items x feature channels (a group C baseline of Table 2)."""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from ..errors import MmsrError
from .base import DatasetInfo
from .common import (
    Attentive, ItemTable, ModalityCodeChannels, WithModalities, by_length_groups, check_heads, trimmed_history,
)


class Linear2D(nn.Module):
    """Trans2D's Linear2D: one weight matrix per channel, ``y[.., c, :] = x[.., c, :] W_c + b_c``."""

    def __init__(self, channels: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(channels, out_dim))
        nn.init.normal_(self.weight, std=in_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., C, in] -> [..., C, out]
        return torch.einsum("...ci,cio->...co", x, self.weight) + self.bias


def attention2d_mask(is_item: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """[B, L*C, L*C] for Attention2D: (i, c) sees (j, c') iff j <= i, item j is real and has
    channel c'; every query also sees its own item's ID channel (no empty row)."""
    B, L, C = available.shape
    device = is_item.device
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    keys = (available & is_item.unsqueeze(-1)).view(B, 1, 1, L, C)
    own_id = torch.zeros(L, C, L, C, dtype=torch.bool, device=device)
    own_id[torch.arange(L), :, torch.arange(L), 0] = True
    allowed = (causal.view(1, L, 1, L, 1) & keys) | own_id[None]
    return allowed.reshape(B, L * C, L * C)


class Attention2D(nn.Module):
    """Trans2D's Attention2D (Singer et al., WSDM 2022): attention over items x channels.

    Q, K, V come from channel-specific projections (Linear2D) of the [L, C, d] input, and every
    (item i, channel c) query attends to every (item j <= i, channel c') key. The score of that
    pair is the weighted sum of three terms, with learnable weights alpha (one per term and
    layer, starting at 1, as in the authors' implementation):

    - the 4D term ``q[i,c] . k[j,c']``: item-item, channel-channel and item-channel relations at
      once (the "4D attention matrices" of the MMSR paper's related work);
    - the channel-channel term ``sum_t q[t,c] . k[t,c']``, the same for every item pair. The
      authors sum over the whole sequence; here over t <= i, so that no query reads later
      items (only the last item's output is scored, so the last query sums over all of them);
    - the item-item term ``sum_c q[i,c] . k[j,c]``, the same for every channel pair.

    Missing channels (an item without codes in a modality, or padding) take no part in either
    sum, and their keys are masked. Heads split d as in SASRec (the authors give every head the
    full width).
    """

    def __init__(self, channels: int, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = Linear2D(channels, dim, 3 * dim)
        self.out = Linear2D(channels, dim, dim)
        self.alpha = nn.Parameter(torch.ones(3))  # weights of the 4D, channel and item terms
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """x [B, L, C, d], allowed [B, L*C, L*C] (attention2d_mask), available [B, L, C]."""
        B, L, C, D = x.shape
        H, dh = self.heads, D // self.heads
        q, k, v = self.qkv(x).reshape(B, L, C, 3, H, dh).unbind(3)  # each [B, L, C, H, dh]
        m = available[..., None, None].to(x.dtype)
        qm, km = q * m, k * m
        full = torch.einsum("bichd,bjehd->bhicje", q, k)
        channel = torch.einsum("btchd,btehd->bhtce", qm, km).cumsum(2)  # prefix over t <= i
        item = torch.einsum("bichd,bjchd->bhij", qm, km)
        a = self.alpha
        scores = a[0] * full + a[1] * channel[:, :, :, :, None, :] + a[2] * item[:, :, :, None, :, None]
        scores = scores.reshape(B, H, L * C, L * C) * dh**-0.5
        attn = self.dropout(scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1))
        y = attn @ v.permute(0, 3, 1, 2, 4).reshape(B, H, L * C, dh)  # [B, H, L*C, dh]
        return self.out(y.transpose(1, 2).reshape(B, L, C, D))


class Trans2DLayer(nn.Module):
    """Transformer layer on 2D input: Attention2D and a per-channel (Linear2D) FFN, post-LN.

    The FFN keeps width d (as SASRec's; the authors' BERT layer widens to 3072 on a 16-d model),
    and LayerNorm normalises each (item, channel) cell, so that missing channels, zeroed, do not
    shift the statistics of the others (the authors normalise an item's C x d block at once).
    """

    def __init__(self, channels: int, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn = Attention2D(channels, dim, heads, dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(Linear2D(channels, dim, dim), nn.GELU(), Linear2D(channels, dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, allowed, available):
        x = self.attn_norm(x + self.dropout(self.attn(x, allowed, available)))
        x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x * available.unsqueeze(-1).to(x.dtype)


@dataclass
class Trans2DConfig(Attentive, WithModalities):
    """Trans2D's options: width, layers, heads, dropout, and the modality channels."""


class Trans2D(ModalityCodeChannels, ItemTable):
    """Trans2D (Singer et al., WSDM 2022: "Sequential Modeling with Multiple Attributes for
    Watchlist Recommendation in E-Commerce"; paper ref. [40]): holistic fusion.

    Embedding layer: each history item is a row of C channels - its item-ID embedding and one
    channel per modality (mean code embedding mapped to d by a per-channel projection) - plus the
    position embedding on every channel: E in R^{L x C x d} (MMSR paper section 3.1, the input
    of holistic fusion). ``layers`` Trans2D layers (``Attention2D``) process E as a whole, without
    first reducing the channels. Prediction: the last item's C channel outputs, concatenated
    (missing channels zero), mapped to d.
    """

    config_class = Trans2DConfig

    def __init__(self, config: Trans2DConfig, info: DatasetInfo):
        super().__init__(config, info)
        check_heads(config.dim, config.heads)
        code_dims = self.init_code_channels(info, "trans2d")
        self.channels = 1 + len(code_dims)
        self.max_len = info.max_len
        self.channel_proj = nn.ModuleList(nn.Linear(cd, config.dim) for cd in code_dims)
        self.pos_emb = nn.Embedding(info.max_len, config.dim)
        nn.init.normal_(self.pos_emb.weight, std=config.dim**-0.5)  # the item table's scale
        self.input_norm = nn.LayerNorm(config.dim)  # BERT-style embedding LayerNorm (post-LN layers)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Trans2DLayer(self.channels, config.dim, config.heads, config.dropout) for _ in range(config.layers))
        self.predict = nn.Linear(self.channels * config.dim, config.dim)

    def channel_inputs(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E [B, L, C, d] (channel 0: item ID) and channel availability [B, L, C]."""
        channels = [self.item_emb(history)]
        available = [history != self.n_items]
        for i, proj in enumerate(self.channel_proj):
            emb, has = self.modality_channel(i, history)
            channels.append(proj(emb))
            available.append(has)
        return torch.stack(channels, dim=2), torch.stack(available, dim=2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, is_item = trimmed_history(batch, self.n_items)
        L = history.shape[1]
        if L > self.max_len:
            raise MmsrError(f"history length {L} exceeds the model's max_len {self.max_len}")
        x, available = self.channel_inputs(history)
        available = available & is_item.unsqueeze(-1)
        keep = available.unsqueeze(-1).to(x.dtype)
        positions = torch.arange(self.max_len - L, self.max_len, device=history.device)
        x = self.emb_dropout(self.input_norm(x + self.pos_emb(positions)[None, :, None])) * keep

        def encode(rows: torch.Tensor, steps: int) -> torch.Tensor:
            # Attention over steps x C tokens: grouping by length matters most here.
            cut = slice(L - steps, L)
            h, available_h = x[rows, cut], available[rows, cut]
            allowed = attention2d_mask(is_item[rows, cut], available_h)
            for layer in self.layers:
                h = layer(h, allowed, available_h)
            return self.predict(h[:, -1].reshape(len(rows), -1))

        return by_length_groups(is_item.sum(1).clamp(min=1), encode)
