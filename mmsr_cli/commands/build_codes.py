"""`mmsr build-codes`: linear autoencoder + K-means modality codes per named modality."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import contracts as C
from ..app import ConfigOpt, DatasetOpt, SeedOpt, WorkdirOpt, app, console, parse_list, ranged
from ..codes import CodesOptions, run
from ..workdir import DatasetDir


@app.command("build-codes")
def build_codes_command(
    dataset: DatasetOpt,
    modality: Annotated[
        Optional[str],
        typer.Option("--modality", help="Comma-separated modality names [default: every modality with features]."),
    ] = None,
    ae_dim: Annotated[int, ranged("--ae-dim", rng=C.RANGE_AE_DIM, help="Autoencoder bottleneck: size of reduced vectors and centres.")] = 128,
    clusters: Annotated[int, ranged("--clusters", "-c", rng=C.RANGE_CLUSTERS, help="K-means clusters (codes) per modality.")] = 30,
    top_k: Annotated[int, ranged("--top-k", "-k", rng=C.RANGE_CODES_TOP_K, help="Codes per item: its k nearest centres by cosine.")] = 3,
    no_codes: Annotated[
        bool,
        typer.Option("--no-codes", help="No clustering: each item is its own modality node (paper Fig. 5 baseline)."),
    ] = False,
    epochs: Annotated[int, ranged("--epochs", rng=C.RANGE_AE_EPOCHS, help="Autoencoder: most training epochs.")] = 200,
    patience: Annotated[
        int, ranged("--patience", rng=C.RANGE_AE_PATIENCE, help="Autoencoder: stop after N epochs without held-out improvement.")
    ] = 10,
    lr: Annotated[float, ranged("--lr", rng=C.RANGE_LR, help="Autoencoder: Adam learning rate.")] = 1e-3,
    kmeans_items: Annotated[
        int,
        ranged("--kmeans-items", rng=C.RANGE_KMEANS_ITEMS,
               help="Fit K-means on at most N items drawn by --seed (0 = all), then link every item to its nearest centres."),
    ] = 100_000,
    seed: SeedOpt = 0,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Condense each modality's features with a linear autoencoder, cluster them with K-means and
    link every item to its top-k centres: the modality codes of the MSGraphs (paper section 4.1)."""
    opts = CodesOptions(
        modalities=parse_list(modality, "--modality") or None,
        ae_dim=ae_dim,
        clusters=clusters,
        top_k=top_k,
        no_codes=no_codes,
        seed=seed,
        epochs=epochs,
        patience=patience,
        lr=lr,
        kmeans_items=kmeans_items,
    ).validate()
    ds = DatasetDir.open(workdir, dataset)
    with ds.writing():
        for result in run(ds, opts):
            console.print(result.summary(ds.name), markup=False, highlight=False, soft_wrap=True)
