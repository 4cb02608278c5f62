"""TensorBoard event files of `mmsr train` (mmsr_cli/tensorboard_log.py), read back with
TensorBoard's own EventAccumulator and compared with history.json."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmsr_cli.tensorboard_log import scalar_tags

from test_training import make_coded_toy, run_folder, train

SMALL = ["--epochs", "2", "--max-steps", "3", "--dim", "8", "--layers", "1", "--batch-size", "32", "--patience", "0"]


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_files_hold_the_history_lr_and_gate_statistics(cli, tmp_path):
    ds = make_coded_toy(tmp_path)
    r = train(cli, ds, "--model", "mmsr", "--lr", "0.002", *SMALL)
    assert r.exit_code == 0, r.stderr
    folder = run_folder(ds, "mmsr-loo-s0")
    history = json.loads((folder / "history.json").read_text())
    logged = scalars(folder)
    for row in history:
        for tag, value in scalar_tags(row).items():
            assert (row["epoch"], pytest.approx(value, rel=1e-6)) in logged[tag], tag
    assert {"train/loss", "valid/ndcg@10", "valid/hr@5", "time/seconds_per_epoch"} <= set(logged)
    assert [v for _, v in logged["train/lr"]] == pytest.approx([0.002, 0.002])
    gate_tags = [t for t in logged if t.startswith("gate/layer1/")]
    assert sorted(gate_tags) == ["gate/layer1/beta_hohe_mean", "gate/layer1/share_hohe"]
    for tag in gate_tags:
        assert all(0.0 <= v <= 1.0 for _, v in logged[tag]) and len(logged[tag]) == 2


def test_no_tensorboard_writes_no_event_file_and_baselines_have_no_gates(cli, tmp_path):
    ds = make_coded_toy(tmp_path)
    assert train(cli, ds, "--model", "sasrecf", "--heads", "2", "--no-tensorboard", *SMALL).exit_code == 0
    assert not list(run_folder(ds, "sasrecf-loo-s0").glob("events.out.tfevents.*"))
    assert train(cli, ds, "--model", "sasrecf", "--heads", "2", "--run-name", "tb", *SMALL).exit_code == 0
    logged = scalars(run_folder(ds, "tb"))
    assert "train/loss" in logged and not any(t.startswith("gate/") for t in logged)
