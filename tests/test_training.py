"""`mmsr train` / `mmsr evaluate` end to end on a tiny preprocessed dataset, through the CLI."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mmsr_cli import contracts as C
from mmsr_cli import inputs
from mmsr_cli import metrics
from mmsr_cli import runs
from mmsr_cli import training
from mmsr_cli.models.base import ModelConfig
from mmsr_cli.workdir import DatasetDir

from conftest import cached_dataset, one_error_line, run_cli

N_TOY_ITEMS = 20
# Small and fast: 5 training batches per epoch.
FAST = ["--dim", "16", "--batch-size", "64", "--heads", "2"]


def make_toy(workdir: Path, name: str = "toy", n_users: int = 60, seed: int = 0, max_len: int = 8) -> DatasetDir:
    """A preprocessed dataset of chains: user u reads items s, s+1, ... (mod 20), 5-11 of them
    (built once per session, then copied: conftest.cached_dataset)."""
    return cached_dataset(f"toy-{n_users}-{seed}-{max_len}", workdir, name,
                          lambda w, n: _build_toy(w, n, n_users, seed, max_len))


def _build_toy(workdir: Path, name: str, n_users: int, seed: int, max_len: int) -> DatasetDir:
    ds = DatasetDir.open(workdir, name)
    rng = np.random.default_rng(seed)
    lines = ["user_id\titem_ids"]
    for u in range(n_users):
        start, length = rng.integers(0, N_TOY_ITEMS), rng.integers(5, 12)
        lines.append(f"u{u}\t" + " ".join(f"i{(start + j) % N_TOY_ITEMS}" for j in range(length)))
    ds.path(C.RAW_DIR).mkdir(parents=True)
    ds.path(C.RAW_SEQUENCES).write_text("\n".join(lines) + "\n")
    ds.path(C.RAW_ITEMS).write_text(
        "".join(json.dumps({"asin": f"i{i}", "title": f"Item number {i}"}) + "\n" for i in range(N_TOY_ITEMS))
    )
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=[C.RAW_DIR], options={})
    r = run_cli(["preprocess", "--workdir", workdir, "--dataset", name, "--core", "0", "--max-len", str(max_len)])
    assert r.exit_code == 0, r.stderr
    return ds


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> DatasetDir:
    return make_toy(tmp_path_factory.mktemp("work"))


def train(cli, ds: DatasetDir, *args):
    return cli(["train", "--workdir", ds.workdir, "--dataset", ds.name, *args])


def evaluate(cli, ds: DatasetDir, *args):
    return cli(["evaluate", "--workdir", ds.workdir, "--dataset", ds.name, *args])


def run_folder(ds: DatasetDir, run: str) -> Path:
    return ds.path(f"{C.RUNS_DIR}/{run}")


def state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True)
    return obj["model"] if "model" in obj else obj


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------


def test_train_writes_the_run_and_keeps_the_best_validation_epoch(cli, toy):
    r = train(cli, toy, "--model", "sasrec", "--run-name", "a", "--epochs", "4", "--patience", "0", "--lr", "0.003", *FAST)
    assert r.exit_code == 0, r.stderr
    folder = run_folder(toy, "a")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "last.pt", "best.pt", "history.json", "history.csv", "curve.png"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary files left
    config = json.loads((folder / "config.json").read_text())
    assert config["dataset"] == "toy" and config["model"]["model"] == "sasrec" and config["model"]["dim"] == 16
    assert config["model"]["max_len"] == 8 and config["train"]["lr"] == 0.003
    assert set(config["fingerprints"]) == {"preprocess"}
    best = torch.load(folder / "best.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in best.values())
    last = torch.load(folder / "last.pt", weights_only=True)
    assert last["epoch"] == 4 and {"model", "optimizer", "rng", "best", "history"} <= set(last)
    history = json.loads((folder / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert (folder / "history.csv").read_text().count("\n") == 5
    # each epoch records the process's peak RSS so far (a torch process holds well over 50 MiB)
    peaks = [h["peak_rss_mib"] for h in history]
    assert peaks == sorted(peaks) and peaks[0] > 50 and "peak_gpu_mib" not in history[0]
    csv_rows = list(csv.DictReader(io.StringIO((folder / "history.csv").read_text())))
    assert [float(r["peak_rss_mib"]) for r in csv_rows] == peaks and csv_rows[0]["peak_gpu_mib"] == ""
    assert (folder / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert history[-1]["loss"] < history[0]["loss"]

    valid = [h["valid"]["ndcg@10"] for h in history]
    best_epoch = int(np.argmax(valid)) + 1  # first maximum
    assert f"run a: best epoch {best_epoch}/4;" in r.stderr
    # best.pt holds the weights of that epoch: re-evaluating it on valid gives its metrics.
    e = evaluate(cli, toy, "--run", "a", "--split", "valid")
    assert e.exit_code == 0, e.stderr
    metrics = json.loads((folder / "metrics_valid.json").read_text())
    assert metrics["metrics"] == pytest.approx(history[best_epoch - 1]["valid"])
    assert metrics["n"] == 60 and "hr@10" in e.stdout


def test_best_is_chosen_on_validation_and_test_is_never_read(toy, monkeypatch):
    """Validation peaks at epoch 2 while the model keeps changing; test data is never opened."""
    scripted = iter([0.1, 0.5, 0.3, 0.2, 0.9, 0.9])  # 0.9 would win if training did not stop
    snapshots, opened = [], []

    def fake_evaluate(model, split, batch_size, device, progress=None, micro_batch=None):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        value = next(scripted)
        return {**{m: 0.0 for m in metrics.METRIC_NAMES}, "ndcg@10": value, "n": len(split)}

    real_open = inputs.DatasetBundle.open_split

    def recording_open(self, ds, split):
        opened.append(split)
        return real_open(self, ds, split)

    monkeypatch.setattr(training, "evaluate_split", fake_evaluate)
    monkeypatch.setattr(inputs.DatasetBundle, "open_split", recording_open)
    tc = runs.TrainConfig(model="sasrec", run_name="scripted", epochs=10, batch_size=64, patience=2)
    result = training.train(toy, tc, ModelConfig(model="sasrec", dim=16))
    assert opened == ["train", "valid"]
    assert (result.best_epoch, result.epochs_run, result.stopped_early) == (2, 4, True)
    folder = run_folder(toy, "scripted")
    assert same_state(state(folder / "best.pt"), snapshots[1])
    assert same_state(state(folder / "last.pt"), snapshots[3])
    assert not same_state(snapshots[1], snapshots[3])


def test_resume_after_interruption_equals_an_uninterrupted_run(cli, toy):
    common = ["--model", "sasrec", "--patience", "0", "--dropout", "0.3", *FAST]
    assert train(cli, toy, *common, "--run-name", "straight", "--epochs", "4").exit_code == 0
    assert train(cli, toy, *common, "--run-name", "resumed", "--epochs", "2").exit_code == 0
    r = train(cli, toy, *common, "--run-name", "resumed", "--epochs", "4")
    assert r.exit_code == 0, r.stderr
    a, b = run_folder(toy, "straight"), run_folder(toy, "resumed")

    def strip(h):
        return [training.without_measurements(e) for e in h]

    ha, hb = (json.loads((f / "history.json").read_text()) for f in (a, b))
    assert len(hb) == 4 and strip(ha) == strip(hb)
    assert same_state(state(a / "last.pt"), state(b / "last.pt"))
    assert same_state(state(a / "best.pt"), state(b / "best.pt"))

    # Resuming with another configuration is refused, and nothing is touched.
    before = (b / "last.pt").read_bytes()
    r = train(cli, toy, *common, "--run-name", "resumed", "--epochs", "4", "--lr", "0.01")
    assert "run exists with another configuration (train.lr: 0.001 != 0.01)" in one_error_line(r)
    assert (b / "last.pt").read_bytes() == before
    # A run started before a model option existed resumes: the missing field takes its default.
    config = json.loads((b / "config.json").read_text())
    del config["model"]["feed_forward"]
    (b / "config.json").write_text(json.dumps(config))
    r = train(cli, toy, *common, "--run-name", "resumed", "--epochs", "5")
    assert r.exit_code == 0, r.stderr
    assert len(json.loads((b / "history.json").read_text())) == 5
    # --no-resume starts over.
    r = train(cli, toy, *common, "--run-name", "resumed", "--epochs", "1", "--lr", "0.01", "--no-resume")
    assert r.exit_code == 0, r.stderr
    assert len(json.loads((b / "history.json").read_text())) == 1


def test_runs_and_metrics_record_the_code_that_made_them(cli, toy, monkeypatch):
    """config.json and metrics_<split>.json name mmsr's version and, in a git checkout, the commit
    and whether the package differs from it; a resume on other code is allowed and recorded."""
    import subprocess

    import mmsr_cli
    from mmsr_cli import runtime

    assert train(cli, toy, "--model", "pop", "--run-name", "coded").exit_code == 0
    config = json.loads((run_folder(toy, "coded") / C.RUN_CONFIG).read_text())
    package = Path(mmsr_cli.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None
    assert config["code"]["mmsr"] == mmsr_cli.__version__ and config["code"]["commit"] == expected
    assert isinstance(config["code"]["modified"], bool) == (expected is not None)
    assert evaluate(cli, toy, "--run", "coded", "--split", "valid").exit_code == 0
    metrics = json.loads((run_folder(toy, "coded") / C.metrics_file("valid")).read_text())
    assert metrics["code"] == config["code"]

    # a resume on other code trains on and records the new code
    other = {"mmsr": "9.9.9", "commit": "0" * 40, "modified": False}
    monkeypatch.setattr(runtime, "code_version", lambda: other)
    monkeypatch.setattr(mmsr_cli.runs, "code_version", lambda: other)
    common = ["--model", "sasrec", *FAST, "--patience", "0", "--run-name", "moved"]
    assert train(cli, toy, *common, "--epochs", "1").exit_code == 0
    monkeypatch.undo()
    monkeypatch.setattr(mmsr_cli.runs, "code_version", lambda: {**other, "commit": "1" * 40})
    r = train(cli, toy, *common, "--epochs", "2")
    assert r.exit_code == 0, r.stderr
    config = json.loads((run_folder(toy, "moved") / C.RUN_CONFIG).read_text())
    assert config["code"]["commit"] == "1" * 40
    assert [h["epoch"] for h in json.loads((run_folder(toy, "moved") / "history.json").read_text())] == [1, 2]


def test_pop_matches_a_direct_count_ranking(cli, toy):
    r = train(cli, toy, "--model", "pop")
    assert r.exit_code == 0, r.stderr
    assert "run pop-loo-s0: best epoch 1/1" in r.stderr  # default name <model>-<split>-s<seed>
    assert evaluate(cli, toy, "--run", "pop-loo-s0").exit_code == 0
    got = json.loads((run_folder(toy, "pop-loo-s0") / "metrics_test.json").read_text())["metrics"]
    counts = np.bincount(pq.read_table(toy.path(C.samples_file("train")))["target"].to_numpy(), minlength=N_TOY_ITEMS)
    targets = pq.read_table(toy.path(C.samples_file("test")))["target"].to_numpy()
    ranks = np.array([1 + (counts > counts[t]).sum() + (counts == counts[t]).sum() - 1 for t in targets])
    assert got["hr@10"] == pytest.approx(np.mean(ranks <= 10))
    assert got["mrr@20"] == pytest.approx(np.mean(np.where(ranks <= 20, 1 / ranks, 0)))


def test_compare_groups_runs_by_config_over_seeds(cli, toy):
    for seed in ("0", "1"):
        r = train(cli, toy, "--model", "gru4rec", "--epochs", "1", "--seed", seed, "--dim", "16", "--batch-size", "64")
        assert r.exit_code == 0, r.stderr
    assert train(cli, toy, "--model", "pop").exit_code == 0
    r = evaluate(cli, toy, "--compare", "gru4rec-loo-s0,gru4rec-loo-s1,pop-loo-s0")
    assert r.exit_code == 0, r.stderr
    accuracy = r.stdout.split("coverage, recommended popularity")[0]  # the first of the two tables
    rows = [line for line in accuracy.splitlines() if line.startswith("│")]
    assert len(rows) == 2
    gru = next(line for line in rows if "gru4rec" in line)
    assert "0,1" in gru
    each = [json.loads((run_folder(toy, f"gru4rec-loo-s{s}") / "metrics_test.json").read_text())["metrics"] for s in (0, 1)]
    mean, std = np.mean([m["hr@10"] for m in each]), np.std([m["hr@10"] for m in each])
    assert f"{mean:.4f} ± {std:.4f}" in gru


def test_a_run_trained_before_an_option_existed_joins_its_experiment():
    from mmsr_cli.runs import experiment_key

    full = runs.with_config_defaults({"dataset": {"name": "toy"}, "train": {"seed": 1}, "model": {"model": "mmsr"}})
    assert full["model"]["modalities"] == list(ModelConfig().modalities)  # JSON values, as config.json holds them
    old = json.loads(json.dumps(full))
    del old["model"]["feed_forward"], old["train"]["drop_ratio"]
    assert experiment_key(old) == experiment_key(full)
    assert experiment_key({**old, "train": {**old["train"], "seed": 2}}) == experiment_key(full)  # repetitions
    assert experiment_key({**old, "model": {**old["model"], "layers": 3}}) != experiment_key(full)
    assert runs.config_difference(old, full) is None
    assert runs.config_difference(old, {**full, "model": {**full["model"], "feed_forward": True}}) == \
        "model.feed_forward: False != True"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "bert4rec"], "--model: unknown model 'bert4rec' (expected one of mmsr, pop, gru4rec, sasrec, sasrecf, "),
        (["--model", "sasrec", "--fusion", "hohe"], "--fusion: not used by model sasrec"),
        (["--model", "sasrec", "--no-codes"], "--no-codes: not used by model sasrec"),
        (["--model", "sasrec", "--feed-forward"], "--feed-forward: not used by model sasrec"),
        (["--model", "gru4rec", "--heads", "4"], "--heads: not used by model gru4rec"),
        (["--model", "pop", "--lr", "0.1"], "--lr: not used by model pop"),
        (["--model", "pop", "--weight-decay", "0.1"], "--weight-decay: not used by model pop"),
        (["--model", "sasrec", "--no-pos-emb"], "--no-pos-emb: not used by model sasrec"),
        (["--model", "sasrec", "--modalities", "image"], "--modalities: not used by model sasrec"),
        (["--model", "sasrec", "--metric", "auc"], "--metric: unknown metric 'auc'"),
        (["--model", "sasrec", "--epochs", "0"], "--epochs: must be an integer in 1..10000, got 0"),
        (["--model", "sasrec", "--dim", "15", "--heads", "2"], "--heads: 2 does not divide --dim 15"),
        (["--model", "sasrecf"], "has no modality codes; run `mmsr build-codes --modality NAME --dataset toy` first"),
    ],
)
def test_bad_options_are_one_line_errors(cli, toy, args, expected):
    runs_before = sorted(p.name for p in toy.path(C.RUNS_DIR).glob("*")) if toy.path(C.RUNS_DIR).exists() else []
    r = train(cli, toy, *args)
    assert expected in one_error_line(r)
    runs_after = sorted(p.name for p in toy.path(C.RUNS_DIR).glob("*")) if toy.path(C.RUNS_DIR).exists() else []
    assert runs_after == runs_before


def test_missing_preprocess_and_unknown_run(cli, tmp_path):
    ds = DatasetDir.open(tmp_path, "raw-only")
    ds.path(C.RAW_DIR).mkdir(parents=True)
    ds.write_manifest(C.STAGE_DOWNLOAD, outputs=[C.RAW_DIR], options={})
    r = train(cli, ds, "--model", "sasrec")
    assert "stage 'preprocess' has not been run; run `mmsr preprocess --dataset raw-only` first" in one_error_line(r)
    r = evaluate(cli, ds, "--run", "nothing")
    assert "no such run" in one_error_line(r)


def test_checkpoint_of_another_dataset_or_stale_data_is_refused(cli, tmp_path):
    first = make_toy(tmp_path, "first", seed=1)
    second = make_toy(tmp_path, "second", seed=2)
    assert train(cli, first, "--model", "pop", "--run-name", "p").exit_code == 0
    shutil.copytree(run_folder(first, "p"), run_folder(second, "p"))
    r = evaluate(cli, second, "--run", "p")
    assert "run was trained on dataset 'first', not 'second'" in one_error_line(r)
    r = cli(["recommend", "--workdir", tmp_path, "--dataset", "second", "--run", "p", "--all-users"])
    assert "run was trained on dataset 'first', not 'second'" in one_error_line(r)
    # The same dataset preprocessed again with other options: the run no longer fits its files.
    r = cli(["preprocess", "--workdir", tmp_path, "--dataset", "first", "--core", "0", "--max-len", "6"])
    assert r.exit_code == 0, r.stderr
    r = evaluate(cli, first, "--run", "p")
    assert "run was trained on other 'preprocess' data than dataset 'first' holds now" in one_error_line(r)
    assert not (run_folder(first, "p") / "metrics_test.json").exists()


def add_hand_made_codes(ds: DatasetDir, name: str = "image") -> None:
    """codes:<name> as build-codes leaves it: item i has code i % 4, items 0-2 have none."""
    import pyarrow as pa

    from mmsr_cli.workdir import upstream, write_parquet_atomic

    n = N_TOY_ITEMS
    codes = [[] if i < 3 else [i % 4] for i in range(n)]
    table = pa.table(
        {
            "item_idx": pa.array(np.arange(n, dtype=np.int32)),
            "codes": pa.array(codes, pa.list_(pa.int32())),
            "similarities": pa.array([[1.0] * len(c) for c in codes], pa.list_(pa.float32())),
        }
    )
    write_parquet_atomic(ds.path(C.codes_file(name)), table, C.CODES_SCHEMA)
    g = torch.Generator().manual_seed(0)
    torch.save({"centres": torch.randn(4, 6, generator=g), "reduced": torch.randn(n, 6, generator=g)}, ds.path(C.centres_file(name)))
    ds.write_manifest(
        C.modality_stage(C.STAGE_CODES, name),
        inputs=upstream(ds.require(C.STAGE_PREPROCESS)),
        outputs=[C.codes_file(name), C.centres_file(name)],
        options={"codes_mode": "clusters", "top_k": 1},
    )


def make_coded_toy(workdir: Path, name: str = "coded") -> DatasetDir:
    """The toy dataset with hand-made codes for an image and a text modality, and its graphs
    (built once per session, then copied)."""
    return cached_dataset("coded", workdir, name, _build_coded_toy)


def _build_coded_toy(workdir: Path, name: str) -> DatasetDir:
    ds = make_toy(workdir, name)
    for modality, kind in (("image", "image"), ("title", "text")):
        add_hand_made_codes(ds, modality)
        ds.write_manifest(C.modality_stage(C.STAGE_FEATURES, modality), outputs=[], options={"modality": kind})
    assert run_cli(["build-graphs", "--workdir", ds.workdir, "--dataset", ds.name]).exit_code == 0
    return ds


def test_sasrecf_trains_on_modality_codes_and_records_their_fingerprint(cli, tmp_path):
    ds = make_toy(tmp_path, "coded")
    add_hand_made_codes(ds)
    r = train(cli, ds, "--model", "sasrecf", "--epochs", "2", *FAST)
    assert r.exit_code == 0, r.stderr
    config = json.loads((run_folder(ds, "sasrecf-loo-s0") / "config.json").read_text())
    assert config["model"]["modalities"] == ["image"]
    assert set(config["fingerprints"]) == {"preprocess", "codes:image"}
    assert evaluate(cli, ds, "--run", "sasrecf-loo-s0").exit_code == 0
    r = train(cli, ds, "--model", "sasrecf", "--modalities", "text", "--run-name", "t", *FAST)
    assert "stage 'codes:text' has not been run; run `mmsr build-codes --modality text --dataset coded` first" in one_error_line(r)
    # New codes for the modality: the trained run no longer matches the dataset.
    add_hand_made_codes(ds)  # same content, new manifest
    torch.save({"centres": torch.zeros(4, 6), "reduced": torch.zeros(N_TOY_ITEMS, 6)}, ds.path(C.centres_file("image")))
    ds.write_manifest(
        C.modality_stage(C.STAGE_CODES, "image"),
        inputs={}, outputs=[C.codes_file("image"), C.centres_file("image")], options={},
    )
    r = evaluate(cli, ds, "--run", "sasrecf-loo-s0")
    assert "run was trained on other 'codes:image' data" in one_error_line(r)


def test_training_hands_freed_heap_back_every_few_steps_and_after_validation(cli, tmp_path, monkeypatch):
    """Batches of changing shapes fragment glibc's heap (runtime.release_freed_memory): the loop
    trims it every TRIM_EVERY_STEPS training steps and after each validation pass."""
    import platform

    from mmsr_cli import runtime

    assert runtime.release_freed_memory() is (platform.libc_ver()[0] == "glibc")
    calls = []
    monkeypatch.setattr(training, "TRIM_EVERY_STEPS", 3)  # the loop's own names (training imports them)
    monkeypatch.setattr(training, "release_freed_memory", lambda: calls.append(1) or True)
    ds = make_toy(tmp_path)
    r = train(cli, ds, "--model", "sasrec", *FAST, "--batch-size", "16", "--epochs", "2", "--patience", "0", "--max-steps", "7")
    assert r.exit_code == 0, r.stderr
    assert len(calls) == 2 * (7 // 3 + 1)  # per epoch: after steps 3 and 6, and after validation


def test_a_script_gets_the_train_commands_checks_and_run_names(tmp_path):
    """runs.train_configs holds `mmsr train`'s option checks and defaults, and default_run_name
    its naming, so a script calling the library builds the same runs."""
    from mmsr_cli.errors import MmsrError

    for model, given, message in (("gru4rec", {"heads": 2}, "--heads: not used by model gru4rec"),
                                  ("sasrec", {"graph_variant": "items"}, "--no-codes: not used by model sasrec"),
                                  ("mmsr", {"aggregator": "gcn", "fusion": "hohe"}, "--fusion: only used by --aggregator han"),
                                  ("mmsr", {"fusion": "sideways"}, "--fusion: expected one of"),
                                  ("mmsr", {"modalities": "image,image"}, "--modalities: a modality is named twice")):
        with pytest.raises(MmsrError, match=message):
            runs.train_configs(model, **given)
    tc, mc = runs.train_configs("mmsr", aggregator="gcn", modalities="image, text", dim=64, epochs=None)
    assert (tc.model, tc.epochs, mc.model, mc.dim, mc.modalities) == ("mmsr", 50, "mmsr", 64, ("image", "text"))
    ds = make_toy(tmp_path)
    assert runs.default_run_name(ds, tc, mc) == "mmsr-gcn-loo-s0"
    assert runs.default_run_name(ds, tc, runs.train_configs("mmsr")[1]) == "mmsr-loo-s0"
