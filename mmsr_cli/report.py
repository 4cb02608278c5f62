"""`mmsr report`: a Markdown report with tables and figures from the runs of a workdir.

Reads, per dataset, ``runs/<run>/config.json``, ``history.json`` and every ``metrics_*.json``
(`mmsr evaluate`, clean and under robustness settings) and writes, without evaluating anything:

* results tables (paper Table 2): mean ± std over the runs that differ only by seed (the mean
  alone for one run), significant gains starred (paired tests on the stored per-sample ranks,
  significance.py: each MMSR experiment against the best baseline, or the pairs asked for);
  (``runs.compare_runs``), metrics in %, the best baseline underlined, the best value in
  bold, and the relative gain of MMSR over the best baseline;
* robustness curves (Figure 4): a metric against the share of items whose modality is dropped,
  one line per experiment, ratio 0 being the clean evaluation of the same runs;
* the perturbation case study (Figure 1): clean vs disordered vs mismatched;
* the c/k heat map (Figure 5) from MMSR runs that differ only in their codes' clusters c and
  top-k k (recorded in config.json's ``codes``); the datasets ``scripts/sweep_codes.sh`` makes,
  ``DATASET-c<c>k<k>`` with DATASET's preprocess fingerprint, join DATASET's section when both are
  reported (:func:`fold_sweep_copies`);
* training curves (loss and validation metric per epoch) and the update-gate statistics of MMSR
  (share of nodes of each type weighting ho->he above he->ho, Eq. 16-17);
* evaluation beyond accuracy (popularity.py): catalogue coverage, recommended-item popularity and
  the metric by the target item's training popularity (head, torso, tail, rare), with a bar chart.

Figures are PNG files (matplotlib, Agg) in ``<output stem>_figures/`` beside the report. Every
input is read and checked and every figure rendered before anything is written; then the figures
and the report are written as one (``workdir.commit_atomic``): a failure leaves the earlier
report and figures as they were.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import contracts as C
from .errors import MmsrError
from .metrics import METRIC_NAMES, check_metric
from .models import fields_not_read
from .popularity import BUCKETS, RARE_MAX, flat_metrics
from .runs import (NOT_EXPERIMENT, compare_runs, describe_experiment, experiment_key, option_token, recorded_codes,
                   with_config_defaults)
from .significance import (ALPHA, MARK, Arm, PairTest, default_pairs, fmt_p, parse_pairs, read_ranks, run_tests,
                           seeds_wilcoxon_note, significant_cells)
from .space import PAPER_SPACE
from .workdir import DatasetDir, bytes_writer, commit_atomic, read_file_text

SHOWN = METRIC_NAMES  # hr, mrr, ndcg @5/10/20


@dataclass
class RunFiles:
    name: str
    dataset: str
    config: dict
    history: list[dict] | None
    metrics: list[dict] = field(default_factory=list)  # metrics_*.json records, "file" added
    folder: Path = Path()  # runs/<run>/ (its ranks files)

    @property
    def model(self) -> str:
        return self.config["model"]["model"]

    @property
    def trained_with_drop(self) -> bool:
        return bool(self.config["train"].get("drop_modality"))

    def clean(self, split: str) -> dict | None:
        return next((m for m in self.metrics if m["file"] == C.metrics_file(split)), None)


def _read_json(path: Path, what: str):
    try:
        return json.loads(read_file_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MmsrError(f"{path}: not valid JSON ({e}); {what}") from e
    except OSError as e:
        raise MmsrError(f"{path}: cannot read ({e.strerror or e})") from e


def _read_run(folder: Path, dataset: str) -> RunFiles:
    config = _read_json(folder / C.RUN_CONFIG, "re-run `mmsr train` for this run")
    if not isinstance(config, dict) or not all(isinstance(config.get(k), dict) for k in ("train", "model")):
        raise MmsrError(f"{folder / C.RUN_CONFIG}: not a run config (fields 'train' and 'model' missing)")
    if "codes" not in config:  # trained before config.json recorded the codes' c and k
        codes = recorded_codes(DatasetDir.open(folder.parents[2], dataset), config)
        if codes is not None:
            config = {**config, "codes": codes}
    history = None
    if (folder / C.RUN_HISTORY_JSON).exists():
        history = _read_json(folder / C.RUN_HISTORY_JSON, "re-run `mmsr train` for this run")
        if not isinstance(history, list):
            raise MmsrError(f"{folder / C.RUN_HISTORY_JSON}: expected a list of epochs")
    run = RunFiles(folder.name, dataset, config, history, folder=folder)
    for path in sorted(folder.glob("metrics_*.json")):
        rec = _read_json(path, f"re-run `mmsr evaluate --run {folder.name}`")
        if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict) or "split" not in rec:
            raise MmsrError(f"{path}: not a metrics file of `mmsr evaluate` (fields 'split' and 'metrics')")
        missing = [m for m in SHOWN if m not in rec["metrics"]]
        if missing:
            raise MmsrError(f"{path}: field 'metrics' lacks {', '.join(missing)}; re-run `mmsr evaluate --run {folder.name}`")
        run.metrics.append({**rec, "file": path.name})
    return run


def collect_runs(workdir: Path, datasets: list[str] | None = None, runs: list[str] | None = None) -> dict[str, list[RunFiles]]:
    """dataset -> its runs (those named in ``runs`` if given), read from ``<workdir>/<dataset>/runs``."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise MmsrError(f"{workdir}: no such workdir")
    if datasets:
        folders = []
        for name in datasets:
            if not (workdir / name).is_dir():
                raise MmsrError(f"--dataset: no dataset '{name}' in {workdir}")
            folders.append(workdir / name)
    else:
        folders = sorted(p for p in workdir.iterdir() if (p / C.RUNS_DIR).is_dir())
    found: dict[str, list[RunFiles]] = {}
    for folder in folders:
        runs_dir = folder / C.RUNS_DIR
        names = sorted(p.name for p in runs_dir.iterdir() if (p / C.RUN_CONFIG).exists()) if runs_dir.is_dir() else []
        if runs:
            names = [n for n in names if n in runs]
        if names:
            found[folder.name] = [_read_run(runs_dir / n, folder.name) for n in names]
    if runs:
        seen = {r.name for rs in found.values() for r in rs}
        unknown = [r for r in runs if r not in seen]
        if unknown:
            raise MmsrError(f"--runs: no run '{unknown[0]}' in {workdir} (datasets {', '.join(p.name for p in folders) or 'none'})")
    if not found:
        raise MmsrError(f"{workdir}: no runs found; train some with `mmsr train` first")
    return found


SWEEP_COPY = re.compile(r"^(?P<base>.+)-c\d+k\d+$")  # scripts/sweep_codes.sh: DATASET-c<c>k<k>


def _preprocess_fingerprint(runs: list[RunFiles]) -> str | None:
    prints = {(r.config.get("fingerprints") or {}).get("preprocess") for r in runs}
    return prints.pop() if len(prints) == 1 else None


def fold_sweep_copies(found: dict[str, list[RunFiles]]) -> dict[str, list[RunFiles]]:
    """Move the runs of each sweep copy ``B-c<c>k<k>`` into dataset B's list when B is reported too
    and every run of both read the same preprocessed data (same preprocess fingerprint).

    A copy differs from B in its codes and graphs only, so its runs are B's experiments with other
    codes: their configs take B's name (so they group, label and map onto the c/k grid with B's
    runs) and each run is named ``<copy>/<run>`` (run names are unique per dataset only).
    """
    out = {name: list(runs) for name, runs in found.items()}
    for name, runs in found.items():
        match = SWEEP_COPY.match(name)
        base = match.group("base") if match else None
        if base not in out or base == name:  # base absent, or already folded into its own base
            continue
        fingerprint = _preprocess_fingerprint(runs)
        if fingerprint is None or fingerprint != _preprocess_fingerprint(found[base]):
            continue
        out[base] += [replace(r, name=f"{name}/{r.name}", config={**r.config, "dataset": base}) for r in runs]
        del out[name]
    return out


# ----------------------------------------------------------------------------------------------
# Grouping and aggregation


def _record(run: RunFiles, metrics: dict) -> dict:
    return {"run": run.name, "config": run.config, "metrics": metrics}


def experiment_labels(runs: list[RunFiles]) -> dict[str, str]:
    """experiment_key -> label (runs.compare_runs' labels, unique within ``runs``), without
    the options every run shares (:func:`shared_options`, :func:`common_modalities`): the
    dataset's heading says those once."""
    groups = compare_runs([_record(r, {}) for r in runs])
    said = said_once(runs)
    by_run = {name: without_tokens(g["experiment"], said) for g in groups for name in g["runs"]}
    return {experiment_key(r.config): by_run[r.name] for r in runs}


def said_once(runs: list[RunFiles]) -> set[str]:
    """The label tokens a dataset's heading states for all of ``runs``: shared options and modalities."""
    said = set(shared_options(runs))
    shared = common_modalities(runs)
    if shared:
        said.add(option_token("modalities", shared))
    return said


def without_tokens(label: str, tokens: set[str]) -> str:
    return " ".join(t for t in label.split(" ") if t not in tokens)


def shared_options(runs: list[RunFiles]) -> list[str]:
    """``key=value`` labels of the non-default options that every run reading them was given
    alike (e.g. ``epochs=10`` when each trained model ran 10 epochs and Pop, which has no epochs,
    is among the runs); modalities aside (:func:`common_modalities`)."""
    defaults = with_config_defaults({})
    configs = [(r.model, with_config_defaults(r.config)) for r in runs]
    out = []
    for section in ("model", "train"):
        for key, default in defaults[section].items():
            if key in ("model", "max_len", "modalities") or key in NOT_EXPERIMENT:
                continue
            values = {json.dumps(c[section].get(key)) for model, c in configs if key not in fields_not_read(model)}
            if len(values) == 1 and (value := json.loads(next(iter(values)))) != default:
                out.append(option_token(key, value))
    return out


def common_modalities(runs: list[RunFiles]) -> list[str] | None:
    """The modalities of every run that reads any, when they are the same for all of them."""
    seen = {tuple(r.config["model"].get("modalities") or ()) for r in runs} - {()}
    return list(next(iter(seen))) if len(seen) == 1 else None


@dataclass
class Group:
    label: str
    model: str
    runs: list[str]
    seeds: list
    mean: dict[str, float]
    std: dict[str, float]
    default_options: bool  # the model with every model option at its default (codes and training budget aside)
    epochs: int = 0  # training budget (--epochs)


def clean_groups(runs: list[RunFiles], split: str) -> list[Group]:
    """compare_runs over the clean ``split`` metrics of runs trained without dropped modalities."""
    records = [_record(r, r.clean(split)["metrics"]) for r in runs if r.clean(split) and not r.trained_with_drop]
    labels = experiment_labels(runs)
    models = {r.name: r.model for r in runs}
    out = []
    for g in compare_runs(records):
        config = next(r.config for r in runs if r.name == g["runs"][0])
        out.append(Group(labels[experiment_key(config)], models[g["runs"][0]], g["runs"], g["seeds"], g["mean"], g["std"],
                         _default_model_options(config), int(config["train"].get("epochs", 0))))
    return sorted(out, key=lambda g: (g.model == "mmsr", g.label))


def popularity_groups(runs: list[RunFiles], split: str) -> tuple[list[dict], dict | None]:
    """compare_runs over the coverage, recommended popularity and per-bucket metrics of the clean
    ``split`` evaluations that recorded them (``beyond``), and the buckets' sizes."""
    evaluated = [r for r in runs if r.clean(split) and r.clean(split).get("beyond") and not r.trained_with_drop]
    if not evaluated:
        return [], None
    labels = experiment_labels(runs)
    groups = compare_runs([_record(r, flat_metrics(r.clean(split)["beyond"])) for r in evaluated])
    for g in groups:
        g["experiment"] = labels[experiment_key(next(r.config for r in runs if r.name == g["runs"][0]))]
    return sorted(groups, key=lambda g: g["experiment"]), evaluated[0].clean(split)["beyond"]["buckets"]


def _default_model_options(config: dict) -> bool:
    """The paper's model: every model option at its default but the hyper-parameters that tuning
    searches for every model (space.PAPER_SPACE: layers, dropout), so a tuned paper-form MMSR is
    the headline and a tuned ablation or the authors' variant is not."""
    defaults = with_config_defaults({})["model"]
    model = with_config_defaults(config)["model"]
    tuned = {"model", "max_len", "modalities", *PAPER_SPACE}
    return all(model[k] == v for k, v in defaults.items() if k not in tuned)


def reference_mmsr(groups: list[Group]) -> Group | None:
    """The MMSR experiment compared with the baselines: the paper's model (every model option at
    its default: no ablation, HAN-GNN) with the most runs, then the largest --epochs (a 2-epoch
    sweep run is not the headline model), then first by label; else any MMSR experiment so."""
    mmsr = [g for g in groups if g.model == "mmsr"]
    if not mmsr:
        return None
    return min(mmsr, key=lambda g: (not g.default_options, -len(g.runs), -g.epochs, g.label))


def _epoch_cost(history: list[dict]) -> str:
    """'train s | valid s | peak GiB' cells of the runs table, from history.json."""
    def median(key: str) -> str:
        values = [h[key] for h in history if key in h]
        return f"{np.median(values):.0f}" if values else ""

    peaks = [h["peak_rss_mib"] for h in history if "peak_rss_mib" in h]
    peak = f"{max(peaks) / 1024:.2f}" if peaks else ""
    return f"{median('train_seconds')} | {median('valid_seconds')} | {peak}"


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _cell(mean: float, std: float, n: int) -> str:
    """A mean in %, with ± std only over several runs (one run has no spread to show)."""
    return f"{_pct(mean)} ± {_pct(std)}" if n > 1 else _pct(mean)


def results_table(groups: list[Group], marked: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Markdown rows: mean ± std in %, best baseline underlined, best overall bold, significant
    gains (``marked``: (label, metric), significance.significant_cells) starred, then MMSR's gain."""
    baselines = [g for g in groups if g.model != "mmsr"]
    best_base = {m: max((g.mean[m] for g in baselines), default=None) for m in SHOWN}
    best_all = {m: max(g.mean[m] for g in groups) for m in SHOWN}
    lines = ["| experiment | seeds | " + " | ".join(m.upper() for m in SHOWN) + " |",
             "|---|---|" + "---:|" * len(SHOWN)]
    for g in groups:
        cells = []
        for m in SHOWN:
            cell = _cell(g.mean[m], g.std[m], len(g.runs)) + (MARK if (g.label, m) in marked else "")
            if g.model != "mmsr" and g.mean[m] == best_base[m]:
                cell = f"<u>{cell}</u>"
            if g.mean[m] == best_all[m]:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {g.label} | {','.join(str(s) for s in g.seeds)} | " + " | ".join(cells) + " |")
    ref = reference_mmsr(groups)
    if ref is not None and baselines:
        gains = []
        for m in SHOWN:
            base = best_base[m]
            gains.append("n/a" if not base else f"{100 * (ref.mean[m] - base) / base:+.1f}%")
        lines.append(f"| gain of {ref.label} over the best baseline | | " + " | ".join(gains) + " |")
    return lines


def significance_tests(runs: list[RunFiles], groups: list[Group], split: str, pairs: str | None) -> tuple[list[PairTest], list[str]]:
    """Paired tests (significance.py) between the groups: ``pairs`` (RUN_A:RUN_B,...) or each
    MMSR experiment against the best baseline per metric; also the runs without a ranks file
    (evaluated before `evaluate` stored them), whose experiments are left out of the default pairs."""
    by_name = {r.name: r for r in runs}
    arms, unranked = [], []
    for g in groups:
        ranks, samples = [], set()
        for name in g.runs:
            run = by_name[name]
            rec = run.clean(split)
            path = run.folder / rec["ranks"] if rec.get("ranks") else None
            if path is None or not path.exists():
                unranked.append(name)
                ranks = None
                break
            ranks.append(read_ranks(path))
            samples.add(f"{(rec.get('fingerprints') or {}).get('preprocess')}/{split}")
        arms.append(Arm(g.label, g.model, g.runs, g.seeds, g.mean, ranks, samples.pop() if len(samples) == 1 else ""))
    if pairs is not None:
        chosen = parse_pairs(pairs, arms, SHOWN, "--pairs")
    else:
        chosen = default_pairs([a for a in arms if a.ranks is not None], SHOWN)
    return run_tests(chosen), unranked


def significance_section(tests: list[PairTest], unranked: list[str]) -> list[str]:
    md = []
    if tests:
        md += ["Paired tests over the same test cases (each case's metric averaged over the seeds; over the seeds "
               "too where both have two or more in common): difference in % points and p-values.", "",
               "| experiment | against | metric | difference | t-test | Wilcoxon | seeds | t-test (seeds) | Wilcoxon (seeds) |",
               "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for t in tests:
            md.append(f"| {t.a} | {t.b} | {t.metric.upper()} | {100 * t.diff:+.2f}{MARK if t.significant else ''} | "
                      f"{fmt_p(t.t_p)} | {fmt_p(t.wilcoxon_p)} | {t.n_seeds or ''} | {fmt_p(t.seeds_t_p)} | "
                      f"{fmt_p(t.seeds_wilcoxon_p)} |")
        md.append("")
        note = seeds_wilcoxon_note(tests)
        if note:
            md += [note, ""]
    if unranked:
        md += [f"No per-sample ranks for {', '.join(unranked)} (evaluated before `mmsr evaluate` stored them): "
               "re-run `mmsr evaluate` on them for paired tests.", ""]
    return md


def setting_records(runs: list[RunFiles], split: str) -> list[tuple[RunFiles, dict]]:
    return [(r, m) for r in runs for m in r.metrics if m["split"] == split and m.get("setting")]


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


def robustness_curves(runs: list[RunFiles], split: str, metric: str) -> dict[str, dict[str, dict[float, tuple[float, float, int]]]]:
    """selector -> experiment label -> ratio -> (mean, std, n) of ``metric``.

    Two kinds of curves: runs evaluated with ``--drop-modality`` (ratio 0: the clean evaluation of
    the same runs), and runs *trained* with ``--drop-modality`` (the items lack the modality in
    training and test), labelled "(trained with missing)", whose ratio 0 is the clean evaluation
    of the runs with the same options trained without dropping.
    """
    labels = experiment_labels(runs)
    raw: dict[str, dict[str, dict[float, list[float]]]] = {}
    zero: dict[tuple[str, str], set[str]] = {}  # (selector, label) -> keys of the runs giving ratio 0
    zero_runs: dict[tuple[str, str], set[str]] = {}  # ... or the very runs giving ratio 0
    for run, rec in setting_records(runs, split):
        s = rec["setting"]
        if not s.get("drop_modality"):
            continue
        label = labels[experiment_key(run.config)]
        raw.setdefault(s["drop_modality"], {}).setdefault(label, {}).setdefault(float(s["drop_ratio"]), []).append(
            rec["metrics"][metric])
        zero_runs.setdefault((s["drop_modality"], label), set()).add(run.name)
    for run in runs:
        clean = run.clean(split)
        if not run.trained_with_drop or clean is None:
            continue
        train = run.config["train"]
        base = {**run.config, "train": {**train, "drop_modality": "", "drop_ratio": 0.0}}
        base_key = experiment_key(base)
        label = f"{labels.get(base_key) or without_tokens(describe_experiment(base), said_once(runs))} (trained with missing)"
        raw.setdefault(train["drop_modality"], {}).setdefault(label, {}).setdefault(float(train["drop_ratio"]), []).append(
            clean["metrics"][metric])
        zero.setdefault((train["drop_modality"], label), set()).add(base_key)
    out = {}
    for selector, by_label in sorted(raw.items()):
        for label, points in by_label.items():
            for run in runs:
                clean = run.clean(split)
                if clean is None:
                    continue
                if run.name in zero_runs.get((selector, label), ()) or (
                    not run.trained_with_drop and experiment_key(run.config) in zero.get((selector, label), ())
                ):
                    points.setdefault(0.0, []).append(clean["metrics"][metric])
        out[selector] = {
            label: {ratio: (*_mean_std(v), len(v)) for ratio, v in sorted(points.items())}
            for label, points in sorted(by_label.items())
        }
    return out


def perturbation_table(runs: list[RunFiles], split: str, metric: str) -> tuple[list[str], dict[str, dict[str, tuple[float, float, int]]]]:
    """(setting columns, label -> column -> (mean, std, n)) of ``metric``: clean, disordered, mismatched-R."""
    labels = experiment_labels(runs)
    raw: dict[str, dict[str, list[float]]] = {}
    columns: set[str] = set()
    involved: set[str] = set()
    for run, rec in setting_records(runs, split):
        s = rec["setting"]
        if not s.get("perturb"):
            continue
        column = C.perturb_setting(s["perturb"], s.get("perturb_ratio", 0.0))  # seeds pooled
        columns.add(column)
        involved.add(run.name)
        raw.setdefault(labels[experiment_key(run.config)], {}).setdefault(column, []).append(rec["metrics"][metric])
    for run in runs:
        clean = run.clean(split)
        if clean is not None and run.name in involved:
            raw[labels[experiment_key(run.config)]].setdefault("clean", []).append(clean["metrics"][metric])
    ordered = ["clean"] + sorted(columns)
    return ordered, {label: {c: (*_mean_std(v), len(v)) for c, v in cols.items()} for label, cols in sorted(raw.items())}


def codes_grid(runs: list[RunFiles], split: str, metric: str) -> tuple[str, dict[tuple[int, int], tuple[float, int]]] | None:
    """(label, (c, k) -> (mean, n)) for the MMSR experiment run with the most (c, k) settings of its
    codes (same c and k for every modality; clean evaluations, no dropped modalities); None if < 2."""
    base: dict[str, dict[tuple[int, int], list[float]]] = {}
    names: dict[str, str] = {}
    for run in runs:
        clean = run.clean(split)
        codes = run.config.get("codes") or {}
        if run.model != "mmsr" or clean is None or run.trained_with_drop or not codes:
            continue
        ck = {(o.get("clusters"), o.get("top_k")) for o in codes.values() if o.get("codes_mode") == "clusters"}
        if len(ck) != 1 or len(codes) != sum(o.get("codes_mode") == "clusters" for o in codes.values()):
            continue
        (c, k), = ck
        if c is None or k is None:
            continue
        key = experiment_key({**run.config, "codes": {}})
        base.setdefault(key, {}).setdefault((int(c), int(k)), []).append(clean["metrics"][metric])
        names[key] = run.name
    if not base:
        return None
    key = max(base, key=lambda k: len(base[k]))
    if len(base[key]) < 2:
        return None
    label = without_tokens(describe_experiment(next(r for r in runs if r.name == names[key]).config), said_once(runs))
    return label, {ck: (float(np.mean(v)), len(v)) for ck, v in sorted(base[key].items())}


def gate_table(runs: list[RunFiles], split: str) -> dict[str, list[dict[str, dict]]]:
    """label -> per layer -> node type -> {nodes, hohe_share, heho_share, mean_beta_hohe} averaged
    over the experiment's runs (clean evaluations that recorded gate statistics)."""
    labels = experiment_labels(runs)
    raw: dict[str, list[list[dict]]] = {}
    for run in runs:
        clean = run.clean(split)
        if clean is not None and clean.get("gates") and not run.trained_with_drop:
            raw.setdefault(labels[experiment_key(run.config)], []).append(clean["gates"])
    out = {}
    for label, all_gates in sorted(raw.items()):
        layers = []
        for layer in range(min(len(g) for g in all_gates)):
            per_type = {}
            for t in all_gates[0][layer]:
                entries = [g[layer][t] for g in all_gates if t in g[layer] and g[layer][t]["nodes"]]
                if not entries:
                    continue
                per_type[t] = {
                    "nodes": int(sum(e["nodes"] for e in entries)),
                    "hohe_share": float(np.mean([e["hohe_share"] for e in entries])),
                    "heho_share": float(np.mean([e["heho_share"] for e in entries])),
                    "mean_beta_hohe": float(np.mean([e["mean_beta_hohe"] for e in entries])),
                }
            layers.append(per_type)
        out[label] = layers
    return out


# ----------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    # matplotlib: only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    return plt


def _png(fig) -> bytes:
    """The figure as PNG bytes (written with the report, at the end)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    return buf.getvalue()


def plot_robustness(selector: str, curves: dict, metric: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        x = list(points)
        y = [100 * points[r][0] for r in x]
        err = [100 * points[r][1] for r in x]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.set(xlabel=f"share of items without {selector} (drop ratio)", ylabel=f"{metric} (%)",
           title=f"robustness to missing {selector}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_perturbations(columns: list[str], table: dict, metric: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(table)), 4))
    width = 0.8 / len(columns)
    labels = list(table)
    for i, column in enumerate(columns):
        values = [100 * table[label][column][0] if column in table[label] else np.nan for label in labels]
        ax.bar(np.arange(len(labels)) + i * width, values, width, label=column)
    ax.set_xticks(np.arange(len(labels)) + width * (len(columns) - 1) / 2, labels, fontsize=7, rotation=15)
    ax.set(ylabel=f"{metric} (%)", title="order and modality match (Figure 1)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_codes_heatmap(grid: dict, metric: str, label: str) -> bytes:
    plt = _pyplot()
    cs = sorted({c for c, _ in grid})
    ks = sorted({k for _, k in grid})
    values = np.full((len(ks), len(cs)), np.nan)
    for (c, k), (v, _) in grid.items():
        values[ks.index(k), cs.index(c)] = 100 * v
    fig, ax = plt.subplots(figsize=(1.2 * len(cs) + 2, 0.8 * len(ks) + 2))
    im = ax.imshow(values, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(cs)), [str(c) for c in cs])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    for i in range(len(ks)):
        for j in range(len(cs)):
            if not math.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color="white", fontsize=8)
    ax.set(xlabel="codes per modality c (clusters)", ylabel="codes per item k (top-k)", title=f"{label}: {metric} (%)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _png(fig)


def plot_training(runs: list[RunFiles], metric: str) -> bytes:
    plt = _pyplot()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.get_cmap("tab20").colors
    for i, run in enumerate(runs):
        # 20 colours, then a new line style: every run keeps its own look (a Table-2 report has 13+)
        style = {"color": colours[i % 20], "linestyle": ("-", "--", ":", "-.")[i // 20 % 4], "marker": ".", "label": run.name}
        epochs = [h["epoch"] for h in run.history]
        ax_loss.plot(epochs, [h["loss"] for h in run.history], **style)
        ax_metric.plot(epochs, [100 * h["valid"][metric] for h in run.history], **style)
    ax_loss.set(xlabel="epoch", ylabel="training loss (CE)", title="training loss")
    ax_metric.set(xlabel="epoch", ylabel=f"valid {metric} (%)", title=f"validation {metric}")
    ax_metric.legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


def plot_gates(gates: dict) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(gates), figsize=(4.5 * len(gates), 3.8), squeeze=False)
    for ax, (label, layers) in zip(axes[0], gates.items()):
        types = list(dict.fromkeys(t for layer in layers for t in layer))
        width = 0.8 / max(len(layers), 1)
        for i, layer in enumerate(layers):
            ax.bar(np.arange(len(types)) + i * width, [layer.get(t, {}).get("hohe_share", np.nan) for t in types],
                   width, label=f"layer {i + 1}")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(types)) + width * (len(layers) - 1) / 2, types)
        ax.set(ylim=(0, 1), ylabel="share of nodes choosing ho->he", title=label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_popularity_buckets(groups: list[dict], metric: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(BUCKETS) + 0.4 * len(groups)), 3.8))
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(BUCKETS))
    for i, g in enumerate(groups):
        means = [100 * g["mean"].get(f"{metric}/{b}", np.nan) for b in BUCKETS]
        stds = [100 * g["std"].get(f"{metric}/{b}", np.nan) for b in BUCKETS]
        ax.bar(x + i * width, means, width, yerr=stds, capsize=2, label=g["experiment"])
    ax.set_xticks(x + width * (len(groups) - 1) / 2, BUCKETS)
    ax.set(ylabel=f"{metric.upper()} (%)", xlabel="target item's training popularity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


# ----------------------------------------------------------------------------------------------
# The report


@dataclass
class ReportResult:
    path: Path
    figures: list[Path]
    datasets: list[str]
    n_runs: int


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_report(
    workdir: Path,
    output: Path,
    datasets: list[str] | None = None,
    runs: list[str] | None = None,
    metric: str = "ndcg@10",
    split: str = "test",
    pairs: str | None = None,
) -> ReportResult:
    """Write the Markdown report ``output`` and its figures; see the module docstring."""
    check_metric(metric)
    if split not in ("valid", "test"):
        raise MmsrError(f"--split: expected valid or test, got {split!r}")
    found = fold_sweep_copies(collect_runs(workdir, datasets, runs))
    output = Path(output)
    if output.is_dir():
        raise MmsrError(f"--output: {output} is a directory; give a file name such as {output / 'report.md'}")
    fig_dir = output.parent / f"{output.stem}_figures"
    figures: dict[Path, bytes] = {}  # rendered now, written with the Markdown at the end

    def figure(name: str, png: bytes) -> str:
        figures[fig_dir / name] = png
        return f"{fig_dir.name}/{name}"

    n_runs = sum(len(v) for v in found.values())
    md = [
        "# mmsr report",
        "",
        f"{n_runs} run(s) of {len(found)} dataset(s) in `{Path(workdir)}`. Metrics are in %, mean ± std "
        f"(ddof 0; the mean alone for one run) over the runs that differ only by seed, on the {split} split (full ranking over all items, "
        f"pessimistic ties). Figures use {metric.upper()}.",
        "",
    ]
    for dataset, dataset_runs in found.items():
        ds_key = _safe(dataset)
        md += [f"## {dataset}", ""]
        shared = common_modalities(dataset_runs)
        if shared:
            md += [f"Modalities of every multi-modal run: {', '.join(shared)}.", ""]
        options = shared_options(dataset_runs)
        if options:
            md += [f"Options of every run whose model reads them: {', '.join(options)}.", ""]

        md += [f"### Results ({split})", ""]
        groups = clean_groups(dataset_runs, split)
        if groups:
            tests, unranked = significance_tests(dataset_runs, groups, split, pairs)
            md += results_table(groups, significant_cells(tests))
            ref = reference_mmsr(groups)
            md += ["", "Underlined: the best baseline; bold: the best experiment."
                   + (f" The gain row compares {ref.label} with the best baseline of each column." if ref and len(groups) > 1 else "")
                   + (f" {MARK}: significant gain, p < {ALPHA} in a paired t-test and a Wilcoxon signed-rank test over the "
                      "test cases (below)." if tests else ""), ""]
            md += significance_section(tests, unranked)
        else:
            md += [f"No clean {split} evaluation yet: run `mmsr evaluate --dataset {dataset} --run RUN --split {split}`.", ""]

        curves = robustness_curves(dataset_runs, split, metric)
        if curves:
            md += ["### Robustness to missing modalities (paper Figure 4)", ""]
            for selector, by_label in curves.items():
                rel = figure(f"{ds_key}_robustness_{_safe(selector)}.png", plot_robustness(selector, by_label, metric))
                ratios = sorted({r for points in by_label.values() for r in points})
                md += [f"Missing **{selector}**: {metric.upper()} (%) by share of items without it (0 = clean).", ""]
                md += ["| experiment | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---:|" * len(ratios)]
                for label, points in by_label.items():
                    md.append(f"| {label} | " + " | ".join(
                        _cell(*points[r]) if r in points else "" for r in ratios) + " |")
                md += ["", f"![robustness to missing {selector}]({rel})", ""]

        columns, table = perturbation_table(dataset_runs, split, metric)
        if table:
            md += ["### Fusion order case study: disordered and mismatched histories (paper Figure 1)", ""]
            md += [f"{metric.upper()} (%); in brackets the change relative to the clean evaluation.", ""]
            md += ["| experiment | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
            for label, cols in table.items():
                clean = cols.get("clean", (None,))[0]
                cells = []
                for c in columns:
                    if c not in cols:
                        cells.append("")
                        continue
                    v = cols[c][0]
                    change = f" ({100 * (v - clean) / clean:+.1f}%)" if c != "clean" and clean else ""
                    cells.append(f"{_pct(v)}{change}")
                md.append(f"| {label} | " + " | ".join(cells) + " |")
            rel = figure(f"{ds_key}_perturbations.png", plot_perturbations(columns, table, metric))
            md += ["", f"![disordered and mismatched]({rel})", ""]

        grid = codes_grid(dataset_runs, split, metric)
        if grid is not None:
            label, cells = grid
            rel = figure(f"{ds_key}_codes_heatmap.png", plot_codes_heatmap(cells, metric, label))
            md += ["### MS-Graph construction: codes c and links k (paper Figure 5)", ""]
            md += [f"{label}, {metric.upper()} (%) by clusters c and codes per item k (runs per cell in brackets).", ""]
            md += ["| c | k | value |", "|---:|---:|---:|"]
            md += [f"| {c} | {k} | {_pct(v)} ({n}) |" for (c, k), (v, n) in cells.items()]
            md += ["", f"![c/k heat map]({rel})", ""]

        gates = gate_table(dataset_runs, split)
        if gates:
            rel = figure(f"{ds_key}_gates.png", plot_gates(gates))
            md += ["### Update gate: fusion order per node type (Eq. 16-17)", ""]
            md += ["Share of nodes whose gate weights ho->he (homogeneous first) above he->ho, and the mean "
                   "weight beta of ho->he, on the " + split + " split.", ""]
            md += ["| experiment | layer | node type | nodes | ho->he | he->ho | mean beta(ho->he) |",
                   "|---|---:|---|---:|---:|---:|---:|"]
            for label, layers in gates.items():
                for i, layer in enumerate(layers):
                    for t, s in layer.items():
                        md.append(f"| {label} | {i + 1} | {t} | {s['nodes']} | {s['hohe_share']:.3f} | "
                                  f"{s['heho_share']:.3f} | {s['mean_beta_hohe']:.3f} |")
            md += ["", f"![gate statistics]({rel})", ""]

        pop_groups, buckets = popularity_groups(dataset_runs, split)
        if pop_groups:
            md += ["### Beyond accuracy: coverage, popularity and long tail", ""]
            md += [f"Coverage@10: share of the catalogue in some top-10 list; popularity@10: mean training "
                   f"popularity (users) of the recommended items; {metric.upper()} (%) by the target item's "
                   f"training popularity: rare = at most {RARE_MAX} training users, the other items split into "
                   "thirds of their training interactions (head: the most popular items). Buckets: "
                   + ", ".join(f"{b} {buckets[b]['items']:,} items / {buckets[b]['n']:,} samples" for b in BUCKETS)
                   + ".", ""]
            cols = [f"{metric}/{b}" for b in BUCKETS]
            md += ["| experiment | seeds | coverage@10 | popularity@10 | " + " | ".join(BUCKETS) + " |",
                   "|---|---:|---:|---:|" + "---:|" * len(BUCKETS)]
            for g in pop_groups:
                n = len(g["seeds"])
                cells = [_cell(g["mean"][c], g["std"][c], n) if c in g["mean"] else "" for c in cols]
                md.append(f"| {g['experiment']} | {len(g['seeds'])} | {_pct(g['mean']['coverage@10'])} | "
                          f"{g['mean']['avg_pop@10']:.1f} | " + " | ".join(cells) + " |")
            rel = figure(f"{ds_key}_popularity.png", plot_popularity_buckets(pop_groups, metric))
            md += ["", f"![{metric} by popularity bucket]({rel})", ""]

        with_history = [r for r in dataset_runs if r.history and all(metric in h.get("valid", {}) for h in r.history)]
        if with_history:
            rel = figure(f"{ds_key}_training.png", plot_training(with_history, metric))
            md += ["### Training curves", "", f"![training loss and validation {metric}]({rel})", ""]

        md += ["### Runs", "", "Time per epoch: median over the run's epochs (training / full-ranking validation); peak RSS: "
               "the largest the training process reached (a resumed run counts from its resumption; empty for "
               "runs trained before it was recorded).", "",
               "| run | experiment | seed | epochs | best epoch | train s/epoch | valid s/epoch | peak RSS (GiB) | evaluations |",
               "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        labels = experiment_labels(dataset_runs)
        for run in dataset_runs:
            epochs = len(run.history) if run.history else 0
            best = ""
            if run.history:
                chosen = run.config["train"].get("metric", "ndcg@10")
                values = [h["valid"].get(chosen, -1) for h in run.history]
                best = str(run.history[int(np.argmax(values))]["epoch"])
            files = ", ".join(m["file"] for m in run.metrics) or "none"
            md.append(f"| {run.name} | {labels[experiment_key(run.config)]} | {run.config['train'].get('seed', '')} | "
                      f"{epochs} | {best} | {_epoch_cost(run.history or [])} | {files} |")
        md.append("")

    # Everything is checked and rendered: the figures and the Markdown are written as one.
    commit_atomic({**{path: bytes_writer(png) for path, png in figures.items()},
                   output: bytes_writer(("\n".join(md).rstrip() + "\n").encode())})
    return ReportResult(output, list(figures), list(found), n_runs)
