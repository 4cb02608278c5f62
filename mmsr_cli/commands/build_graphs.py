"""`mmsr build-graphs`: samples + modality codes -> per-sample MSGraphs stored as flat arrays."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..app import ConfigOpt, DatasetOpt, WorkdirOpt, app, console, parse_list
from ..graphs import BuildGraphsOptions, build_graphs
from ..runtime import progress
from ..workdir import DatasetDir


@app.command(
    "build-graphs",
    help="Check the samples and codes for the Modality-enriched Sequence Graphs (MSGraphs), count their "
    "nodes and edges, and record the variant ('codes', or 'items' with --no-codes) and modalities in "
    "<workdir>/<dataset>/graphs/<variant>/meta.json; train and evaluate build each batch's graphs as it is drawn.",
)
def build_graphs_command(
    dataset: DatasetOpt,
    modalities: Annotated[
        Optional[str],
        typer.Option("--modalities", help="Comma-separated modalities to include [default: every one with codes]."),
    ] = None,
    no_codes: Annotated[
        bool,
        typer.Option("--no-codes", help="One node per item and modality (nothing shared) instead of shared codes."),
    ] = False,
    splits: Annotated[
        str, typer.Option("--splits", help="Comma-separated splits to build (train, valid, test).")
    ] = "train,valid,test",
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    ds = DatasetDir.open(workdir, dataset)
    opts = BuildGraphsOptions(
        modalities=parse_list(modalities, "--modalities") if modalities is not None else None,
        no_codes=no_codes,
        splits=tuple(parse_list(splits, "--splits")),
    )
    with ds.writing(), progress(transient=True) as bar:
        result = build_graphs(ds, opts, progress=bar)
    per_split = ", ".join(
        f"{s} {c['samples']} graphs ({c['mean_nodes']:.1f} nodes, {c['mean_edges']:.1f} edges each)"
        for s, c in result.counts.items()
    )
    mods = ", ".join(result.modalities) or "no modalities (item-only graphs)"
    console.print(
        f"build-graphs [{result.variant}; {mods}]: {per_split}; checked and counted in {result.seconds:.1f}s "
        f"-> {ds.path('graphs/' + result.variant)}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
