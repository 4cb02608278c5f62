"""What an encoder of `extract-features` is: the two kinds of input and what each kind does.

An encoder turns one kind of item input (``contracts.MODALITY_KINDS``: image or text) into
``dim``-dimensional vectors. The kind decides what is read from ``items.parquet``, which options
apply, how a chunk of items is encoded (texts in length-sorted batches; images prepared in
threads) and what is recorded; a concrete encoder (one module of this package) only loads its
network and says how a batch becomes vectors:

* :class:`TextEncoder` subclasses implement ``encode(texts) -> Tensor [B, dim]``;
* :class:`ImageEncoder` subclasses implement ``prepare(rel, root) -> (input, None) | (None,
  reason)`` (in decoding threads) and ``encode(inputs) -> Tensor [B, dim]``.

Each also says which ``--model`` values it takes (``claims``); :mod:`mmsr_cli.encoders` asks
the registered encoders in turn.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from .. import contracts as C
from ..errors import MmsrError
from ..workdir import file_sha256

if TYPE_CHECKING:
    import pyarrow as pa

    from ..features import FeatureOptions

Advance = Callable[[int], None]

TEXT_FIELDS = ("title", "categories", "brand", "description", "features")
LIST_FIELDS = {"categories": ", ", "features": "; "}  # list fields and the separator of their entries


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Encoder:
    """Set by every encoder: ``dim``; ``source`` (what was loaded: a name, folder or file) and
    ``weights_label`` (which weights), recorded in the manifest and the resume key."""

    kind: str = ""  # one of C.MODALITY_KINDS
    default_model: str = ""  # --model of this kind when none is given
    threads: bool = False  # whether encode_chunk wants a pool of --workers threads
    dim: int
    source: str
    weights_label: str

    @classmethod
    def claims(cls, model: str) -> bool:
        """Whether ``--model model`` is this encoder's (cheap; a fallback encoder takes the rest)."""
        raise NotImplementedError

    @classmethod
    def from_options(cls, opts: "FeatureOptions", device, dtype) -> "Encoder":
        raise NotImplementedError

    @staticmethod
    def check_options(opts: "FeatureOptions") -> None:
        """Refuse options that do not apply to this kind."""

    def inputs(self, items: "pa.Table", opts: "FeatureOptions") -> list:
        """One input per item (in item_idx order)."""
        raise NotImplementedError

    def encode_chunk(self, inputs: list, opts: "FeatureOptions", root: Path, pool, advance: Advance):
        """(features [n, dim] float32, missing [n] bool, reasons [n]) for one chunk; missing rows are zero."""
        raise NotImplementedError

    def resume_key(self, opts: "FeatureOptions") -> dict[str, Any]:
        """Options of this kind that decide a chunk's contents (a resume with others starts over)."""
        return {}

    def manifest_options(self, opts: "FeatureOptions") -> dict[str, Any]:
        return {}


def _empty_chunk(n: int, dim: int):
    return torch.zeros((n, dim), dtype=torch.float32), np.zeros(n, dtype=bool), [None] * n


# ----------------------------------------------------------------------------------------------
# Text


def item_text(row: dict, fields: Sequence[str]) -> str:
    """The text of one item: the chosen fields in order, whitespace normalised, '' when none.

    The title stands alone; other fields are labelled so the encoder can tell a brand from a
    category; list fields are de-duplicated (Amazon lists repeat parents) and joined with ', '
    (categories) or '; ' (features).
    """
    parts = []
    for f in fields:
        value = row.get(f)
        if f in LIST_FIELDS:
            seen: dict[str, None] = {}
            for c in value or []:
                c = " ".join(str(c).split()) if c is not None else ""
                if c:
                    seen.setdefault(c, None)
            text = LIST_FIELDS[f].join(seen)
        else:
            text = " ".join(str(value).split()) if value is not None else ""
        if not text:
            continue
        parts.append(text if f == "title" else f"{f.capitalize()}: {text}")
    return ". ".join(parts)


class TextEncoder(Encoder):
    kind = "text"
    default_model = "t5-base"
    pooling = "mean"  # how token states become one vector, recorded in the manifest

    @classmethod
    def from_options(cls, opts, device, dtype) -> "TextEncoder":
        return cls(opts.model, opts.max_length, device, dtype)

    @staticmethod
    def check_options(opts) -> None:
        if opts.weights != "default":
            raise MmsrError("--weights: applies to --modality image only (text models load "
                            "their weights from the --model folder or name)")
        if not opts.fields:
            raise MmsrError("--fields: give at least one of " + ", ".join(TEXT_FIELDS))
        bad = [f for f in opts.fields if f not in TEXT_FIELDS]
        if bad:
            raise MmsrError(f"--fields: unknown field {bad[0]!r} (expected {', '.join(TEXT_FIELDS)})")
        if len(set(opts.fields)) != len(opts.fields):
            raise MmsrError(f"--fields: a field is listed twice in {','.join(opts.fields)}")

    def encode(self, texts: list[str]):
        raise NotImplementedError

    def inputs(self, items, opts) -> list[str]:
        return [item_text(r, opts.fields) for r in items.select(list(opts.fields)).to_pylist()]

    def encode_chunk(self, inputs, opts, root, pool, advance):
        n = len(inputs)
        feats, missing, reasons = _empty_chunk(n, self.dim)
        for i, text in enumerate(inputs):
            if not text.strip():
                missing[i], reasons[i] = True, "empty text"
        todo = [i for i in range(n) if not missing[i]]
        # Similar lengths in one batch: less padding, the same vectors (pooling ignores padding).
        todo.sort(key=lambda i: len(inputs[i]))
        advance(n - len(todo))
        for b in range(0, len(todo), opts.batch_size):
            idx = todo[b : b + opts.batch_size]
            feats[idx] = self.encode([inputs[i] for i in idx])
            advance(len(idx))
        return feats, missing, reasons

    def resume_key(self, opts) -> dict[str, Any]:
        return {"fields": list(opts.fields), "max_length": opts.max_length}

    def manifest_options(self, opts) -> dict[str, Any]:
        return {"fields": list(opts.fields), "max_length": opts.max_length, "pooling": self.pooling}


def mean_pool(hidden, attention_mask):
    """Mean of ``hidden [B, T, d]`` over the positions where ``attention_mask [B, T]`` is 1."""
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1.0)


# ----------------------------------------------------------------------------------------------
# Images


class ImageEncoder(Encoder):
    kind = "image"
    default_model = "resnet50"
    threads = True

    @classmethod
    def from_options(cls, opts, device, dtype) -> "ImageEncoder":
        return cls(opts.model, opts.weights, device, dtype)

    def prepare(self, rel: str | None, root: Path):
        raise NotImplementedError

    def encode(self, images: list):
        raise NotImplementedError

    def inputs(self, items, opts) -> list[str | None]:
        return items.column("image_path").to_pylist()

    def encode_chunk(self, inputs, opts, root, pool, advance):
        feats, missing, reasons = _empty_chunk(len(inputs), self.dim)
        for b in range(0, len(inputs), opts.batch_size):
            # Decoding and resizing run in threads (PIL releases the GIL), the network in this one.
            loaded = list(pool.map(lambda rel: self.prepare(rel, root), inputs[b : b + opts.batch_size]))
            good = [j for j, (img, _) in enumerate(loaded) if img is not None]
            for j, (_, reason) in enumerate(loaded):
                if reason is not None:
                    missing[b + j], reasons[b + j] = True, reason
            if good:
                feats[[b + j for j in good]] = self.encode([loaded[j][0] for j in good])
            advance(len(loaded))
        return feats, missing, reasons

    def resume_key(self, opts) -> dict[str, Any]:
        if opts.weights in ("default", "none"):
            return {}
        return {"weights_sha256": file_sha256(Path(self.weights_label))}


_BY_KIND: dict[str, type[Encoder]] = {cls.kind: cls for cls in (ImageEncoder, TextEncoder)}
KINDS: dict[str, type[Encoder]] = {k: _BY_KIND[k] for k in C.MODALITY_KINDS}  # the base class of each kind
