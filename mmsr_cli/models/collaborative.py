"""Multi-modal collaborative baselines of the paper's Table 2: MMGCN, MGAT and BM3.

None of them reads sequence order. A user is one node of a user-item graph built from the
training interactions only (``DatasetInfo.train_interactions``: what each user met before their
validation target; never a validation or test target), and every sample of that user, whatever
its history, gets that node's vector; the history in the batch is ignored. Items carry the raw
features written by ``mmsr extract-features`` (``DatasetInfo.item_features``, features/NAME.pt;
items without features have zero rows), as in the three papers, not the build-codes centres.

Scoring is the harness's: a dot product between user and item representations, trained with
cross-entropy over all items like every model (the originals train with BPR and sampled
negatives, BM3 with its self-supervised losses alone; BM3 adds those through
:meth:`~mmsr_cli.models.base.Recommender.auxiliary_loss`).

Graph nodes are the users ``0..U-1`` followed by the items ``U..U+I-1``; ``edge_index`` holds
every training interaction in both directions (PyTorch Geometric's source -> target layout),
sorted by target, so that propagation runs as CSR sparse kernels: PyG's SimpleConv/LGConv on a
sparse adjacency, and for MGAT's attention the sampled dense-dense product and sparse matmul of
``layers.py`` (on Beauty's 308k directed edges, ~10x faster on CPU than gathering one d-vector
per edge). The whole graph is propagated once per training batch; under ``torch.no_grad`` in
eval mode the propagated representations are kept until a parameter changes, so full-ranking
evaluation propagates once per pass instead of once per batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import LGConv, SimpleConv
from torch_geometric.utils import degree, softmax

from ..errors import MmsrError
from .base import DatasetInfo, ModelConfig, Recommender
from .layers import CsrGraph, _Aggregate, _EdgeDot


class UserItemGraphModel(Recommender):
    """Shared part: the training user-item graph, item feature buffers, scoring by user node."""

    input_kind = "user-item"  # the training user-item pairs and the items' features (inputs.py)

    def __init__(self, config: ModelConfig, info: DatasetInfo):
        super().__init__()
        name = config.model
        if info.train_interactions is None:
            raise MmsrError(f"model {name}: the dataset info has no training interactions")
        if not info.item_features:
            raise MmsrError(f"model {name} needs item features; run `mmsr extract-features` first")
        self.n_users, self.n_items, self.dim = info.n_users, info.n_items, config.dim
        pairs = torch.as_tensor(np.asarray(info.train_interactions), dtype=torch.long).reshape(-1, 2)
        users, items = pairs[:, 0], pairs[:, 1]
        if pairs.numel() and (users.min() < 0 or users.max() >= self.n_users or items.min() < 0 or items.max() >= self.n_items):
            raise MmsrError(f"model {name}: training interactions outside {self.n_users} users x {self.n_items} items")
        item_nodes = items + self.n_users
        src, dst = torch.cat([users, item_nodes]), torch.cat([item_nodes, users])
        order = torch.argsort(dst * self.n_nodes + src)  # by target, then source: CSR rows
        self.register_buffer("edge_index", torch.stack([src[order], dst[order]]), persistent=False)
        self._csr: CsrGraph | None = None
        self.modality_names = list(info.item_features)
        for i, (m, feats) in enumerate(info.item_features.items()):
            feats = torch.as_tensor(feats, dtype=torch.float32)
            if feats.dim() != 2 or feats.shape[0] != self.n_items:
                raise MmsrError(
                    f"model {name}: features of modality '{m}' have shape {tuple(feats.shape)}, expected ({self.n_items}, dim)"
                )
            self.register_buffer(f"features_{i}", feats, persistent=False)
        self._eval_cache: tuple | None = None

    @property
    def n_nodes(self) -> int:
        return self.n_users + self.n_items

    def features(self, i: int) -> torch.Tensor:
        return getattr(self, f"features_{i}")

    def csr(self) -> CsrGraph:
        """The graph as CSR index arrays (row = target), built once per device."""
        if self._csr is None or self._csr.row.device != self.edge_index.device:
            self._csr = CsrGraph(self.edge_index[1], self.edge_index[0], self.n_nodes, self.n_nodes)
        return self._csr

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user representations [U, d'], item representations [I, d']) over the whole graph."""
        raise NotImplementedError

    def representations(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training or torch.is_grad_enabled():
            self._eval_cache = None
            return self.propagate()
        # Keyed on every parameter's and buffer's storage and in-place version: an optimizer
        # step, load_state_dict or .to() all change it.
        key = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = (key, self.propagate())
        return self._eval_cache[1]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.representations()[0][batch["user_idx"]]

    def item_embeddings(self) -> torch.Tensor:
        return self.representations()[1]

    def user_and_item_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        users, items = self.representations()  # one propagation for both sides
        return users[batch["user_idx"]], items

    def split_nodes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[: self.n_users], x[self.n_users :]


class ModalityInput(nn.Module):
    """Layer-0 node vectors of one modality graph (MMGCN's modal graphs, MGAT's embedding layer).

    Users: a learned modality-specific preference vector; items: their features reduced to ``dim``
    by a learned linear map (the authors' code of both papers, ``dim_latent``; MGAT adds tanh).
    Rows are L2-normalised as in the authors' code.
    """

    def __init__(self, n_users: int, feat_dim: int, dim: int, squash: bool):
        super().__init__()
        self.preference = nn.Embedding(n_users, dim)
        self.project = nn.Linear(feat_dim, dim)
        self.squash = squash
        nn.init.xavier_normal_(self.preference.weight)
        nn.init.xavier_normal_(self.project.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        items = self.project(features)
        if self.squash:
            items = torch.tanh(items)
        return F.normalize(torch.cat([self.preference.weight, items]), dim=-1)


class MMGCNLayer(nn.Module):
    """One MMGCN layer on one modality graph: its aggregation layer, then its combination layer.

    Aggregation: h = LeakyReLU(mean_{j in N(v)} W1 x_j) (Eq. 1 with the mean aggregator).
    Combination: x_hat = LeakyReLU(W2 x_v) + e_id(v), the node itself in the ID space (Eq. 5),
    then x' = LeakyReLU(W3 [h; x_hat]) (the concatenation combiner). Equation numbers as the
    authors' code comments them.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.neighbour = nn.Linear(dim, dim, bias=False)  # W1
        self.aggregate = SimpleConv(aggr="mean")  # mean over the neighbourhood, no self loop
        self.own = nn.Linear(dim, dim)  # W2
        self.combine = nn.Linear(2 * dim, dim)  # W3
        for lin in (self.neighbour, self.own, self.combine):
            nn.init.xavier_normal_(lin.weight)

    def forward(self, x: torch.Tensor, id_emb: torch.Tensor, adj_t: torch.Tensor) -> torch.Tensor:
        """``adj_t``: sparse [N, N] adjacency, row = target (PyG's ``adj_t``)."""
        h = F.leaky_relu(self.aggregate(self.neighbour(x), adj_t))
        x_hat = F.leaky_relu(self.own(x)) + id_emb
        return F.leaky_relu(self.combine(torch.cat([h, x_hat], dim=-1)))


class MMGCN(UserItemGraphModel):
    """MMGCN (Wei et al., ACM MM 2019): one GCN per modality over the same user-item graph.

    Each modality m has its own graph (modal-specific user-item graphs): item nodes start from
    the item's features of m, user nodes from a learned preference vector (ModalityInput);
    ``layers`` MMGCNLayers propagate on it, each combining the node with its neighbourhood and the
    ID embedding shared by all modalities. Model prediction: a node's representation is the sum
    over modalities of its last layer's output, and scores are inner products. Dense inputs: the
    raw extract-features vectors. ``dropout`` is not used (MMGCN has none).
    """

    def __init__(self, config: ModelConfig, info: DatasetInfo):
        super().__init__(config, info)
        self.id_emb = nn.Embedding(self.n_nodes, config.dim)  # shared ID embedding of users and items
        nn.init.xavier_normal_(self.id_emb.weight)
        self.inputs = nn.ModuleList(
            ModalityInput(self.n_users, self.features(i).shape[1], config.dim, squash=False)
            for i in range(len(self.modality_names))
        )
        self.layers = nn.ModuleList(
            nn.ModuleList(MMGCNLayer(config.dim) for _ in range(config.layers)) for _ in self.modality_names
        )

    def modality_representations(self) -> list[torch.Tensor]:
        """Each modality graph's last-layer node vectors [U + I, d], before they are summed."""
        out = []
        for i, (inp, layers) in enumerate(zip(self.inputs, self.layers)):
            x = inp(self.features(i))
            adj_t = self.csr().pattern(x)
            for layer in layers:
                x = layer(x, self.id_emb.weight, adj_t)
            out.append(x)
        return out

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_nodes(torch.stack(self.modality_representations()).sum(0))


class GatedGraphAttention(nn.Module):
    """MGAT's gated attention aggregation over one modality graph (its embedding propagation layer).

    With z = W x and the score s(v, j) = z_v . LeakyReLU(z_j) between a node v and a neighbour
    j, the gate g = sigmoid(s / sqrt(|N(j)|)) decides how much j may pass on (a neighbour with
    many interactions says less about v), and the attention weights a(v, j) = softmax over j in
    N(v) of g * s sum to one per neighbourhood. The output is the L2-normalised
    sum_j a(v, j) z_j + b. All as in the authors' code (GraphGAT.message), the degree being the
    neighbour's own.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.xavier_normal_(self.lin.weight)

    def attention(self, z: torch.Tensor, graph: CsrGraph) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention [E], gate [E]) of every edge, in the graph's (target-sorted) edge order."""
        s = _EdgeDot.apply(z, F.leaky_relu(z), graph)  # z_target . LeakyReLU(z_source), at the edges
        source_degree = degree(graph.col, num_nodes=graph.n_cols, dtype=z.dtype)
        gate = torch.sigmoid(s / source_degree[graph.col].sqrt())
        return softmax(gate * s, graph.row, num_nodes=graph.n_rows), gate

    def forward(self, x: torch.Tensor, graph: CsrGraph) -> torch.Tensor:
        z = self.lin(x)
        alpha, _ = self.attention(z, graph)
        return F.normalize(_Aggregate.apply(alpha, z, graph) + self.bias, dim=-1)


class MGATLayer(nn.Module):
    """One MGAT layer: gated attention aggregation, then fusion with the node and its ID embedding:
    x' = LeakyReLU(W3 LeakyReLU(h) + LeakyReLU(W2 x) + e_id) (MGAT's information fusion of
    one layer, as in the authors' code)."""

    def __init__(self, dim: int):
        super().__init__()
        self.attend = GatedGraphAttention(dim)
        self.own = nn.Linear(dim, dim)  # W2
        self.fuse = nn.Linear(dim, dim)  # W3
        nn.init.xavier_normal_(self.own.weight)
        nn.init.xavier_normal_(self.fuse.weight)

    def forward(self, x: torch.Tensor, id_emb: torch.Tensor, graph: CsrGraph) -> torch.Tensor:
        h = F.leaky_relu(self.attend(x, graph))
        return F.leaky_relu(self.fuse(h) + F.leaky_relu(self.own(x)) + id_emb)


class MGAT(UserItemGraphModel):
    """MGAT (Tao et al., IP&M 2020): MMGCN's per-modality graphs with gated attention.

    Per modality (embedding layer): users start from a learned preference vector, items from
    their features (linear map + tanh, ModalityInput); ``layers`` MGATLayers let each neighbour
    pass on information through a gate and weigh neighbours by attention (embedding propagation
    layer), so that noisy neighbours in a modality are down-weighted instead of averaged in as in
    MMGCN. Prediction layer: a node's layer outputs are concatenated, averaged over modalities,
    and scored by inner product (vectors of ``layers * dim``). The authors' code holds the
    same concatenation of two layers but returns after the first one, so their runs used one
    layer (``--layers 1`` here). One width ``dim`` throughout (theirs: 256/128/100 per modality
    inside, 64 out). Dense inputs: the raw extract-features vectors. ``dropout`` is not used
    (the authors' dropout is commented out).
    """

    def __init__(self, config: ModelConfig, info: DatasetInfo):
        super().__init__(config, info)
        self.id_emb = nn.Embedding(self.n_nodes, config.dim)
        nn.init.xavier_normal_(self.id_emb.weight)
        self.inputs = nn.ModuleList(
            ModalityInput(self.n_users, self.features(i).shape[1], config.dim, squash=True)
            for i in range(len(self.modality_names))
        )
        self.layers = nn.ModuleList(
            nn.ModuleList(MGATLayer(config.dim) for _ in range(config.layers)) for _ in self.modality_names
        )

    def modality_representations(self) -> list[torch.Tensor]:
        """Each modality graph's node vectors [U + I, layers * d] (layer outputs concatenated)."""
        out = []
        for i, (inp, layers) in enumerate(zip(self.inputs, self.layers)):
            x, outputs = inp(self.features(i)), []
            for layer in layers:
                x = layer(x, self.id_emb.weight, self.csr())
                outputs.append(x)
            out.append(torch.cat(outputs, dim=-1))
        return out

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_nodes(torch.stack(self.modality_representations()).mean(0))


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

    def __init__(self, config: ModelConfig, info: DatasetInfo):
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
