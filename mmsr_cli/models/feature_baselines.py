"""Feature-enriched sequential baselines of the paper's Table 2 (group C): GRU4Rec^F, NOVA, DIF-SR
and Trans2D, in the shared harness (base.Recommender).

Their "side information" is the same as SASRec^F's (``baselines.ModalityCodeChannels``): for each
history item and modality, the mean embedding of its top-k modality codes; an item without codes
in a modality has that channel masked (each model says how). Like every model of the harness,
they return one user vector per history and are scored by dot product with the item-ID table
(paper Eq. 7), trained with cross-entropy over all items.

Sequence inputs are left-padded (``mmsr_cli.data``): ``history`` [B, L] with pad id ``n_items``,
``lengths`` [B]. The models read the last ``lengths`` columns only (anything before them, padding
or not, is ignored) and count positions from the end, so a history gives the same vector whatever
the batch's width. That is what lets each of them run its layers per length group
(``baselines.by_length_groups``): a group of short histories never pays for the batch's longest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MmsrError
from .base import DatasetInfo, ModelConfig
from .baselines import ModalityCodeChannels, _ItemTable, by_length_groups, causal_allowed


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


def _check_heads(config: ModelConfig) -> None:
    if config.dim % config.heads:
        raise MmsrError(f"--heads: {config.heads} does not divide --dim {config.dim}")


class _FeedForward(nn.Module):
    """Point-wise FFN with GELU, residual and post-LayerNorm: the BERT-style block of NOVA-BERT and
    of DIF-SR's RecBole code."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


# ----------------------------------------------------------------------------------------------
# GRU4Rec^F: late fusion


class GRU4RecF(ModalityCodeChannels, _ItemTable):
    """GRU4Rec^F: late fusion (paper section 3.1, Eq. 5-6; a baseline of section 5, group C).

    Each feature channel is first modelled as a sequence on its own, ``E_:,j = M([E_1,j..E_m,j])``
    (Eq. 5, M a GRU: one over the item-ID embeddings, one per modality over its channel), and the
    channels' sequence outputs are fused only afterwards, ``P = sigma(W cat[E_:,1; E_:,2; ...])``
    (Eq. 6; sigma = GELU, as SASRec^F's Eq. 3). This is the parallel-GRU design of RecBole's
    GRU4RecF (Hidasi et al., RecSys 2016, p-RNN with concatenated outputs), with one GRU per
    modality instead of one over all features. ``P`` is read at the last item. A missing modality
    channel is a zero input to its GRU at that step; dropout is on the item-ID input, as in RecBole.
    """

    def __init__(self, config: ModelConfig, info: DatasetInfo):
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


# ----------------------------------------------------------------------------------------------
# NOVA: non-invasive self-attention


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


class NOVALayer(nn.Module):
    """``R_{i+1} = FFN(LN(R_i + NOVA(R_i, S)))``; the same side information S feeds every layer."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn = NonInvasiveAttention(dim, heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.ffn = _FeedForward(dim, dropout)

    def forward(self, r, side, side_mask, allowed, keep):
        r = self.norm(r + self.dropout(self.attn(r, side, side_mask, allowed)))
        return self.ffn(r) * keep


class NOVA(ModalityCodeChannels, _ItemTable):
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

    def __init__(self, config: ModelConfig, info: DatasetInfo):
        super().__init__(config, info)
        _check_heads(config)
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
        self.layers = nn.ModuleList(NOVALayer(config.dim, config.heads, config.dropout) for _ in range(config.layers))

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
        history, is_item = trimmed_history(batch, self.n_items)
        if history.shape[1] > self.max_len:
            raise MmsrError(f"history length {history.shape[1]} exceeds the model's max_len {self.max_len}")
        L = history.shape[1]
        keep = is_item.unsqueeze(-1).to(self.item_emb.weight.dtype)
        side, side_mask = self.side_information(history)
        r = self.emb_dropout(self.input_norm(self.item_emb(history))) * keep  # R_0: item IDs only

        def encode(rows: torch.Tensor, steps: int) -> torch.Tensor:
            cut = slice(L - steps, L)
            h, s, s_mask, keep_h = r[rows, cut], side[rows, cut], side_mask[rows, cut], keep[rows, cut]
            allowed = causal_allowed(is_item[rows, cut])
            for layer in self.layers:
                h = layer(h, s, s_mask, allowed, keep_h)
            return h[:, -1]

        return by_length_groups(is_item.sum(1).clamp(min=1), encode)


# ----------------------------------------------------------------------------------------------
# DIF-SR: decoupled side information fusion


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


class DIFLayer(nn.Module):
    """Post-LN transformer layer around the decoupled attention (DIF-SR's encoder layer)."""

    def __init__(self, dim, heads, side_dims, max_len, fusion, dropout):
        super().__init__()
        self.attn = DecoupledAttention(dim, heads, side_dims, max_len, fusion, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.ffn = _FeedForward(dim, dropout)

    def forward(self, r, sides, side_masks, allowed, keep):
        r = self.norm(r + self.dropout(self.attn(r, sides, side_masks, allowed)))
        return self.ffn(r) * keep


class DIFSR(ModalityCodeChannels, _ItemTable):
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

    def __init__(self, config: ModelConfig, info: DatasetInfo, fusion: str = "gate"):
        super().__init__(config, info)
        _check_heads(config)
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
            DIFLayer(config.dim, config.heads, side_dims, info.max_len, fusion, config.dropout) for _ in range(config.layers)
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
        history, is_item = trimmed_history(batch, self.n_items)
        if history.shape[1] > self.max_len:
            raise MmsrError(f"history length {history.shape[1]} exceeds the model's max_len {self.max_len}")
        L = history.shape[1]
        keep = is_item.unsqueeze(-1).to(self.item_emb.weight.dtype)
        sides, side_masks = self.side_sources(history)
        side_masks = [m & is_item for m in side_masks]
        r = self.emb_dropout(self.input_norm(self.item_emb(history))) * keep  # item IDs only

        def encode(rows: torch.Tensor, steps: int) -> torch.Tensor:
            cut = slice(L - steps, L)
            h, keep_h, allowed = r[rows, cut], keep[rows, cut], causal_allowed(is_item[rows, cut])
            s, s_masks = [x[rows, cut] for x in sides], [m[rows, cut] for m in side_masks]
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


# ----------------------------------------------------------------------------------------------
# Trans2D: 2D attention over items x feature channels


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


class Trans2D(ModalityCodeChannels, _ItemTable):
    """Trans2D (Singer et al., WSDM 2022: "Sequential Modeling with Multiple Attributes for
    Watchlist Recommendation in E-Commerce"; paper ref. [40]): holistic fusion.

    Embedding layer: each history item is a row of C channels - its item-ID embedding and one
    channel per modality (mean code embedding mapped to d by a per-channel projection) - plus the
    position embedding on every channel: E in R^{L x C x d} (MMSR paper section 3.1, the input
    of holistic fusion). ``layers`` Trans2D layers (``Attention2D``) process E as a whole, without
    first reducing the channels. Prediction: the last item's C channel outputs, concatenated
    (missing channels zero), mapped to d.
    """

    def __init__(self, config: ModelConfig, info: DatasetInfo):
        super().__init__(config, info)
        _check_heads(config)
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
