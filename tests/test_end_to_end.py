"""train -> evaluate -> report on real runs: every cell of the report's tables is recomputed here
from the metrics files that `evaluate` wrote (and those from the per-sample ranks), and every
figure is a decodable image with something drawn on it. tests/test_report.py covers the
sections and layouts on hand-written files; this file checks that the two ends fit together.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from mmsr_cli import contracts as C
from mmsr_cli.metrics import METRIC_NAMES
from mmsr_cli.workdir import DatasetDir

from conftest import assert_metrics_match_ranks, run_cli
from test_training import make_coded_toy

pytestmark = pytest.mark.slow

SMALL = ["--epochs", "1", "--max-steps", "2", "--dim", "8", "--batch-size", "32", "--device", "cpu"]
RUNS = {  # run -> training options
    "pop-loo-s0": ["--model", "pop"],
    "sasrec-loo-s0": ["--model", "sasrec", "--heads", "2", *SMALL, "--seed", "0"],
    "sasrec-loo-s1": ["--model", "sasrec", "--heads", "2", *SMALL, "--seed", "1"],
    "mmsr-loo-s0": ["--model", "mmsr", "--layers", "1", *SMALL],
}
GROUPS = {"pop": ["pop-loo-s0"], "sasrec": ["sasrec-loo-s0", "sasrec-loo-s1"], "mmsr": ["mmsr-loo-s0"]}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> DatasetDir:
    ds = make_coded_toy(tmp_path_factory.mktemp("e2e"))
    base = ["--workdir", ds.workdir, "--dataset", ds.name]
    for run, args in RUNS.items():
        r = run_cli(["train", *base, *args])
        assert r.exit_code == 0, r.stderr
        r = run_cli(["evaluate", *base, "--run", run, "--device", "cpu"])
        assert r.exit_code == 0, r.stderr
    r = run_cli(["evaluate", *base, "--run", "mmsr-loo-s0", "--perturb", "disordered", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    return ds


def table(text: str, header_start: str) -> dict[str, list[str]]:
    """The rows (first cell -> other cells) of the first table after a line starting with
    ``header_start``."""
    lines = text[text.index(header_start):].splitlines()
    out = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def label_of(rows: dict, model: str) -> str:
    (label,) = [k for k in rows if k == model or k.startswith(f"{model} ")]
    return label


def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def test_report_on_evaluated_runs_checks_every_cell(evaluated, tmp_path):
    ds = evaluated
    records = {run: assert_metrics_match_ranks(ds.path(f"{C.RUNS_DIR}/{run}")) for run in RUNS}
    out = tmp_path / "report.md"
    r = run_cli(["report", "--workdir", ds.workdir, "--output", out])
    assert r.exit_code == 0, r.stderr
    text = out.read_text()

    # Results: mean (± population std over seeds) in %, the best baseline underlined, the best bold
    results = table(text, "| experiment | seeds | HR@5")
    assert list(results) == [label_of(results, m) for m in GROUPS] + [
        f"gain of {label_of(results, 'mmsr')} over the best baseline"]
    mean = {m: {k: np.mean([records[r]["metrics"][k] for r in runs]) for k in METRIC_NAMES} for m, runs in GROUPS.items()}
    std = {m: {k: np.std([records[r]["metrics"][k] for r in runs]) for k in METRIC_NAMES} for m, runs in GROUPS.items()}
    for model, runs in GROUPS.items():
        seeds, *cells = results[label_of(results, model)]
        assert seeds == ",".join(str(json.loads(ds.path(f"{C.RUNS_DIR}/{r}/config.json").read_text())["train"]["seed"]) for r in runs)
        assert len(cells) == len(METRIC_NAMES)
        for k, cell in zip(METRIC_NAMES, cells):
            plain = f"{pct(mean[model][k])} ± {pct(std[model][k])}" if len(runs) > 1 else pct(mean[model][k])
            best_base = max(mean[m][k] for m in GROUPS if m != "mmsr")
            best_all = max(mean[m][k] for m in GROUPS)
            expected = plain  # no significance mark: MMSR vs Pop has p > 0.3 on every metric here
            if model != "mmsr" and mean[model][k] == best_base:
                expected = f"<u>{expected}</u>"
            if mean[model][k] == best_all:
                expected = f"**{expected}**"
            assert cell == expected, (model, k)
    gain = results[f"gain of {label_of(results, 'mmsr')} over the best baseline"][1:]
    for k, cell in zip(METRIC_NAMES, gain):
        base = max(mean[m][k] for m in GROUPS if m != "mmsr")
        assert cell == ("n/a" if base == 0 else f"{100 * (mean['mmsr'][k] - base) / base:+.1f}%"), k

    # Figure 1's table: clean and disordered NDCG@10 of the MMSR run, with the relative change
    perturbed = table(text, "| experiment | clean |")
    clean = records["mmsr-loo-s0"]["metrics"]["ndcg@10"]
    shuffled = assert_metrics_match_ranks(ds.path(f"{C.RUNS_DIR}/mmsr-loo-s0"), setting="disordered")["metrics"]["ndcg@10"]
    assert shuffled != clean
    assert perturbed == {label_of(results, "mmsr"): [pct(clean), f"{pct(shuffled)} ({100 * (shuffled - clean) / clean:+.1f}%)"]}

    # Beyond accuracy: coverage@10 and popularity@10 per experiment (means over its seeds)
    beyond = table(text, "| experiment | seeds | coverage@10")
    for model, runs in GROUPS.items():
        cells = beyond[label_of(results, model)]
        assert cells[0] == str(len(runs))
        assert cells[1] == pct(np.mean([records[r]["beyond"]["coverage@10"] for r in runs]))
        assert cells[2] == f"{np.mean([records[r]['beyond']['avg_pop@10'] for r in runs]):.1f}"

    # Runs: one row per run, with its evaluations
    listed = table(text, "| run | experiment |")
    assert sorted(listed) == sorted(RUNS)
    assert listed["mmsr-loo-s0"][-1] == "metrics_test.json, metrics_test_disordered.json"
    assert all(listed[r][-1] == "metrics_test.json" for r in RUNS if r != "mmsr-loo-s0")

    # Figures: every link is a decodable PNG beside the report with more than a blank canvas
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {p.split("/")[-1] for p in links} == {"coded_perturbations.png", "coded_gates.png", "coded_popularity.png",
                                                 "coded_training.png"}
    for link in links:
        with Image.open(out.parent / link) as img:
            assert img.format == "PNG" and img.width >= 300 and img.height >= 200
            colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 8, link  # lines, bars and text, not one flat colour
