"""`mmsr extract-features`: one feature vector per item and named modality.

Paper section 4.1 ("Nodes and their initialization"): image features ``e_a`` come from a
ResNet-50 pretrained on ImageNet, text features ``e_b`` from a pretrained T5 encoder, one
separate model per modality. The encoder is found by ``--modality`` and ``--model`` in the
registry of :mod:`mmsr_cli.encoders` (torchvision classifiers, Hugging Face vision models, T5,
MiniLM and other text encoders, CLIP/SigLIP text towers); this module is the driver they share.

Items without usable input (no image, a missing/empty/corrupt file, an empty text) are recorded
as missing with a reason; their rows in the tensor are zero and must not be read as features.

Work is done in chunks of items written to ``features/<name>.partial/``; a killed run resumes
at the first unfinished chunk as long as the options that decide the result are unchanged
(recorded in ``options.json`` there), otherwise it starts over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from . import contracts as C
from . import encoders
from .encoders.base import Encoder
from .encoders.images import image_warnings_as_errors
from .errors import MmsrError
from .runtime import progress, resolve_device
from .workdir import (
    DatasetDir,
    atomic_path,
    commit_atomic,
    check_regular_file,
    parquet_writer,
    read_file_text,
    read_parquet,
    torch_writer,
    upstream,
    validate_modality_name,
    write_torch_atomic,
)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
PARTIAL_FORMAT = 2  # bump when the chunk file layout changes: old partial folders restart (2: checksums)


@dataclass
class FeatureOptions:
    modality: str  # image | text
    name: str | None = None  # modality name in the dataset (default: the modality)
    model: str | None = None  # torchvision name (image); HF name, folder or package alias (text)
    weights: str = "default"  # image only: default (ImageNet) | none (random init) | state_dict path
    fields: tuple[str, ...] = ("title", "categories", "brand")  # text only
    max_length: int = 128  # text only: tokens after truncation
    batch_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    chunk_size: int = 1024  # items per resumable chunk
    workers: int = 2  # image decoding threads

    def validate(self) -> "FeatureOptions":
        kind = encoders.kind(self.modality)
        if self.name is None:
            self.name = self.modality
        try:
            validate_modality_name(self.name)
        except MmsrError as e:
            raise MmsrError(f"--name: {e}") from None
        if self.model is None:
            self.model = kind.default_model
        if self.precision not in PRECISIONS:
            raise MmsrError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for opt, value, rng in (("--batch-size", self.batch_size, C.RANGE_FEATURE_BATCH),
                                ("--chunk-size", self.chunk_size, C.RANGE_FEATURE_CHUNK),
                                ("--max-length", self.max_length, C.RANGE_TEXT_TOKENS),
                                ("--workers", self.workers, C.RANGE_DECODE_WORKERS)):
            rng.check(opt, value)
        kind.check_options(self)
        return self


@dataclass
class FeatureResult:
    name: str
    n_items: int
    dim: int
    n_missing: int
    n_computed: int  # items encoded by this run (resumed chunks excluded)
    seconds: float
    resumed_chunks: int
    reasons: dict[str, int] = field(default_factory=dict)

    def summary(self, dataset: str) -> str:
        rate = self.n_computed / self.seconds if self.seconds > 0 else float("inf")
        resumed = f", {self.resumed_chunks} chunk(s) resumed" if self.resumed_chunks else ""
        reasons = ""
        if self.reasons:
            reasons = " (" + "; ".join(f"{r}: {n}" for r, n in sorted(self.reasons.items())) + ")"
        return (
            f"extract-features {dataset}/{self.name}: {self.n_items} items, dim {self.dim}, "
            f"{self.n_missing} missing{reasons}, {rate:.1f} items/s{resumed}"
        )


# ----------------------------------------------------------------------------------------------
# Shared driver


def _resolve_precision(precision: str, device):
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            raise MmsrError(f"--precision {precision}: mixed precision runs on a CUDA device only (use fp32 or auto)")
        return "fp32", None
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision, {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _read_items(ds: DatasetDir) -> pa.Table:
    path = ds.path(C.ITEMS)
    table = read_parquet(path, C.ITEMS_SCHEMA, C.ITEMS_LATER_COLUMNS)
    idx = table.column("item_idx").to_numpy()
    order = np.argsort(idx, kind="stable")
    if not np.array_equal(idx[order], np.arange(len(idx))):
        raise MmsrError(f"{path}: item_idx is not 0..{len(idx) - 1}; re-run `mmsr preprocess --dataset {ds.name}`")
    return table.take(pa.array(order))


def _partial_key(opts: FeatureOptions, encoder: Encoder, items_fingerprint: str, precision: str,
                 device_type: str, n_items: int) -> dict:
    """Everything that decides a chunk's contents: a resume with another key starts over."""
    return {
        "format": PARTIAL_FORMAT,
        "items": items_fingerprint,
        "n_items": n_items,
        "modality": opts.modality,
        "model": encoder.source,
        "weights": encoder.weights_label,
        "chunk_size": opts.chunk_size,
        "precision": precision,
        "device_type": device_type,
        **encoder.resume_key(opts),
    }


def _chunk_sha256(features, missing: np.ndarray, reasons: list[str]) -> str:
    """Checksum of a chunk's contents, stored with it and verified on resume."""
    h = hashlib.sha256(repr((tuple(features.shape), str(features.dtype), len(missing))).encode())
    h.update(features.contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(missing, dtype=bool).tobytes())
    h.update("\0".join(reasons).encode())
    return h.hexdigest()


def _save_chunk(path: Path, features, missing: np.ndarray, reasons: list[str | None]) -> None:
    stored = [r or "" for r in reasons]
    write_torch_atomic(
        path,
        {
            "features": features.contiguous(),
            "missing": torch.from_numpy(missing.copy()),
            "reasons": stored,
            "sha256": _chunk_sha256(features, missing, stored),
        },
    )


def _load_chunk(path: Path, n: int):
    """A saved chunk, or None when it is unreadable, of another size or fails its checksum
    (a damaged chunk is recomputed, never used)."""
    try:
        check_regular_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
        feats, missing, reasons = obj["features"], obj["missing"].numpy(), obj["reasons"]
        if obj["sha256"] != _chunk_sha256(feats, missing, reasons):
            return None
    except Exception:
        return None  # a chunk we cannot read is recomputed
    if feats.shape[0] != n or len(missing) != n or len(reasons) != n:
        return None
    return feats, missing, [r or None for r in reasons]


def run(ds: DatasetDir, opts: FeatureOptions, *, on_chunk: Callable[[int], None] | None = None) -> FeatureResult:
    """Extract features of every item for one named modality; resumable by chunks.

    ``on_chunk(i)`` is called after chunk ``i`` is saved (tests use it to interrupt a run).
    """

    opts.validate()
    name = opts.name
    stage = C.modality_stage(C.STAGE_FEATURES, name)
    pre = ds.require(C.STAGE_PREPROCESS)
    log = ds.logger(stage)
    items = _read_items(ds)
    n_items = items.num_rows
    device = resolve_device(opts.device)
    precision, dtype = _resolve_precision(opts.precision, device)

    encoder = encoders.resolve(opts, device, dtype)
    model_source, weights_label = encoder.source, encoder.weights_label
    inputs = encoder.inputs(items, opts)
    dim = encoder.dim

    key = _partial_key(opts, encoder, pre["fingerprint"], precision, device.type, n_items)
    partial = ds.path(C.FEATURES_DIR) / f"{name}.partial"
    key_file = partial / "options.json"
    if partial.exists():
        try:
            old = json.loads(read_file_text(key_file))
        except (OSError, json.JSONDecodeError):
            old = None
        if old != key:
            log.info("partial results in %s were made with other options: starting over", partial)
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    if not key_file.exists():
        with atomic_path(key_file) as tmp:
            tmp.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")

    log.info("start: %d items, model %s, weights %s, device %s, precision %s", n_items, model_source,
             weights_label, device, precision)
    n_chunks = (n_items + opts.chunk_size - 1) // opts.chunk_size
    chunks: list[tuple] = []
    computed = resumed = 0
    seconds = 0.0
    pool = ThreadPoolExecutor(max_workers=opts.workers) if encoder.threads else None
    try:
        with progress() as bar, image_warnings_as_errors():
            task = bar.add_task(f"features {name}", total=n_items)
            for ci in range(n_chunks):
                lo, hi = ci * opts.chunk_size, min(n_items, (ci + 1) * opts.chunk_size)
                chunk_path = partial / f"chunk_{ci:05d}.pt"
                loaded = _load_chunk(chunk_path, hi - lo) if chunk_path.exists() else None
                if loaded is not None and loaded[0].shape[1] == dim:
                    chunks.append(loaded)
                    resumed += 1
                    bar.advance(task, hi - lo)
                    continue
                t0 = time.perf_counter()
                feats, missing, reasons = encoder.encode_chunk(
                    inputs[lo:hi], opts, ds.root, pool, lambda n: bar.advance(task, n)
                )
                seconds += time.perf_counter() - t0
                computed += hi - lo
                _save_chunk(chunk_path, feats, missing, reasons)
                chunks.append((feats, missing, reasons))
                log.info("chunk %d/%d: items %d-%d, %d missing", ci + 1, n_chunks, lo, hi - 1, int(missing.sum()))
                if on_chunk is not None:
                    on_chunk(ci)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    features = torch.cat([c[0] for c in chunks]) if chunks else torch.zeros((0, dim))
    missing = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros(0, dtype=bool)
    reasons = [r for c in chunks for r in c[2]]
    features[torch.from_numpy(missing)] = 0.0

    tensor_rel, index_rel = C.features_tensor_file(name), C.features_index_file(name)
    index = pa.table(
        {
            "item_idx": pa.array(np.arange(n_items, dtype=np.int32)),
            "row": pa.array(np.arange(n_items, dtype=np.int32)),
            "missing": pa.array(missing, type=pa.bool_()),
            "reason": pa.array(reasons, type=pa.string()),
        }
    )
    commit_atomic({  # both or neither: the index describes the tensor's rows
        ds.path(tensor_rel): torch_writer(
            {"features": features.to(torch.float32).contiguous(), "missing": torch.from_numpy(missing)}),
        ds.path(index_rel): parquet_writer(index, C.FEATURE_INDEX_SCHEMA),
    })
    reason_counts: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            reason_counts[r] = reason_counts.get(r, 0) + 1
    options = {
        "modality": opts.modality,
        "name": name,
        "model": opts.model,
        "model_source": model_source,
        "weights": weights_label,
        "dim": dim,
        "precision": precision,
        "device": device.type,
        "chunk_size": opts.chunk_size,
    }
    options.update(encoder.manifest_options(opts))
    ds.write_manifest(
        stage,
        inputs=upstream(pre),
        outputs=[tensor_rel, index_rel],
        options=options,
        counts={"n_items": n_items, "n_missing": int(missing.sum()), "missing_reasons": reason_counts},
    )
    shutil.rmtree(partial, ignore_errors=True)
    result = FeatureResult(name, n_items, dim, int(missing.sum()), computed, seconds, resumed, reason_counts)
    log.info(result.summary(ds.name))
    return result
