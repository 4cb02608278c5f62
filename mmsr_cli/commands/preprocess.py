"""`mmsr preprocess`: raw/ -> items, users, interactions and train/valid/test samples."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import contracts as C
from ..app import ConfigOpt, DatasetOpt, WorkdirOpt, app, console, ranged
from ..preprocess import PreprocessOptions, run
from ..workdir import DatasetDir


@app.command("preprocess")
def preprocess_command(
    dataset: DatasetOpt,
    core: Annotated[
        int, ranged("--core", rng=C.RANGE_CORE, help="k-core: keep users and items with >= K interactions (0 or 1: off).")
    ] = 5,
    max_len: Annotated[int, ranged("--max-len", rng=C.RANGE_MAX_LEN, help="Keep the last N items of each history.")] = 50,
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="loo: last item test, second-to-last valid; ratio: last --test-ratio of each user test; "
            "official: the train/valid/test files of Amazon 2023's benchmark, kept exactly (no --core filter).",
        ),
    ] = "loo",
    test_ratio: Annotated[
        float, ranged("--test-ratio", rng=C.RANGE_RATIO, help="Share of each sequence used as test cases (--split ratio).")
    ] = 0.2,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Filter (k-core), order and number the raw interactions, then write the split samples."""
    opts = PreprocessOptions(core=core, max_len=max_len, split=split, test_ratio=test_ratio).validate()
    ds = DatasetDir.open(workdir, dataset)
    with ds.writing():
        result = run(ds, opts)
    console.print(result.summary(ds.name), markup=False, highlight=False, soft_wrap=True)
