"""`mmsr download`: fetch a known dataset, ingest a local copy, or generate the synthetic one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import contracts as C
from ..app import ConfigOpt, DatasetOpt, WorkdirOpt, app, console, ranged
from ..download import KNOWN_DATASETS, DownloadOptions, run_download
from ..workdir import DatasetDir


@app.command(
    "download",
    help=f"Fetch raw data into <workdir>/<dataset>/raw/. Known datasets: {', '.join(KNOWN_DATASETS)} "
    "(Amazon 2014; synthetic is generated locally), and amazon2023-<Category> (Amazon Reviews 2023 "
    "from the Hugging Face hub, e.g. amazon2023-All_Beauty; HF_ENDPOINT selects a mirror); any other "
    "name needs --from DIR. Re-running skips complete files and resumes partial ones.",
)
def download(
    dataset: DatasetOpt,
    from_dir: Annotated[
        Optional[Path],
        typer.Option("--from", help="Ingest a local copy from this folder instead of downloading "
                     "(Amazon files, sequences.tsv + items.jsonl, or interactions.csv|parquet; "
                     "optional images/). Any dataset name is allowed."),
    ] = None,
    images: Annotated[bool, typer.Option("--images/--no-images", help="Fetch (or copy) item images.")] = True,
    workers: Annotated[int, ranged("--workers", rng=C.RANGE_DOWNLOAD_WORKERS, help="Concurrent image downloads.")] = 8,
    retries: Annotated[int, ranged("--retries", rng=C.RANGE_RETRIES, help="Extra attempts per file or image.")] = 5,
    timeout: Annotated[float, ranged("--timeout", rng=C.RANGE_TIMEOUT, help="Seconds without data before an attempt fails.")] = 60.0,
    base_url: Annotated[
        Optional[str],
        typer.Option("--base-url", help="Host and folder of the Amazon files (a mirror) instead of the SNAP one."),
    ] = None,
    benchmark: Annotated[
        Optional[str],
        typer.Option("--benchmark", help="Amazon 2023: fetch the official 5-core split files of this "
                     "split (last_out, last_out_w_his, timestamp, timestamp_w_his) instead of the raw "
                     "reviews; then `preprocess --split official`."),
    ] = None,
    revision: Annotated[
        Optional[str],
        typer.Option("--revision", help="Amazon 2023: hub revision (branch, tag or commit hash) to pin."),
    ] = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    ds = DatasetDir.open(workdir, dataset)
    opts = DownloadOptions(
        images=images, workers=workers, retries=retries, timeout=timeout, base_url=base_url, from_dir=from_dir,
        benchmark=benchmark, revision=revision,
    )
    with ds.writing(create=True):
        result = run_download(ds, opts)
    console.print(f"{result.summary()} -> {ds.path('raw')}", highlight=False, markup=False, soft_wrap=True)
