"""The measurement scripts that patch or read model internals (docs/benchmarks.md, issue 4).

scripts/bench_attention_share.py records every ``neighbourhood_softmax`` call of a forward pass
and names them by their order in ``HANLayer.forward`` (ho, he, hohe, heho). Here the same self-loop
weights and gate are computed directly from the layer's parts, so a change of that order cannot go
unnoticed. scripts/bench_tied_keys.py patches HANLayer for one measurement and must undo it, as
scripts/bench_length_groups.py must undo its swap of the sequence models' length groups.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsr_cli import contracts as C
from mmsr_cli.data import to_device
from mmsr_cli.runs import load_run
from test_layers import RICH_EDGES, RICH_NODE_TYPE, graph_inputs, setup_layer
from test_training import make_coded_toy, train

MMSR_FAST = ["--dim", "16", "--batch-size", "64"]  # test_training.FAST without --heads (not an MMSR option)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_attention_share.py"


def load_script(name: str = "bench_attention_share"):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def direct_shares(ds, run: str) -> dict[int, dict[str, float]]:
    loaded = load_run(ds, run, "best", torch.device("cpu"))
    model = loaded.model.eval()
    model.every_node = True  # the hooks read each layer's full input
    data = loaded.bundle.open_split(ds, "test")
    batch = to_device(data.collate(np.arange(len(data))), torch.device("cpu"))
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args: inputs.append(args)) for layer in model.layers]
    with torch.no_grad():
        model(batch)
        for hook in hooks:
            hook.remove()
        last = batch["last_node"] if model._last_inverse is None else model._last_inverse[batch["last_node"]]
        out = {}
        for layer_no, (layer, (h, edges, types)) in enumerate(zip(model.layers, inputs), start=1):
            v = layer.value(h, types)
            h_ho = layer._homogeneous(v, v, edges)
            h_he = layer._heterogeneous(layer.key(h, types), layer.query(h, types), v, edges)
            graphs = {"ho": edges.ho, "he": edges.he, "hohe": edges.he, "heho": edges.ho}
            alphas = {
                "ho": layer.attention(h, edges, types, "ho"),
                "he": layer.attention(h, edges, types, "he"),
                "hohe": layer.attention(h_ho, edges, types, "he"),
                "heho": layer.attention(h_he, edges, types, "ho"),
            }
            selfs = {}
            for name, alpha in alphas.items():
                g = graphs[name]
                on_self = (g.row == g.col) & torch.isin(g.row, last)
                per_node = torch.zeros(g.n_rows)
                per_node[g.row[on_self]] = alpha[on_self]
                selfs[name] = per_node[last]
            beta = layer.last_gate[last, 0]
            out[layer_no] = {f"self {k}": float(w.mean()) for k, w in selfs.items()}
            out[layer_no]["beta(ho->he)"] = float(beta.mean())
            out[layer_no]["code share"] = float((beta * (1 - selfs["hohe"])).mean())
    return out


def test_attention_shares_match_the_layer_parts(cli, tmp_path):
    ds = make_coded_toy(tmp_path)
    assert train(cli, ds, "--model", "mmsr", "--epochs", "1", "--run-name", "m", *MMSR_FAST).exit_code == 0
    got = load_script().shares(ds, "m", "test")
    want = direct_shares(ds, "m")
    assert set(got) == set(want) == {1, 2}
    for layer in want:
        assert set(got[layer]) == set(want[layer])
        for key, value in want[layer].items():
            assert got[layer][key] == pytest.approx(value, abs=1e-6), (layer, key)
        # The code graph gives every item two codes: the self loop never holds all of he's weight.
        assert 0.0 < got[layer]["self he"] < 1.0 and 0.0 < got[layer]["code share"] < 1.0


def test_other_fusions_are_refused(cli, tmp_path):
    ds = make_coded_toy(tmp_path)
    assert train(cli, ds, "--model", "mmsr", "--epochs", "1", "--fusion", "ho", "--run-name", "ho", *MMSR_FAST).exit_code == 0
    with pytest.raises(SystemExit, match="needs --aggregator han --fusion adaptive"):
        load_script().shares(ds, "ho", "test")


def test_tied_keys_patch_is_the_layer_with_w_k_equal_to_w_q_and_is_undone():
    """scripts/bench_tied_keys.py: the patched layer computes what a layer whose W_K holds W_Q's
    weights computes, on every fusion path; leaving the context restores Eq. 13's W_K."""
    tied_keys = load_script("bench_tied_keys").keys_tied_to_queries
    layer = setup_layer()
    h, edges, types, *_ = graph_inputs(RICH_EDGES, RICH_NODE_TYPE, 3)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.key.weight.copy_(layer.query.weight)
        paper = layer(h, edges, types)
        with tied_keys():
            tied = layer(h, edges, types)
            tied_alpha = layer.attention(h, edges, types, "he")
        assert torch.allclose(tied, twin(h, edges, types), atol=1e-6)
        assert torch.allclose(tied_alpha, twin.attention(h, edges, types, "he"), atol=1e-6)
        assert not torch.allclose(tied, paper, atol=1e-4)
        assert torch.equal(layer(h, edges, types), paper)


def test_length_groups_bench_times_both_forwards_and_restores_the_grouped_one(tmp_path):
    """scripts/bench_length_groups.py swaps the models' ``by_length_groups`` for one pass over the
    longest history on every other step; afterwards the models must group again."""
    from mmsr_cli.models.common import by_length_groups

    script = load_script("bench_length_groups")
    ds = make_coded_toy(tmp_path)
    grouped = by_length_groups
    for name in ("sasrec", "trans2d"):
        row = script.bench(ds, name, steps=1, batch_size=16, seed=0)
        assert row["model"] == name and 5 <= row["max length"] <= 8
        assert row["one pass cpu"] > 0 and row["grouped cpu"] > 0
    assert all(module.by_length_groups is grouped for module in script.MODULES)


def test_step_speed_counts_a_validation_pass_with_its_full_ranking_product(tmp_path):
    """scripts/bench_step_speed.py's validation FLOPs (the epoch's arithmetic floor) include the
    scores of every validation user against every item, and MMSR's graph layers on top."""
    script = load_script("bench_step_speed")
    ds = make_coded_toy(tmp_path)
    counted = {}
    for name in ("sasrec", "mmsr"):
        subject = script.Subject(ds, name, {"dim": 16})
        n_users, n_items = len(subject.valid), subject.model.item_embeddings().shape[0]
        counted[name] = subject.valid_flops(batch_size=8)
        assert counted[name] >= 2 * n_users * n_items * 16  # the full-ranking score product
    assert counted["mmsr"] > 2 * len(subject.valid) * n_items * 16


def test_length_groups_bench_on_a_missing_dataset_is_a_one_line_error(tmp_path, monkeypatch):
    script = load_script("bench_length_groups")
    monkeypatch.setattr("sys.argv", ["bench_length_groups.py", "--workdir", str(tmp_path), "--dataset", "gone", "--models", "sasrec"])
    with pytest.raises(SystemExit) as e:
        script.main()
    message = str(e.value.code)
    assert message.startswith("bench_length_groups: error: ") and "gone" in message and "\n" not in message


@pytest.mark.slow  # the cuda tests, torchrun and two trainings in fresh processes
def test_gpu_check_cpu_dry_run_runs_every_step_and_prints_the_table(tmp_path):
    """scripts/gpu_check.sh --cpu-dry-run: the cuda tests on the CPU (MMSR_TEST_CUDA=cpu), a
    one-process torchrun (gloo), and the benchmark table from the two runs' histories."""
    import json
    import os
    import subprocess
    import sys

    script = SCRIPT.with_name("gpu_check.sh")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(script), "--cpu-dry-run", "--out", str(out)], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all steps passed" in r.stderr and "torchrun: ok" in r.stderr
    pytest_log = (out / "pytest.log").read_text()
    assert " passed" in pytest_log and "skipped" not in pytest_log and "failed" not in pytest_log
    bench = json.loads((out / "bench.json").read_text())
    assert bench["dataset"] == "synthetic" and bench["device"] == "cpu" and "CPU dry run" in bench["note"]
    assert [row["model"] for row in bench["rows"]] == ["mmsr", "sasrec"]
    for row in bench["rows"]:
        assert row["steps"] == 2 and row["peak_gpu_mib"] is None and 0 <= row["valid_ndcg@10"] <= 1
    table = (out / "bench.md").read_text().splitlines()
    assert table[0].startswith("dataset synthetic, device cpu (CPU dry run")
    assert [line.split("|")[1].strip() for line in table[4:]] == ["mmsr", "sasrec"]
    assert table[2] in r.stdout  # printed too
    bad = subprocess.run(["bash", str(script), "--gpu"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "gpu_check: error: unknown option --gpu (expected --cpu-dry-run, --skip-tests, --skip-bench, --out DIR)"]


def test_scale_log_is_a_5_core_log_of_beautys_size(tmp_path):
    """scripts/bench_scale.py: the generated log has Beauty's users and items times the scale,
    about its interactions, at least 5 interactions per user and per item (so `preprocess --core 5`
    keeps everything), and is not sorted by user."""
    import pyarrow.parquet as pq

    bench = load_script("bench_scale")
    counts = bench.generate_log(1, tmp_path)
    table = pq.read_table(tmp_path / "interactions.parquet")
    users, items = table.column("user").to_numpy(), table.column("item").to_numpy()
    assert counts == {"users": 22_363, "items": 12_101, "interactions": table.num_rows}
    assert abs(table.num_rows / bench.BEAUTY["interactions"] - 1) < 0.02
    assert len(np.unique(users)) == 22_363 and len(np.unique(items)) == 12_101
    assert np.bincount(users).min() >= 5 and np.bincount(items).min() >= 5
    assert np.any(np.diff(users) < 0)


def test_rank_breakdown_seen_successor_is_a_training_samples_last_item_and_target(tmp_path):
    """scripts/bench_rank_breakdown.py: a (last item, target) step counts as seen only where a
    training sample has that last history item and that target, not where the two merely meet in
    one training history."""
    import pyarrow as pa
    import pyarrow.parquet as pq


    class Samples:  # the one DatasetDir method the function reads
        def path(self, name):
            return tmp_path / name

    path = tmp_path / C.samples_file("train")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"history": [[1], [1, 2], [5, 3]], "target": [2, 3, 4]}), path)
    bench = load_script("bench_rank_breakdown")
    seen = bench.seen_successors(Samples(), np.array([1, 2, 3, 2, 1, 4]), np.array([2, 4, 4, 3, 3, 2]))
    assert seen.tolist() == [True, False, True, True, False, False]


def test_step_ab_imports_the_old_checkout_apart_and_it_computes_the_same_model(tmp_path):
    """scripts/bench_step_ab.py times an older checkout's model (MMSR by default) beside the current one in one
    process: the copy is a separate package (its classes, not the current ones, even through the
    relative imports between model files), and given the same weights it computes the same loss."""
    import sys

    from mmsr_cli.models.mmsr import MMSR
    from test_mmsr_model import SAMPLE_A, SAMPLE_B, collate, info, model

    script = load_script("bench_step_ab")
    try:
        script.copy_checkout(Path(__file__).resolve().parents[1], tmp_path)
        old_class = script.old_model_class("mmsr")
        assert old_class is not MMSR and old_class.__module__ == "mmsr_old.models.mmsr"
        # any registered model, although the registry names the current package's modules
        assert script.old_model_class("sasrecf").__module__ == "mmsr_old.models.sasrecf"
        assert sys.modules["mmsr_old.models.layers"].HANLayer is not sys.modules["mmsr_cli.models.layers"].HANLayer
        new = model()
        old = old_class(new.config, info()).eval()
        assert not any(isinstance(m, type(new.layers[0])) for m in old.modules())
        old.load_state_dict(new.state_dict())
        batch = collate([SAMPLE_A, SAMPLE_B])
        with torch.no_grad():
            torch.testing.assert_close(old(batch), new(batch), rtol=0, atol=0)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == "mmsr_old" or n.startswith("mmsr_old.")]:
            del sys.modules[name]


@pytest.mark.slow  # two trainings, two evaluations and the comparison in fresh processes
def test_tuned_table_trains_each_best_config_tests_it_and_compares_with_p_values(tmp_path):
    """scripts/bench_tuned.sh: every study's best config file trained with each seed and
    tested, then one --compare with the paired tests; run again, it trains nothing and compares
    the same runs; a study without its config file stops it before any training."""
    import json
    import os
    import subprocess
    import sys

    ds = make_coded_toy(tmp_path)
    tune = ds.path("tune")
    tune.mkdir()
    for study, model in (("base-cpu", "sasrec"), ("ours-cpu", "mmsr")):
        (tune / f"{study}.toml").write_text(
            f'dataset = "{ds.name}"\n\n[train]\nmodel = "{model}"\nepochs = 1\ndim = 8\nbatch-size = 64\n'
            'lr = 0.003\ndevice = "cpu"\n')
    script = SCRIPT.with_name("bench_tuned.sh")
    env = {**os.environ, "MMSR": f"{sys.executable} -m mmsr_cli", "JOBS": "1",
           "PYTHONPATH": f"{SCRIPT.parents[1]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = ["bash", str(script), str(ds.workdir), ds.name, "base-cpu ours-cpu", "3"]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = ds.path(C.RUNS_DIR)
    for study, model in (("base-cpu", "sasrec"), ("ours-cpu", "mmsr")):
        run = runs / f"{study}-tuned-s3"
        config = json.loads((run / "config.json").read_text())
        assert config["train"]["seed"] == 3 and config["model"]["model"] == model and config["model"]["dim"] == 8
        assert json.loads((run / "metrics_test.json").read_text())["n"] > 0
    compared = ds.path("logs/tuned-compare.txt").read_text()
    assert r.stdout.endswith(compared)  # printed and kept
    paired = compared.split("paired tests (p-values)")[1]
    rows = [line.split("│")[1:4] for line in paired.splitlines() if line.startswith("│")]
    assert [(a.split()[0], b.split()[0], metric.strip()) for a, b, metric in rows] == [
        ("mmsr", "sasrec", f"{m}@{k}") for m in ("hr", "mrr", "ndcg") for k in (5, 10, 20)]
    stamp = (runs / "base-cpu-tuned-s3" / "best.pt").stat().st_mtime_ns
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "tuned: base-cpu-tuned-s3 already tested" in again.stdout and "tuned: ours-cpu-tuned-s3 already tested" in again.stdout
    assert (runs / "base-cpu-tuned-s3" / "best.pt").stat().st_mtime_ns == stamp
    assert ds.path("logs/tuned-compare.txt").read_text() == compared
    missing = subprocess.run(["bash", str(script), str(ds.workdir), ds.name, "base-cpu other-cpu"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"tuned: no {ds.path('tune/other-cpu.toml')}; run bench_tune.sh first"]


def test_results_archive_carries_studies_and_tested_runs_to_a_new_workdir(tmp_path):
    """scripts/bench_results_archive.py: save copies the study database and the tested runs'
    result files (no checkpoints); restore puts them into a workdir that lacks them and never
    overwrites a run folder or study file that is there."""
    import sqlite3

    script = load_script("bench_results_archive")
    old = tmp_path / "old" / "ds"
    (old / "tune").mkdir(parents=True)
    with sqlite3.connect(old / "tune" / "studies.sqlite3") as db:
        db.execute("create table trials (number int, value real)")
        db.executemany("insert into trials values (?, ?)", [(0, 0.05), (1, 0.06)])
    db.close()
    for run, tested in (("m-tuned-s0", True), ("m-tuned-s1", False), ("tune-m-t000", True)):
        folder = old / "runs" / run
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(f'{{"run": "{run}"}}')
        (folder / "best.pt").write_bytes(b"checkpoint")
        if tested:
            (folder / "metrics_test.json").write_text('{"ndcg@10": 0.05}')
            np.save(folder / "ranks_test.npy", np.arange(5))
    dest = tmp_path / "archive"
    script.save(old, dest, ["*-tuned-s*"])

    new = tmp_path / "new" / "ds"
    (new / "runs" / "m-tuned-s0").mkdir(parents=True)  # already there: kept as it is
    script.restore(new, dest)
    with sqlite3.connect(new / "tune" / "studies.sqlite3") as db:
        assert db.execute("select number, value from trials order by number").fetchall() == [(0, 0.05), (1, 0.06)]
    db.close()
    assert sorted(p.name for p in (new / "runs").iterdir()) == ["m-tuned-s0"]
    assert list((new / "runs" / "m-tuned-s0").iterdir()) == []

    fresh = tmp_path / "fresh" / "ds"
    fresh.mkdir(parents=True)
    script.restore(fresh, dest)
    run = fresh / "runs" / "m-tuned-s0"  # only the tested tuned run, without its checkpoint
    assert sorted(p.name for p in (fresh / "runs").iterdir()) == ["m-tuned-s0"]
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics_test.json", "ranks_test.npy"]
    assert np.load(run / "ranks_test.npy").tolist() == [0, 1, 2, 3, 4]
    assert not [p for p in fresh.rglob(".*")]  # no temporary left behind
