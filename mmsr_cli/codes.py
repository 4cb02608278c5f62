"""`mmsr build-codes`: modality features -> linear autoencoder -> K-means -> top-k modality codes.

Paper section 4.1 ("Node transformation and compositions"): each modality's feature vectors are
condensed by a linear autoencoder, clustered with K-means into ``c`` clusters per modality, and
every item is linked to its ``k`` nearest cluster centres by cosine similarity. The centre
vectors initialise the code embedding table (``e_ID_a``). With ``--no-codes`` every item is its
own modality node (the Fig. 5 baseline without modality codes).

Outputs per modality ``NAME``: ``codes/NAME.parquet`` (contracts.CODES_SCHEMA) and
``codes/NAME.pt`` = ``{"centres": [c, ae_dim], "reduced": [n_items, ae_dim]}`` (float32; rows of
items without features are zero). :func:`load_modality_info` is how the graph builder and the
models read them.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from . import contracts as C
from .errors import MmsrError
from .models.base import ModalityInfo
from .workdir import (DatasetDir, check_regular_file, commit_atomic, parquet_writer, read_parquet, torch_writer, upstream,
                      validate_modality_name)

CODES_MODES = ("clusters", "items")  # manifest option codes_mode: shared codes, or one per item
FINITE_CHUNK = 65_536  # rows checked for NaN/inf at once: a bounded mask, whatever the catalogue
MIN_REL_IMPROVEMENT = 1e-3  # autoencoder early stopping: smaller held-out gains count as none


def available_modalities(ds: DatasetDir) -> list[str]:
    """Names of the modalities that have a build-codes manifest, sorted."""
    prefix = C.STAGE_CODES + ":"
    return sorted(s[len(prefix):] for s in ds.stages(C.STAGE_CODES) if s.startswith(prefix))


def _load_centres_file(path) -> dict:
    check_regular_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors differ between torch versions
        raise MmsrError(f"{path}: not a readable codes tensor file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or "centres" not in obj or "reduced" not in obj:
        raise MmsrError(f"{path}: expected a dict with 'centres' and 'reduced' tensors")
    return obj


def load_modality_info(ds: DatasetDir, name: str, variant: str = "codes"):
    """The :class:`~mmsr_cli.models.base.ModalityInfo` of modality ``name``.

    ``variant="codes"``: the code table written by build-codes (``n_codes`` = c clusters, or
    n_items when it ran with ``--no-codes``), ``item_codes`` int64 ``[n_items, k]`` padded with
    -1 (items without features: all -1). ``variant="items"``: one node per item whatever mode
    build-codes ran in (``n_codes`` = n_items, ``centres`` = the item's reduced vector,
    ``item_codes`` = ``[[item_idx]]``, ``[[-1]]`` for items without features).
    """

    validate_modality_name(name)
    if variant not in C.GRAPH_VARIANTS:
        raise MmsrError(f"graph variant {variant!r} is unknown (expected {' or '.join(C.GRAPH_VARIANTS)})")
    stage = C.modality_stage(C.STAGE_CODES, name)
    manifest = ds.require(stage)
    table = read_parquet(ds.path(C.codes_file(name)), C.CODES_SCHEMA)
    tensors = _load_centres_file(ds.path(C.centres_file(name)))
    reduced = tensors["reduced"].to(torch.float32)
    n_items = table.num_rows
    item_idx = table.column("item_idx").to_numpy()
    if not np.array_equal(item_idx, np.arange(n_items)) or reduced.shape[0] != n_items:
        raise MmsrError(
            f"{ds.path(C.codes_file(name))}: rows are not items 0..{n_items - 1} in order, or do "
            f"not match {C.centres_file(name)}; re-run `mmsr build-codes --modality {name}`"
        )
    # Offsets/values of the list column: vectorised padding, no Python loop over items.
    codes_col = table.column("codes").combine_chunks()
    offsets = codes_col.offsets.to_numpy()
    values = codes_col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.diff(offsets)
    has_codes = lengths > 0

    if variant == "items":
        item_codes = np.where(has_codes, np.arange(n_items), -1).astype(np.int64)[:, None]
        return ModalityInfo(
            name=name,
            n_codes=n_items,
            code_dim=int(reduced.shape[1]),
            centres=reduced,
            item_codes=item_codes,
        )

    centres = tensors["centres"].to(torch.float32)
    options = manifest.get("options", {})
    k_recorded = int(options.get("top_k", 1)) if options.get("codes_mode") == "clusters" else 1
    k = int(max(lengths.max(initial=0), k_recorded, 1))
    item_codes = np.full((n_items, k), -1, dtype=np.int64)
    rows = np.repeat(np.arange(n_items), lengths)
    cols = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
    item_codes[rows, cols] = values
    return ModalityInfo(
        name=name,
        n_codes=int(centres.shape[0]),
        code_dim=int(centres.shape[1]),
        centres=centres,
        item_codes=item_codes,
    )


# ----------------------------------------------------------------------------------------------
# Building the codes


@dataclass
class CodesOptions:
    modalities: list[str] | None = None  # None: every modality with extracted features
    ae_dim: int = 128  # autoencoder bottleneck: dimension of reduced vectors and centres
    clusters: int = 30  # c: K-means clusters (codes) per modality
    top_k: int = 3  # k: codes linked to each item (nearest centres by cosine)
    no_codes: bool = False  # one node per item instead of shared codes (Fig. 5 baseline)
    seed: int = 0
    epochs: int = 200  # autoencoder: most epochs
    patience: int = 10  # autoencoder: stop after this many epochs without held-out improvement
    lr: float = 1e-3
    batch_size: int = 256
    n_init: int = 10  # K-means restarts (fixed so that a seed decides the result)
    # K-means is fitted on at most this many items (drawn by seed; 0 = all), then every item is
    # linked to its nearest centres: fitting on all 1.2 M items of a 100x Beauty log would take
    # hours (10 restarts of up to 300 passes), a fixed sample keeps the fit's cost constant
    kmeans_items: int = 100_000

    def validate(self) -> "CodesOptions":
        for opt, value, rng in (("--ae-dim", self.ae_dim, C.RANGE_AE_DIM), ("--clusters", self.clusters, C.RANGE_CLUSTERS),
                                ("--top-k", self.top_k, C.RANGE_CODES_TOP_K), ("--epochs", self.epochs, C.RANGE_AE_EPOCHS),
                                ("--patience", self.patience, C.RANGE_AE_PATIENCE), ("--lr", self.lr, C.RANGE_LR),
                                ("--seed", self.seed, C.RANGE_SEED), ("--kmeans-items", self.kmeans_items, C.RANGE_KMEANS_ITEMS)):
            rng.check(opt, value)
        if self.batch_size < 1:  # not an option: a library caller's value
            raise MmsrError(f"CodesOptions.batch_size: must be at least 1, got {self.batch_size}")
        if not self.no_codes and self.top_k > self.clusters:
            raise MmsrError(f"--top-k {self.top_k}: must not exceed --clusters {self.clusters}")
        if not self.no_codes and 0 < self.kmeans_items < self.clusters:
            raise MmsrError(f"--kmeans-items {self.kmeans_items}: must be 0 or at least --clusters {self.clusters}")
        for name in self.modalities or []:
            try:
                validate_modality_name(name)
            except MmsrError as e:
                raise MmsrError(f"--modality: {e}") from None
        return self


@dataclass
class ModalityCodesResult:
    name: str
    n_items: int
    n_missing: int
    dim: int
    ae_dim: int
    ae_mse: float  # held-out reconstruction MSE of the autoencoder
    ae_epochs: int
    mode: str  # clusters | items
    n_codes: int
    sizes: np.ndarray  # items linked to each code
    seconds: float

    def summary(self, dataset: str) -> str:
        head = (f"build-codes {dataset}/{self.name}: {self.n_items} items ({self.n_missing} without "
                f"features), AE {self.dim}->{self.ae_dim} held-out MSE {self.ae_mse:.4g} "
                f"({self.ae_epochs} epochs)")
        if self.mode == "items":
            return f"{head}, --no-codes: one node per item ({self.n_codes}), {self.seconds:.1f} s"
        empty = float((self.sizes == 0).mean()) if len(self.sizes) else 0.0
        return (f"{head}, {self.n_codes} codes: items per code min {int(self.sizes.min())} / median "
                f"{float(np.median(self.sizes)):g} / max {int(self.sizes.max())}, {empty:.0%} empty, "
                f"{self.seconds:.1f} s")


def train_autoencoder(x, opts: CodesOptions, log=None):
    """Linear autoencoder (paper 4.1): encoder Linear(dim, ae_dim), decoder Linear(ae_dim, dim).

    MSE loss, Adam; 10% of the items are held out and training stops when their loss has not
    improved for ``patience`` epochs; the best encoder is kept. Returns (encoder, held-out MSE,
    epochs run). Deterministic for a seed on one machine (CPU, fixed shuffling generator).
    """
    # One thread: these matmuls are small ([256, dim] x [dim, ae_dim]), so thread start-up and
    # sync cost more than they save, and collapse when the cores are shared (measured on the
    # 2-core machine under load: 10 ms per step with 1 thread, 150 ms with 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_autoencoder(x, opts, log)
    finally:
        torch.set_num_threads(threads)


def _train_autoencoder(x, opts: CodesOptions, log=None):
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    n, dim = x.shape
    perm = torch.randperm(n, generator=gen)
    n_held = max(1, n // 10) if n >= 2 else 0
    # the training rows stay in ``x``, each batch gathered from it: no copy of 90 % of the features
    held, train_rows = x[perm[:n_held]], perm[n_held:]
    encoder, decoder = nn.Linear(dim, opts.ae_dim), nn.Linear(opts.ae_dim, dim)
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimiser = torch.optim.Adam(params, lr=opts.lr)
    check = held if n_held else x  # a single item: nothing to hold out

    def held_mse() -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(decoder(encoder(check)), check))

    best, best_state, stale, epochs = held_mse(), None, 0, 0
    for epoch in range(opts.epochs):
        epochs = epoch + 1
        order = torch.randperm(len(train_rows), generator=gen)
        for b in range(0, len(train_rows), opts.batch_size):
            batch = x[train_rows[order[b : b + opts.batch_size]]]
            loss = nn.functional.mse_loss(decoder(encoder(batch)), batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        mse = held_mse()
        # Patience counts epochs without a meaningful gain (0.1% relative): a loss creeping down
        # by 1e-6 per epoch would otherwise keep training to --epochs for nothing.
        stale = 0 if mse < best * (1 - MIN_REL_IMPROVEMENT) else stale + 1
        if mse < best:
            best = mse
            best_state = {k: v.clone() for k, v in encoder.state_dict().items()}
        if stale >= opts.patience:
            break
        if log is not None and epochs % 10 == 0:
            log.info("autoencoder epoch %d: held-out MSE %.6g (best %.6g)", epochs, mse, best)
    if best_state is not None:
        encoder.load_state_dict(best_state)
    return encoder, best, epochs


def top_k_cosine(vectors: np.ndarray, centres: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices [n, k] of each vector's k most cosine-similar centres (ties: lower index) and the sims."""
    eps = 1e-12
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), eps)
    c = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), eps)
    sims = (v @ c.T).astype(np.float32)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int32), np.take_along_axis(sims, idx, axis=1)


def kmeans_sample(n_present: int, kmeans_items: int, seed: int) -> np.ndarray | None:
    """Rows (sorted) of the items K-means is fitted on, or None for all of them."""
    if kmeans_items == 0 or n_present <= kmeans_items:
        return None
    return np.sort(np.random.default_rng([seed, n_present]).choice(n_present, kmeans_items, replace=False))


def load_features(ds: DatasetDir, name: str):
    path = ds.path(C.features_tensor_file(name))
    check_regular_file(path)
    try:
        # memory-mapped: the features are read from the page cache, not copied into the process
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        feats = obj["features"].to(torch.float32)
    except Exception as e:
        raise MmsrError(f"{path}: not a readable features file ({type(e).__name__}); re-run "
                        f"`mmsr extract-features --name {name} --dataset {ds.name}`") from e
    index = read_parquet(ds.path(C.features_index_file(name)), C.FEATURE_INDEX_SCHEMA)
    n = index.num_rows
    if not np.array_equal(index.column("item_idx").to_numpy(), np.arange(n)) or feats.shape[0] != n:
        raise MmsrError(f"{ds.path(C.features_index_file(name))}: rows do not match {path}; re-run "
                        f"`mmsr extract-features --name {name} --dataset {ds.name}`")
    rows = index.column("row").to_numpy().astype(np.int64)
    missing = index.column("missing").to_numpy(zero_copy_only=False).astype(bool)
    if not np.array_equal(rows, np.arange(n)):  # extract-features writes row = item_idx: no copy then
        feats = feats[torch.from_numpy(rows)]
    finite = np.concatenate([torch.isfinite(feats[lo : lo + FINITE_CHUNK]).all(dim=1).numpy()
                             for lo in range(0, n, FINITE_CHUNK)] or [np.zeros(0, dtype=bool)])
    bad = np.flatnonzero(~finite & ~missing)
    if len(bad):  # e.g. an fp16 overflow in the encoder; K-means cannot place NaN
        raise MmsrError(f"{path}: features of {len(bad)} item(s) are not finite (NaN or inf), first item_idx "
                        f"{int(bad[0])}; re-run `mmsr extract-features --name {name} --dataset {ds.name}` "
                        f"(with --precision fp32)")
    return feats, missing


def _check_present(ds: DatasetDir, name: str, opts: CodesOptions, n_present: int) -> None:
    if n_present == 0:
        raise MmsrError(f"{ds.path(C.features_index_file(name))}: no item has features for modality '{name}'")
    if not opts.no_codes and opts.clusters > n_present:
        raise MmsrError(f"--clusters {opts.clusters}: more than the {n_present} items with '{name}' features")


def _check_counts(ds: DatasetDir, name: str, opts: CodesOptions) -> None:
    index = read_parquet(ds.path(C.features_index_file(name)), C.FEATURE_INDEX_SCHEMA)
    missing = index.column("missing").to_numpy(zero_copy_only=False)
    _check_present(ds, name, opts, int((~missing.astype(bool)).sum()))


def build_modality(ds: DatasetDir, name: str, opts: CodesOptions) -> ModalityCodesResult:

    t0 = time.perf_counter()
    stage = C.modality_stage(C.STAGE_CODES, name)
    feat_manifest = ds.require(C.modality_stage(C.STAGE_FEATURES, name))
    log = ds.logger(stage)
    feats, missing = load_features(ds, name)
    n_items, dim = feats.shape
    present = np.flatnonzero(~missing)
    n_present = len(present)
    _check_present(ds, name, opts, n_present)
    log.info("start: %d items (%d with features), dim %d, options %s", n_items, n_present, dim, opts)

    # the items with features; all of them (the usual case) without a copy of the table
    x = feats if n_present == n_items else feats[torch.from_numpy(present)]
    encoder, ae_mse, ae_epochs = train_autoencoder(x, opts, log)
    with torch.no_grad():
        reduced_present = encoder(x).numpy().astype(np.float32)
    del x
    reduced = np.zeros((n_items, opts.ae_dim), dtype=np.float32)
    reduced[present] = reduced_present

    offsets = np.zeros(n_items + 1, dtype=np.int32)
    if opts.no_codes:
        mode, k = "items", 1
        centres = reduced
        code_values = present.astype(np.int32)
        sim_values = np.ones(n_present, dtype=np.float32)
        sizes = np.ones(n_items, dtype=np.int64)
        sizes[missing] = 0
    else:
        # scikit-learn takes ~1 s to import: only when codes are clustered
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning

        mode, k = "clusters", opts.top_k
        km = KMeans(n_clusters=opts.clusters, n_init=opts.n_init, random_state=opts.seed)
        fit_rows = kmeans_sample(n_present, opts.kmeans_items, opts.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            # float64: identical results across runs
            km.fit((reduced_present if fit_rows is None else reduced_present[fit_rows]).astype(np.float64))
        for w in caught:  # fewer distinct vectors than clusters: some codes stay empty (counted)
            log.warning("k-means: %s", w.message)
        centres = km.cluster_centers_.astype(np.float32)
        idx, sims = top_k_cosine(reduced_present, centres, k)
        code_values, sim_values = idx.reshape(-1), sims.reshape(-1)
        sizes = np.bincount(code_values, minlength=opts.clusters)
    lengths = np.zeros(n_items, dtype=np.int32)
    lengths[present] = k
    offsets[1:] = np.cumsum(lengths)

    codes_rel, centres_rel = C.codes_file(name), C.centres_file(name)
    table = pa.table(
        {
            "item_idx": pa.array(np.arange(n_items, dtype=np.int32)),
            "codes": pa.ListArray.from_arrays(pa.array(offsets), pa.array(code_values, pa.int32())),
            "similarities": pa.ListArray.from_arrays(pa.array(offsets), pa.array(sim_values, pa.float32())),
        }
    )
    commit_atomic({  # both or neither: the codes index the centres
        ds.path(codes_rel): parquet_writer(table, C.CODES_SCHEMA),
        ds.path(centres_rel): torch_writer({"centres": torch.from_numpy(np.ascontiguousarray(centres)),
                                            "reduced": torch.from_numpy(reduced)}),
    })
    seconds = time.perf_counter() - t0
    ds.write_manifest(
        stage,
        inputs=upstream(feat_manifest),
        outputs=[codes_rel, centres_rel],
        options={
            "codes_mode": mode,
            "ae_dim": opts.ae_dim,
            "clusters": opts.clusters if mode == "clusters" else None,
            "top_k": k,
            "seed": opts.seed,
            "epochs": opts.epochs,
            "patience": opts.patience,
            "lr": opts.lr,
            "batch_size": opts.batch_size,
            "kmeans_n_init": opts.n_init if mode == "clusters" else None,
            "kmeans_items": opts.kmeans_items if mode == "clusters" else None,
        },
        counts={
            "n_items": n_items,
            "n_missing": int(missing.sum()),
            "n_codes": int(centres.shape[0]),
            "feature_dim": int(dim),
            "ae_heldout_mse": ae_mse,
            "ae_epochs": ae_epochs,
            "empty_codes": int((sizes == 0).sum()) if mode == "clusters" else 0,
        },
    )
    result = ModalityCodesResult(name, n_items, int(missing.sum()), int(dim), opts.ae_dim, ae_mse, ae_epochs,
                                 mode, int(centres.shape[0]), sizes, seconds)
    log.info(result.summary(ds.name))
    return result


def run(ds: DatasetDir, opts: CodesOptions) -> list[ModalityCodesResult]:
    """Build codes for the chosen modalities (default: every modality with features)."""
    opts.validate()
    names = opts.modalities
    if not names:
        prefix = C.STAGE_FEATURES + ":"
        names = [s[len(prefix):] for s in ds.stages(C.STAGE_FEATURES) if s.startswith(prefix)]
        if not names:
            ds.require(C.STAGE_PREPROCESS)  # a missing dataset or preprocess says so first
            raise MmsrError(
                f"{ds.root / C.MANIFESTS_DIR}: no modality has features; run `mmsr extract-features "
                f"--dataset {ds.name} --modality image|text` first"
            )
    for name in names:  # check every modality's inputs and options before writing anything
        ds.require(C.modality_stage(C.STAGE_FEATURES, name))
        _check_counts(ds, name, opts)
    return [build_modality(ds, name, opts) for name in names]
