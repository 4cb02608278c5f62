"""`mmsr evaluate`: full-ranking metrics of trained runs, alone or compared over seeds."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import contracts as C
from .. import significance as sig
from ..app import ConfigOpt, DatasetOpt, SeedOpt, WorkdirOpt, app, console, parse_list, ranged
from ..errors import MmsrError
from ..evaluation import evaluate_runs
from ..metrics import KS, METRICS, REGISTRY, Selection
from ..popularity import BUCKETS, flat_metrics
from ..robustness import Setting
from ..runs import compare_runs, run_dir
from ..workdir import DatasetDir

BEYOND_SHOWN = ("coverage@10", "avg_pop@10", "hr@10/head", "hr@10/torso", "hr@10/tail", "hr@10/rare",
                "ndcg@10/head", "ndcg@10/torso", "ndcg@10/tail", "ndcg@10/rare")


def _bucket_table(beyond: dict):
    table = Table(title="by the target's training popularity")
    for col in ("bucket", "items", "popularity", "samples", "hr@10", "ndcg@10", "mrr@10"):
        table.add_column(col, justify="left" if col == "bucket" else "right")
    for name in BUCKETS:
        b = beyond["buckets"][name]
        lo_hi = b["popularity_range"]
        table.add_row(name, f"{b['items']:,}", "-" if lo_hi is None else f"{lo_hi[0]}-{lo_hi[1]}", f"{b['n']:,}",
                      *("-" if b["metrics"].get(m) is None else f"{b['metrics'][m]:.4f}" for m in ("hr@10", "ndcg@10", "mrr@10")))
    return table


@app.command("evaluate")
def evaluate_command(
    dataset: DatasetOpt,
    run: Annotated[Optional[str], typer.Option("--run", help="Run name (folder under runs/).")] = None,
    split: Annotated[str, typer.Option("--split", help="valid or test.")] = "test",
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="best (validation) or last.")] = "best",
    compare: Annotated[
        Optional[str],
        typer.Option("--compare", help="Comma-separated runs to evaluate side by side, grouped by config minus seed, "
                     "with paired significance tests (--pairs)."),
    ] = None,
    pairs: Annotated[
        Optional[str],
        typer.Option("--pairs", help="With --compare: RUN_A:RUN_B,... paired tests of A's experiment against B's on every metric "
                     "[default: each MMSR experiment against the best baseline on each metric]."),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    drop_modality: Annotated[
        Optional[str],
        typer.Option("--drop-modality", help="Missing modalities (paper 5.4): image, text, all or a modality name; "
                     "a share --drop-ratio of the items lose it (MMSR: its nodes are removed from the graphs)."),
    ] = None,
    drop_ratio: Annotated[Optional[float], ranged("--drop-ratio", rng=C.RANGE_RATIO, help="Share of items (0 < R < 1) that lose the modality.")] = None,
    perturb: Annotated[
        Optional[str],
        typer.Option("--perturb", help="disordered (shuffle each history) or mismatched (displace items' modality codes), paper Figure 1."),
    ] = None,
    perturb_ratio: Annotated[
        Optional[float], ranged("--perturb-ratio", rng=C.RANGE_RATIO, help="mismatched: share of items (0 < R < 1) given other items' codes [default: 0.5].")
    ] = None,
    seed: SeedOpt = 0,
    metrics: Annotated[
        Optional[str],
        typer.Option("--metrics", help=f"Comma-separated metrics among {', '.join(REGISTRY)} [default: {','.join(METRICS)}]."),
    ] = None,
    topk: Annotated[
        Optional[str], typer.Option("--topk", help=f"Comma-separated cut-offs k of the metrics [default: {','.join(map(str, KS))}].")
    ] = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Rank all items for every sample of a split (pessimistic ties); HR, MRR, NDCG @5/10/20
    (or the --metrics at the --topk cut-offs: metrics.py),
    catalogue coverage@K and recommended-item popularity@K, and the metrics per popularity bucket of
    the target item (head, torso, tail, rare; popularity.py).

    Writes runs/<run>/metrics_<split>.json (and the per-sample ranks, ranks_<split>.npy) and prints a
    table on stdout; with --drop-modality or
    --perturb, runs/<run>/metrics_<split>_<setting>.json (e.g. metrics_test_drop-text-0.3.json),
    the items chosen by --seed.
    """
    if (run is None) == (compare is None):
        raise MmsrError("give exactly one of --run NAME or --compare RUN1,RUN2,...")
    if pairs is not None and compare is None:
        raise MmsrError("--pairs: only with --compare")
    runs = [run] if run is not None else parse_list(compare, "--compare")
    if len(set(runs)) != len(runs):
        raise MmsrError(f"--compare: a run is named twice in {compare}")
    setting = Setting.from_options(drop_modality, drop_ratio, perturb, perturb_ratio, seed)
    selection = Selection.parse(metrics, topk)
    shown_metrics = selection.names
    shown = f" / {setting.name}" if setting is not None else ""
    ds = DatasetDir.open(workdir, dataset)
    if pairs is not None:  # before any run is evaluated: a typo or two seeds of one experiment must not come after the writes
        sig.pair_names(pairs, "--pairs", runs, lambda name: sig.run_experiment(ds, name))
    records = evaluate_runs(ds, runs, split, checkpoint, device, setting, selection)  # all checked before any is written

    out = Console()  # stdout: the table is the command's data
    if not out.is_terminal:  # piped: do not squeeze the columns into 80 characters
        out = Console(width=250)
    if run is not None:
        rec = records[0]
        out.print(f"{ds.name} / {run} / {split}{shown} ({checkpoint}.pt, {rec['n']:,} samples)", markup=False, highlight=False)
        table = Table()
        table.add_column("metric")
        table.add_column("value", justify="right")
        for m in shown_metrics:
            table.add_row(m, f"{rec['metrics'][m]:.4f}")
        for name, value in rec["beyond"].items():
            if name.startswith(("coverage@", "avg_pop@")):
                table.add_row(name, f"{value:.4f}" if name.startswith("coverage") else f"{value:.1f}")
        out.print(table)
        out.print(_bucket_table(rec["beyond"]))
        headline = [m for m in ("hr@10", "ndcg@10") if m in rec["metrics"]] or list(shown_metrics[:2])
        console.print(
            f"{run}: {split} " + ", ".join(f"{m} {rec['metrics'][m]:.4f}" for m in headline)
            + f" -> {ds.path('runs')}/{run}/{rec['file']}",
            markup=False, highlight=False, soft_wrap=True,
        )
        return
    groups = compare_runs(records)
    arms = sig.arms_from_groups(groups, records, lambda name: run_dir(ds, name))
    chosen = sig.parse_pairs(pairs, arms, shown_metrics, "--pairs") if pairs is not None else sig.default_pairs(arms, shown_metrics)
    tests = sig.run_tests(chosen)
    marked = sig.significant_cells(tests)
    out.print(f"{ds.name} / {split}{shown} ({checkpoint}.pt): mean (± std over seeds where there are several)"
              + (f"; {sig.MARK} significant gain (paired t-test and Wilcoxon over the test cases, p < {sig.ALPHA})" if tests else ""),
              markup=False, highlight=False)
    table = Table()
    table.add_column("experiment")
    table.add_column("seeds", justify="right")
    for m in shown_metrics:
        table.add_column(m, justify="right")
    for g in groups:
        spread = len(g["seeds"]) > 1
        table.add_row(
            g["experiment"],
            ",".join(str(s) for s in g["seeds"]),
            *(f"{g['mean'][m]:.4f}" + (f" ± {g['std'][m]:.4f}" if spread else "")
              + (sig.MARK if (g["experiment"], m) in marked else "") for m in shown_metrics),
        )
    out.print(table)
    beyond = compare_runs([{**r, "metrics": flat_metrics(r["beyond"])} for r in records])
    shown_beyond = [m for m in BEYOND_SHOWN if all(m in g["mean"] for g in beyond)]
    table = Table(title="coverage, recommended popularity, and metrics by the target's training popularity")
    table.add_column("experiment")
    for m in shown_beyond:
        table.add_column(m, justify="right")
    for g in beyond:
        spread = len(g["seeds"]) > 1
        table.add_row(g["experiment"], *(
            (f"{g['mean'][m]:.1f}" + (f" ± {g['std'][m]:.1f}" if spread else "")) if m.startswith("avg_pop")
            else (f"{g['mean'][m]:.4f}" + (f" ± {g['std'][m]:.4f}" if spread else "")) for m in shown_beyond))
    out.print(table)
    if tests:
        pt = Table(title="paired tests (p-values)")
        for column in ("experiment", "against", "metric", "difference", "t-test", "Wilcoxon", "seeds", "t-test (seeds)", "Wilcoxon (seeds)"):
            pt.add_column(column, justify="left" if column in ("experiment", "against", "metric") else "right")
        for t in tests:
            pt.add_row(t.a, t.b, t.metric, f"{t.diff:+.4f}" + (sig.MARK if t.significant else ""), sig.fmt_p(t.t_p),
                       sig.fmt_p(t.wilcoxon_p), str(t.n_seeds or ""), sig.fmt_p(t.seeds_t_p), sig.fmt_p(t.seeds_wilcoxon_p))
        out.print(pt)
        note = sig.seeds_wilcoxon_note(tests)
        if note:
            out.print(note, markup=False, highlight=False)
    console.print(f"compared {len(runs)} runs in {len(groups)} experiment(s); {len(tests)} paired test(s)",
                  markup=False, highlight=False)
