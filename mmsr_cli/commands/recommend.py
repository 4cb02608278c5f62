"""`mmsr recommend`: top-K next items for users from a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import contracts as C
from ..app import ConfigOpt, DatasetOpt, WorkdirOpt, app, console, parse_list, ranged
from ..errors import MmsrError
from ..recommend import RECS_SCHEMA, RecommendOptions, recommend, write_stdout
from ..runs import load_run
from ..runtime import resolve_device
from ..workdir import DatasetDir, write_parquet_atomic


@app.command("recommend")
def recommend_command(
    dataset: DatasetOpt,
    run: Annotated[str, typer.Option("--run", help="Run name (folder under runs/).")],
    users: Annotated[Optional[str], typer.Option("--users", help="Comma-separated user ids (as in the raw data).")] = None,
    all_users: Annotated[bool, typer.Option("--all-users", help="Recommend for every user.")] = False,
    top_k: Annotated[int, ranged("--top-k", rng=C.RANGE_TOP_K, help="Items per user.")] = 10,
    exclude_seen: Annotated[bool, typer.Option("--exclude-seen", help="Leave out items the user already interacted with.")] = False,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write a Parquet file (user_id, rank, item_id, title, score).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="stdout format without --output: tsv or jsonl.")] = "tsv",
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best (validation) or last.")] = "best",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Score all items from each user's latest history (their last max_len interactions)."""
    if fmt not in ("tsv", "jsonl"):
        raise MmsrError(f"--format: expected tsv or jsonl, got {fmt!r}")
    if output is not None and output.suffix != ".parquet":
        raise MmsrError(f"--output: {output} must end in .parquet")
    opts = RecommendOptions(
        users=parse_list(users, "--users") or None, all_users=all_users, top_k=top_k, exclude_seen=exclude_seen
    ).validate()
    dev = resolve_device(device)
    ds = DatasetDir.open(workdir, dataset)
    loaded = load_run(ds, run, checkpoint, dev)
    opts.batch_size = loaded.train_config.batch_size
    table = recommend(ds, loaded, opts, dev)
    n_users = len(set(table.column("user_id").to_pylist()))
    if output is not None:
        write_parquet_atomic(output, table, RECS_SCHEMA)
        console.print(f"{run}: top-{top_k} for {n_users:,} users -> {output}", markup=False, highlight=False, soft_wrap=True)
    else:
        write_stdout(table, fmt)
