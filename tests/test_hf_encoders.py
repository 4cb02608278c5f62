"""Hugging Face hub encoders in `extract-features` (mmsr_cli/encoders/hub_image.py, text_tower.py): each architecture's
pooled embedding, through the CLI, against the model run directly. Models are tiny random configs
saved to a folder (conftest.tiny_hf_model)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from PIL import Image

from mmsr_cli.encoders.images import to_rgb
from mmsr_cli.workdir import DatasetDir

from conftest import tiny_hf_model
from conftest import make_items
from test_features import assert_one_line_error, extract, load_outputs, write_images

# model kind -> (class that loads it, how its authors pool an image)
IMAGE_MODELS = {
    "clip": (T.CLIPVisionModelWithProjection, lambda out: out.image_embeds),
    "siglip": (T.SiglipVisionModel, lambda out: out.pooler_output),
    "dinov2": (T.Dinov2Model, lambda out: out.pooler_output),
    "vit": (T.ViTModel, lambda out: out.last_hidden_state[:, 0]),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_MODELS))
def test_image_model_gives_its_pooled_embedding(cli, tmp_path, kind):
    folder = tiny_hf_model(kind, tmp_path / kind)
    paths = write_images(DatasetDir.open(tmp_path, "toy"))
    ds = make_items(tmp_path, [{"image_path": p} for p in paths])
    r = extract(cli, ds, "--modality", "image", "--model", folder, "--batch-size", "4", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    tensors, index = load_outputs(ds, "image")
    feats = tensors["features"]
    cls, pool = IMAGE_MODELS[kind]
    net = cls.from_pretrained(folder).eval()
    processor = T.AutoImageProcessor.from_pretrained(folder)
    dim = net.config.projection_dim if kind == "clip" else net.config.hidden_size
    assert feats.shape == (12, dim)
    assert [row["missing"] for row in index] == [False] * 6 + [True] * 6
    with Image.open(ds.path(paths[1])) as img:  # the CMYK JPEG, as RGB
        x = processor(images=to_rgb(img), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = pool(net(pixel_values=x))[0]
    torch.testing.assert_close(feats[1], want, rtol=1e-4, atol=1e-5)
    assert ds.read_manifest("features:image")["options"]["dim"] == dim


@pytest.mark.parametrize("kind", ["siglip-text", "clip-text"])
def test_text_tower_gives_its_pooled_embedding(cli, tmp_path, kind):
    folder = tiny_hf_model(kind, tmp_path / kind)
    titles = ["red lipstick", "a much longer title about shampoo for dry hair", "soap"]
    ds = make_items(tmp_path, [{"title": t} for t in titles])
    r = extract(cli, ds, "--modality", "text", "--model", folder, "--fields", "title", "--batch-size", "2",
                "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    feats = load_outputs(ds, "text")[0]["features"]
    tok = T.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        if kind == "clip-text":
            net = T.CLIPTextModelWithProjection.from_pretrained(folder).eval()
            want = [net(**tok([t], return_tensors="pt")).text_embeds[0] for t in titles]
        else:  # SigLIP reads the last position: texts are padded to the full length, one by one here
            net = T.SiglipTextModel.from_pretrained(folder).eval()
            n = net.config.max_position_embeddings
            want = [net(input_ids=tok([t], padding="max_length", max_length=n, return_tensors="pt")["input_ids"]
                        ).pooler_output[0] for t in titles]
    torch.testing.assert_close(feats, torch.stack(want), rtol=1e-4, atol=1e-5)


def test_hub_model_errors_are_one_line(cli, tmp_path):
    folder = tiny_hf_model("siglip", tmp_path / "siglip")
    ds = make_items(tmp_path, [{"image_path": None, "title": "x"}])
    assert_one_line_error(extract(cli, ds, "--modality", "image", "--model", folder, "--weights", "none"),
                          "--weights none: only for torchvision models")
    text = tiny_hf_model("clip-text", tmp_path / "clip-text")  # a text tower is no image model
    assert_one_line_error(extract(cli, ds, "--modality", "image", "--model", text),
                          "a clip_text_model model", "clip, siglip, dinov2, vit")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(extract(cli, ds, "--modality", "image", "--model", tmp_path / "empty"),
                          "is not a Hugging Face model folder (no config.json)")
