"""Models: HAN-GNN layers, MMSR, and baselines behind one interface (see base.py).

The registry maps a model name (``mmsr train --model NAME``) to ``"module:Class"``; modules are
imported only when their model is built, so a broken or heavy model module never slows down or
breaks the others. Adding a model is one file (a :class:`~mmsr_cli.models.base.Recommender`
built as ``Class(config, info)`` from its own ``config_class``) plus one line here
(docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import fields

from ..errors import MmsrError
from .base import SHARED_RANGES, DatasetInfo, ModelConfig, Recommender

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


# What a model without parameters (``trainable = False``: Pop) does not read of TrainConfig.
TRAINING_FIELDS = ("epochs", "lr", "weight_decay", "clip_norm", "patience")


def fields_not_read(name: str) -> tuple[str, ...]:
    """The ModelConfig / TrainConfig fields model ``name`` ignores: the model options outside its
    ``config_class`` (and the training options, for a model without parameters). `mmsr train`
    refuses them for it; `mmsr report` knows a run without such an option did not leave it at a
    default."""
    cls = model_class(name)
    read = set(cls.config_class.option_names())
    options = [f.name for f in fields(ModelConfig) if f.name not in ("model", "max_len")]
    return (() if cls.trainable else TRAINING_FIELDS) + tuple(f for f in options if f not in read)


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
    """A freshly initialised model of ``config.model`` for the dataset described by ``info``,
    built from its own typed config (the fields of ``config`` it reads)."""
    cls = model_class(config.model)
    return cls(cls.config_class.from_record(config), info)


def check_model_config(cfg: ModelConfig) -> ModelConfig:
    """The ranges of the shared fields and the model's own rules (its config's ``validate``), in
    one line naming the option."""
    for name, rng in SHARED_RANGES.items():
        rng.check(f"--{name.replace('_', '-')}", getattr(cfg, name))
    model_class(cfg.model).config_class.from_record(cfg).validate()
    return cfg
