"""`mmsr recommend`: latest histories, --exclude-seen, outputs, errors; graph batches for histories."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mmsr_cli import contracts as C
from mmsr_cli.graphs import GraphSplit
from mmsr_cli.inputs import GraphInput
from mmsr_cli.models.base import DatasetInfo
from mmsr_cli.recommend import RECS_SCHEMA, write_stdout
from mmsr_cli.workdir import DatasetDir

from conftest import run_cli, one_error_line
from test_training import N_TOY_ITEMS, make_toy


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> DatasetDir:
    """The toy chains with a SASRec that has learned them (valid HR@1 close to 1)."""
    ds = make_toy(tmp_path_factory.mktemp("work"))
    r = run_cli(
        ["train", "--workdir", ds.workdir, "--dataset", ds.name, "--model", "sasrec", "--run-name", "s",
         "--epochs", "8", "--lr", "0.01", "--dim", "32", "--batch-size", "64", "--dropout", "0.1"]
    )
    assert r.exit_code == 0, r.stderr
    return ds


def recommend(cli, ds: DatasetDir, *args):
    return cli(["recommend", "--workdir", ds.workdir, "--dataset", ds.name, "--run", "s", *args])


def sequences(ds: DatasetDir) -> dict[str, list[str]]:
    """Each user's full item-id sequence, oldest first."""
    raw = ds.path(C.RAW_SEQUENCES).read_text().splitlines()[1:]
    return {u: items.split() for u, items in (line.split("\t") for line in raw)}


def test_recommends_the_next_item_of_the_latest_history(cli, trained):
    r = recommend(cli, trained, "--all-users", "--top-k", "1", "--format", "jsonl")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    seqs = sequences(trained)
    assert len(rows) == len(seqs)
    # The chain continues after the user's LAST item (the test item included, not the train prefix).
    nxt = {u: f"i{(int(items[-1][1:]) + 1) % N_TOY_ITEMS}" for u, items in seqs.items()}
    hits = np.mean([row["item_id"] == nxt[row["user_id"]] for row in rows])
    assert hits >= 0.9
    assert rows[0]["title"] == f"Item number {rows[0]['item_id'][1:]}"


def test_exclude_seen_and_parquet_output(cli, trained, tmp_path):
    users = ["u3", "u10", "u0"]
    out = tmp_path / "recs.parquet"
    r = recommend(cli, trained, "--users", ",".join(users), "--top-k", "12", "--exclude-seen", "--output", out)
    assert r.exit_code == 0, r.stderr
    table = pq.read_table(out)
    assert table.schema.equals(RECS_SCHEMA)
    seqs = sequences(trained)
    for u in users:
        mine = [row for row in table.to_pylist() if row["user_id"] == u]
        assert [row["rank"] for row in mine] == list(range(1, len(mine) + 1))
        assert len(mine) == min(12, N_TOY_ITEMS - len(set(seqs[u])))
        assert not set(row["item_id"] for row in mine) & set(seqs[u])  # seen items absent
        scores = [row["score"] for row in mine]
        assert scores == sorted(scores, reverse=True)
    assert list(dict.fromkeys(table.column("user_id").to_pylist())) == users  # request order
    # Without --exclude-seen the full catalogue is ranked, seen items included.
    r = recommend(cli, trained, "--users", "u3", "--top-k", str(N_TOY_ITEMS))
    lines = r.stdout.splitlines()
    assert lines[0] == "user_id\trank\titem_id\tscore\ttitle" and len(lines) == 1 + N_TOY_ITEMS


def test_exclude_seen_over_several_batches(cli, trained):
    """60 users in batches of 16 (the run's training batch size; the last batch holds 12): every
    user's list is exactly the items they have not seen, whatever batch they fall in."""
    from mmsr_cli.recommend import RecommendOptions, recommend as recommend_lib
    from mmsr_cli.runs import load_run

    base = ["--workdir", trained.workdir, "--dataset", trained.name]
    r = cli(["train", *base, "--model", "pop", "--run-name", "pop16", "--batch-size", "16", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    r = cli(["recommend", *base, "--run", "pop16", "--all-users", "--top-k", str(N_TOY_ITEMS), "--exclude-seen",
             "--format", "jsonl", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    seqs = sequences(trained)
    assert list(dict.fromkeys(row["user_id"] for row in rows)) == list(seqs)  # users in their index order
    catalogue = {f"i{i}" for i in range(N_TOY_ITEMS)}
    for user, items in seqs.items():
        mine = [row for row in rows if row["user_id"] == user]
        assert {row["item_id"] for row in mine} == catalogue - set(items), user
        assert [row["rank"] for row in mine] == list(range(1, len(mine) + 1)), user
        assert [row["score"] for row in mine] == sorted((row["score"] for row in mine), reverse=True), user
    # The trained SASRec in batches of 7 (9 batches, the last of 4) gives the one-batch table.
    loaded = load_run(trained, "s", "best", torch.device("cpu"))
    tables = [recommend_lib(trained, loaded, RecommendOptions(all_users=True, top_k=N_TOY_ITEMS, exclude_seen=True,
                                                              batch_size=b), torch.device("cpu")) for b in (7, 512)]
    assert tables[0].equals(tables[1])
    assert tables[0].num_rows == sum(N_TOY_ITEMS - len(set(items)) for items in seqs.values())


def test_bad_inputs_keep_earlier_output(cli, trained, tmp_path):
    out = tmp_path / "recs.parquet"
    assert recommend(cli, trained, "--users", "u1", "--output", out).exit_code == 0
    before = out.read_bytes()
    r = recommend(cli, trained, "--users", "u1,nobody", "--output", out)
    assert "--users: unknown user 'nobody'" in one_error_line(r)
    assert out.read_bytes() == before
    assert "exactly one of --users" in one_error_line(recommend(cli, trained, "--users", "u1", "--all-users"))
    assert "exactly one of --users" in one_error_line(recommend(cli, trained))
    assert "--top-k: must be an integer in 1..1000, got 0" in one_error_line(recommend(cli, trained, "--all-users", "--top-k", "0"))
    r = cli(["recommend", "--workdir", trained.workdir, "--dataset", trained.name, "--run", "missing", "--all-users"])
    assert "no such run" in one_error_line(r)


def test_tsv_output_flattens_titles():
    import pyarrow as pa

    table = pa.table(
        {"user_id": ["u"], "rank": [1], "item_id": ["a"], "title": ["two\tcolumns\nand lines"], "score": [1.5]},
        schema=RECS_SCHEMA,
    )
    buf = io.StringIO()
    write_stdout(table, "tsv", buf)
    assert buf.getvalue().splitlines()[1] == "u\t1\ta\t1.5\ttwo columns and lines"


@pytest.fixture(scope="module")
def graphs(trained) -> DatasetDir:
    """Item-only MSGraphs of the toy data (no modality codes)."""
    r = run_cli(["build-graphs", "--workdir", trained.workdir, "--dataset", trained.name])
    assert r.exit_code == 0, r.stderr
    return trained


def test_graph_history_batches_match_stored_graphs(graphs):
    """recommend builds MSGraphs for arbitrary histories exactly like build-graphs stores them."""
    trained = graphs
    stored = GraphSplit.open(trained, "test")
    samples = pq.read_table(trained.path(C.samples_file("test")))
    history = samples.column("history").combine_chunks()
    flat = history.values.to_numpy().astype(np.int64)
    ptr = history.offsets.to_numpy().astype(np.int64)
    info = DatasetInfo(n_items=N_TOY_ITEMS, n_users=60, max_len=8)
    rows = np.array([5, 0, 17, 3], dtype=np.int64)
    (batch_rows, built), = list(GraphInput().history_batches(info, flat, ptr, rows, batch_size=64))
    expected = stored.collate(rows)
    assert batch_rows.tolist() == rows.tolist()
    for key in expected:
        if key not in ("target", "user_idx"):
            assert torch.equal(built[key], expected[key]), key


def test_mmsr_trains_evaluates_and_recommends_through_the_harness(cli, graphs):
    ds = graphs
    base = ["--workdir", ds.workdir, "--dataset", ds.name]
    r = cli(["train", *base, "--model", "mmsr", "--run-name", "g", "--epochs", "1", "--max-steps", "2",
             "--dim", "8", "--layers", "1", "--batch-size", "64"])
    assert r.exit_code == 0, r.stderr
    config = json.loads(ds.path("runs/g/config.json").read_text())
    assert set(config["fingerprints"]) == {"preprocess", "graphs:codes"}
    assert json.loads(ds.path("runs/g/history.json").read_text())[0]["steps"] == 2
    assert cli(["evaluate", *base, "--run", "g", "--split", "valid"]).exit_code == 0
    r = cli(["recommend", *base, "--run", "g", "--users", "u4,u9", "--top-k", "5", "--exclude-seen", "--format", "jsonl"])
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    seqs = sequences(ds)
    assert len(rows) == 10 and all(row["item_id"] not in seqs[row["user_id"]] for row in rows)
