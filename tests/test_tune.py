"""`mmsr tune`: Optuna search on validation, ordinary trial runs, resumption after kill -9, the
best options as a train config, and no look at the test split."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmsr_cli.errors import MmsrError
from mmsr_cli import contracts as C
from mmsr_cli import inputs
from mmsr_cli import training, tuning
from mmsr_cli.space import PAPER_SPACE, Choice, Range, model_space

from conftest import run_cli
from test_training import make_toy, one_error_line, run_folder

pytestmark = pytest.mark.slow  # Optuna studies over several trainings, one of them killed and resumed


def tune(ds, *args):
    return run_cli(["tune", "--workdir", ds.workdir, "--dataset", ds.name, *args])


def small_space(tmp_path: Path) -> Path:
    path = tmp_path / "space.toml"
    path.write_text("dim = 16\nbatch-size = [64, 128]\nlayers = { low = 1, high = 2 }\n")
    return path


def studies(ds, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{ds.path(C.TUNE_STORAGE)}")


def test_model_spaces_follow_the_paper_and_the_model():
    assert PAPER_SPACE["lr"] == Range(1e-4, 1e-2, log=True) and 0.0 in PAPER_SPACE["weight_decay"].values
    assert PAPER_SPACE["batch_size"] == Choice((128, 256, 512)) and PAPER_SPACE["layers"] == Range(1, 4)
    assert model_space("mmsr")["fusion"] == Choice(("adaptive", "hohe", "heho", "synchronous"))
    assert "fusion" not in model_space("sasrec") and "dropout" not in model_space("srgnn")  # SR-GNN has none


def test_tune_searches_on_validation_writes_a_train_config_and_never_opens_test(tmp_path, monkeypatch):
    ds = make_toy(tmp_path / "work")
    opened, read = [], []
    real_open, real_read = inputs.DatasetBundle.open_split, pq.read_table

    def recording_open(self, ds_, split):
        opened.append(split)
        return real_open(self, ds_, split)

    def recording_read(source, *args, **kwargs):
        read.append(str(source))
        return real_read(source, *args, **kwargs)

    monkeypatch.setattr(inputs.DatasetBundle, "open_split", recording_open)
    monkeypatch.setattr(pq, "read_table", recording_read)
    r = tune(ds, "--model", "sasrec", "--trials", "3", "--epochs", "3", "--patience", "0", "--study", "s",
             "--space", small_space(tmp_path))
    assert r.exit_code == 0, r.stderr
    assert set(opened) == {"train", "valid"} and not [p for p in read if "test" in Path(p).name]
    study = studies(ds, "s")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    # trial 0: the defaults of `mmsr train` that the space holds (batch 512 is outside it)
    assert trials[0].params == {"lr": 1e-3, "weight_decay": 0.0, "dropout": 0.3, "layers": 2, "batch_size": 64}
    for t in trials:  # each trial is an ordinary run whose best validation epoch is the trial's value
        folder = run_folder(ds, f"tune-s-t{t.number:03d}")
        history = json.loads((folder / "history.json").read_text())
        assert len(history) == 3 and t.value == max(h["valid"]["ndcg@10"] for h in history)
        assert t.intermediate_values == {e: max(h["valid"]["ndcg@10"] for h in history[:e]) for e in (1, 2, 3)}
        assert not list(folder.glob("metrics_test*")) and not list(folder.glob("ranks_test*"))
    best = max(trials, key=lambda t: t.value)
    assert f"best valid ndcg@10 {best.value:.4f} (trial {best.number}" in r.stderr
    assert "│ 2 " in r.stdout or "│     2 │" in r.stdout  # the trials table

    # the best options as a config file that `mmsr train --config` takes: it retrains the best trial
    config = ds.path(C.tune_config_file("s"))
    options = tomllib.loads(config.read_text())["train"]
    assert options["model"] == "sasrec" and options["lr"] == best.params["lr"] and options["dim"] == 16
    r = run_cli(["train", "--workdir", ds.workdir, "--config", config, "--run-name", "retrained"])
    assert r.exit_code == 0, r.stderr
    history = json.loads((run_folder(ds, "retrained") / "history.json").read_text())
    assert max(h["valid"]["ndcg@10"] for h in history) == pytest.approx(best.value)

    # the file comes from the study, not from the trial runs: with every trial's folder deleted
    # (their checkpoints are most of a study's disk), the study writes the same file again
    written = config.read_text()
    for t in trials:
        shutil.rmtree(run_folder(ds, f"tune-s-t{t.number:03d}"))
    config.unlink()
    r = tune(ds, "--model", "sasrec", "--trials", "3", "--epochs", "3", "--patience", "0", "--study", "s",
             "--space", small_space(tmp_path))
    assert r.exit_code == 0, r.stderr
    assert config.read_text() == written

    # more trials resume the study; other fixed options are refused, naming the difference
    r = tune(ds, "--model", "sasrec", "--trials", "4", "--epochs", "3", "--patience", "0", "--study", "s",
             "--space", small_space(tmp_path))
    assert r.exit_code == 0, r.stderr
    assert len(studies(ds, "s").get_trials()) == 4
    r = tune(ds, "--model", "sasrec", "--trials", "4", "--epochs", "5", "--patience", "0", "--study", "s",
             "--space", small_space(tmp_path))
    assert "the study exists with another epochs (3)" in one_error_line(r) and r.exit_code == 2


@pytest.mark.parametrize(
    "content, expected",
    [
        ("lr = { low = 1e-2, high = 1e-4, log = true }", "field 'lr': low 0.01 must not exceed high 0.0001"),
        ("layers = [1, 2.5]", "field 'layers': expected an integer, got 2.5"),
        ("fusion = ['adaptive']", "field 'fusion': not used by model sasrec"),
        ("epochs = 3", "field 'epochs': not a tunable option"),
        ("dropout = 1.5", "field 'dropout': value 1.5 is invalid"),
        ("lr = {low = 1e-4}", "field 'lr': a range is"),
        ("lr = 0.001\nweight-decay = 0.0\ndropout = 0.1\nlayers = 1\nbatch-size = 64", "--space: no option is searched"),
    ],
)
def test_bad_space_files_are_one_line_errors(tmp_path, content, expected):
    ds = make_toy(tmp_path / "work")
    path = tmp_path / "bad.toml"
    path.write_text(content + "\n")
    r = tune(ds, "--model", "sasrec", "--trials", "1", "--space", path)
    line = one_error_line(r)
    assert expected in line and r.exit_code == 2
    assert expected.startswith("--space") or str(path) in line
    assert not ds.path(f"{C.RUNS_DIR}").exists()


def test_tune_refuses_pop_and_bad_options(tmp_path):
    ds = make_toy(tmp_path / "work")
    assert "nothing to tune" in one_error_line(tune(ds, "--model", "pop", "--trials", "1"))
    assert "--timeout: expected a positive duration" in one_error_line(tune(ds, "--model", "sasrec", "--timeout", "soon"))
    assert "--trials: must be an integer in 1..10000, got 0" in one_error_line(tune(ds, "--model", "sasrec", "--trials", "0"))


# Validation NDCG@10 after each epoch: trials 0-2 set the median (0.5 at epoch 2), trial 3 is
# below it at every epoch and would end as the best trial but for pruning.
CURVES = {0: [0.3, 0.5, 0.6, 0.6], 1: [0.3, 0.5, 0.6, 0.6], 2: [0.3, 0.5, 0.6, 0.6], 3: [0.1, 0.2, 0.25, 0.9]}


@pytest.mark.parametrize("prune_after, pruned_at", [(None, 2), (1, 1), (3, 3), (0, None)])
def test_the_median_pruner_stops_a_trial_below_the_median_from_prune_after_on(tmp_path, monkeypatch, prune_after, pruned_at):
    """Trials follow CURVES (a scripted training): the fourth, below the median of the first three,
    stops at --prune-after's epoch (default 2); with 0 it runs to the end and is the best."""
    from types import SimpleNamespace

    def scripted_train(ds, tc, mc, resume, on_epoch):
        curve = CURVES[int(tc.run_name.rsplit("-t", 1)[1])]
        for epoch, value in enumerate(curve, 1):
            on_epoch({"epoch": epoch, "valid": {"ndcg@10": value}})
        return SimpleNamespace(best_valid={"ndcg@10": max(curve)})

    monkeypatch.setattr(tuning, "train", scripted_train)
    ds = make_toy(tmp_path / "work")
    args = ["--model", "sasrec", "--trials", "4", "--epochs", "4", "--study", "p", "--space", small_space(tmp_path)]
    r = tune(ds, *args, *([] if prune_after is None else ["--prune-after", str(prune_after)]))
    assert r.exit_code == 0, r.stderr
    trials = studies(ds, "p").get_trials()
    assert [t.state.name for t in trials[:3]] == ["COMPLETE"] * 3
    last = trials[3]
    if pruned_at is None:
        assert last.state.name == "COMPLETE" and last.value == 0.9
        assert tomllib.loads(ds.path(C.tune_config_file("p")).read_text())["train"]["lr"] == last.params["lr"]
    else:
        assert last.state.name == "PRUNED" and last.user_attrs["epochs"] == pruned_at
    # the study keeps its pruning: resumed with another --prune-after, it is refused by name
    other = "0" if prune_after != 0 else "2"
    r = tune(ds, *args, "--trials", "5", "--prune-after", other)
    assert "the study exists with another prune_after" in one_error_line(r) and r.exit_code == 2


def test_a_study_from_before_prune_after_resumes_with_its_epoch_2_pruning(tmp_path, monkeypatch):
    """Studies created before --prune-after recorded no such setting; they pruned from epoch 2 and
    resume under the default, not under another --prune-after."""
    ds = make_toy(tmp_path / "work")
    args = ["--model", "sasrec", "--epochs", "1", "--patience", "0", "--study", "old", "--space", small_space(tmp_path)]
    assert tune(ds, *args, "--trials", "1").exit_code == 0
    study = studies(ds, "old")
    settings = dict(study.user_attrs["settings"])
    assert settings.pop("prune_after") == 2
    study.set_user_attr("settings", settings)  # as such a study's storage holds it
    r = tune(ds, *args, "--trials", "2", "--prune-after", "1")
    assert "the study exists with another prune_after (2)" in one_error_line(r) and r.exit_code == 2
    r = tune(ds, *args, "--trials", "2")
    assert r.exit_code == 0, r.stderr
    assert len(studies(ds, "old").get_trials()) == 2


# `mmsr ARGS[2:]` (heartbeat every 1 s, silent after 2 s) that sends itself signal ARGS[0] (KILL:
# killed; STOP: stopped, as by Ctrl-Z or a hung machine) when run ARGS[1] is about to write its
# history of 3 epochs (last.pt of epoch 3 is saved, history.json still holds 2). ARGS[1] "-": never.
SIGNAL_AT_EPOCH_3 = r"""
import os, signal, sys
from mmsr_cli import training, tuning
tuning.HEARTBEAT_SECONDS, tuning.GRACE_SECONDS = 1, 2
sig, run, args = getattr(signal, "SIG" + sys.argv[1]), sys.argv[2], sys.argv[3:]
original = training.write_history
def hooked(folder, history, *rest, **kw):
    if folder.name == run and len(history) == 3:
        os.kill(os.getpid(), sig)
    return original(folder, history, *rest, **kw)
training.write_history = hooked
from mmsr_cli.app import main
main(args)
"""


def _three_trial_study(tmp_path: Path, study: str):
    """The toy dataset, `mmsr tune` arguments for a 3-trial SASRec study of 6 epochs each, and the
    environment of a child process that runs them."""
    ds = make_toy(tmp_path / "work")
    args = ["tune", "--workdir", str(ds.workdir), "--dataset", ds.name, "--model", "sasrec", "--trials", "3",
            "--epochs", "6", "--patience", "0", "--study", study, "--space", str(small_space(tmp_path))]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return ds, args, env


def test_a_killed_tune_resumes_with_no_trial_lost_or_counted_twice(tmp_path, monkeypatch):
    """kill -9 while trial 1 trains: a new `tune` fails the silent trial, retries it from its
    last.pt under the same run, and ends with exactly --trials finished trials."""
    ds, args, env = _three_trial_study(tmp_path, "k")
    # The child kills itself as trial 1 is about to record its third epoch (SIGNAL_AT_EPOCH_3): no
    # polling from here, so the kill point does not depend on the machine's load.
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_EPOCH_3, "KILL", "tune-k-t001", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    history = run_folder(ds, "tune-k-t001") / "history.json"
    before = json.loads(history.read_text())
    assert [h["epoch"] for h in before] == [1, 2]
    assert [t.state.name for t in studies(ds, "k").get_trials()] == ["COMPLETE", "RUNNING"]

    monkeypatch.setattr(tuning, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(tuning, "GRACE_SECONDS", 2)
    r = run_cli(args)
    assert r.exit_code == 0, r.stderr
    trials = studies(ds, "k").get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1 and len(trials) == 4
    retry = next(t for t in trials if t.state.name == "COMPLETE" and t.user_attrs["run"] == "tune-k-t001")
    assert retry.params == trials[1].params and retry.number != 1
    after = json.loads(history.read_text())
    assert [h["epoch"] for h in after] == list(range(1, 7))  # resumed from last.pt, no epoch twice
    assert [training.without_measurements(h) for h in after[:len(before)]] == [training.without_measurements(h) for h in before]
    new = [t for t in trials if t.number > 1 and t is not retry]  # trial 2 or 3, whichever began first
    assert len(new) == 1 and new[0].user_attrs["run"] == f"tune-k-t{new[0].number:03d}"
    assert "process died; queued again" in r.stdout


def _process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_for(condition, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_stopped_trial_is_taken_over_by_its_retry_which_waits_for_the_run(tmp_path):
    """A tune stopped (not killed) during trial 1 stops beating; a second tune fails the trial and
    its retry waits for the run the stopped process still holds. Woken, the stopped process finds
    its trial taken over at its next report and lets go; the retry continues the run from last.pt.
    No trial ends in an error, none is lost, and --trials finished trials result."""
    ds, args, env = _three_trial_study(tmp_path, "s")
    first = subprocess.Popen([sys.executable, "-c", SIGNAL_AT_EPOCH_3, "STOP", "tune-s-t001", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = None
    try:
        _wait_for(lambda: first.poll() is not None or _process_state(first.pid) == "T", "the first tune to stop")
        assert first.poll() is None, first.stdout.read()[-2000:]
        second = subprocess.Popen([sys.executable, "-c", SIGNAL_AT_EPOCH_3, "STOP", "-", *args], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def retry_running() -> bool:
            return any(t.number > 1 and t.state.name == "RUNNING" and t.user_attrs.get("run") == "tune-s-t001"
                       for t in studies(ds, "s").get_trials())

        _wait_for(lambda: second.poll() is not None or retry_running(), "the retry of trial 1")
        time.sleep(3)  # the retry meets the run's lock, held by the stopped process
        os.kill(first.pid, signal.SIGCONT)
        out_first, _ = first.communicate(timeout=600)
        out_second, _ = second.communicate(timeout=600)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert first.returncode == 0, out_first[-2000:]
    assert second.returncode == 0, out_second[-2000:]
    assert "trial 1 was taken over by its retry" in out_first
    assert "(a retry) waits for its run" in out_second and "run-tune-s-t001.lock" in out_second
    trials = studies(ds, "s").get_trials()
    states = [tuning._state(t) for t in trials]
    assert states.count("complete") == 3 and states.count("killed") == 1 and "error" not in states, states
    retry = next(t for t in trials if t.number > 1 and t.user_attrs["run"] == "tune-s-t001")
    assert retry.state.name == "COMPLETE" and retry.params == trials[1].params
    history = json.loads((run_folder(ds, "tune-s-t001") / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 7))  # the retry went on from epoch 3, no epoch twice
    assert sorted(retry.intermediate_values) == list(range(1, 7))


def test_a_space_can_pin_the_authors_variant_and_is_checked_as_a_whole(tmp_path):
    from mmsr_cli.space import model_space, read_space_file

    path = tmp_path / "authors.toml"
    path.write_text('variant = "authors"\nattention-dropout = [0.0, 0.2]\n')
    # MMSR's own space searches --fusion, which the authors' layer does not have: refused before any trial
    with pytest.raises(MmsrError, match=r"field 'fusion': value 'hohe' is invalid .*--variant authors"):
        read_space_file(path, "mmsr", model_space("mmsr"))
    path.write_text('variant = "authors"\nfusion = "adaptive"\nattention-dropout = [0.0, 0.2]\n')
    space = read_space_file(path, "mmsr", model_space("mmsr"))
    assert space["variant"] == "authors" and space["attention_dropout"] == Choice((0.0, 0.2))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name, model", [("tune-beauty-cpu", "sasrec"), ("tune-beauty-cpu", "sasrecf"),
                                         ("tune-beauty-cpu", "mmsr"), ("tune-beauty-cpu-mmsr-authors", "mmsr")])
def test_shipped_beauty_spaces_search_the_same_ranges_for_every_model(name, model):
    """configs/tune-beauty-cpu*.toml (the CPU-sized Beauty tuning of docs/benchmarks.md) load for
    the models they are for, replace the models' own spaces, and search the same options over the
    same ranges for every model, so that equal trial counts are equal budgets."""
    from mmsr_cli.space import fixed, read_space_file, searched

    space = read_space_file(CONFIGS / f"{name}.toml", model, model_space(model))
    assert searched(space) == {
        "lr": Range(3e-4, 1e-2, log=True), "weight_decay": Choice((0.0, 1e-6, 1e-5, 1e-4)),
        "dropout": Range(0.1, 0.5, step=0.1), "layers": Choice((1, 2)),
    }
    expected = {"batch_size": 512}
    if name.endswith("mmsr-authors"):
        expected.update(variant="authors", attention_dropout=0.2)
    assert fixed(space) == expected


SHIPPED_TUNED = sorted(p.name for p in (CONFIGS / "tuned").glob("*.toml"))


def test_every_beauty_study_has_a_shipped_config():
    assert {n for n in SHIPPED_TUNED if n.startswith("beauty-ratio-")} == {
        f"beauty-ratio-{s}.toml" for s in ("sasrec", "sasrecf", "mmsr", "mmsr-authors", "bm3", "difsr", "nova")}


@pytest.mark.parametrize("file", SHIPPED_TUNED)
def test_shipped_tuned_configs_are_what_tune_writes_for_a_trial_of_their_space(file):
    """configs/tuned/DATASET-STUDY.toml (the best trials of the Beauty and Sports studies) hold
    options of their study's space, and `mmsr tune` would write the same [train] table for them."""
    from types import SimpleNamespace

    from mmsr_cli.space import read_space_file, searched

    text = (CONFIGS / "tuned" / file).read_text()
    dataset = tomllib.loads(text)["dataset"]
    assert file.startswith(f"{dataset}-")
    study = file.removeprefix(f"{dataset}-").removesuffix(".toml")
    model = "mmsr" if study.startswith("mmsr") else study
    space_file = "tune-beauty-cpu-mmsr-authors" if study == "mmsr-authors" else "tune-beauty-cpu"
    space = read_space_file(CONFIGS / f"{space_file}.toml", model, model_space(model))
    train = tomllib.loads(text)["train"]
    params = {name: train[name.replace("_", "-")] for name in searched(space)}
    for name, param in searched(space).items():
        value = params[name]
        assert value in param.values if isinstance(param, Choice) else param.low <= value <= param.high, name
    settings = tuning.TuneSettings(model=model, epochs=10, patience=3, seed=0, metric="ndcg@10", space=space)
    best = tuning.TrialRow(number=0, state="complete", value=0.05, epochs=10, run="r", params=params)
    written = tuning.best_config_toml(SimpleNamespace(name=dataset), "s", settings, best)
    assert written.split("[train]\n")[1] == text.split("[train]\n")[1]
