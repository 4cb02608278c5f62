"""`mmsr report`: Markdown tables and PNG figures from the runs of a workdir (no evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..app import ConfigOpt, WorkdirOpt, app, console, parse_list
from ..errors import MmsrError
from ..report import write_report
from ..workdir import resolve_workdir


@app.command("report")
def report_command(
    dataset: Annotated[
        Optional[str], typer.Option("--dataset", "-d", help="Comma-separated datasets [default: every dataset with runs].")
    ] = None,
    runs: Annotated[Optional[str], typer.Option("--runs", help="Comma-separated runs to include [default: all].")] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Markdown file; figures go to <stem>_figures/ beside it [default: <workdir>/report.md].")
    ] = None,
    metric: Annotated[str, typer.Option("--metric", help="Metric of the figures and robustness tables.")] = "ndcg@10",
    split: Annotated[str, typer.Option("--split", help="Split whose metrics files are reported: valid or test.")] = "test",
    pairs: Annotated[
        Optional[str],
        typer.Option("--pairs", help="RUN_A:RUN_B,... paired significance tests of A's experiment against B's on every metric "
                     "[default: each MMSR experiment against the best baseline on each metric]."),
    ] = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Results tables (mean ± std over seeds, best baseline underlined, gain of MMSR, significant gains
    starred after paired tests over the test cases), robustness
    curves (Figure 4), disordered/mismatched case study (Figure 1), c/k heat map (Figure 5),
    update-gate statistics and training curves, from config.json, history.json and metrics_*.json."""
    root = resolve_workdir(workdir)
    names = parse_list(dataset, "--dataset") or None
    run_names = parse_list(runs, "--runs") or None
    if run_names and len(set(run_names)) != len(run_names):
        raise MmsrError(f"--runs: a run is named twice in {runs}")
    result = write_report(root, output if output is not None else root / "report.md", names, run_names, metric, split, pairs)
    console.print(
        f"report: {result.n_runs} run(s) of {', '.join(result.datasets)}, {len(result.figures)} figure(s) -> {result.path}",
        markup=False, highlight=False, soft_wrap=True,
    )
