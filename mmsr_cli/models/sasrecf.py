"""SASRec^F: SASRec over items fused early with their modality channels (paper section 3.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import DatasetInfo
from .common import Attentive, ModalityCodeChannels, WithModalities
from .sasrec import SASRec


@dataclass
class SASRecFConfig(Attentive, WithModalities):
    """SASRec^F's options: SASRec's and the modalities whose codes are fused in."""


class SASRecF(ModalityCodeChannels, SASRec):
    """SASRec^F: early fusion of item ID and modality channels (paper section 3.1, Eq. 3-4).

    Each history item's channels are fused first, ``E_i = sigma(W cat[e_v; e_m1; e_m2; ...])``
    (sigma: GELU), then SASRec models the fused sequence (Eq. 4). A modality channel ``e_m`` of an
    item is the mean of the embeddings of its modality codes (build-codes' top-k codes); the code
    tables start from the cluster centres and are trained. An item without codes in a modality has
    that channel masked to zero, so only its available channels feed W. Candidates are scored
    against the item-ID table (Eq. 7) like the other models.
    """

    config_class = SASRecFConfig

    def __init__(self, config: SASRecFConfig, info: DatasetInfo):
        super().__init__(config, info)
        code_dims = self.init_code_channels(info, "sasrecf")
        self.fuse = nn.Linear(config.dim + sum(code_dims), config.dim)  # W of Eq. 3
        self.fuse_act = nn.GELU()  # sigma of Eq. 3
        # Scale: W and GELU shrink the fused rows to ~0.3 of an item row's norm, so after SASRec's
        # sqrt(d) they start at 3.4 beside positions of 11.3. A LayerNorm brings every fused row
        # to an item row's scale (per-coordinate std 1/sqrt(d)) before the sqrt(d).
        self.fuse_norm = nn.LayerNorm(config.dim)

    def fused_items(self, items: torch.Tensor) -> torch.Tensor:
        """Eq. 3 for ``items`` [n] -> [n, d]; the padding item's row is zero. Row by row: an item's
        row does not depend on which others are fused with it."""
        channels = [self.item_emb(items)]
        for i in range(len(self.code_tables)):
            emb, _ = self.modality_channel(i, items)  # missing -> zero channel (masked)
            channels.append(emb)
        fused = self.fuse_act(self.fuse(torch.cat(channels, dim=-1)))
        fused = self.fuse_norm(fused) / math.sqrt(self.dim)
        return fused * (items != self.n_items).unsqueeze(-1)

    def fused_item_table(self) -> torch.Tensor:
        """Eq. 3 for every item: [n_items + 1, d]; the padding row is zero."""
        return self.fused_items(torch.arange(self.n_items + 1, device=self.item_emb.weight.device))

    def input_embeddings(self, history: torch.Tensor) -> torch.Tensor:
        # Eq. 3 once per distinct item of the batch: a Beauty batch of 512 histories holds about a
        # third of the 12,101 items, and B * L history slots are more than all of them.
        items, slots = torch.unique(history, return_inverse=True)
        return F.embedding(slots, self.fused_items(items))
