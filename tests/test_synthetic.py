"""The embedded synthetic dataset: determinism, planted patterns, missing modalities (mmsr_cli/sources/synthetic.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsr_cli import contracts as C
from mmsr_cli.errors import MmsrError
from mmsr_cli.sources.synthetic import COLOURS, SHAPES, TOPICS, generate_synthetic, n_visual_classes
from mmsr_cli.workdir import DatasetDir


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "raw"
    return out, generate_synthetic(out)


def test_same_seed_gives_byte_identical_files(generated, tmp_path):
    out, info = generated
    generate_synthetic(tmp_path / "again")
    assert tree(out) == tree(tmp_path / "again")
    other = generate_synthetic(tmp_path / "seed1", seed=1, images=False)
    assert other.sequences != info.sequences and other.n_images == 0
    assert not (tmp_path / "seed1" / "images").exists()
    # Turning images off does not change the sequences or the texts (separate random streams).
    no_images = generate_synthetic(tmp_path / "noimg", images=False)
    assert no_images.sequences == info.sequences
    assert (tmp_path / "noimg" / "items.jsonl").read_bytes() == (out / "items.jsonl").read_bytes()


def test_files_follow_the_sequence_format(generated):
    out, info = generated
    lines = (out / "sequences.tsv").read_text().splitlines()
    assert lines[0] == "user_id\titem_ids" and len(lines) == 1 + info.n_users == 1001
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    asins = {it["asin"] for it in items}
    assert len(items) == len(asins) == info.n_items == 300
    lengths = []
    for line in lines[1:]:
        user, seq = line.split("\t")
        ids = seq.split(" ")
        assert set(ids) <= asins and len(set(ids)) == len(ids)  # no repeats within a user
        lengths.append(len(ids))
    assert min(lengths) >= 5 and max(lengths) <= 20
    counts = np.bincount([i for s in info.sequences for i in s], minlength=info.n_items)
    assert counts.min() >= 5  # every item survives a 5-core filter
    for it in items:
        assert set(it) == {"asin", "title", "categories", "brand", "description"}


def test_missing_images_and_empty_texts(generated):
    out, info = generated
    assert len(info.missing_image) == len(info.empty_text) == 6
    assert not set(info.missing_image) & set(info.empty_text)
    pngs = {p.name for p in (out / "images").iterdir()}
    assert len(pngs) == info.n_images == 294
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    for i, item_id in enumerate(info.item_ids):
        has_png = C.safe_item_filename(item_id) + ".png" in pngs
        assert has_png == (i not in info.missing_image)
        empty = items[i]["title"] == "" and items[i]["description"] == "" and items[i]["categories"] == []
        assert empty == (i in info.empty_text)
    # missing items still occur in sequences, so downstream stages meet them
    used = {i for s in info.sequences for i in s}
    assert set(info.missing_image) <= used and set(info.empty_text) <= used


def test_images_show_the_visual_class(generated):
    out, info = generated
    palette = np.array([rgb for _, rgb in COLOURS], dtype=float)
    for i in range(0, info.n_items, 7):
        if i in info.missing_image:
            continue
        img = Image.open(out / "images" / f"{info.item_ids[i]}.png")
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 64)
        px = np.asarray(img, dtype=float).reshape(-1, 3)
        shape_px = px[px.max(1) - px.min(1) > 70]  # backgrounds are neutral; the shape is saturated
        colour = np.argmin(((palette - shape_px.mean(0)) ** 2).sum(1))
        assert colour == info.item_visual[i] // len(SHAPES)
    assert len(COLOURS) * len(SHAPES) == n_visual_classes()


def test_texts_show_the_topic_and_not_the_visual_class(generated):
    out, info = generated
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    visual_words = {name for name, _ in COLOURS} | set(SHAPES)
    for i, item in enumerate(items):
        if i in info.empty_text:
            continue
        text = f"{item['title']} {item['description']}".lower()
        topic, _, words = TOPICS[info.item_topic[i]]
        assert item["categories"][-1] == topic.title()
        assert sum(w in text for w in words) >= 3
        assert not visual_words & set(text.replace(".", " ").split())


def test_planted_chains(generated):
    """Visual users walk the visual chain, text users the topic chain, the rest neither."""
    _, info = generated
    vis, top = np.array(info.item_visual), np.array(info.item_topic)
    n_vis, n_top = n_visual_classes(), len(TOPICS)

    def chain_rate(behaviour: str, labels: np.ndarray, n: int) -> float:
        steps = [
            (labels[b] - labels[a]) % n in (0, 1)
            for s, beh in zip(info.sequences, info.user_behaviour)
            if beh == behaviour
            for a, b in zip(s, s[1:])
        ]
        return float(np.mean(steps))

    assert chain_rate("visual", vis, n_vis) > 0.8 and chain_rate("visual", top, n_top) < 0.25
    assert chain_rate("text", top, n_top) > 0.8 and chain_rate("text", vis, n_vis) < 0.25
    assert chain_rate("popularity", vis, n_vis) < 0.25 and chain_rate("popularity", top, n_top) < 0.25
    share = {b: info.user_behaviour.count(b) / info.n_users for b in ("visual", "text", "popularity")}
    assert 0.3 < share["visual"] < 0.5 and 0.3 < share["text"] < 0.5 and 0.1 < share["popularity"] < 0.3
    # visual class and topic are independent: every visual class spans many topics
    assert all(len(set(top[vis == v])) >= 6 for v in range(n_vis))


def test_bad_sizes_are_errors(tmp_path):
    with pytest.raises(MmsrError, match="n_items=10 is too small"):
        generate_synthetic(tmp_path, n_items=10)
    with pytest.raises(MmsrError, match="min_len"):
        generate_synthetic(tmp_path, min_len=8, max_len=4)


def test_cli_synthetic_is_deterministic_and_rerun_safe(cli, tmp_path):
    r = cli(["download", "--dataset", "synthetic", "--workdir", tmp_path])
    assert r.exit_code == 0, r.stderr
    assert "1000 users, 300 items" in r.stderr and "images 294 ok" in r.stderr
    ds = DatasetDir.open(tmp_path, "synthetic")
    m = ds.require("download")
    assert m["options"]["layout"] == "sequences"
    assert set(m["outputs"]) == {"raw/sequences.tsv", "raw/items.jsonl", "raw/synthetic_latent.json", "raw/images"}
    assert m["counts"]["images_no_url"] == 6
    r = cli(["download", "--dataset", "synthetic", "--workdir", tmp_path])
    assert r.exit_code == 0
    assert ds.require("download")["fingerprint"] == m["fingerprint"]  # downstream stays fresh

    # --no-images removes the images of the earlier run rather than leaving stale ones around
    r = cli(["download", "--dataset", "synthetic", "--workdir", tmp_path, "--no-images"])
    assert r.exit_code == 0 and not any((tmp_path / "synthetic" / "raw" / "images").iterdir())
