"""The one small interface every recommender implements, and the data a model is built from.

A model takes a batch (a dict of tensors made by a split's ``collate``) and returns one user
vector per sample; scores are dot products with the item embedding table (paper Eq. 7), so the
training loss (cross-entropy over all items) and the full-ranking evaluation are shared by all
models in the harness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from .. import contracts as C


@dataclass
class ModalityInfo:
    """What a model needs to know about one named modality (from build-codes)."""

    name: str
    n_codes: int  # size of the code table (c clusters, or n_items for per-item nodes)
    code_dim: int  # dimension of the centre / reduced vectors
    centres: torch.Tensor | None = None  # [n_codes, code_dim] initial code embeddings
    item_codes: np.ndarray | None = None  # [n_items, k] code ids per item, -1 = none (missing)


@dataclass
class DatasetInfo:
    n_items: int
    n_users: int
    max_len: int
    modalities: list[ModalityInfo] = field(default_factory=list)
    item_popularity: np.ndarray | None = None  # [n_items] training target counts (Pop)
    # Filled only for models that declare they need them (Recommender.needs_*):
    # [n, 2] unique (user_idx, item_idx) pairs each user met before their validation target (never
    # a validation or test target): the user-item graph of the collaborative baselines;
    train_interactions: np.ndarray | None = None
    # modality name -> [n_items, feat_dim] float32 features from extract-features (missing rows zero).
    item_features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """A run's model options as config.json records them: every option of every model (a model
    reads the fields of its own :class:`ModelOptions`; the others keep their defaults)."""

    model: str = "mmsr"
    dim: int = 128  # paper: embedding size 128 for all models
    layers: int = 2  # L: HAN-GNN layers / transformer blocks / GRU layers
    heads: int = 2  # transformer heads (SASRec family)
    dropout: float = 0.3
    max_len: int = 50
    modalities: tuple[str, ...] = ()  # empty: all modalities of the dataset
    # MMSR ablations (paper sections 5.2-5.3)
    fusion: str = "adaptive"  # adaptive | hohe | heho | synchronous | ho | he
    invasive: bool = False  # phase 2 values from the intermediate state instead of h^(l)
    pos_emb: bool = True
    type_emb: bool = True
    graph_variant: str = "codes"  # codes | items (--no-codes)
    # MMSR propagation layers (paper section 5.2, Table 3): "han" = HAN-GNN (layers.py; fusion and
    # invasive apply to it only), or a standard PyG aggregator (aggregators.AGGREGATOR_NAMES)
    aggregator: str = "han"
    # MMSR extension, not in the paper (docs/benchmarks.md, "Does MMSR beat SASRec?"): a residual
    # ReLU feed-forward block h + W2 relu(W1 h) after each propagation layer
    feed_forward: bool = False
    # MMSR's HAN-GNN as the paper writes it ("paper", layers.HANLayer) or as the authors' public
    # code runs it ("authors", han_authors.AuthorsHANLayer; their init, dropouts and shared layer)
    variant: str = "paper"
    # dropout on MMSR's attention weights after each softmax (the authors' dropout_atten; 0 = off)
    attention_dropout: float = 0.0
    # MMSR's user vector: "last" = last pooling (section 4.4), or "attention" / "residual" (not in
    # the paper): SR-GNN's soft attention over the graph's item nodes instead of / beside last pooling
    readout: str = "last"


# The options ModelOptions.validate checks when a model has them: one line naming the option.
SHARED_RANGES = {"dim": C.RANGE_DIM, "layers": C.RANGE_LAYERS, "heads": C.RANGE_HEADS, "dropout": C.RANGE_DROPOUT,
                 "attention_dropout": C.RANGE_DROPOUT}


@dataclass
class ModelOptions:
    """A model's own typed config: the `mmsr train` options it reads, as fields with documented
    defaults, and their checks (:meth:`validate`). A model class names it in ``config_class`` and
    is built from it; the options it does not read follow from its fields (models.fields_not_read).
    """

    model: str = ""  # the model's registry name (not an option)

    def validate(self) -> "ModelOptions":
        """The ranges of the options the model has; a model adds its own rules."""
        for name, rng in SHARED_RANGES.items():
            if hasattr(self, name):
                rng.check(f"--{name.replace('_', '-')}", getattr(self, name))
        return self

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "model")

    @classmethod
    def from_record(cls, config: "ModelConfig | ModelOptions") -> "ModelOptions":
        """The model's options out of a run's ModelConfig (or another model's options)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


class SplitData(Protocol):
    """One split (train/valid/test) as the harness sees it."""

    def __len__(self) -> int: ...

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch for these sample indices; always holds ``target`` [B] and ``user_idx`` [B]."""
        ...


class Recommender(nn.Module):
    """Batch in, user vectors out; scores against all items by dot product."""

    #: what the model reads (inputs.KINDS): "sequence" (padded histories), "graph" (MSGraphs) or
    #: "user-item" (the training user-item pairs and the items' features: collaborative models)
    input_kind: ClassVar[str] = "sequence"
    #: whether the model reads the modality codes of items itself (SASRecF, NOVA, ...: the harness
    #: loads codes:<m> for it; robustness replaces them through :meth:`set_item_codes`)
    reads_codes: ClassVar[bool] = False
    #: the model's typed config (the options it reads); see ModelOptions
    config_class: ClassVar[type[ModelOptions]] = ModelOptions
    #: False for a model without parameters (Pop): the training options mean nothing to it
    trainable: ClassVar[bool] = True
    #: `mmsr tune`: the model's own options to search, beyond the paper's shared ranges
    #: (space.PAPER_SPACE); option -> space.Range, a tuple of choices, or a fixed value
    search_space: ClassVar[dict] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # [B, d]
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:  # [n_items, d]
        raise NotImplementedError

    def user_and_item_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, d] user vectors, [n_items, d] item vectors) whose dot products are the scores
        (Eq. 7); evaluation multiplies them a few rows at a time."""
        return self(batch), self.item_embeddings()

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # [B, n_items]
        users, items = self.user_and_item_vectors(batch)
        return users @ items.T

    def set_item_codes(self, modalities: list[ModalityInfo]) -> None:
        """Replace the item codes the model reads by those of ``modalities`` (dropped or displaced
        codes: robustness.py). Models that read no codes, or read them through their graphs
        (MMSR), have nothing to replace."""

    def auxiliary_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A model's own extra training objective, added to the harness's CE (None: none)."""
        return None


def code_embedding_table(modality: ModalityInfo) -> nn.Embedding:
    """Code embeddings [n_codes, code_dim] initialised from the modality's centres.

    The centres are rescaled to unit mean row norm (directions kept). Feature spaces differ wildly
    in scale (ResNet-50 codes have norms in the hundreds, MiniLM codes about 2), while item tables
    start at unit expected norm; unscaled centres would swamp every fused or merged input.
    """
    table = nn.Embedding(modality.n_codes, modality.code_dim)
    if modality.centres is None:
        nn.init.normal_(table.weight, std=1.0 / math.sqrt(modality.code_dim))
        return table
    centres = torch.as_tensor(modality.centres, dtype=torch.float32)
    if tuple(centres.shape) != (modality.n_codes, modality.code_dim):
        raise ValueError(
            f"modality '{modality.name}': centres have shape {tuple(centres.shape)}, "
            f"expected ({modality.n_codes}, {modality.code_dim})"
        )
    with torch.no_grad():
        table.weight.copy_(centres / centres.norm(dim=1).mean().clamp_min(1e-12))
    return table
