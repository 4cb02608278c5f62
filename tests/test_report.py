"""`mmsr report`: tables, robustness/perturbation/codes/gate sections and figures from run files.

Runs are written by hand (config.json, history.json, metrics_*.json as train/evaluate leave them),
so the expected numbers are known exactly and nothing is trained.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from mmsr_cli import contracts as C
from mmsr_cli.metrics import METRIC_NAMES
from mmsr_cli.models.base import ModelConfig
from mmsr_cli.runs import TrainConfig

from conftest import one_error_line

PNG = b"\x89PNG\r\n\x1a\n"


def metrics(base: float) -> dict[str, float]:
    return {m: base * (1 + i / 10) for i, m in enumerate(METRIC_NAMES)}


def write_run(ds: Path, name: str, model: str, seed: int, clean: float | None, c: int = 30, k: int = 3,
              extra: dict | None = None, gates=None, **train) -> Path:
    folder = ds / C.RUNS_DIR / name
    folder.mkdir(parents=True)
    modalities = ["image", "title"] if model in ("mmsr", "sasrecf") else []
    config = {
        "dataset": ds.name,
        "train": asdict(TrainConfig(model=model, run_name=name, seed=seed, **train)),
        "model": {**asdict(ModelConfig(model=model)), "modalities": modalities},
        "codes": {m: {"codes_mode": "clusters", "clusters": c, "top_k": k, "ae_dim": 128, "seed": 0} for m in modalities},
        "fingerprints": {},
    }
    (folder / "config.json").write_text(json.dumps(config))
    history = [{"epoch": e, "loss": 5.0 - e, "train_seconds": 10.0 * e + seed, "valid_seconds": 2.0,
                "peak_rss_mib": 512.0 * e, "valid": metrics(0.01 * e)} for e in (1, 2, 3)]
    if model == "gru4rec":  # trained before the peak memory was recorded
        history = [{k: v for k, v in h.items() if k != "peak_rss_mib"} for h in history]
    (folder / "history.json").write_text(json.dumps(history))
    if clean is not None:
        record = {"run": name, "split": "test", "n": 100, "metrics": metrics(clean)}
        if gates is not None:
            record["gates"] = gates
        (folder / C.metrics_file("test")).write_text(json.dumps(record))
    for setting, value in (extra or {}).items():
        rec = {"run": name, "split": "test", "n": 100, "metrics": metrics(value), "setting": setting_record(setting)}
        (folder / C.metrics_file("test", setting)).write_text(json.dumps(rec))
    return folder


def setting_record(name: str) -> dict:
    parts = name.split("-")
    if parts[0] == "drop":
        return {"name": name, "seed": 0, "drop_modality": parts[1], "drop_ratio": float(parts[2])}
    if parts[0] == "mismatched":
        return {"name": name, "seed": 0, "perturb": "mismatched", "perturb_ratio": float(parts[1])}
    return {"name": name, "seed": 0, "perturb": parts[0]}


def gates(hohe_item: float, hohe_image: float) -> list[dict]:
    def entry(n, share):
        return {"nodes": n, "hohe_share": share, "heho_share": 1 - share, "mean_beta_hohe": share / 2 + 0.25}

    empty = {"nodes": 0, "hohe_share": None, "heho_share": None, "mean_beta_hohe": None}
    return [{"item": entry(100, hohe_item), "image": entry(40, hohe_image), "title": empty}]


@pytest.fixture
def workdir(tmp_path) -> Path:
    ds = tmp_path / "work" / "beauty"
    write_run(ds, "pop-loo-s0", "pop", 0, 0.010)
    write_run(ds, "sasrec-loo-s0", "sasrec", 0, 0.040)
    write_run(ds, "sasrec-loo-s1", "sasrec", 1, 0.050)
    write_run(ds, "sasrecf-loo-s0", "sasrecf", 0, 0.060, extra={"drop-text-0.3": 0.050, "drop-text-0.5": 0.030})
    write_run(ds, "sasrecf-loo-s1", "sasrecf", 1, 0.050, extra={"drop-text-0.3": 0.040})
    g = gates(0.8, 0.25)
    write_run(ds, "mmsr-loo-s0", "mmsr", 0, 0.070, gates=g,
              extra={"drop-text-0.3": 0.068, "disordered": 0.060, "mismatched-0.5": 0.035})
    write_run(ds, "mmsr-loo-s1", "mmsr", 1, 0.080, gates=gates(0.6, 0.75))
    # other codes (Figure 5), one seed each
    write_run(ds, "mmsr-c20-k3", "mmsr", 0, 0.090, c=20, k=3)
    write_run(ds, "mmsr-c20-k2", "mmsr", 0, 0.050, c=20, k=2)
    # trained with dropped modalities: not in the main table
    write_run(ds, "mmsr-drop", "mmsr", 0, 0.020, drop_modality="text", drop_ratio=0.3)
    # a run without any evaluation
    write_run(ds, "gru4rec-loo-s0", "gru4rec", 0, None)
    return tmp_path / "work"


def report(cli, workdir: Path, *args):
    return cli(["report", "--workdir", workdir, *args])


def row(text: str, first_cell: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_tables_match_the_metrics_files(cli, workdir, tmp_path):
    out = tmp_path / "docs" / "report.md"
    r = report(cli, workdir, "--output", out)
    assert r.exit_code == 0, r.stderr
    assert "report: 11 run(s) of beauty" in r.stderr
    text = out.read_text()
    cols = ["experiment", "seeds", *(m.upper() for m in METRIC_NAMES)]
    header = row(text, "experiment")
    assert header == cols
    i10 = cols.index("NDCG@10")
    factor = 1 + METRIC_NAMES.index("ndcg@10") / 10

    sasrec = row(text, "sasrec")
    mean, std = np.mean([0.04, 0.05]) * factor, np.std([0.04, 0.05]) * factor
    assert sasrec[1] == "0,1" and sasrec[i10] == f"{100 * mean:.2f} ± {100 * std:.2f}"
    # the best baseline (sasrecf, mean 0.055) is underlined; pop and sasrec are not
    best = f"{100 * 0.055 * factor:.2f} ± {100 * 0.005 * factor:.2f}"
    assert row(text, "sasrecf")[i10] == f"<u>{best}</u>"
    assert "<u>" not in "".join(row(text, "sasrec") + row(text, "pop"))
    # MMSR experiments differing in their codes get their own rows, named by c and k
    assert row(text, "mmsr c=30 k=3")[1] == "0,1" and row(text, "mmsr c=20 k=2")[1] == "0"
    assert row(text, "mmsr c=20 k=3")[i10] == f"**{100 * 0.09 * factor:.2f}**"  # best overall: bold; one run: no ± 0.00
    # gain of the default MMSR with the most runs (c=30 k=3: 0.075) over the best baseline (0.055)
    gain = row(text, "gain of mmsr c=30 k=3 over the best baseline")
    assert gain[i10] == f"{100 * (0.075 - 0.055) / 0.055:+.1f}%"
    # a run trained with dropped modalities is its own experiment, outside the main table
    assert not [line for line in text.splitlines() if line.startswith("| mmsr drop_modality")]

    # robustness (Figure 4): ratio 0 is the clean evaluation of the same runs
    section = text[text.index("Missing **text**"):]
    assert row(section, "experiment")[1:] == ["0", "0.3", "0.5"]
    sf = row(section, "sasrecf")
    assert sf[1] == f"{100 * 0.055 * factor:.2f} ± {100 * 0.005 * factor:.2f}"
    assert sf[2] == f"{100 * 0.045 * factor:.2f} ± {100 * 0.005 * factor:.2f}"
    assert sf[3] == f"{100 * 0.03 * factor:.2f}"
    assert row(section, "mmsr c=30 k=3")[1:] == [f"{100 * 0.07 * factor:.2f}", f"{100 * 0.068 * factor:.2f}", ""]
    # a run trained without 30 % of the texts: its clean test point at 0.3, the runs trained on all at 0
    assert row(section, "mmsr c=30 k=3 (trained with missing)")[1:] == [
        f"{100 * 0.075 * factor:.2f} ± {100 * 0.005 * factor:.2f}", f"{100 * 0.02 * factor:.2f}", ""]

    # perturbations (Figure 1)
    section = text[text.index("Fusion order case study"):]
    assert row(section, "experiment")[1:] == ["clean", "disordered", "mismatched-0.5"]
    m = row(section, "mmsr c=30 k=3")
    assert m[1] == f"{100 * 0.07 * factor:.2f}"
    assert m[3] == f"{100 * 0.035 * factor:.2f} (-50.0%)"

    # c/k heat map (Figure 5): the three (c, k) settings of the default MMSR
    section = text[text.index("codes c and links k"):]
    assert row(section, "20")[1:] == ["2", f"{100 * 0.05 * factor:.2f} (1)"]
    assert f"| 30 | 3 | {100 * 0.075 * factor:.2f} (2) |" in section

    # gate statistics: averaged over the two seeds; empty node types are left out
    section = text[text.index("Update gate"):]
    lines = [line for line in section.splitlines() if line.startswith("| mmsr c=30 k=3 | 1 |")]
    assert lines == [
        "| mmsr c=30 k=3 | 1 | item | 200 | 0.700 | 0.300 | 0.600 |",
        "| mmsr c=30 k=3 | 1 | image | 80 | 0.500 | 0.500 | 0.500 |",
    ]

    # figures: every linked PNG exists next to the report and is a PNG
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {Path(link).name for link in links} == {
        "beauty_robustness_text.png", "beauty_perturbations.png", "beauty_codes_heatmap.png",
        "beauty_gates.png", "beauty_training.png"}
    for link in links:
        assert (out.parent / link).read_bytes()[:8] == PNG
    assert not [p for p in (out.parent / "report_figures").iterdir() if p.name.startswith(".")]
    # the run list names every run and its evaluations
    assert row(text, "gru4rec-loo-s0")[-1] == "none"
    # and its cost: median train / valid seconds per epoch, peak RSS in GiB (absent in older runs)
    assert row(text, "run")[5:8] == ["train s/epoch", "valid s/epoch", "peak RSS (GiB)"]
    assert row(text, "sasrec-loo-s1")[5:8] == ["21", "2", "1.50"]
    assert row(text, "gru4rec-loo-s0")[5:8] == ["20", "2", ""]
    assert "metrics_test_drop-text-0.3.json" in row(text, "mmsr-loo-s0")[-1]


def test_sweep_copies_join_their_dataset_section(cli, tmp_path):
    """scripts/sweep_codes.sh's datasets toy-c<c>k<k> (same preprocessed data) fold into toy's
    section and heat map; a look-alike name over other data keeps its own section."""
    work = tmp_path / "work"

    def run(dataset, name, c, k, value, preprocess="p1"):
        folder = write_run(work / dataset, name, "mmsr", 0, value, c=c, k=k)
        config = json.loads((folder / "config.json").read_text())
        config["fingerprints"] = {"preprocess": preprocess}
        (folder / "config.json").write_text(json.dumps(config))

    run("toy", "mmsr-loo-s0", 30, 3, 0.07)
    run("toy-c10k1", "mmsr-loo-s0", 10, 1, 0.03)  # same run name as the base's run
    run("toy-c20k2", "mmsr-c20k2-s0", 20, 2, 0.05)
    run("toy-c40k1", "mmsr-c40k1-s0", 40, 1, 0.09, preprocess="p2")  # other data: not a copy
    out = tmp_path / "r.md"
    r = report(cli, work, "--output", out)
    assert r.exit_code == 0, r.stderr
    text = out.read_text()
    assert re.findall(r"^## (.+)$", text, re.M) == ["toy", "toy-c40k1"]
    toy = text[: text.index("## toy-c40k1")]
    factor = 1 + METRIC_NAMES.index("ndcg@10") / 10
    grid = toy[toy.index("codes c and links k"):]
    assert [line for line in grid.splitlines() if re.match(r"\| \d", line)] == [
        f"| 10 | 1 | {100 * 0.03 * factor:.2f} (1) |", f"| 20 | 2 | {100 * 0.05 * factor:.2f} (1) |",
        f"| 30 | 3 | {100 * 0.07 * factor:.2f} (1) |"]
    assert row(toy, "mmsr c=10 k=1")[1] == "0" and row(toy, "toy-c10k1/mmsr-loo-s0")[1] == "mmsr c=10 k=1"
    assert row(toy, "mmsr-loo-s0")[1] == "mmsr c=30 k=3"


def test_gain_row_compares_the_papers_model_with_the_largest_budget(cli, tmp_path):
    """Not an ablation or another aggregator (first by label), nor a short-budget run."""
    ds = tmp_path / "work" / "beauty"
    write_run(ds, "sasrec-s0", "sasrec", 0, 0.04)
    write_run(ds, "mmsr-e10", "mmsr", 0, 0.05, epochs=10)
    write_run(ds, "mmsr-e2", "mmsr", 0, 0.03, epochs=2)
    folder = write_run(ds, "mmsr-gat-e2", "mmsr", 0, 0.02, epochs=2)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["aggregator"] = "gat"
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "r.md"
    r = report(cli, tmp_path / "work", "--output", out)
    assert r.exit_code == 0, r.stderr
    gain = row(out.read_text(), "gain of mmsr epochs=10 over the best baseline")
    assert gain[1 + 1 + METRIC_NAMES.index("ndcg@10")] == f"{100 * (0.05 - 0.04) / 0.04:+.1f}%"


def test_gain_row_compares_the_tuned_paper_form_not_the_authors_variant(cli, tmp_path):
    """Tuned MMSR forms (issue 17): dropout and layers are hyper-parameters every model is tuned
    on, so the paper's form with tuned values is the headline; the authors' variant is not, even
    with more runs and first by label."""
    ds = tmp_path / "work" / "beauty"
    rng = np.random.default_rng(0)
    runs = [write_run(ds, f"sasrec-s{seed}", "sasrec", seed, 0.04) for seed in (0, 1)]
    for seed in (0, 1, 2):
        runs.append(folder := write_run(ds, f"mmsr-authors-s{seed}", "mmsr", seed, 0.03))
        config = json.loads((folder / "config.json").read_text())
        config["model"].update(variant="authors", attention_dropout=0.2, dropout=0.2, layers=1)
        (folder / "config.json").write_text(json.dumps(config))
    for seed in (0, 1):
        runs.append(folder := write_run(ds, f"mmsr-paper-s{seed}", "mmsr", seed, 0.05))
        config = json.loads((folder / "config.json").read_text())
        config["model"].update(dropout=0.5, layers=1)
        (folder / "config.json").write_text(json.dumps(config))
    for folder in runs:  # per-sample ranks: the paired tests, over the two seeds in common too
        np.save(folder / C.ranks_file("test"), rng.integers(1, 50, 100).astype(np.int32))
        record = json.loads((folder / C.metrics_file("test")).read_text())
        (folder / C.metrics_file("test")).write_text(json.dumps({**record, "ranks": C.ranks_file("test")}))
    out = tmp_path / "r.md"
    r = report(cli, tmp_path / "work", "--output", out)
    assert r.exit_code == 0, r.stderr
    text = out.read_text()
    gain = row(text, "gain of mmsr layers=1 dropout=0.5 over the best baseline")
    assert gain[1 + 1 + METRIC_NAMES.index("ndcg@10")] == f"{100 * (0.05 - 0.04) / 0.04:+.1f}%"
    assert len([line for line in text.splitlines() if line.startswith("| gain of")]) == 1
    # two seeds in common: the Wilcoxon test over seeds cannot go below 0.5, and the report says so
    assert "its smallest p is 2/2^n: 0.5 with 2 seeds" in text


def test_options_every_run_shares_are_said_once(cli, tmp_path):
    """epochs and lr given alike to every model that reads them move from the labels to one line;
    Pop, which reads neither, does not stop them from being shared."""
    ds = tmp_path / "work" / "beauty"
    write_run(ds, "pop-s0", "pop", 0, 0.01)
    write_run(ds, "sasrec-s0", "sasrec", 0, 0.04, epochs=10, lr=0.002)
    write_run(ds, "mmsr-s0", "mmsr", 0, 0.05, epochs=10, lr=0.002)
    folder = write_run(ds, "mmsr-ho-s0", "mmsr", 0, 0.06, epochs=10, lr=0.002)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["fusion"] = "ho"
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "r.md"
    assert report(cli, tmp_path / "work", "--output", out).exit_code == 0
    text = out.read_text()
    assert "Options of every run whose model reads them: epochs=10, lr=0.002." in text
    for label in ("pop", "sasrec", "mmsr", "mmsr fusion=ho", "gain of mmsr over the best baseline"):
        row(text, label)
    # One SASRec run with another budget: epochs is no longer shared, lr still is.
    write_run(ds, "sasrec-e20-s0", "sasrec", 0, 0.045, epochs=20, lr=0.002)
    assert report(cli, tmp_path / "work", "--output", out).exit_code == 0
    text = out.read_text()
    assert "Options of every run whose model reads them: lr=0.002." in text
    for label in ("pop", "sasrec epochs=10", "sasrec epochs=20", "mmsr epochs=10", "mmsr fusion=ho epochs=10"):
        row(text, label)


def test_runs_trained_before_codes_were_recorded_take_them_from_the_manifests(cli, tmp_path):
    """An old run's config.json has fingerprints but no "codes" entry: while the dataset's codes
    manifest still has the fingerprint the run read, the run joins the runs of those c and k."""
    ds = tmp_path / "work" / "beauty"
    write_run(ds, "mmsr-new-s1", "mmsr", 1, 0.06, c=20, k=2)
    folder = write_run(ds, "mmsr-old-s0", "mmsr", 0, 0.04)
    config = json.loads((folder / "config.json").read_text())
    del config["codes"]
    config["fingerprints"] = {"codes:image": "f00d", "codes:title": "beef"}
    (folder / "config.json").write_text(json.dumps(config))
    (ds / C.MANIFESTS_DIR).mkdir()

    def manifest(modality: str, fingerprint: str, c: int = 20) -> None:
        record = {"manifest_version": 1, "stage": f"codes:{modality}", "fingerprint": fingerprint, "outputs": {},
                  "options": {"codes_mode": "clusters", "clusters": c, "top_k": 2, "ae_dim": 128, "seed": 0}}
        (ds / C.MANIFESTS_DIR / f"codes__{modality}.json").write_text(json.dumps(record))

    manifest("image", "f00d")
    manifest("title", "beef")
    out = tmp_path / "r.md"
    assert report(cli, tmp_path / "work", "--output", out).exit_code == 0
    assert row(out.read_text(), "mmsr")[1] == "0,1"  # one experiment, both seeds, in seed order
    # The title codes were rebuilt since (other fingerprint): the old run's codes are unknown.
    manifest("title", "cafe", c=30)
    assert report(cli, tmp_path / "work", "--output", out).exit_code == 0
    text = out.read_text()
    assert row(text, "mmsr c=20 k=2")[1] == "1" and row(text, "mmsr codes-unknown")[1] == "0"
    # A corrupt manifest is a one-line error that names it; the earlier report stays.
    (ds / C.MANIFESTS_DIR / "codes__title.json").write_text("{broken")
    r = report(cli, tmp_path / "work", "--output", out)
    assert "codes__title.json: corrupt manifest" in one_error_line(r)
    assert out.read_text() == text


def test_runs_option_and_default_output(cli, workdir):
    r = report(cli, workdir, "--runs", "sasrec-loo-s0,sasrec-loo-s1,pop-loo-s0", "--metric", "hr@5")
    assert r.exit_code == 0, r.stderr
    text = (workdir / "report.md").read_text()
    assert "Figures use HR@5" in text and "| sasrec | 0,1 |" in text
    assert "| mmsr" not in text and "Robustness" not in text and "gain of" not in text


def test_a_run_still_in_its_first_epoch_is_listed_without_figures(cli, workdir):
    (workdir / "beauty" / C.RUNS_DIR / "gru4rec-loo-s0" / "history.json").unlink()  # config.json only, as train starts
    r = report(cli, workdir)
    assert r.exit_code == 0, r.stderr
    assert row((workdir / "report.md").read_text(), "gru4rec-loo-s0")[3:] == ["0", "", "", "", "", "none"]


def test_bad_options_and_files_are_one_line_errors(cli, workdir, tmp_path):
    assert "--runs: no run 'nope'" in one_error_line(report(cli, workdir, "--runs", "nope"))
    assert "--metric: unknown metric 'auc'" in one_error_line(report(cli, workdir, "--metric", "auc"))
    assert "--dataset: no dataset 'toys'" in one_error_line(report(cli, workdir, "--dataset", "toys"))
    (tmp_path / "empty").mkdir()
    assert "no runs found; train some with `mmsr train` first" in one_error_line(report(cli, tmp_path / "empty"))
    (workdir / "beauty/runs/pop-loo-s0/metrics_test.json").write_text("{broken")
    line = one_error_line(report(cli, workdir))
    assert "pop-loo-s0/metrics_test.json: not valid JSON" in line
    assert not (workdir / "report.md").exists()


def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("report*")) if p.is_file()} | {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("report_figures/*"))}


def test_a_failed_markdown_write_keeps_the_earlier_figures(cli, workdir, monkeypatch):
    """Every figure is rendered before the first write, and figures and Markdown are written as
    one: a full disk while writing the Markdown leaves the earlier report and figures as they were."""
    import errno
    import os

    assert report(cli, workdir).exit_code == 0
    before = _outputs(workdir)
    assert any(name.endswith(".png") for name in before)
    real = Path.write_bytes

    def full_for_markdown(self, data):
        if self.suffix == ".md":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_for_markdown)
    line = one_error_line(report(cli, workdir, "--metric", "hr@5"))  # other figures, other text
    assert "report.md: no space left on device" in line
    assert _outputs(workdir) == before
    assert not [p for p in workdir.rglob(".*mmsr*")]  # no temporary left


def test_pairs_of_one_experiment_in_a_later_dataset_are_refused_before_any_write(cli, workdir):
    """--pairs is checked in every dataset before the first figure of any dataset is written."""
    rng = np.random.default_rng(0)
    for run in ("sasrec-loo-s0", "sasrec-loo-s1", "pop-loo-s0"):  # the pair is testable in beauty
        folder = workdir / "beauty" / C.RUNS_DIR / run
        np.save(folder / C.ranks_file("test"), rng.integers(1, 50, 100).astype(np.int32))
        record = json.loads((folder / C.metrics_file("test")).read_text())
        (folder / C.metrics_file("test")).write_text(json.dumps({**record, "ranks": C.ranks_file("test")}))
    assert report(cli, workdir, "--dataset", "beauty", "--pairs", "sasrec-loo-s0:pop-loo-s0").exit_code == 0
    for p in [*workdir.glob("report*"), *workdir.glob("report_figures/*")]:
        p.unlink() if p.is_file() else None
    later = workdir / "zeta"
    write_run(later, "sasrec-loo-s0", "sasrec", 0, 0.040)
    write_run(later, "pop-loo-s0", "sasrec", 1, 0.050)  # in this dataset a seed of the same experiment
    line = one_error_line(report(cli, workdir, "--pairs", "sasrec-loo-s0:pop-loo-s0"))
    assert "--pairs: sasrec-loo-s0 and pop-loo-s0 are seeds of one experiment" in line
    assert _outputs(workdir) == {}


def test_tuned_floats_are_labelled_to_four_digits_unless_that_merges_two_experiments(cli, tmp_path):
    """A tuned learning rate (0.0068286553746408525) reads lr=0.006829 in the tables; two
    experiments whose learning rates differ past the fourth digit keep them as stored, so that
    their rows never share a label."""
    ds = tmp_path / "work" / "beauty"
    write_run(ds, "pop-s0", "pop", 0, 0.01)
    write_run(ds, "sasrec-s0", "sasrec", 0, 0.04, lr=0.0068286553746408525)
    out = tmp_path / "r.md"
    assert report(cli, tmp_path / "work", "--output", out).exit_code == 0
    assert "lr=0.006829" in out.read_text() and "0.0068286553746408525" not in out.read_text()
    write_run(ds, "sasrec-b-s0", "sasrec", 0, 0.045, lr=0.0068291)
    assert report(cli, tmp_path / "work", "--output", out).exit_code == 0
    for label in ("sasrec lr=0.0068286553746408525", "sasrec lr=0.0068291"):
        row(out.read_text(), label)
