"""Encoders of `extract-features`, found by ``--modality`` and ``--model`` through this registry.

| module               | kind  | ``--model``                                              |
|----------------------|-------|----------------------------------------------------------|
| text_tower.py        | text  | a CLIP or SigLIP text tower (hub name or folder)         |
| hub_image.py         | image | a CLIP/SigLIP vision tower, DINOv2 or ViT (hub name or folder) |
| torchvision_image.py | image | a torchvision classifier name (default resnet50); fallback |
| mean_text.py         | text  | any other Hugging Face encoder, ``minilm`` (default t5-base); fallback |

An encoder is a subclass of :class:`~mmsr_cli.encoders.base.TextEncoder` or
:class:`~mmsr_cli.encoders.base.ImageEncoder` in its own module; :func:`register` adds it. The
encoders of a kind are asked in registration order whether they take the ``--model`` value
(``claims``), the kind's fallback last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import MmsrError
from .base import KINDS, Encoder

if TYPE_CHECKING:
    from ..features import FeatureOptions

__all__ = ["ENCODERS", "FALLBACKS", "Encoder", "KINDS", "kind", "register", "registered", "resolve"]

ENCODERS: list[type[Encoder]] = []  # the registry, asked in this order (register() appends)
FALLBACKS: dict[str, type[Encoder]] = {}  # kind -> the encoder of the --model values no other claims


def register(cls: type[Encoder], *, fallback: bool = False) -> type[Encoder]:
    """Add an encoder class; ``fallback``: it takes the ``--model`` values no other encoder of its
    kind claims (one per kind). Returns the class, so it can decorate it."""
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}: kind {cls.kind!r} is not one of {', '.join(KINDS)}")
    if fallback:
        FALLBACKS[cls.kind] = cls
    elif cls not in ENCODERS:
        ENCODERS.append(cls)
    return cls


def registered(modality: str) -> list[type[Encoder]]:
    """The encoders of a kind in the order they are asked, the fallback last."""
    found = [cls for cls in ENCODERS if cls.kind == modality]
    return found + ([FALLBACKS[modality]] if modality in FALLBACKS else [])


def kind(modality: str) -> type[Encoder]:
    """The base class of a kind (its options, inputs and chunk loop)."""
    if modality not in KINDS:
        raise MmsrError(f"--modality: expected {' or '.join(KINDS)}, got {modality!r}")
    return KINDS[modality]


def resolve(opts: "FeatureOptions", device, dtype) -> Encoder:
    """The encoder for ``opts.modality`` and ``opts.model``, loaded onto ``device``."""
    for cls in registered(opts.modality):
        if cls.claims(opts.model):
            return cls.from_options(opts, device, dtype)
    raise MmsrError(f"--model {opts.model}: no {opts.modality} encoder takes it")


def _built_in() -> None:
    # the built-in encoders, registered in this order once register() exists
    from .hub_image import HubImage
    from .mean_text import MeanPoolText
    from .text_tower import TextTower
    from .torchvision_image import TorchvisionImage

    register(TextTower)
    register(HubImage)
    register(TorchvisionImage, fallback=True)
    register(MeanPoolText, fallback=True)


_built_in()
