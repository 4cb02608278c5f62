"""Item images as network inputs, with the memory of every step bounded.

Shared by all image encoders: :func:`prepare_item_image` checks the item's path, loads the
image (:func:`load_image`) and hands the RGB picture to the encoder's own input transform.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


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
            return bounded_rgb(img, short_side), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Over PIL's pixel limit: decoding could take gigabytes. The warning is an error inside
        # `run` (see image_warnings_as_errors), so it never reaches stderr.
        return None, "image too large"
    except MemoryError:
        return None, "image too large"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        return None, f"unreadable image ({type(e).__name__})"  # no path: reasons are counted


def bounded_rgb(img, short_side: int):
    """A decoded image -> RGB, upright (EXIF orientation), aspect ratio at most MAX_ASPECT_RATIO,
    shrunk first when it is far larger than ``short_side`` needs."""
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
    return to_rgb(img)


@contextlib.contextmanager
def image_warnings_as_errors():
    """PIL's DecompressionBombWarning (an image over MAX_IMAGE_PIXELS) raised as an exception.

    Set once around the whole extraction, in the main thread: warning filters are global, and
    changing them from the decoding threads would race.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def to_rgb(img):
    """Any PIL mode -> RGB; transparency is laid on white (product photos' usual background)."""
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
