"""BM3, a multi-modal collaborative baseline of the paper's Table 2 (user-item graphs: common.py)."""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import LGConv
from torch_geometric.utils import degree

from .base import DatasetInfo
from .common import Regularised, UserItemGraphModel, WithModalities


@dataclass
class BM3Config(Regularised, WithModalities):
    """BM3's options: width, LightGCN layers, the target views' dropout, the feature modalities."""


class BM3(UserItemGraphModel):
    """BM3 (Zhou et al., WWW 2023): bootstrapped latent views, no negatives, no target network.

    Encoder: ID embeddings of users and items propagated by LightGCN over the user-item graph
    (Eq. 2: symmetric-normalised adjacency, no transform, no non-linearity), read out as the mean
    of layers 0..L, items adding their own embedding (Eq. 3); each modality's raw features are
    projected by h_m = e_m W_m + b_m (Eq. 1); one predictor f_p is shared by all of them. Scores
    are f_p(h_u) . f_p(h_i) (the authors' inference).

    Self-supervised objective (:meth:`auxiliary_loss`, on the batch's (user, target) pairs,
    which are training interactions): the target view of a representation is a dropout of its
    stop-gradient copy (:meth:`target_view`; ratio ``dropout``); with C(a, b) = 1 - cos(a, b):
    graph reconstruction C(f_p(h_u), view(h_i)) + C(f_p(h_i), view(h_u)); inter-modality alignment
    C(f_p(h_m), view(h_i)); intra-modality masked reconstruction C(f_p(h_m), view(h_m)); summed
    with weight one. The harness adds them to its CE. BM3's L2 penalty on the embeddings is left
    to ``--weight-decay``; the features stay fixed.
    """

    config_class = BM3Config

    def __init__(self, config: BM3Config, info: DatasetInfo):
        super().__init__(config, info)
        self.view_dropout = config.dropout
        self.user_emb = nn.Embedding(self.n_users, config.dim)
        self.item_emb = nn.Embedding(self.n_items, config.dim)
        nn.init.xavier_uniform_(self.user_emb.weight)
        nn.init.xavier_uniform_(self.item_emb.weight)
        self.convs = nn.ModuleList(LGConv(normalize=False) for _ in range(config.layers))
        src, dst = self.edge_index
        inv_sqrt = degree(dst, num_nodes=self.n_nodes).clamp(min=1).pow(-0.5)
        self.register_buffer("edge_weight", inv_sqrt[src] * inv_sqrt[dst], persistent=False)  # 1/sqrt(d_u d_i)
        self.projections = nn.ModuleList(  # W_m, b_m of Eq. 1
            nn.Linear(self.features(i).shape[1], config.dim) for i in range(len(self.modality_names))
        )
        self.predictor = nn.Linear(config.dim, config.dim)  # f_p
        for lin in (*self.projections, self.predictor):
            nn.init.xavier_normal_(lin.weight)
        self._online: tuple[torch.Tensor, torch.Tensor] | None = None

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Online (h_u [U, d], h_i [I, d]) before the predictor (Eq. 2-3)."""
        x = torch.cat([self.user_emb.weight, self.item_emb.weight])
        adj_t = self.csr().matrix(self.edge_weight)  # D^-1/2 A D^-1/2, row = target
        layers = [x]
        for conv in self.convs:
            x = conv(x, adj_t)
            layers.append(x)
        users, items = self.split_nodes(torch.stack(layers).mean(0))
        return users, items + self.item_emb.weight

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        users, items = self.encode()
        if self.training:  # auxiliary_loss of the same step reuses this propagation
            self._online = (users, items)
        return self.predictor(users), self.predictor(items)

    def modality_latents(self, items: torch.Tensor) -> list[torch.Tensor]:
        """h_m = e_m W_m + b_m of ``items`` [N] for every modality (Eq. 1): [N, d] each."""
        return [proj(self.features(i)[items]) for i, proj in enumerate(self.projections)]

    def target_view(self, h: torch.Tensor) -> torch.Tensor:
        """The contrastive target: dropout of the stop-gradient representation (no target network)."""
        return F.dropout(h.detach(), p=self.view_dropout, training=True)

    def auxiliary_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        online, self._online = self._online, None
        h_u, h_i = online if online is not None and self.training else self.encode()
        users, items = batch["user_idx"], batch["target"]
        h_u, h_i = h_u[users], h_i[items]

        def c(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return 1.0 - F.cosine_similarity(a, b, dim=-1).mean()

        view_u, view_i = self.target_view(h_u), self.target_view(h_i)
        loss = c(self.predictor(h_u), view_i) + c(self.predictor(h_i), view_u)  # graph reconstruction
        for h_m in self.modality_latents(items):
            predicted = self.predictor(h_m)
            loss = loss + c(predicted, view_i)  # inter-modality feature alignment
            loss = loss + c(predicted, self.target_view(h_m))  # intra-modality masked reconstruction
        return loss
