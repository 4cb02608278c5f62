"""The encoder registry (mmsr_cli/encoders): the recipe "add an encoder" of
docs/architecture-sources.md holds, i.e. an encoder written in one module (here, this test) and
registered runs through `extract-features` with the kind's whole driver (inputs, missing items,
chunks, resume key, manifest), with no other file touched; and --model values reach the encoder
that claims them."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

from mmsr_cli import contracts as C
from mmsr_cli import encoders
from mmsr_cli.encoders.base import ImageEncoder, TextEncoder, item_text
from mmsr_cli.encoders.images import prepare_item_image

from conftest import make_items
from test_features import extract, load_outputs


class LetterCounts(TextEncoder):
    """A toy text encoder: how often each letter a-z occurs (``--model letters``)."""

    pooling = "letter counts"
    dim = 26

    @classmethod
    def claims(cls, model: str) -> bool:
        return model == "letters"

    def __init__(self, model: str, max_length: int, device, dtype):
        self.source = self.weights_label = model

    def encode(self, texts: list[str]):
        return torch.tensor([[t.lower().count(c) for c in string.ascii_lowercase] for t in texts], dtype=torch.float32)


class MeanColour(ImageEncoder):
    """A toy image encoder: the mean RGB of the picture (``--model mean-rgb``)."""

    dim = 3

    @classmethod
    def claims(cls, model: str) -> bool:
        return model == "mean-rgb"

    def __init__(self, model: str, weights: str, device, dtype):
        self.source = self.weights_label = model

    def prepare(self, rel, root):
        return prepare_item_image(rel, root, 8, lambda img: torch.tensor(np.asarray(img), dtype=torch.float32).mean((0, 1)))

    def encode(self, images: list):
        return torch.stack(images)


@pytest.fixture
def toy_encoders(monkeypatch):
    monkeypatch.setattr(encoders, "ENCODERS", list(encoders.ENCODERS))  # the registration ends with the test
    encoders.register(LetterCounts)
    encoders.register(MeanColour)


ROWS = [{"title": "Red lipstick", "brand": "Acme", "image_path": "raw/images/red.png"},
        {"title": "", "image_path": "raw/images/absent.png"},
        {"title": "Blue bag", "categories": ["Bags", "Blue"], "image_path": None}]


def test_a_registered_text_encoder_runs_through_extract_features(cli, tmp_path, toy_encoders):
    ds = make_items(tmp_path, ROWS)
    r = extract(cli, ds, "--modality", "text", "--model", "letters", "--chunk-size", "2")
    assert r.exit_code == 0, r.stderr
    tensors, index = load_outputs(ds, "text")
    fields = ("title", "categories", "brand")
    expected = LetterCounts("letters", 1, None, None).encode([item_text(ROWS[0], fields), item_text(ROWS[2], fields)])
    assert torch.equal(tensors["features"][[0, 2]], expected)
    assert tensors["missing"].tolist() == [False, True, False] and index[1]["reason"] == "empty text"
    options = json.loads(ds.manifest_path(C.modality_stage(C.STAGE_FEATURES, "text")).read_text())["options"]
    assert options["model_source"] == "letters" and options["pooling"] == "letter counts" and options["dim"] == 26


def test_a_registered_image_encoder_runs_through_extract_features(cli, tmp_path, toy_encoders):
    ds = make_items(tmp_path, ROWS)
    ds.path("raw/images").mkdir(parents=True)
    Image.new("RGB", (4, 6), (200, 10, 30)).save(ds.path("raw/images/red.png"))
    r = extract(cli, ds, "--modality", "image", "--model", "mean-rgb", "--name", "colour")
    assert r.exit_code == 0, r.stderr
    tensors, index = load_outputs(ds, "colour")
    assert tensors["features"][0].tolist() == [200.0, 10.0, 30.0]
    assert [row["reason"] for row in index] == [None, "image file not found", "no image"]


def test_model_values_reach_the_encoder_that_claims_them(toy_encoders, tmp_path):
    claimed = {kind: [cls for cls in encoders.registered(kind)] for kind in C.MODALITY_KINDS}
    assert list(encoders.KINDS) == list(C.MODALITY_KINDS)
    for kind, classes in claimed.items():
        assert classes[-1] is encoders.FALLBACKS[kind]  # asked last, takes the rest
        assert all(cls.kind == kind for cls in classes)
    first = {kind: next(cls for cls in encoders.registered(kind) if cls.claims(model)).__name__
             for kind, model in (("text", "letters"), ("image", "mean-rgb"))}
    assert first == {"text": "LetterCounts", "image": "MeanColour"}
    assert next(c for c in encoders.registered("image") if c.claims("resnet50")).__name__ == "TorchvisionImage"
    assert next(c for c in encoders.registered("image") if c.claims("org/vit")).__name__ == "HubImage"
    # a folder without config.json is no text tower: the fallback takes it (and says what is wrong)
    assert next(c for c in encoders.registered("text") if c.claims(str(tmp_path))).__name__ == "MeanPoolText"
