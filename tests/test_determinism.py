"""Same inputs and seed, same outputs: the whole pipeline twice, in two fresh workdirs, on CPU.

Data stages (download, preprocess, extract-features, build-codes, build-graphs) must give
byte-identical Parquet, ``.pt`` and JSON files. Manifests are compared without their
creation time and timings (``created``, ``*seconds``), which differ by design; their output hashes
and fingerprints are equal. `train` + `evaluate` must give identical weights, optimizer state,
validation history and test metrics; `best.pt` is byte-identical too. (GPU runs are not covered:
see README, "Determinism".)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmsr_cli import contracts as C

from conftest import run_cli
from test_features import tiny_t5  # noqa: F401  (fixture: a tiny random T5 text encoder)
from conftest import assert_same
from test_interruption import IMAGE_FEATURES, checkpoint_state, data_files, manifest_core

pytestmark = pytest.mark.slow  # the synthetic pipeline twice, compared byte for byte

TRAIN = ["--model", "mmsr", "--epochs", "2", "--dim", "16", "--batch-size", "128", "--max-steps", "3",
         "--patience", "0", "--device", "cpu", "--seed", "7"]
RUN = "mmsr-loo-s7"


def mmsr(work: Path, command: str, *args) -> None:
    r = run_cli([command, "--workdir", str(work), "--dataset", "synthetic", *map(str, args)])
    assert r.exit_code == 0, r.stderr


def run_pipeline(work: Path, text_model: Path) -> Path:
    mmsr(work, "download")
    mmsr(work, "preprocess", "--max-len", "20")
    mmsr(work, "extract-features", *IMAGE_FEATURES)
    mmsr(work, "extract-features", "--modality", "text", "--name", "title", "--model", text_model,
         "--fields", "title", "--chunk-size", "100")
    mmsr(work, "build-codes", "--clusters", "6", "--top-k", "2", "--epochs", "15", "--seed", "3")
    mmsr(work, "build-graphs")
    mmsr(work, "train", *TRAIN)
    mmsr(work, "evaluate", "--run", RUN, "--split", "test", "--device", "cpu")
    return work / "synthetic"


@pytest.fixture(scope="module")
def twice(tmp_path_factory, tiny_t5) -> tuple[Path, Path]:  # noqa: F811
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tuple(run_pipeline(tmp_path_factory.mktemp(name), tiny_t5) for name in ("first", "second"))
    finally:
        torch.set_num_threads(threads)


def test_data_stages_give_byte_identical_files(twice):
    a, b = twice
    files_a = {k: v for k, v in data_files(a).items() if not k.startswith(C.RUNS_DIR + "/")}
    files_b = {k: v for k, v in data_files(b).items() if not k.startswith(C.RUNS_DIR + "/")}
    assert files_a.keys() == files_b.keys()
    assert [k for k in files_a if files_a[k] != files_b[k]] == []
    kinds = {Path(k).suffix for k in files_a}
    assert {".parquet", ".pt", ".json", ".png", ".tsv"} <= kinds
    assert [k for k in files_a if k.startswith(C.GRAPHS_DIR)] == [f"{C.GRAPHS_DIR}/codes/meta.json"]

    stages = sorted(p.stem.replace("__", ":") for p in (a / C.MANIFESTS_DIR).glob("*.json"))
    assert stages == ["codes:image", "codes:title", "download", "features:image", "features:title",
                      "graphs:codes", "preprocess"]
    for stage in stages:
        assert manifest_core(a, stage) == manifest_core(b, stage), stage


def test_train_and_evaluate_give_identical_weights_and_metrics(twice):
    a, b = twice
    run_a, run_b = a / C.RUNS_DIR / RUN, b / C.RUNS_DIR / RUN
    assert_same(checkpoint_state(run_a), checkpoint_state(run_b))
    assert (run_a / "best.pt").read_bytes() == (run_b / "best.pt").read_bytes()
    metrics = [json.loads((r / "metrics_test.json").read_text()) for r in (run_a, run_b)]
    assert metrics[0]["metrics"] == metrics[1]["metrics"] and metrics[0]["n"] == metrics[1]["n"] == 1000


def test_another_seed_gives_another_run(twice):
    """The comparisons above can fail: a different training seed changes weights and metrics."""
    a, _ = twice
    mmsr(a.parent, "train", *TRAIN[:-1], "8")
    seven = checkpoint_state(a / C.RUNS_DIR / RUN)
    eight = checkpoint_state(a / C.RUNS_DIR / "mmsr-loo-s8")
    assert seven["model"].keys() == eight["model"].keys()
    assert not all(torch.equal(seven["model"][k], eight["model"][k]) for k in seven["model"])
    assert seven["history"] != eight["history"]
