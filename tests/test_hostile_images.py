"""Hostile images through `mmsr extract-features`, in a child process under a memory cap.

Each file is small on disk but claims or implies a large allocation somewhere in image preparation
(decode, mode conversion, resize): a thin strip whose resize to the network's short side would
allocate gigabytes, pixel counts at and over the decode limit, a 16-bit and a palette image with
transparency large enough to be shrunk, an animation, EXIF rotations. The child's address space is
capped (RLIMIT_AS), so a regression ends in a refused allocation instead of the OOM killer, and its
peak resident memory is checked against the issue's bar. The cap is on address space, not resident
memory: torch and its thread pools reserve ~3.8 GB of it while touching ~0.8 GB, so the cap sits
above the bar and the bar is checked on the child's peak RSS.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import make_items, run_cli_limited
from mmsr_cli import contracts as C

pytestmark = pytest.mark.slow  # extract-features in a child under a memory limit

GIB = 1 << 30
ADDRESS_SPACE_CAP = 6 * GIB  # a resize of the 1 x 100,000 strip without the crop asks for ~20 GB
PEAK_RSS_MIB = 2048  # half the bar of 4 GiB; the run below peaks near 1.2 GiB


def _exif_rotated(path, size, orientation: int) -> None:
    img = Image.fromarray(np.random.default_rng(orientation).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    img.save(path, exif=exif)


def _png_claiming(path, width: int, height: int) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _hostile_images(folder) -> dict[str, str | None]:
    """file name -> the reason extract-features must record (None: encoded)."""
    folder.mkdir(parents=True)
    Image.new("RGB", (1, 100_000), (200, 10, 10)).save(folder / "strip-tall.png")
    Image.new("L", (100_000, 1), 90).save(folder / "strip-wide.png")
    Image.new("P", (8000, 8000), 3).save(folder / "at-pixel-limit.png")  # 64 M pixels, 1 byte each
    Image.new("L", (9000, 9000), 1).save(folder / "over-pixel-limit.png")  # 81 M: refused before decoding
    _png_claiming(folder / "bomb.png", 100_000, 100_000)  # 10 G pixels in a 100-byte file
    grey16 = Image.new("I;16", (6000, 4000))
    grey16.save(folder / "grey16-large.png")
    palette = Image.new("P", (6000, 4000), 5)
    palette.putpalette(list(range(256)) * 3)
    palette.info["transparency"] = 5
    palette.save(folder / "palette-transparent.png", transparency=5)
    frames = [Image.new("P", (600, 600), i) for i in range(120)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=10, loop=0)
    _exif_rotated(folder / "exif-rotated.jpg", (40, 3000), 6)
    _exif_rotated(folder / "exif-mirrored.jpg", (300, 200), 5)
    return {
        "strip-tall.png": None, "strip-wide.png": None, "at-pixel-limit.png": None,
        "over-pixel-limit.png": "image too large", "bomb.png": "image too large",
        "grey16-large.png": None, "palette-transparent.png": None, "animated.gif": None,
        "exif-rotated.jpg": None, "exif-mirrored.jpg": None,
    }


def test_hostile_images_stay_within_memory_and_are_encoded_or_refused(tmp_path):
    expected = _hostile_images(tmp_path / "toy" / "raw" / "images")
    names = list(expected)
    ds = make_items(tmp_path, [{"image_path": f"raw/images/{n}"} for n in names])
    r = run_cli_limited(
        ["extract-features", "--workdir", tmp_path, "--dataset", "toy", "--modality", "image",
         "--model", "mobilenet_v3_small", "--weights", "none", "--batch-size", "4", "--workers", "2",
         "--device", "cpu"],
        ADDRESS_SPACE_CAP,
    )
    assert r.exit_code == 0, r.stderr
    assert r.peak_rss_mib < PEAK_RSS_MIB, f"peak RSS {r.peak_rss_mib:.0f} MiB"
    import pyarrow.parquet as pq
    import torch

    rows = pq.read_table(ds.path(C.features_index_file("image"))).to_pylist()
    reasons = {n: row["reason"] for n, row in zip(names, rows)}
    assert reasons == expected
    features = torch.load(ds.path(C.features_tensor_file("image")), weights_only=True)["features"]
    encoded = [i for i, n in enumerate(names) if expected[n] is None]
    assert torch.isfinite(features[encoded]).all()
    print(json.dumps({"peak_rss_mib": round(r.peak_rss_mib)}))


def test_thin_strip_keeps_the_centre_the_network_sees():
    """Cropping a strip to MAX_ASPECT_RATIO keeps the centre square the network's crop reads."""
    from mmsr_cli.encoders.images import MAX_ASPECT_RATIO, bounded_rgb

    column = np.zeros((100_000, 1, 3), dtype=np.uint8)
    column[50_000, 0] = 255  # a mark in the middle survives the crop
    img = bounded_rgb(Image.fromarray(column), 232)
    assert img.size == (1, MAX_ASPECT_RATIO)
    assert np.asarray(img)[MAX_ASPECT_RATIO // 2, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    from mmsr_cli.encoders.images import bounded_rgb

    img = Image.new("RGB", (30, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.info["exif"] = exif.tobytes()
    assert bounded_rgb(img, 232).size == (10, 30)
