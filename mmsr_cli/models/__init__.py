"""Models: HAN-GNN layers, MMSR, and baselines behind one interface (see base.py).

The registry maps a model name (``mmsr train --model NAME``) to ``"module:Class"``; modules are
imported only when their model is built, so a broken or heavy model module never slows down or
breaks the others. Adding a model is one class (``Class(config, info)``, a
:class:`~mmsr_cli.models.base.Recommender`) plus one line here.
"""

from __future__ import annotations

import importlib

from .. import contracts as C
from ..errors import MmsrError
from .base import DatasetInfo, ModelConfig, Recommender

REGISTRY: dict[str, str] = {
    "mmsr": "mmsr_cli.models.mmsr:MMSR",
    "pop": "mmsr_cli.models.pop:Pop",
    "gru4rec": "mmsr_cli.models.gru4rec:GRU4Rec",
    "sasrec": "mmsr_cli.models.sasrec:SASRec",
    "sasrecf": "mmsr_cli.models.sasrecf:SASRecF",
    "srgnn": "mmsr_cli.models.srgnn:SRGNN",
    "gru4recf": "mmsr_cli.models.gru4recf:GRU4RecF",
    "nova": "mmsr_cli.models.nova:NOVA",
    "difsr": "mmsr_cli.models.difsr:DIFSR",
    "trans2d": "mmsr_cli.models.trans2d:Trans2D",
    "mmgcn": "mmsr_cli.models.mmgcn:MMGCN",
    "mgat": "mmsr_cli.models.mgat:MGAT",
    "bm3": "mmsr_cli.models.bm3:BM3",
}


# Config fields (ModelConfig / TrainConfig) that a model does not read: `mmsr train` refuses them
# for it, and `mmsr report` knows a run without such an option did not leave it at a default.
MMSR_ONLY_FIELDS = (
    "aggregator", "fusion", "invasive", "pos_emb", "type_emb", "graph_variant", "feed_forward", "variant", "attention_dropout",
)
_FIELDS_NOT_READ: dict[str, tuple[str, ...]] = {
    "pop": ("epochs", "lr", "weight_decay", "clip_norm", "dropout", "dim", "layers", "heads", "patience", "modalities"),
    "gru4rec": ("heads", "modalities"),
    "sasrec": ("modalities",),
    "sasrecf": (),
    "srgnn": ("heads", "dropout", "modalities"),
    "gru4recf": ("heads",),
    "nova": (),
    "difsr": (),
    "trans2d": (),
    "mmsr": ("heads",),
    "mmgcn": ("heads", "dropout"),
    "mgat": ("heads", "dropout"),
    "bm3": ("heads",),
}


def fields_not_read(name: str) -> tuple[str, ...]:
    """The ModelConfig / TrainConfig fields model ``name`` ignores."""
    return _FIELDS_NOT_READ[check_model_name(name)] + (() if name == "mmsr" else MMSR_ONLY_FIELDS)


def model_names() -> list[str]:
    return list(REGISTRY)


def check_model_name(name: str) -> str:
    if name not in REGISTRY:
        raise MmsrError(f"--model: unknown model {name!r} (expected one of {', '.join(REGISTRY)})")
    return name


def model_class(name: str) -> type[Recommender]:
    """The class registered under ``name`` (imported now)."""
    module_name, _, class_name = REGISTRY[check_model_name(name)].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MmsrError(f"--model {name}: its module {module_name} cannot be imported ({e})") from e
    return getattr(module, class_name)


def build_model(config: ModelConfig, info: DatasetInfo) -> Recommender:
    """A freshly initialised model of ``config.model`` for the dataset described by ``info``."""
    return model_class(config.model)(config, info)


def check_model_config(cfg: ModelConfig) -> ModelConfig:
    """The ranges of the shared fields and the model's own rules (one line naming the option)."""
    for name, rng in (("dim", C.RANGE_DIM), ("layers", C.RANGE_LAYERS), ("heads", C.RANGE_HEADS),
                      ("dropout", C.RANGE_DROPOUT), ("attention_dropout", C.RANGE_DROPOUT)):
        rng.check(f"--{name.replace('_', '-')}", getattr(cfg, name))
    if cfg.model in ("sasrec", "sasrecf") and cfg.dim % cfg.heads:
        raise MmsrError(f"--heads: {cfg.heads} does not divide --dim {cfg.dim}")
    if cfg.model == "mmsr":
        from .mmsr import check_variant  # the lazy registry: MMSR's module only for MMSR

        check_variant(cfg)
    return cfg
