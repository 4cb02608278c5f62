"""Data-parallel `mmsr train` under torchrun (distributed.py): two CPU processes (Gloo) give the
same weights and validation metrics as one process with the same global batch, write one set of
run files, resume with dropout and a ragged last batch to the weights of a straight two-rank
run, and the sharded full-ranking evaluation equals the single-process one. Ports are
never picked by the test: torchrun --standalone lets its agent bind one, and the one-process
group meets through a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mmsr_cli import contracts as C
from mmsr_cli import distributed
from mmsr_cli.evaluation import evaluate_split
from mmsr_cli.models import build_model
from mmsr_cli.models.base import ModelConfig
from mmsr_cli.inputs import load_dataset
from mmsr_cli.training import without_measurements
from mmsr_cli.workdir import DatasetDir

from conftest import assert_same, run_cli
from test_training import make_coded_toy, state

pytestmark = pytest.mark.slow  # torchrun starts two fresh processes per run

# 63 is odd: the ranks' slices of a global batch differ in size (31 and 32), as the last batch's do.
SASREC = ["--model", "sasrec", "--dim", "16", "--heads", "2", "--batch-size", "63", "--dropout", "0",
          "--patience", "0", "--device", "cpu", "--seed", "3"]
MMSR = ["--model", "mmsr", "--dim", "8", "--layers", "1", "--batch-size", "63", "--dropout", "0",
        "--max-steps", "3", "--epochs", "1", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> DatasetDir:
    ds = make_coded_toy(tmp_path_factory.mktemp("work"))
    return ds


def torchrun(ds: DatasetDir, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m mmsr_cli train ...`` as a user would start it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "mmsr_cli",
           "train", "--workdir", str(ds.workdir), "--dataset", ds.name, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def single(ds: DatasetDir, *args: str) -> None:
    r = run_cli(["train", "--workdir", ds.workdir, "--dataset", ds.name, *args])
    assert r.exit_code == 0, r.stderr


def history(ds: DatasetDir, run: str) -> list[dict]:
    return json.loads(ds.path(f"{C.RUNS_DIR}/{run}/history.json").read_text())


def assert_close_runs(ds: DatasetDir, run_a: str, run_b: str) -> None:
    a, b = history(ds, run_a), history(ds, run_b)
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b] and [h["steps"] for h in a] == [h["steps"] for h in b]
    for ha, hb in zip(a, b):
        assert ha["loss"] == pytest.approx(hb["loss"], abs=1e-5)
        assert ha["valid"] == pytest.approx(hb["valid"], abs=1e-6)
    for ckpt in ("best.pt", "last.pt"):
        wa, wb = state(ds.path(f"{C.RUNS_DIR}/{run_a}/{ckpt}")), state(ds.path(f"{C.RUNS_DIR}/{run_b}/{ckpt}"))
        assert wa.keys() == wb.keys()
        for k in wa:
            a, b = wa[k], wb[k]
            if k.endswith("attn.qkv.bias"):
                # The key bias has a zero gradient (it shifts all of a query's logits alike, and the
                # softmax ignores that); Adam turns the float noise left there into full steps.
                third = a.shape[0] // 3
                a, b = torch.cat([a[:third], a[2 * third :]]), torch.cat([b[:third], b[2 * third :]])
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"{ckpt} {k}")


def run_files(ds: DatasetDir, run: str) -> list[str]:
    """The run's files; TensorBoard event files (named by time, host and process, one per start of
    rank 0) count as one name."""
    names = {p.name for p in ds.path(f"{C.RUNS_DIR}/{run}").iterdir()}
    return sorted({"events.out.tfevents" if n.startswith("events.out.tfevents.") else n for n in names})


def test_two_ranks_train_like_one_process(coded):
    """Two ranks with half the global batch each give one process's weights and metrics, and one
    set of run files; resuming is the dropout test's below (against this straight two-rank run)."""
    single(coded, *SASREC, "--epochs", "2", "--run-name", "one")
    r = torchrun(coded, *SASREC, "--epochs", "2", "--run-name", "two")
    assert (r.stdout + r.stderr).count("run two: best epoch") == 1  # the summary is printed by rank 0 only
    assert_close_runs(coded, "one", "two")
    assert run_files(coded, "two") == run_files(coded, "one")


def test_two_ranks_train_mmsr_like_one_process(coded):
    single(coded, *MMSR, "--run-name", "mmsr-one")
    torchrun(coded, *MMSR, "--run-name", "mmsr-two")
    assert_close_runs(coded, "mmsr-one", "mmsr-two")


def test_two_ranks_resume_with_dropout_and_a_ragged_last_batch(coded):
    """Dropout masks are drawn per rank and epoch, and the last global batch splits unevenly
    across the ranks: a two-rank run stopped after epoch 1 and resumed ends with the weights,
    optimizer state and history of a straight two-rank run."""
    args = [a if a != "0" or SASREC[i - 1] != "--dropout" else "0.3" for i, a in enumerate(SASREC)]
    assert args[args.index("--dropout") + 1] == "0.3"
    n_train = len(load_dataset(coded, ModelConfig(model="sasrec")).open_split(coded, "train"))
    assert n_train % 63 % 2 == 1  # the last batch is ragged and odd: the ranks' slices differ in size
    torchrun(coded, *args, "--epochs", "2", "--run-name", "drop-straight")
    r = torchrun(coded, *args, "--epochs", "1", "--run-name", "drop-resumed")
    assert (r.stdout + r.stderr).count("run drop-resumed: best epoch") == 1  # rank 0 prints the summary
    torchrun(coded, *args, "--epochs", "2", "--run-name", "drop-resumed")  # resumes from epoch 1's last.pt
    log = coded.path(f"{C.LOGS_DIR}/train.log").read_text()  # rank 0 logs, once per start
    assert log.count("train drop-resumed on coded") == 2 and log.count("resume drop-resumed from epoch 1") == 1
    assert log.count("run drop-resumed: best epoch") == 2
    folder = coded.path(f"{C.RUNS_DIR}/drop-resumed")
    assert not [p for p in folder.iterdir() if ".tmp" in p.name or p.name.startswith(".")]
    assert run_files(coded, "drop-resumed") == run_files(coded, "drop-straight")
    a, b = (torch.load(coded.path(f"{C.RUNS_DIR}/{run}/last.pt"), weights_only=True) for run in ("drop-straight", "drop-resumed"))
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "optimizer", "best", "bad_epochs", "stopped"):
        assert_same(a[key], b[key], key)
    assert [without_measurements(r) for r in a["history"]] == [without_measurements(r) for r in b["history"]]
    assert_same(state(coded.path(f"{C.RUNS_DIR}/drop-straight/best.pt")), state(coded.path(f"{C.RUNS_DIR}/drop-resumed/best.pt")), "best.pt")
    config = json.loads(coded.path(f"{C.RUNS_DIR}/drop-resumed/config.json").read_text())
    assert config["model"]["dropout"] == 0.3


def test_sharded_evaluation_sums_to_the_single_process_metrics(coded, monkeypatch, tmp_path):
    bundle = load_dataset(coded, ModelConfig(model="sasrec", dim=16, heads=2))
    torch.manual_seed(0)
    model = build_model(bundle.model_config, bundle.info)
    split = bundle.open_split(coded, "valid")
    whole = evaluate_split(model, split, 7, torch.device("cpu"))
    # Two ranks' slices, scored one after the other (no group: their sums are combined here).
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(evaluate_split(model, split, 7, torch.device("cpu")))
    assert [p["n"] for p in parts] == [whole["n"] // 2, whole["n"] - whole["n"] // 2]
    for name in whole:
        if name != "n":
            combined = sum(p[name] * p["n"] for p in parts) / whole["n"]
            assert combined == pytest.approx(whole[name], abs=1e-12)
    monkeypatch.undo()
    # A real (one-rank Gloo) group goes through the all-reduce and gives the same metrics.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.active() and distributed.world_size() == 1
        assert evaluate_split(model, split, 7, torch.device("cpu")) == pytest.approx(whole, abs=1e-12)
    finally:
        dist.destroy_process_group()


def test_shards_cover_each_batch_in_order():
    batch = list(range(10))
    assert [distributed.shard(batch, r, 3) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert [distributed.shard([5], r, 2) for r in range(2)] == [[], [5]]
    assert distributed.shard(batch) == batch  # one process: the whole batch
