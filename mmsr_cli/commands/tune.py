"""`mmsr tune`: search a model's hyper-parameters on validation with Optuna (tune/ in the dataset)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import contracts as C
from ..app import ConfigOpt, DatasetOpt, SeedOpt, WorkdirOpt, app, console, ranged
from ..distributed import launched
from ..errors import MmsrError
from ..models import check_model_name
from ..space import model_space, read_space_file
from ..tuning import PRUNE_AFTER_EPOCHS, TuneSettings, parse_timeout, tune
from ..workdir import DatasetDir


@app.command("tune")
def tune_command(
    dataset: DatasetOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="Model to tune (any but pop, which has no parameters).")] = "mmsr",
    trials: Annotated[int, ranged("--trials", "-n", rng=C.RANGE_TRIALS, help="Finished trials the study should have (a resumed study counts its earlier ones).")] = 20,
    space: Annotated[
        Optional[Path],
        typer.Option("--space", help="TOML file narrowing the model's search space (lr = {low = 1e-4, high = 3e-3, log = true}, "
                     "batch-size = [256, 512], dim = 64 fixes an option; replace = true: only the file's entries)."),
    ] = None,
    timeout: Annotated[
        Optional[str], typer.Option("--timeout", help="Start no trial after this long (600, 600s, 30m, 2h); the running one finishes.")
    ] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Study name [default: <model>-<split>-s<seed>].")] = None,
    epochs: Annotated[int, ranged("--epochs", rng=C.RANGE_EPOCHS, help="Maximum epochs per trial.")] = 50,
    patience: Annotated[int, ranged("--patience", rng=C.RANGE_PATIENCE, help="Early stopping of each trial (epochs without validation gain); 0 = never.")] = 5,
    prune_after: Annotated[int, ranged("--prune-after", rng=C.RANGE_PRUNE_AFTER, help="First epoch at which the median pruner may stop a trial below the median of earlier trials; 0 = no pruning.")] = PRUNE_AFTER_EPOCHS,
    metric: Annotated[str, typer.Option("--metric", help="Validation metric the study maximises.")] = "ndcg@10",
    seed: SeedOpt = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Search hyper-parameters on the validation split (Optuna TPE, median pruning); resumable.

    Each trial is a run runs/tune-<study>-tNNN; the study lives in tune/studies.sqlite3 of the
    dataset; the best options are written to tune/<study>.toml for `mmsr train --config`.
    """
    if launched():
        raise MmsrError("mmsr tune runs in one process: start it without torchrun (two `tune` processes share a study)")
    check_model_name(model)
    seconds = parse_timeout(timeout)
    search = model_space(model)
    if space is not None:
        search = read_space_file(space, model, search)
    settings = TuneSettings(model=model, epochs=epochs, patience=patience, seed=seed, metric=metric, space=search,
                            prune_after=prune_after)
    ds = DatasetDir.open(workdir, dataset)

    def progress(row) -> None:
        value = "" if row.value is None else f" valid {metric} {row.value:.4f}"
        console.print(f"trial {row.number} {row.state}{value} ({_params(row.params)}) {row.note}".rstrip(),
                      markup=False, highlight=False, soft_wrap=True)

    def note(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    result = tune(ds, settings, trials, study_name=study, timeout=seconds, device=device, on_trial=progress,
                  on_note=note)

    out = Console()  # stdout: the trials table is the command's data
    if not out.is_terminal:
        out = Console(width=250)
    table = Table(title=f"{ds.name} / study {result.study}: valid {metric}")
    for column in ("trial", "state", metric, "epochs", *result.searched, "run", "note"):
        table.add_column(column, justify="right" if column not in ("state", "run", "note") else "left")
    for r in result.trials:
        mark = " *" if result.best is not None and r.number == result.best.number else ""
        table.add_row(str(r.number), r.state, "" if r.value is None else f"{r.value:.4f}{mark}",
                      "" if r.epochs is None else str(r.epochs), *(_fmt(r.params.get(k)) for k in result.searched),
                      r.run, r.note)
    out.print(table)
    console.print(result.summary(), markup=False, highlight=False, soft_wrap=True)


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _params(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
