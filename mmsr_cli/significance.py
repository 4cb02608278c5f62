"""Paired significance tests between experiments (`mmsr evaluate --compare`, `mmsr report`).

`mmsr evaluate` stores the rank of each sample's target beside its metrics
(``ranks_<split>[_<setting>].npy``, contracts.ranks_file). Two experiments evaluated on the same
samples are compared on each metric by

* a paired t-test and a Wilcoxon signed-rank test (scipy.stats) over the test cases, each case's
  value being its metric (HR, MRR or NDCG@k of its rank) averaged over the experiment's seeds;
* where both experiments have two or more seeds in common, the same two tests over the seeds
  (each seed's mean metric, paired by seed). Under six seeds the exact Wilcoxon test cannot give
  p < 0.05 whatever the gains (``wilcoxon_floor``); the tables say so beside it.

As in the paper's Table 2, a gain is marked significant (``*``) when both tests over the test
cases give p < 0.05; by default each MMSR experiment is tested against the best baseline on each
metric.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import contracts as C
from .errors import MmsrError
from .metrics import metrics_from_ranks
from .runs import experiment_key, run_dir
from .workdir import read_file_text, write_bytes_atomic

ALPHA = 0.05
MARK = "*"


@dataclass
class Arm:
    """One experiment: its runs (one per seed) and their per-sample ranks on one split."""

    label: str
    model: str
    runs: list[str]
    seeds: list[int]
    mean: dict[str, float]
    ranks: list[np.ndarray] | None  # per run; None where a run has no ranks file
    samples: str = ""  # what identifies the evaluated samples (preprocess fingerprint, split, setting)


@dataclass
class PairTest:
    a: str
    b: str
    metric: str
    diff: float  # mean of a - mean of b
    n_cases: int
    t_p: float
    wilcoxon_p: float
    n_seeds: int = 0
    seeds_t_p: float | None = None
    seeds_wilcoxon_p: float | None = None

    @property
    def significant(self) -> bool:
        return self.diff > 0 and self.t_p < ALPHA and self.wilcoxon_p < ALPHA


def wilcoxon_floor(n: int) -> float:
    """The smallest p the exact two-sided Wilcoxon signed-rank test can give over n pairs: every
    difference of one sign, probability 2 / 2^n (0.25 for three seeds, below 0.05 from six)."""
    return 2.0 / 2 ** n


def seeds_wilcoxon_note(tests: list[PairTest]) -> str:
    """Why the Wilcoxon test over seeds cannot mark a gain with few seeds ("" where it can)."""
    few = sorted({t.n_seeds for t in tests if t.n_seeds and wilcoxon_floor(t.n_seeds) >= ALPHA})
    if not few:
        return ""
    floors = ", ".join(f"{wilcoxon_floor(n):.3g} with {n}" for n in few)
    need = next(n for n in range(2, 64) if wilcoxon_floor(n) < ALPHA)
    return (f"Over so few seeds the exact Wilcoxon test cannot reach p < {ALPHA} (its smallest p is 2/2^n: {floors} "
            f"seeds); it needs {need} or more, the t-test over seeds does not.")


def write_ranks(path: Path, ranks) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(ranks, dtype=np.int32), allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())


def read_ranks(path: Path) -> np.ndarray:
    try:
        ranks = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise MmsrError(f"{path}: file not found; re-run `mmsr evaluate` for this run") from None
    except (ValueError, OSError, EOFError) as e:
        raise MmsrError(f"{path}: not a ranks file of `mmsr evaluate` ({e})") from None
    if ranks.ndim != 1 or not np.issubdtype(ranks.dtype, np.integer) or (ranks.size and ranks.min() < 1):
        raise MmsrError(f"{path}: expected a 1-d array of ranks >= 1, got {ranks.dtype} {ranks.shape}")
    return ranks


def case_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """[n] per-sample values of ``metric`` (``<name>@<k>``, metrics.REGISTRY) from 1-based ranks."""
    name, _, k = metric.partition("@")
    return metrics_from_ranks(torch.from_numpy(ranks.astype(np.int64)), (int(k),), (name,))[metric].numpy()


def _p(test, x: np.ndarray, y: np.ndarray) -> float:
    """p-value of a paired test; 1.0 when the pairs do not differ at all, nan when undefined."""
    if np.array_equal(x, y):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = float(test(x, y).pvalue)
        except ValueError:
            return math.nan
    return p


def paired_test(a: Arm, b: Arm, metric: str) -> PairTest:
    # SciPy: only when a test is run
    from scipy import stats

    for arm in (a, b):
        if arm.ranks is None:
            raise MmsrError(f"{arm.label}: a run has no per-sample ranks; re-run `mmsr evaluate` for {', '.join(arm.runs)}")
    if a.samples != b.samples or len(a.ranks[0]) != len(b.ranks[0]):
        raise MmsrError(f"{a.label} / {b.label}: evaluated on other samples (other data, split or setting); no paired test")
    values_a = [case_values(r, metric) for r in a.ranks]
    values_b = [case_values(r, metric) for r in b.ranks]
    x, y = np.mean(values_a, axis=0), np.mean(values_b, axis=0)
    test = PairTest(a.label, b.label, metric, a.mean[metric] - b.mean[metric], len(x),
                    _p(stats.ttest_rel, x, y), _p(stats.wilcoxon, x, y))
    common = sorted(set(a.seeds) & set(b.seeds))
    if len(common) >= 2:
        sx = np.array([values_a[a.seeds.index(s)].mean() for s in common])
        sy = np.array([values_b[b.seeds.index(s)].mean() for s in common])
        test.n_seeds = len(common)
        test.seeds_t_p, test.seeds_wilcoxon_p = _p(stats.ttest_rel, sx, sy), _p(stats.wilcoxon, sx, sy)
    return test


def default_pairs(arms: list[Arm], metrics) -> list[tuple[Arm, Arm, str]]:
    """Each MMSR experiment against the best baseline on each metric."""
    baselines = [arm for arm in arms if arm.model != "mmsr"]
    if not baselines:
        return []
    out = []
    for metric in metrics:
        best = max(baselines, key=lambda arm: arm.mean[metric])
        out += [(arm, best, metric) for arm in arms if arm.model == "mmsr"]
    return out


def pair_names(value: str, option: str, runs: list[str] | None = None,
               experiment_of: Callable[[str], str | None] | None = None) -> list[tuple[str, str]]:
    """``RUN_A:RUN_B,...`` as (A, B) pairs; with ``runs``, each name must be one of them; with
    ``experiment_of`` (run -> experiment key, None when unknown yet), A and B must be of two
    experiments. What can be checked before any run is evaluated (evaluate checks it before
    writing anything)."""
    out = []
    for item in value.split(","):
        a, sep, b = item.strip().partition(":")
        if not sep or not a or not b:
            raise MmsrError(f"{option}: expected RUN_A:RUN_B[,RUN_C:RUN_D...], got {item.strip()!r}")
        for run in (a, b) if runs is not None else ():
            if run not in runs:
                raise MmsrError(f"{option}: run {run!r} is not among the compared runs")
        if experiment_of is not None and experiment_of(a) is not None and experiment_of(a) == experiment_of(b):
            raise MmsrError(f"{option}: {a} and {b} are seeds of one experiment")
        out.append((a, b))
    return out


def run_experiment(ds, run: str) -> str | None:
    """The experiment key (config minus seed) of a run of ``ds``, from its config.json; None when
    that cannot be read (evaluating the run then says why)."""
    try:
        return experiment_key(json.loads(read_file_text(run_dir(ds, run) / C.RUN_CONFIG)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, MmsrError):
        return None


def parse_pairs(value: str, arms: list[Arm], metrics, option: str) -> list[tuple[Arm, Arm, str]]:
    """``RUN_A:RUN_B,...``: the experiment of run A against that of run B, on every metric."""
    by_run = {run: arm for arm in arms for run in arm.runs}
    out = []
    for a, b in pair_names(value, option):
        for run in (a, b):
            if run not in by_run:
                raise MmsrError(f"{option}: run {run!r} is not among the compared runs (or has no {'clean'} metrics)")
        if by_run[a] is by_run[b]:
            raise MmsrError(f"{option}: {a} and {b} are seeds of one experiment")
        out += [(by_run[a], by_run[b], m) for m in metrics]
    return out


def run_tests(pairs: list[tuple[Arm, Arm, str]]) -> list[PairTest]:
    return [paired_test(a, b, metric) for a, b, metric in pairs]


def significant_cells(tests: list[PairTest]) -> set[tuple[str, str]]:
    """(label, metric) of the experiments whose gain on that metric is significant."""
    return {(t.a, t.metric) for t in tests if t.significant}


def fmt_p(p: float | None) -> str:
    if p is None:
        return ""
    if math.isnan(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def arms_from_groups(groups: list[dict], records: list[dict], folder_of) -> list[Arm]:
    """Arms of runs.compare_runs' groups; ``records`` the metrics records of their runs
    (with ``config``), ``folder_of(run)`` a run's folder (its ranks file is read from there)."""
    by_run = {r["run"]: r for r in records}
    arms = []
    for g in groups:
        members = [by_run[run] for run in g["runs"]]
        ranks = None
        if all(m.get("ranks") for m in members):
            ranks = [read_ranks(Path(folder_of(m["run"])) / m["ranks"]) for m in members]
        first = members[0]
        samples = {f"{(m.get('fingerprints') or {}).get('preprocess')}/{m['split']}/{(m.get('setting') or {}).get('name', '')}"
                   for m in members}
        arms.append(Arm(g["experiment"], g["model"], g["runs"], g["seeds"], g["mean"], ranks,
                        samples.pop() if len(samples) == 1 else f"mixed:{first['run']}"))
    return arms
