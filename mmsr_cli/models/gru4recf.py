"""GRU4Rec^F: late fusion of item-ID and modality-channel sequences (paper section 3.1, group C)."""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from .base import DatasetInfo
from .common import ItemTable, ModalityCodeChannels, Regularised, WithModalities, by_length_groups, trimmed_history


@dataclass
class GRU4RecFConfig(Regularised, WithModalities):
    """GRU4Rec^F's options: GRU4Rec's and the modalities of its channel GRUs."""


class GRU4RecF(ModalityCodeChannels, ItemTable):
    """GRU4Rec^F: late fusion (paper section 3.1, Eq. 5-6; a baseline of section 5, group C).

    Each feature channel is first modelled as a sequence on its own, ``E_:,j = M([E_1,j..E_m,j])``
    (Eq. 5, M a GRU: one over the item-ID embeddings, one per modality over its channel), and the
    channels' sequence outputs are fused only afterwards, ``P = sigma(W cat[E_:,1; E_:,2; ...])``
    (Eq. 6; sigma = GELU, as SASRec^F's Eq. 3). This is the parallel-GRU design of RecBole's
    GRU4RecF (Hidasi et al., RecSys 2016, p-RNN with concatenated outputs), with one GRU per
    modality instead of one over all features. ``P`` is read at the last item. A missing modality
    channel is a zero input to its GRU at that step; dropout is on the item-ID input, as in RecBole.
    """

    config_class = GRU4RecFConfig

    def __init__(self, config: GRU4RecFConfig, info: DatasetInfo):
        super().__init__(config, info)
        code_dims = self.init_code_channels(info, "gru4recf")
        gru_dropout = config.dropout if config.layers > 1 else 0.0
        self.emb_dropout = nn.Dropout(config.dropout)
        self.channel_grus = nn.ModuleList(  # M of Eq. 5: item ID, then each modality
            nn.GRU(in_dim, config.dim, num_layers=config.layers, batch_first=True, dropout=gru_dropout)
            for in_dim in (config.dim, *code_dims)
        )
        self.fuse = nn.Linear(len(self.channel_grus) * config.dim, config.dim)  # W of Eq. 6
        self.fuse_act = nn.GELU()  # sigma of Eq. 6

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history, is_item = trimmed_history(batch, self.n_items)
        L = history.shape[1]
        lengths = is_item.sum(1).clamp(min=1)

        def encode(rows: torch.Tensor, steps: int) -> torch.Tensor:
            n = lengths[rows]
            # Right-align each history (items in columns 0..n-1); the GRUs are causal, so the
            # padding read after column n-1 never reaches the output taken there.
            cols = (torch.arange(steps, device=history.device)[None, :] + (L - n)[:, None]) % L
            items = history[rows].gather(1, cols)
            inputs = [self.emb_dropout(self.item_emb(items))]
            inputs += [self.modality_channel(i, items)[0] for i in range(len(self.code_tables))]
            last = torch.arange(len(rows), device=history.device)
            outputs = [gru(x)[0][last, n - 1] for gru, x in zip(self.channel_grus, inputs)]  # Eq. 5
            return self.fuse_act(self.fuse(torch.cat(outputs, dim=-1)))  # Eq. 6

        return by_length_groups(lengths, encode)
