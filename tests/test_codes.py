"""`mmsr build-codes` (mmsr_cli/codes.py): autoencoder, K-means codes, loader, errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmsr_cli import contracts as C
from mmsr_cli.codes import CodesOptions, available_modalities, load_modality_info, top_k_cosine, train_autoencoder
from mmsr_cli.errors import MmsrError
from mmsr_cli.workdir import DatasetDir, file_sha256, upstream, write_parquet_atomic

N_ITEMS = 60
MISSING = {3, 17, 59}


def write_features(ds: DatasetDir, name: str, feats: np.ndarray, missing: set[int]) -> None:
    """Feature files and manifest exactly as extract-features leaves them."""
    n = len(feats)
    flags = np.array([i in missing for i in range(n)])
    feats = feats.astype(np.float32).copy()
    feats[flags] = 0
    ds.path(C.FEATURES_DIR).mkdir(parents=True, exist_ok=True)
    torch.save({"features": torch.from_numpy(feats), "missing": torch.from_numpy(flags)},
               ds.path(C.features_tensor_file(name)))
    index = pa.table({"item_idx": pa.array(range(n), pa.int32()), "row": pa.array(range(n), pa.int32()),
                      "missing": flags, "reason": [("no image" if f else None) for f in flags]})
    write_parquet_atomic(ds.path(C.features_index_file(name)), index, C.FEATURE_INDEX_SCHEMA)
    ds.write_manifest(C.modality_stage(C.STAGE_FEATURES, name), inputs=upstream(ds.read_manifest("preprocess")),
                      outputs=[C.features_tensor_file(name), C.features_index_file(name)], options={"dim": feats.shape[1]})


def blobs(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 5, (centres, dim))
    return means[rng.integers(0, centres, n)] + rng.normal(0, 0.5, (n, dim))


def make_dataset(tmp_path, name: str = "toy", modalities=("image", "text")) -> DatasetDir:
    ds = DatasetDir.open(tmp_path, name)
    items = pa.table({"item_idx": pa.array(range(N_ITEMS), pa.int32()), "item_id": [f"I{i}" for i in range(N_ITEMS)],
                      "n_interactions": pa.array([5] * N_ITEMS, pa.int32())})
    for f in ("title", "brand", "description", "image_path"):
        items = items.append_column(f, pa.nulls(N_ITEMS, pa.string()))
    items = items.append_column("categories", pa.nulls(N_ITEMS, pa.list_(pa.string())))
    items = items.append_column("features", pa.nulls(N_ITEMS, pa.list_(pa.string())))
    write_parquet_atomic(ds.path(C.ITEMS), items, C.ITEMS_SCHEMA)
    ds.write_manifest(C.STAGE_PREPROCESS, outputs=[C.ITEMS], options={})
    for i, m in enumerate(modalities):
        write_features(ds, m, blobs(N_ITEMS, 24 + 8 * i, 4, seed=i), MISSING if m == "image" else set())
    return ds


def build(cli, ds: DatasetDir, *args):
    return cli(["build-codes", "--workdir", ds.workdir, "--dataset", ds.name, "--ae-dim", "8", "-c", "5",
                "-k", "2", "--epochs", "30", *args])


def read_codes(ds: DatasetDir, name: str):
    table = pq.read_table(ds.path(C.codes_file(name)))
    assert table.schema.equals(C.CODES_SCHEMA)
    tensors = torch.load(ds.path(C.centres_file(name)), weights_only=True)
    return table.to_pylist(), tensors


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmsr: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_codes_are_top_k_cosine_centres_and_missing_items_have_none(cli, tmp_path):
    ds = make_dataset(tmp_path)
    r = build(cli, ds)
    assert r.exit_code == 0, r.stderr
    assert "toy/image: 60 items (3 without features)" in r.stderr and "toy/text: 60 items" in r.stderr
    assert "items per code min" in r.stderr and "held-out MSE" in r.stderr
    rows, tensors = read_codes(ds, "image")
    centres, reduced = tensors["centres"].numpy(), tensors["reduced"].numpy()
    assert centres.shape == (5, 8) and reduced.shape == (N_ITEMS, 8) and centres.dtype == np.float32
    for row in rows:
        i = row["item_idx"]
        if i in MISSING:
            assert row["codes"] == [] and row["similarities"] == [] and not reduced[i].any()
            continue
        # Brute force: cosine with every centre, best first.
        v = reduced[i]
        cos = [float(v @ c / (np.linalg.norm(v) * np.linalg.norm(c))) for c in centres]
        best = sorted(range(5), key=lambda j: -cos[j])[:2]
        assert row["codes"] == best
        np.testing.assert_allclose(row["similarities"], [cos[j] for j in best], rtol=1e-5, atol=1e-6)
        assert row["similarities"][0] >= row["similarities"][1]
    m = ds.read_manifest("codes:image")
    assert m["options"]["codes_mode"] == "clusters" and m["options"]["top_k"] == 2
    assert m["inputs"] == {"features:image": ds.read_manifest("features:image")["fingerprint"]}
    assert m["counts"]["n_missing"] == 3 and m["counts"]["n_codes"] == 5


def test_centres_are_kmeans_of_the_reduced_vectors(cli, tmp_path):
    ds = make_dataset(tmp_path, modalities=("text",))
    assert build(cli, ds, "-c", "4").exit_code == 0
    _, tensors = read_codes(ds, "text")
    centres, reduced = tensors["centres"].numpy(), tensors["reduced"].numpy()
    # Each centre is the mean of the items nearest to it (Euclidean): a K-means fixed point.
    nearest = ((reduced[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    for j in range(4):
        np.testing.assert_allclose(centres[j], reduced[nearest == j].mean(0), rtol=1e-4, atol=1e-4)


def test_kmeans_fitted_on_a_sample_links_every_item(cli, tmp_path):
    """--kmeans-items below the items with features: the centres are a K-means fixed point of the
    sampled items (kmeans_sample's rows), every item still gets its top-k of them; at or above,
    the codes are those of the fit on every item, byte for byte."""
    from mmsr_cli.codes import kmeans_sample

    full, cap, sampled = (make_dataset(tmp_path, n, modalities=("text",)) for n in ("full", "cap", "sampled"))
    assert build(cli, full, "-c", "4").exit_code == 0
    assert build(cli, cap, "-c", "4", "--kmeans-items", str(N_ITEMS)).exit_code == 0
    assert file_sha256(full.path(C.codes_file("text"))) == file_sha256(cap.path(C.codes_file("text")))
    r = build(cli, sampled, "-c", "4", "--kmeans-items", "20")
    assert r.exit_code == 0, r.stderr
    assert sampled.read_manifest("codes:text")["options"]["kmeans_items"] == 20
    rows, tensors = read_codes(sampled, "text")
    centres, reduced = tensors["centres"].numpy(), tensors["reduced"].numpy()
    fit = reduced[kmeans_sample(N_ITEMS, 20, 0)]
    assert len(fit) == 20 and kmeans_sample(N_ITEMS, 0, 0) is None and kmeans_sample(N_ITEMS, N_ITEMS, 0) is None
    nearest = ((fit[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    for j in range(4):
        np.testing.assert_allclose(centres[j], fit[nearest == j].mean(0), rtol=1e-4, atol=1e-4)
    assert all(len(row["codes"]) == 2 for row in rows)
    assert_one_line_error(build(cli, sampled, "-c", "4", "--kmeans-items", "3"), "--kmeans-items 3")


def test_same_seed_same_bytes_other_seed_differs(cli, tmp_path):
    a, b = make_dataset(tmp_path, "a"), make_dataset(tmp_path, "b")
    assert build(cli, a, "--seed", "7").exit_code == 0
    assert build(cli, b, "--seed", "7").exit_code == 0
    for name in ("image", "text"):
        assert file_sha256(a.path(C.codes_file(name))) == file_sha256(b.path(C.codes_file(name)))
        ta, tb = read_codes(a, name)[1], read_codes(b, name)[1]
        assert torch.equal(ta["centres"], tb["centres"]) and torch.equal(ta["reduced"], tb["reduced"])
    assert build(cli, b, "--seed", "8").exit_code == 0
    assert not torch.equal(read_codes(a, "text")[1]["reduced"], read_codes(b, "text")[1]["reduced"])


def test_autoencoder_recovers_a_low_rank_subspace():
    rng = np.random.default_rng(0)
    x = torch.from_numpy((rng.normal(size=(400, 3)) @ rng.normal(size=(3, 20))).astype(np.float32))
    opts = CodesOptions(ae_dim=3, epochs=60, patience=20, lr=1e-2, batch_size=64, seed=0)
    encoder, mse, epochs = train_autoencoder(x, opts)
    assert mse < 0.01 * float(x.var())  # rank 3 data through a 3-d bottleneck: almost lossless
    _, mse_narrow, _ = train_autoencoder(x, CodesOptions(ae_dim=1, epochs=60, patience=20, lr=1e-2, batch_size=64))
    assert mse_narrow > 0.1 * float(x.var())  # a 1-d bottleneck must lose the other directions
    assert encoder.out_features == 3 and 1 <= epochs <= 60


def test_top_k_cosine_ties_and_scale():
    centres = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    idx, sims = top_k_cosine(np.array([[3.0, 0.0], [1.0, 1.0]]), centres, 2)
    assert idx.tolist() == [[0, 2], [0, 1]]  # equal cosine: lower index first; length ignored
    np.testing.assert_allclose(sims, [[1.0, 1.0], [np.sqrt(0.5), np.sqrt(0.5)]], rtol=1e-6)


def test_no_codes_gives_one_node_per_item(cli, tmp_path):
    ds = make_dataset(tmp_path)
    r = build(cli, ds, "--no-codes", "--modality", "image")
    assert r.exit_code == 0 and "one node per item" in r.stderr, r.stderr
    rows, tensors = read_codes(ds, "image")
    assert [row["codes"] for row in rows] == [[] if i in MISSING else [i] for i in range(N_ITEMS)]
    assert torch.equal(tensors["centres"], tensors["reduced"])
    assert ds.read_manifest("codes:image")["options"]["codes_mode"] == "items"
    assert available_modalities(ds) == ["image"]
    info = load_modality_info(ds, "image")
    assert info.n_codes == N_ITEMS and info.item_codes.shape == (N_ITEMS, 1)
    assert info.item_codes[3, 0] == -1 and info.item_codes[4, 0] == 4


def test_load_modality_info_variants(cli, tmp_path):
    ds = make_dataset(tmp_path)
    assert build(cli, ds).exit_code == 0
    assert available_modalities(ds) == ["image", "text"]
    rows, tensors = read_codes(ds, "image")
    info = load_modality_info(ds, "image")
    assert (info.name, info.n_codes, info.code_dim) == ("image", 5, 8)
    assert torch.equal(info.centres, tensors["centres"])
    assert info.item_codes.dtype == np.int64 and info.item_codes.shape == (N_ITEMS, 2)
    assert info.item_codes.tolist() == [row["codes"] or [-1, -1] for row in rows]
    items = load_modality_info(ds, "image", "items")
    assert items.n_codes == N_ITEMS and torch.equal(items.centres, tensors["reduced"])
    assert items.item_codes[:, 0].tolist() == [-1 if i in MISSING else i for i in range(N_ITEMS)]
    with pytest.raises(MmsrError, match="variant"):
        load_modality_info(ds, "image", "hetero")
    # Features re-extracted since: the codes are stale.
    write_features(ds, "image", blobs(N_ITEMS, 24, 4, seed=9), MISSING)
    with pytest.raises(MmsrError, match="stale"):
        load_modality_info(ds, "image")


def test_option_errors_are_one_line_and_keep_outputs(cli, tmp_path):
    ds = make_dataset(tmp_path)
    assert build(cli, ds).exit_code == 0
    before = {n: file_sha256(ds.path(C.codes_file(n))) for n in ("image", "text")}
    for args, needle in [
        (["-k", "6"], "--top-k"),
        (["-c", "0"], "--clusters"),
        (["--ae-dim", "0"], "--ae-dim"),
        (["-c", "58", "-k", "1"], "--clusters 58"),  # text has 60 items with features, image 57
        (["--modality", "Bad!"], "--modality"),
        (["--modality", "audio"], "mmsr extract-features"),
    ]:
        assert_one_line_error(build(cli, ds, *args), needle)
    assert before == {n: file_sha256(ds.path(C.codes_file(n))) for n in ("image", "text")}


def test_stage_order(cli, tmp_path):
    ds = make_dataset(tmp_path, modalities=())
    assert_one_line_error(build(cli, ds), "no modality has features", "mmsr extract-features")
    assert_one_line_error(build(cli, DatasetDir.open(tmp_path, "nothing")), "mmsr preprocess")
    with pytest.raises(MmsrError, match="build-codes"):
        load_modality_info(ds, "image")
