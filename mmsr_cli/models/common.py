"""What several models share: the item table, length groups, causal masks, the feed-forward and
side-information layers, the heads check, modality code channels, and the user-item graph base of the collaborative
models (MMGCN, MGAT, BM3; see :class:`UserItemGraphModel`).

Sequence inputs are left-padded histories (``mmsr_cli.data``): ``history`` [B, L] with pad id
``n_items``, most recent item in the last column, ``lengths`` [B]. Models that read a history's
last ``lengths`` columns only and count positions from the end give a history the same vector
whatever the batch's width, which lets them run per length group (:func:`by_length_groups`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MmsrError
from .base import DatasetInfo, ModelOptions, Recommender, code_embedding_table
from .layers import CsrGraph


# ----------------------------------------------------------------------------------------------
# The options models share; each model's own config (in its file) combines them.


@dataclass
class WidthDepth(ModelOptions):
    dim: int = 128  # embedding size (the paper: 128 for every model)
    layers: int = 2  # graph layers / transformer blocks / GRU layers


@dataclass
class Regularised(WidthDepth):
    dropout: float = 0.3  # dropout ratio


@dataclass
class Attentive(Regularised):
    heads: int = 2  # attention heads; they split dim evenly

    def validate(self) -> "Attentive":
        super().validate()
        check_heads(self.dim, self.heads)
        return self


@dataclass
class WithModalities(ModelOptions):
    modalities: tuple[str, ...] = ()  # the modalities read; empty: every one the dataset has


class ItemTable(Recommender):
    """Item-ID embeddings with a padding row ``n_items``; scoring uses rows 0..n_items-1."""

    def __init__(self, config: WidthDepth, info: DatasetInfo):
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


def trimmed_history(batch: dict[str, torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(history [B, L'], is_item [B, L']) over the last L' = longest-history columns.

    Column j of row b holds an item iff j >= L' - lengths[b]; every other slot is set to ``pad``,
    so nothing outside a row's history (padding or stray ids) can reach the model.
    """
    history = batch["history"]
    B, L = history.shape
    lengths = batch["lengths"].to(history.device).clamp(min=1, max=L)
    width = int(lengths.max()) if B else 1
    history = history[:, L - width :]
    is_item = torch.arange(width, device=history.device)[None, :] >= (width - lengths)[:, None]
    return history.masked_fill(~is_item, pad), is_item


def check_heads(dim: int, heads: int) -> None:
    """Attention heads split the width evenly (SASRec(F), NOVA, DIF-SR, Trans2D)."""
    if dim % heads:
        raise MmsrError(f"--heads: {heads} does not divide --dim {dim}")


class FeedForward(nn.Module):
    """Point-wise FFN with GELU, residual and post-LayerNorm: the BERT-style block of NOVA-BERT and
    of DIF-SR's RecBole code."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


class SideInfoLayer(nn.Module):
    """Post-LN transformer layer around a side-information attention (NOVA's non-invasive one,
    DIF-SR's decoupled one): ``R_{i+1} = FFN(LN(R_i + Attn(R_i, S)))``; the same side
    information S feeds every layer."""

    def __init__(self, attn: nn.Module, dim: int, dropout: float):
        super().__init__()
        self.attn = attn
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, dropout)

    def forward(self, r, side, side_mask, allowed, keep):
        r = self.norm(r + self.dropout(self.attn(r, side, side_mask, allowed)))
        return self.ffn(r) * keep


class SideInfoInput:
    """NOVA's and DIF-SR's layer input: the trimmed history and its item-ID embeddings alone
    (LayerNorm, dropout; padding rows zero), the side information entering the attention instead.
    For models with ``item_emb``, ``input_norm``, ``emb_dropout``, ``max_len`` and ``n_items``."""

    def id_input(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(history [B, L], is_item [B, L], keep [B, L, 1], R_0 [B, L, d])."""
        history, is_item = trimmed_history(batch, self.n_items)
        if history.shape[1] > self.max_len:
            raise MmsrError(f"history length {history.shape[1]} exceeds the model's max_len {self.max_len}")
        keep = is_item.unsqueeze(-1).to(self.item_emb.weight.dtype)
        return history, is_item, keep, self.emb_dropout(self.input_norm(self.item_emb(history))) * keep


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


class UserItemGraphModel(Recommender):
    """The collaborative models' shared part: the training user-item graph, item feature buffers,
    scoring by user node.

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

    input_kind = "user-item"  # the training user-item pairs and the items' features (inputs.py)

    def __init__(self, config: WidthDepth, info: DatasetInfo):
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


class ModalityGraphs(UserItemGraphModel):
    """MMGCN's and MGAT's set-up: an ID embedding shared by users and items, one
    :class:`ModalityInput` per modality (``squash``: tanh on the projected features) and
    ``layers`` layers of ``layer`` per modality graph."""

    squash: ClassVar[bool] = False
    layer: ClassVar[type[nn.Module]]

    def __init__(self, config: WidthDepth, info: DatasetInfo):
        super().__init__(config, info)
        self.id_emb = nn.Embedding(self.n_nodes, config.dim)  # shared ID embedding of users and items
        nn.init.xavier_normal_(self.id_emb.weight)
        self.inputs = nn.ModuleList(
            ModalityInput(self.n_users, self.features(i).shape[1], config.dim, squash=self.squash)
            for i in range(len(self.modality_names))
        )
        self.layers = nn.ModuleList(
            nn.ModuleList(self.layer(config.dim) for _ in range(config.layers)) for _ in self.modality_names
        )
